"""The run folder's life: checkpoints written whole, resume and its fallback, the settings a resume may change, the
run lock, TensorBoard after a resume, and the checks of a run's settings before anything is written."""
