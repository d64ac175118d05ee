"""Writes ``temporal_pyramid_reference.pt``: outputs of the temporal pyramid for fixed seeds.

Run once on the code before the spatial factors existed (commit d673ea0); ``tests/method/test_spatiotemporal.py``
checks that the pyramid with every spatial factor 1 (or unset) still gives these tensors bit for bit.
    python tests/reference/make_temporal_pyramid_reference.py
"""

from pathlib import Path

import torch

from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.method.sampling import sample

CASES = {
    "flow": dict(schedule="flow", num_frames=16, reductions=(2, 2)),
    "flow-global-4-2": dict(schedule="flow", num_frames=16, reductions=(4, 2), flow_velocity="global"),
    "ddim-anchored": dict(schedule="ddim", num_frames=17, reductions=(2, 2), anchor_first_frame=True),
    "flow-anchored-4-2": dict(schedule="flow", num_frames=17, reductions=(4, 2), anchor_first_frame=True),
}


def toy_model(x, t, stage):
    """A fixed nonlinear function of x, t and the stage, so the sampler's arithmetic is exercised."""
    return torch.tanh(x) * (0.5 + t.reshape(-1, 1, 1, 1, 1)) + 0.1 * stage.stride


def reference_outputs(kwargs: dict, **extra) -> dict[str, torch.Tensor]:
    p = TemporalPyramid(num_stages=3, **kwargs, **extra)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, p.num_frames, 4, 4, generator=g, dtype=torch.float64)
    out = {"windows": torch.tensor([[s.t_start, s.t_end] for s in p.stages], dtype=torch.float64)}
    for i in range(3):
        noise = torch.randn(p.stage_shape(x0, i), generator=g, dtype=torch.float64)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        out[f"x_t{i}"], out[f"t{i}"], out[f"target{i}"] = p.interpolate(x0, noise, i, u)
        if i < 2:
            x_end = p.endpoints(x0, noise, i)[1]
            out[f"renoise{i}"] = p.renoise(x_end, i, generator=torch.Generator().manual_seed(i))
    out["sample"] = sample(toy_model, p, 2, (3, 4, 4), 6, torch.Generator().manual_seed(5), dtype=torch.float64)
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("temporal_pyramid_reference.pt")
    torch.save({name: reference_outputs(kwargs) for name, kwargs in CASES.items()}, path)
    print(f"wrote {path}")
