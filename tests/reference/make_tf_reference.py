"""Write ``tf_reference.npz``: values TensorFlow itself computes for the two TensorFlow steps of the original FVD.

The original FVD (the paper's TensorFlow code) resizes frames with ``tf.image.resize_bilinear`` (TF1, no
half-pixel centres), scales them by ``2 x / 255 - 1``, and takes the distance with TF-GAN's
``frechet_classifier_distance_from_activations``. ``tests/metrics/test_tf_reference.py`` checks ours against the
stored results; this script only runs where TensorFlow is installed, which the project does not need:

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tensorflow-probability tf-keras
    /tmp/tfenv/bin/pip install --no-deps tensorflow-gan
    /tmp/tfenv/bin/python tests/reference/make_tf_reference.py

Inputs are drawn from ``numpy.random.RandomState`` (a stream NumPy keeps fixed), so the test regenerates
them instead of storing them; see ``reference_inputs.py``. Of the resized frames every third row and
column and the last two are stored, which keeps the file small and still covers every interpolation
phase and the clamped border. TF-GAN's package ``__init__`` needs the
removed ``tf.estimator``, so its ``eval`` modules are loaded without it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reference_inputs import FRECHET_CASES, RESIZE_CASES, STORED_ROWS, activations, frames  # noqa: E402


def tfgan_classifier_metrics() -> types.ModuleType:
    """``tensorflow_gan.python.eval.classifier_metrics`` without running the package's ``__init__``."""
    root = Path(importlib.util.find_spec("tensorflow_gan").origin).parent
    for name, path in [("tensorflow_gan", root), ("tensorflow_gan.python", root / "python"),
                       ("tensorflow_gan.python.eval", root / "python" / "eval")]:
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    from tensorflow_gan.python.eval import classifier_metrics
    return classifier_metrics


def original_fvd_preprocess(videos: np.ndarray) -> np.ndarray:
    """The original FVD's ``preprocess``: frames ``(N, H, W, 3)`` uint8 to 224x224 in [-1, 1], float32."""
    resized = tf.compat.v1.image.resize_bilinear(tf.constant(videos), size=(224, 224))
    return (2.0 * tf.cast(resized, tf.float32) / 255.0 - 1).numpy()


def main() -> None:
    metrics = tfgan_classifier_metrics()
    out: dict[str, np.ndarray] = {}
    for name, (shape, seed) in RESIZE_CASES.items():
        out[f"resize_{name}"] = original_fvd_preprocess(frames(shape, seed))[:, STORED_ROWS][:, :, STORED_ROWS]
    for name, case in FRECHET_CASES.items():
        real, fake = activations(**case)
        out[f"frechet_{name}"] = np.asarray(
            metrics.frechet_classifier_distance_from_activations(tf.constant(real), tf.constant(fake)).numpy())
    out["tensorflow_version"] = np.asarray(tf.__version__)
    path = HERE / "tf_reference.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) with TensorFlow {tf.__version__}:")
    for key, value in out.items():
        print(f"  {key}: {value.shape if value.ndim else value}")


if __name__ == "__main__":
    main()
