"""Lightning callbacks: checkpoints, preemption, the progress bar, clip accounting, the divergence guard, the FVD curve,
sample logging, throughput and the prediction writer."""
