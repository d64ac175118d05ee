"""Shared fixtures: real configs shrunk to CPU size, and one tiny synthetic dataset per session."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULT = CONFIGS / "default.yaml"
OVERLAYS = sorted(p for p in CONFIGS.rglob("*.yaml") if p != DEFAULT)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (-n auto): each, and every process it starts, computes on one thread, so workers never
    # fight over a core (tiny models on an oversubscribed CPU run many times slower).
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    import torch

    torch.set_num_threads(1)

TINY_DATA = dict(num_frames=16, resolution=16, synthetic_num_train=24, synthetic_num_eval=8)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a shared CPU two threads can be many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_shards(tmp_path_factory, num_frames: int, paths: str = "anywhere") -> Path:
    from tpdiff_lightning.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp(f"synthetic{num_frames}-{paths}")
    write_synthetic_shards(root, num_train=TINY_DATA["synthetic_num_train"], num_eval=TINY_DATA["synthetic_num_eval"],
                           num_frames=num_frames, size=TINY_DATA["resolution"], seed=0, progress=False, paths=paths)
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A synthetic shard folder shared by the end-to-end tests, built as the default config builds its data
    (``synthetic_paths: centred``: every path crosses the frame's centre), so no run of it rebuilds the folder."""
    return _tiny_shards(tmp_path_factory, TINY_DATA["num_frames"], "centred")


@pytest.fixture(scope="session")
def tiny_data_root_anywhere(tmp_path_factory) -> Path:
    """Synthetic shards whose paths lie anywhere in frame (``synthetic_paths: anywhere``, the builder's default)."""
    return _tiny_shards(tmp_path_factory, TINY_DATA["num_frames"], "anywhere")


@pytest.fixture(scope="session")
def tiny_data_root_17(tmp_path_factory) -> Path:
    """Synthetic shards of 17-frame clips (1 + 4k frames, as causal video VAEs such as Wan's take)."""
    return _tiny_shards(tmp_path_factory, 17)


def config_chain(path: Path) -> list[Path]:
    """The ``--config`` files of a config's usage line (its first line naming ``lightning_cli.py``), in order."""
    for line in path.read_text().splitlines():
        if "lightning_cli.py" in line:
            names = re.findall(r"--config\s+(\S+)", line)
            if names:
                return [ROOT / name for name in names]
    raise ValueError(f"{path} has no usage line `python lightning_cli.py ... --config {path.relative_to(ROOT)}`")


def callbacks_without_fvd() -> list[dict]:
    """The default config's callbacks without the FVD curve, whose I3D runs are tested on their own."""
    callbacks = yaml.safe_load(DEFAULT.read_text())["trainer"]["callbacks"]
    return [cb for cb in callbacks if not cb["class_path"].endswith("FVDCurve")]


# Interval and count settings of the shipped callbacks, shrunk so each fires within a 2-step run. Only sizes move:
# the callbacks themselves, and every other setting of theirs, stay as the config has them.
CALLBACK_SIZES = {
    "ModelCheckpoint": {"every_n_train_steps": 1},
    "LinkedLastCheckpoint": {"every_n_train_steps": 1},
    "ClipThroughput": {"every_n_batches": 1},
    "SampleVideoLogger": {"every_n_steps": 2, "prompts": ["a red square moving right fast"]},  # one prompt
    "FVDCurve": {"num_videos": 2, "every_n_steps": 2, "num_steps": 5},  # 5: at least one step per stage
}


_FVD_CACHE: list[Path] = []


def fvd_cache_dir() -> Path:
    """One FVD real-statistics cache per test process: its key names the eval shards, N, the clip shape and the
    feature extractor, so the configs that share those compute the real clips' I3D features once."""
    if not _FVD_CACHE:
        import tempfile

        _FVD_CACHE.append(Path(tempfile.mkdtemp(prefix="tpdiff-test-fvd-cache-")))
    return _FVD_CACHE[0]


def config_callbacks(chain: list[Path], out_dir: Path, data_root: Path) -> list[dict]:
    """The callbacks of a config chain (the last file that lists them), as written but for their sizes; the FVD
    curve reads its real clips from ``data_root`` and caches them in the process's ``fvd_cache_dir``."""
    callbacks: list[dict] = []
    for path in chain:
        listed = ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("callbacks")
        if listed is not None:
            callbacks = listed
    shrunk = []
    for cb in callbacks:
        name = cb["class_path"].rsplit(".", 1)[-1]
        init_args = {**(cb.get("init_args") or {}), **CALLBACK_SIZES.get(name, {})}
        if name == "FVDCurve":
            init_args.update(eval_root=str(data_root), cache_dir=str(fvd_cache_dir()))
        shrunk.append({"class_path": cb["class_path"], "init_args": init_args})
    return shrunk


def shrink_args(out_dir: Path, data_root: Path, max_steps: int = 2, steps_per_epoch: int = 2,
                callbacks: list[dict] | None = None) -> list[str]:
    """Command-line overrides that shrink any config in ``configs/`` to a seconds-long CPU run."""
    callbacks = callbacks_without_fvd() if callbacks is None else callbacks
    return [
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        f"--data.init_args.root={data_root}",
        f"--data.init_args.num_frames={TINY_DATA['num_frames']}",
        f"--data.init_args.resolution={TINY_DATA['resolution']}",
        f"--data.init_args.synthetic_num_train={TINY_DATA['synthetic_num_train']}",
        f"--data.init_args.synthetic_num_eval={TINY_DATA['synthetic_num_eval']}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        f"--data.init_args.train_steps_per_epoch={steps_per_epoch}",
        "--data.init_args.predict_prompts=[a red square moving right fast]",
        "--model.init_args.sampling.steps=5",
        "--model.init_args.optimization.warmup_steps=1",
    ]


def write_overlay(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
