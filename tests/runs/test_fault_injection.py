"""Fault injection at CPU size: kills and full disks during checkpoint writes, resumes from damaged run folders,
TensorBoard after a resume, divergence, damaged shards and bad settings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import DEFAULT, ROOT, shrink_args
from tpdiff_lightning.cli.main import command_line, main

CHECKPOINT_EVERY_2 = [
    {"class_path": "tpdiff_lightning.callbacks.checkpoint.LinkedLastCheckpoint",
     "init_args": {"every_n_train_steps": 2, "save_top_k": -1}},
]


def _run_dir(out: Path) -> Path:
    return out / "synthetic" / "tpdiff-flow"


def _fit(out: Path, data_root: Path, max_steps: int, *extra: str, callbacks=None):
    return main(["fit", "--config", str(DEFAULT),
                 *shrink_args(out, data_root, max_steps=max_steps, steps_per_epoch=50,
                              callbacks=CHECKPOINT_EVERY_2 if callbacks is None else callbacks), *extra])


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _folder_state(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _tear(path: Path, keep: float = 0.5) -> None:
    """Replace ``path`` by a file holding the first part of its bytes, as a crash mid-copy leaves it."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: int(len(data) * keep)])


# --- 1. Checkpoint writes under kills and full disks -----------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from tpdiff_lightning.cli.main import command_line, main
    cli = main(["--config", sys.argv[1], "--trainer.logger.init_args.save_dir", sys.argv[2],
                "--data.init_args.root", sys.argv[3]], run=False)
    io, path = cli.trainer.strategy.checkpoint_io, sys.argv[4]
    big = torch.arange(25_000_000, dtype=torch.float32)  # 100 MB: a write that takes a while
    step = 0
    io.save_checkpoint({"global_step": step, "state_dict": {"w": big}}, path)
    print("saved", flush=True)
    while True:
        step += 1
        io.save_checkpoint({"global_step": step, "state_dict": {"w": big}}, path)
""")


@pytest.fixture
def tmpdir_elsewhere(tmp_path):
    """A TMPDIR on another filesystem than the outputs (tmpfs ``/dev/shm`` against the test's disk folder)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem for TMPDIR")
    folder = shm / f"tpdiff-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    yield folder
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


@pytest.mark.slow
def test_kill_during_checkpoint_write_with_tmpdir_on_another_filesystem(tmp_path, tiny_data_root, tmpdir_elsewhere):
    """SIGKILL while a checkpoint file is partly written: last.ckpt stays whole, no temp file survives."""
    folder = tmp_path / "out" / "checkpoints"
    folder.mkdir(parents=True)
    target = folder / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(tmpdir_elsewhere)}
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(DEFAULT), str(tmp_path / "out"),
                                 str(tiny_data_root), str(target)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert proc.stdout.readline().strip() == b"saved"
            whole = target.stat().st_size
            deadline = time.time() + 60
            while time.time() < deadline:
                partial = [e for e in os.scandir(folder) if e.is_file(follow_symlinks=False)
                           and 0 < e.stat().st_size < whole]
                if partial:
                    os.killpg(proc.pid, signal.SIGKILL)
                    kills += 1
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert torch.load(target, map_location="cpu", weights_only=False)["state_dict"]["w"].numel() == 25_000_000
    assert kills == 3
    # The next save (here: a new process's first one) removes what the killed writers left.
    cli = main(["--config", str(DEFAULT), f"--trainer.logger.init_args.save_dir={tmp_path / 'out'}",
                f"--data.init_args.root={tiny_data_root}"], run=False)
    cli.trainer.strategy.checkpoint_io.save_checkpoint({"global_step": 9, "state_dict": {}}, target)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert list(tmpdir_elsewhere.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs mounted in the test folder: a disk that fills up (needs the right to mount)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _cli_checkpoint_io(tmp_path, data_root):
    cli = main(["--config", str(DEFAULT), f"--trainer.logger.init_args.save_dir={tmp_path / 'out'}",
                f"--data.init_args.root={data_root}"], run=False)
    return cli.trainer.strategy.checkpoint_io


def test_full_disk_mid_write_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, tiny_data_root, small_disk,
                                                                             tmpdir_elsewhere, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmpdir_elsewhere))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    io = _cli_checkpoint_io(tmp_path, tiny_data_root)
    target = small_disk / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.zeros(500_000)}}, target)  # 2 MB
    from tpdiff_lightning.runs.checkpoint_io import DiskFullError

    with pytest.raises(DiskFullError, match=f"no space left on the disk holding {small_disk} while writing the "
                                            r"checkpoint last\.ckpt .*the previous checkpoint is kept"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(2_000_000)}}, target)  # 8 MB
    assert _step(target) == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.ckpt"]
    assert list(tmpdir_elsewhere.iterdir()) == []


def test_last_checkpoint_is_a_link_to_the_step_checkpoint_not_a_second_copy(tmp_path, tiny_data_root, one_thread):
    out = tmp_path / "out"
    _fit(out, tiny_data_root, max_steps=4)
    folder = _run_dir(out) / "checkpoints"
    last = folder / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=4.ckpt"
    assert _step(last) == 4
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]


def test_last_link_is_replaced_without_a_moment_when_it_is_missing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tpdiff_lightning.callbacks.checkpoint import LinkedLastCheckpoint

    older, newer, last = tmp_path / "epoch=0-step=2.ckpt", tmp_path / "epoch=0-step=4.ckpt", tmp_path / "last.ckpt"
    older.write_bytes(b"2")
    newer.write_bytes(b"4")
    os.symlink(older.name, last)
    present = []
    real_symlink = os.symlink

    def watched_symlink(src, dst, *args, **kwargs):  # is last.ckpt there while the new link is made?
        present.append(last.is_symlink())
        return real_symlink(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", watched_symlink)
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    LinkedLastCheckpoint._link_checkpoint(trainer, str(newer), str(last))
    assert present == [True]
    assert os.readlink(last) == newer.name and last.read_bytes() == b"4"
    assert sorted(p.name for p in tmp_path.iterdir()) == [older.name, newer.name, "last.ckpt"]


def test_shipped_configs_write_last_checkpoint_as_a_link():
    import yaml

    from tests.conftest import CONFIGS

    for path in CONFIGS.glob("*.yaml"):
        for callback in (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks") or []:
            if "Checkpoint" in callback["class_path"]:
                assert callback["class_path"] == "tpdiff_lightning.callbacks.checkpoint.LinkedLastCheckpoint", path
                assert callback["init_args"]["save_last"] == "link", path


# --- 2. Resume from the newest checkpoint that loads -----------------------------------------------------------

@pytest.fixture
def run_with_checkpoints(tmp_path, tiny_data_root, one_thread):
    """A run trained 4 steps: epoch=0-step=2.ckpt, epoch=0-step=4.ckpt and last.ckpt."""
    out = tmp_path / "out"
    _fit(out, tiny_data_root, max_steps=4)
    return out, _run_dir(out) / "checkpoints"


@pytest.mark.parametrize("damage", ["missing", "torn", "empty"])
def test_resume_last_falls_back_to_the_newest_step_checkpoint(run_with_checkpoints, tiny_data_root, damage):
    out, folder = run_with_checkpoints
    last = folder / "last.ckpt"
    last.unlink()
    if damage == "torn":
        last.write_bytes((folder / "epoch=0-step=4.ckpt").read_bytes()[:1_000_000])
    elif damage == "empty":
        last.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"last\.ckpt (is missing|is unreadable|is empty).*resuming from .*"
                                         r"epoch=0-step=4\.ckpt \(global step 4\)"):
        cli = _fit(out, tiny_data_root, 6, "--ckpt_path", "last")
    assert cli.trainer.global_step == 6
    assert int(cli.model.ema.num_updates) == 6  # continued from 4, not restarted


def test_resume_last_skips_torn_step_checkpoints_and_names_them(run_with_checkpoints, tiny_data_root):
    out, folder = run_with_checkpoints
    _tear(folder / "epoch=0-step=4.ckpt")  # last.ckpt links to it
    with pytest.warns(UserWarning, match=r"epoch=0-step=4\.ckpt is unreadable.*resuming from .*epoch=0-step=2\.ckpt"):
        cli = _fit(out, tiny_data_root, 3, "--ckpt_path", "last")
    assert cli.trainer.global_step == 3


def test_resume_last_with_no_loadable_checkpoint_is_one_clear_error(run_with_checkpoints, tiny_data_root, capsys):
    out, folder = run_with_checkpoints
    for name in ("epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"):
        _tear(folder / name)
    capsys.readouterr()
    args = shrink_args(out, tiny_data_root, max_steps=6, callbacks=CHECKPOINT_EVERY_2)
    with pytest.raises(SystemExit) as exit_info:
        command_line(["fit", "--config", str(DEFAULT), *args, "--ckpt_path", "last"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "no checkpoint of this run loads" in line and "epoch=0-step=2.ckpt is unreadable" in line
    assert "epoch=0-step=4.ckpt is unreadable" in line


def test_an_explicit_torn_checkpoint_is_named_in_one_line(run_with_checkpoints, tiny_data_root, capsys):
    out, folder = run_with_checkpoints
    torn = folder / "epoch=0-step=2.ckpt"
    _tear(torn)
    before = _folder_state(out)
    line = _command_line_error(capsys, ["validate", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root),
                                        "--ckpt_path", str(torn)])
    assert f"ckpt_path={torn} is unreadable (" in line, line
    assert _folder_state(out) == before


def _last_target(folder: Path) -> str:
    return os.readlink(folder / "last.ckpt")


def test_last_checkpoint_names_the_newest_state_after_every_resume(tmp_path, tiny_data_root, one_thread):
    """Resuming from a run's first checkpoint (saved before last.ckpt first pointed anywhere) used to write the
    newer states to last-v1.ckpt and leave last.ckpt on the old step; a run stopping between saves lost its
    last steps."""
    out = tmp_path / "out"
    folder = _run_dir(out) / "checkpoints"
    _fit(out, tiny_data_root, max_steps=2)
    _fit(out, tiny_data_root, 5, "--ckpt_path", "last")
    _fit(out, tiny_data_root, 8, "--ckpt_path", "last")
    assert sorted(p.name for p in folder.glob("last*")) == ["last.ckpt"]
    assert _step(folder / "last.ckpt") == 8  # the final state, though 8 is past the last save at 6
    assert _step(folder / _last_target(folder)) == 8


def test_a_resume_past_a_torn_newest_checkpoint_repoints_last_at_once(run_with_checkpoints, tiny_data_root):
    out, folder = run_with_checkpoints
    _tear(folder / "epoch=0-step=4.ckpt")  # last.ckpt links to it
    with pytest.warns(UserWarning, match=r"epoch=0-step=4\.ckpt is unreadable"):
        cli = _fit(out, tiny_data_root, 2, "--ckpt_path", "last")  # resumes at 2 and has nothing left to train
    assert cli.trainer.global_step == 2
    assert _last_target(folder) == "epoch=0-step=2.ckpt"


def _wait_for_logged_step(out: Path, proc, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            if max(_scalar_steps(_run_dir(out), "train/loss")) >= step:
                return
        except Exception:  # no event file yet
            continue
    raise AssertionError(f"the run did not reach step {step}: {proc.poll()=}")


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_exits_143_and_resumes_there(tmp_path, tiny_data_root):
    """What a cluster's preemption or scancel sends: the run saves where it is, says so in one line, and exits
    non-zero; --ckpt_path last then continues from that step."""
    out = tmp_path / "out"
    every_1000 = [{"class_path": "tpdiff_lightning.callbacks.checkpoint.LinkedLastCheckpoint",
                   "init_args": {"every_n_train_steps": 1000, "save_top_k": -1}}]  # no scheduled save before the signal
    args = [*shrink_args(out, tiny_data_root, max_steps=10_000, steps_per_epoch=10_000, callbacks=every_1000),
            "--trainer.logger.init_args.flush_secs=1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "lightning_cli.py"), "fit", "--config", str(DEFAULT), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True)
    try:
        _wait_for_logged_step(out, proc, 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "stopped by SIGTERM at global step" in lines[0], err[-2000:]
    step = int(re.search(r"global step (\d+)", lines[0]).group(1))
    folder = _run_dir(out) / "checkpoints"
    assert step >= 3 and _step(folder / "last.ckpt") == step and f"step={step}.ckpt" in lines[0]
    cli = _fit(out, tiny_data_root, step + 2, "--ckpt_path", "last", callbacks=every_1000)
    assert cli.trainer.global_step == step + 2
    assert int(cli.model.ema.num_updates) == step + 2  # continued from the saved step, not restarted


def test_a_changed_learning_rate_and_batch_size_on_resume_are_applied_and_said(tmp_path, tiny_data_root, one_thread):
    out = tmp_path / "out"
    _fit(out, tiny_data_root, max_steps=2)
    with pytest.warns(UserWarning, match=r"applied from this step on: model\.init_args\.optimization\.lr: 0\.001 -> "
                                         r"0\.0005.*data\.init_args\.batch_size: 2 -> 3"):
        cli = _fit(out, tiny_data_root, 3, "--ckpt_path", "last", "--model.init_args.optimization.lr=0.0005",
                   "--data.init_args.batch_size=3")
    optimizer = cli.trainer.optimizers[0]
    assert [group["lr"] for group in optimizer.param_groups] == [0.0005, 0.0005]  # not the checkpoint's 0.001
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.0005, 0.0005]
    assert cli.model.settings.optimization.lr == 0.0005 and cli.trainer.global_step == 3
    stored = torch.load(_run_dir(out) / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert stored["optimization"]["lr"] == 0.0005


@pytest.mark.parametrize("change, named", [
    (["--model.init_args.pyramid.num_stages=2", "--model.init_args.pyramid.reductions=[2]",
      "--model.init_args.pyramid.partition=[1, 1]", "--model.init_args.pyramid.stage_weights=null"], r"model\.init_args\.pyramid\.num_stages=2 \(the checkpoint has 3\)"),
    (["--model.init_args.objective.schedule=ddim"],
     r"model\.init_args\.objective\.schedule='ddim' \(the checkpoint has 'flow'\)"),
    (["--model.init_args.optimization.ema_decay=null"],
     r"model\.init_args\.optimization\.ema_decay=None \(the checkpoint has 0\.995\)"),
])
def test_a_resume_that_changes_what_is_trained_is_refused_in_one_line_before_writing(
        tmp_path, tiny_data_root, capsys, one_thread, change, named):
    out = tmp_path / "out"
    _fit(out, tiny_data_root, max_steps=2)
    before = _folder_state(_run_dir(out))
    args = shrink_args(out, tiny_data_root, max_steps=4, callbacks=CHECKPOINT_EVERY_2)
    line = _command_line_error(capsys, ["fit", "--config", str(DEFAULT), *args, "--ckpt_path", "last", *change])
    assert re.search(named, line) and "--weights_from" in line, line
    assert _folder_state(_run_dir(out)) == before  # nothing written


def test_weights_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, tiny_data_root, one_thread):
    """The way a refused resume points to: another pyramid (2 stages) trained from the 3-stage run's weights."""
    out = tmp_path / "out"
    first = _fit(out, tiny_data_root, max_steps=2)
    source = _run_dir(out) / "checkpoints" / "last.ckpt"
    cli = _fit(out, tiny_data_root, 0, "--weights_from", str(source), "--trainer.logger.init_args.version=two-stage",
               "--model.init_args.pyramid.num_stages=2", "--model.init_args.pyramid.reductions=[2]",
               "--model.init_args.pyramid.partition=[1, 1]", "--model.init_args.pyramid.stage_weights=null")
    assert cli.trainer.global_step == 0 and cli.model.pyramid.num_stages == 2
    stored = torch.load(source, weights_only=False)["state_dict"]
    assert all(torch.equal(stored[k], v) for k, v in cli.model.state_dict().items())
    assert set(stored) == set(first.model.state_dict())


def test_find_resume_point_prefers_a_newer_step_checkpoint_over_an_older_last(tmp_path):
    from tpdiff_lightning.runs.resume import find_resume_point

    def save(name, step):
        torch.save({"global_step": step, "state_dict": {}}, tmp_path / name)

    assert find_resume_point([tmp_path]) is None  # nothing there: a fresh start
    save("last.ckpt", 2)
    save("epoch=0-step=2.ckpt", 2)
    assert find_resume_point([tmp_path]).path.name == "last.ckpt"
    assert find_resume_point([tmp_path]).reason is None
    save("epoch=0-step=4.ckpt", 4)  # a kill after the step checkpoint, before last.ckpt was updated
    point = find_resume_point([tmp_path])
    assert point.path.name == "epoch=0-step=4.ckpt" and "newer than last.ckpt" in point.reason


# --- 3. TensorBoard after a resume -----------------------------------------------------------------------------

def _scalar_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def test_validate_after_fit_keeps_the_runs_validation_curve(tmp_path, tiny_data_root, one_thread):
    """Run after fit as the README says, validate used to log at step 0 into the run's own event files, and
    TensorBoard, reading a step that goes backwards as a restart, dropped every validation point of the fit."""
    out = tmp_path / "out"
    args = shrink_args(out, tiny_data_root, max_steps=4, steps_per_epoch=2, callbacks=CHECKPOINT_EVERY_2)  # val at 2, 4
    main(["fit", "--config", str(DEFAULT), *args])
    fit_points = _scalar_steps(_run_dir(out), "val/loss")
    assert len(fit_points) == 2
    main(["validate", "--config", str(DEFAULT), *args, "--ckpt_path",
          str(_run_dir(out) / "checkpoints" / "epoch=0-step=2.ckpt")])  # an older checkpoint too
    assert _scalar_steps(_run_dir(out), "val/loss") == fit_points
    assert _scalar_steps(_run_dir(out) / "validate", "val/loss") == [fit_points[0]]  # its own sub-run, where the
    # fit logged the validation of that same checkpoint


def test_tensorboard_steps_stay_strictly_increasing_after_a_resume(tmp_path, tiny_data_root, one_thread):
    out = tmp_path / "out"
    _fit(out, tiny_data_root, max_steps=5)  # logged steps 0..4; its final state (step 5) was saved at the end
    assert _scalar_steps(_run_dir(out), "train/loss") == [0, 1, 2, 3, 4]
    folder = _run_dir(out) / "checkpoints"
    for final in (folder / _last_target(folder), folder / "last.ckpt"):  # as a kill before that save leaves it
        final.unlink()
    _fit(out, tiny_data_root, 8, "--ckpt_path", "last")  # resumes at 4 and logs steps 4.. again
    steps = _scalar_steps(_run_dir(out), "train/loss")
    assert steps == list(range(8)), steps


# --- 8. Bad settings: one line naming the key and the value, nothing written ------------------------------------

M = r"model\.init_args\."  # every model setting's key as the user types it
BAD_SETTINGS = [
    ("--model.init_args.optimization.lr=abc", M + r"optimization\.lr: expected a float\. Got value: abc"),
    ("--trainer.max_steps=x", r"trainer\.max_steps: expected an int\. Got value: x"),
    ("--data.init_args.batch_size=x", r"data\.init_args\.batch_size: expected an int\. Got value: x"),
    ("--model.init_args.objective.caption_dropout=2", M + r"objective\.caption_dropout=2\.0 is invalid; expected "
                                                       r"0 <= p < 1"),
    ("--model.init_args.objective.schedule=foo", M + r"objective\.schedule='foo' is unknown; expected one of "
                                                  r"\['ddim', 'flow'\]"),
    ("--model.init_args.pyramid.num_stages=0", M + r"pyramid\.num_stages=0 is invalid; expected an integer >= 1"),
    ("--model.init_args.pyramid.reductions=[2]", M + r"pyramid\.reductions=\[2\] has length 1; expected "
                                                  r"num_stages - 1 = 2"),
    ("--model.init_args.no_such_key=1", r"model\.init_args: .*'no_such_key' is not accepted"),
    ("--model.init_args.optimization.lr=-1", M + r"optimization\.lr=-1\.0 is invalid; expected a learning rate > 0"),
    ("--model.init_args.optimization.lr=0", M + r"optimization\.lr=0\.0 is invalid; expected a learning rate > 0"),
    ("--model.init_args.optimization.warmup_steps=-5", M + r"optimization\.warmup_steps=-5 is invalid; expected an "
                                                        r"integer >= 0"),
    ("--model.init_args.sampling.guidance_scale=-3", M + r"sampling\.guidance_scale=-3\.0 is invalid; expected >= 0"),
    ("--ckpt_path=missing.ckpt", r"ckpt_path=missing\.ckpt: no such file or folder"),
    ("--data.init_args.build_synthetic=false", r"data\.init_args\.root=\S+/empty_root: no manifest\.json"),
    # Accepted by the parser, failing only after config.yaml, hparams.yaml and event files were written:
    ("--ckpt_path=TMP", r"ckpt_path=\S+ is a folder that holds no checkpoint.*expected a \.ckpt file"),
    ("--trainer.accumulate_grad_batches=0", r"trainer\.accumulate_grad_batches=0 is invalid; expected an integer >= 1"),
    ("--trainer.val_check_interval=0", r"trainer\.val_check_interval=0 is invalid; expected an integer >= 1"),
    ("--model.init_args.optimization.betas=[1.5, 0.999]", M + r"optimization\.betas=\[1\.5, 0\.999\] is invalid; "
                                                           r"expected two numbers in \[0, 1\)"),
    ("--model.init_args.optimization.weight_decay=-1", M + r"optimization\.weight_decay=-1\.0 is invalid; expected a "
                                                        r"number >= 0"),
    ("--data.init_args.eval_shards=missing-{000000..000001}.tar", r"data\.init_args\.root=\S+: 2 of 2 eval shards "
                                                                   r"missing"),
    ("--data.init_args.root=TMP/nodata", r"data\.init_args\.root=\S+/nodata: no such folder.*synthetic data is built "
                                          r"only at build_synthetic=data/synthetic"),  # a typo: no synthetic run
    ("--trainer.precision=17-mixed", r"trainer\.precision: expected one of .*16-mixed.*bf16-mixed.*32-true.*Got "
                                      r"value: 17-mixed"),
    ("--trainer.precision=fp8", r"trainer\.precision: expected one of .*bf16-true.*Got value: fp8"),
    ("--trainer.max_step=10", r"unrecognized arguments: --trainer\.max_step=10; did you mean --trainer\.max_steps\?"),
    ("--model.init_args.lrr=1", r"'lrr' is not accepted; did you mean model\.init_args\.optimization\.lr\?"),
    ("--model.init_args.pyramid.num_stage=2", M + r"pyramid\.num_stage is not a setting; did you mean "
                                               r"model\.init_args\.pyramid\.num_stages\?"),  # not abbreviated
    # A flat key of release 0.1.0, moved into its group:
    ("--model.init_args.lr=0.01", M + r"lr moved to model\.init_args\.optimization\.lr"),
    ("--model.init_args.num_stages=2", M + r"num_stages moved to model\.init_args\.pyramid\.num_stages"),
    # Accepted silently:
    ("--model.init_args.sampling.steps=2", M + r"sampling\.steps=2 is invalid; expected .* >= 3"),
    ("--model.init_args.sampling.steps=0", M + r"sampling\.steps=0 is invalid"),
    ("--model.init_args.sampling.steps=-3", M + r"sampling\.steps=-3 is invalid"),
    ("--trainer.gradient_clip_val=-1", r"trainer\.gradient_clip_val=-1(\.0)? is invalid; expected a number >= 0"),
    ("--model.init_args.sampling.timestep_shift=true", M + r"sampling\.timestep_shift: expected a float\. Got value: "
                                                        r"True"),
    ("--model.init_args.sampling.step_weights=[true, true, true]", M + r"sampling\.step_weights: expected a float\. "
                                                                    r"Got value: True"),
]


def _command_line_error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        command_line(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Given value" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("setting, expected", BAD_SETTINGS, ids=[s.split("=")[0] for s, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_naming_key_and_value_and_writes_nothing(tmp_path, tiny_data_root, capsys,
                                                                          setting, expected):
    out = tmp_path / "out"
    if "build_synthetic" in setting:  # a data root without a manifest that the run may not build into
        tiny_data_root = tmp_path / "empty_root"
        tiny_data_root.mkdir()
    setting = setting.replace("TMP", str(tmp_path))  # an existing folder that is no checkpoint
    line = _command_line_error(capsys, ["fit", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root), setting])
    assert re.search(expected, line), line
    assert not out.exists()


def test_a_corrupt_yaml_config_names_its_file(tmp_path, capsys):
    bad = tmp_path / "overlay.yaml"
    bad.write_text("trainer:\n  max_steps: [1,\n")
    line = _command_line_error(capsys, ["fit", "--config", str(DEFAULT), "--config", str(bad)])
    assert f"--config {bad}: not valid YAML at line 3" in line
    line = _command_line_error(capsys, ["fit", "--config", str(tmp_path / "missing.yaml")])
    assert f"--config {tmp_path / 'missing.yaml'}: no such file" in line


def test_an_overlay_alone_names_the_base_it_goes_on(capsys):
    line = _command_line_error(capsys, ["fit", "--config", str(ROOT / "configs" / "ddim.yaml")])
    assert "configs/ddim.yaml is an overlay" in line
    assert "python lightning_cli.py fit --config configs/default.yaml --config configs/ddim.yaml" in line, line


def test_the_progress_bar_counts_steps_against_max_steps_across_a_resume(tmp_path, tiny_data_root, one_thread):
    """Lightning's bar read "Epoch 3/-2 ... 700/99" on an endless stream cut into epochs."""
    from tpdiff_lightning.callbacks.progress import StepProgressBar

    out = tmp_path / "out"
    bars = []
    for max_steps, extra in ((3, []), (5, ["--ckpt_path", "last"])):
        cli = _fit(out, tiny_data_root, max_steps, "--trainer.enable_progress_bar=true", *extra)
        bar = cli.trainer.progress_bar_callback
        assert isinstance(bar, StepProgressBar)
        bars.append((bar.train_progress_bar.total, bar.train_progress_bar.n, bar.train_progress_bar.desc.rstrip(": ")))
    assert bars == [(3, 3, "step"), (5, 5, "step")]


def test_predict_says_where_it_wrote_the_clips(tmp_path, tiny_data_root, caplog, one_thread):
    import logging

    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        main(["predict", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root), "--untrained=true",
              "--return_predictions=false"])
    folder = _run_dir(out) / "predictions"
    assert any(f"predict: wrote 1 clip to {folder} and a contact sheet" in r.getMessage() for r in caplog.records)


def test_traceback_flag_and_environment_variable_show_the_full_error(tmp_path, tiny_data_root, monkeypatch):
    from argparse import ArgumentError

    argv = ["fit", "--config", str(DEFAULT), *shrink_args(tmp_path / "out", tiny_data_root), "--trainer.max_steps=x"]
    with pytest.raises(ArgumentError, match="trainer.max_steps"):
        command_line([*argv, "--traceback"])
    monkeypatch.setenv("TPDIFF_TRACEBACK", "1")
    with pytest.raises(ArgumentError, match="trainer.max_steps"):
        command_line(argv)


@pytest.mark.slow
def test_lightning_cli_script_prints_one_line_and_exits_non_zero(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "lightning_cli.py"), "fit", "--config", str(DEFAULT),
                           f"--trainer.logger.init_args.save_dir={tmp_path / 'out'}", "--model.init_args.optimization.lr=abc"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: model.init_args.optimization.lr: expected a float"), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# --- 6. Divergence --------------------------------------------------------------------------------------------

CHECKPOINT_EVERY_STEP = [
    {"class_path": "tpdiff_lightning.callbacks.checkpoint.LinkedLastCheckpoint",
     "init_args": {"every_n_train_steps": 1, "save_top_k": -1}},
]


@pytest.mark.parametrize("lr", ["1e30", "1e12"])
def test_an_exploding_learning_rate_stops_the_run_before_a_checkpoint_holds_it(tmp_path, tiny_data_root, capsys,
                                                                               one_thread, lr):
    out = tmp_path / "out"
    line = _command_line_error(capsys, ["fit", "--config", str(DEFAULT),
                                        *shrink_args(out, tiny_data_root, max_steps=6, steps_per_epoch=50,
                                                     callbacks=CHECKPOINT_EVERY_STEP),
                                        f"--model.init_args.optimization.lr={lr}"])
    what = r"the (weight norm grew|weights hold non-finite|training loss)"
    assert re.search(rf"training diverged at global_step=\d+: {what}", line), line
    for ckpt in (_run_dir(out) / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        norm = torch.linalg.vector_norm(torch.stack([v.float().norm() for k, v in state.items()
                                                     if k.startswith("backbone.")]))
        assert torch.isfinite(norm) and norm < 1e4, (ckpt.name, norm)


def test_loss_explosion_is_measured_against_the_running_median():
    from tpdiff_lightning.callbacks.divergence import DivergenceGuard

    guard = DivergenceGuard(loss_factor=100, window=10, min_history=3)
    assert guard.problem(500.0, 1.0) is None  # too little history to judge: early losses drop fast
    for loss in (1.0, 0.9, 0.8):
        assert guard.problem(loss, 1.0) is None
    assert guard.problem(50.0, 1.0) is None  # a spike, well under 100 x the median
    assert "more than loss_factor=100 times the median 1 of the last 5 steps" in guard.problem(200.0, 1.0)
    assert "loss is nan" in guard.problem(float("nan"), 1.0)
    assert "weights hold non-finite" in guard.problem(1.0, float("inf"))
    assert "weight norm grew from 1 to 20" in guard.problem(1.0, 20.0)
    restored = DivergenceGuard(loss_factor=100, window=10, min_history=3)
    restored.load_state_dict(guard.state_dict())  # a resumed run keeps its median
    assert "times the median" in restored.problem(200.0, 1.0)
    with pytest.raises(ValueError, match="loss_factor=1 is invalid"):
        DivergenceGuard(loss_factor=1)


@pytest.mark.parametrize("alignment", [True, False])  # alignment sees the bad cost first; without it, the loss
def test_non_finite_input_names_step_stage_and_sample_key(alignment):
    from tpdiff_lightning.training.finite_input import NonFiniteInputError
    from tpdiff_lightning.training.module import TPDiffModule

    torch.manual_seed(0)
    module = TPDiffModule(clip={"num_frames": 16, "resolution": 16}, optimization={"ema_decay": None}, objective={"alignment": alignment})
    module.log = lambda *args, **kwargs: None
    video = torch.zeros(3, 3, 16, 16, 16)
    video[1, 0, 5, 2, 2] = float("inf")
    batch = {"video": video, "caption": ["a"] * 3, "key": ["s.tar:k0", "s.tar:k1", "s.tar:k2"],
             "num_skipped": torch.tensor(0)}
    with pytest.raises(NonFiniteInputError, match=r"global_step=0, stage \d, in sample\(s\) s\.tar:k1;"):
        module.training_step(batch, 0)


def test_training_batches_name_their_samples(tiny_data_root):
    from tpdiff_lightning.data.datamodule import VideoDataModule

    dm = VideoDataModule(root=str(tiny_data_root), num_frames=4, resolution=16, batch_size=2, num_workers=0,
                         train_steps_per_epoch=1)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["key"]) == 2 and all(re.fullmatch(r".*train-\d+\.tar:\S+", k) for k in batch["key"])


# --- 7. Data accounting ----------------------------------------------------------------------------------------

def _write_shard(path: Path, n: int, prefix: str) -> None:
    import webdataset as wds

    from tpdiff_lightning.data.synthetic import render_clip
    from tpdiff_lightning.data.video_io import encode_mp4

    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            frames = render_clip("red", "square", "right", "slow", (i % 16, 8.0), 8, 16)
            sink.write({"__key__": f"{prefix}{i:04d}", "mp4": encode_mp4(frames), "txt": f"clip {prefix}{i}"})


def _cut_and_full_shards(tmp_path: Path) -> list[str]:
    """An 8-sample shard cut in the middle (a truncated tar) and a whole 5-sample one; their URLs."""
    _write_shard(tmp_path / "cut.tar", 8, "a")
    _write_shard(tmp_path / "full.tar", 5, "b")
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    return [str(tmp_path / "cut.tar"), str(tmp_path / "full.tar")]


def test_a_truncated_shard_counts_every_lost_sample_against_the_manifest(tmp_path):
    from tpdiff_lightning.data.lost_clips import CorruptSampleWarning
    from tpdiff_lightning.data.pipelines import eval_pipeline

    urls = _cut_and_full_shards(tmp_path)
    with pytest.warns(CorruptSampleWarning) as record:
        batches = list(eval_pipeline(urls, 8, 16, 4, shard_clips={urls[0]: 8, urls[1]: 5}))
    delivered = sum(len(b["caption"]) for b in batches)
    skipped = sum(int(b["num_skipped"]) for b in batches)
    assert 5 <= delivered < 13
    assert delivered + skipped == 13  # every sample accounted for: delivered or counted as lost
    messages = [str(w.message) for w in record]
    assert any(re.search(rf"shard {re.escape(urls[0])} ended early after \d+ samples; its length is 8", m)
               for m in messages), messages


def test_two_ranks_together_account_for_a_truncated_shard_exactly_once(tmp_path):
    from tpdiff_lightning.data.lost_clips import CorruptSampleWarning
    from tpdiff_lightning.data.pipelines import eval_pipeline

    urls = _cut_and_full_shards(tmp_path)
    delivered = skipped = 0
    for rank in range(2):  # every rank reads every shard and keeps its own share of the samples
        with pytest.warns(CorruptSampleWarning):
            batches = list(eval_pipeline(urls, 8, 16, 4, rank=rank, world_size=2,
                                         shard_clips={urls[0]: 8, urls[1]: 5}))
        delivered += sum(len(b["caption"]) for b in batches)
        skipped += sum(int(b["num_skipped"]) for b in batches)
    assert delivered + skipped == 13  # not 13 plus the lost samples counted once per rank


def _two_shards_one_cut(tmp_path: Path) -> tuple[Path, list[str]]:
    """Synthetic data, 2 training shards of 16 clips with their .done records; the first tar cut at 40%."""
    from tpdiff_lightning.data.synthetic import read_manifest, write_synthetic_shards

    root = tmp_path / "data"
    write_synthetic_shards(root, num_train=32, num_eval=4, num_frames=8, size=16, seed=0, clips_per_shard=16,
                           progress=False)
    names = read_manifest(root)["splits"]["train"]["shards"]
    data = (root / names[0]).read_bytes()
    (root / names[0]).write_bytes(data[: int(len(data) * 0.4)])
    return root, names


def test_a_truncated_shard_read_through_a_pattern_counts_every_lost_clip(tmp_path):
    """With shard patterns the manifest is not read; the builder's record beside each shard gives its length."""
    from tpdiff_lightning.data.datamodule import VideoDataModule
    from tpdiff_lightning.data.lost_clips import CorruptSampleWarning
    from tpdiff_lightning.data.pipelines import eval_pipeline

    root, names = _two_shards_one_cut(tmp_path)
    (root / "manifest.json").unlink()
    dm = VideoDataModule(root=str(root), eval_shards="train-{000000..000001}.tar", num_frames=8, resolution=16)
    urls = dm.shard_urls("eval")
    with pytest.warns(CorruptSampleWarning, match=r"ended early after \d+ samples; its length is 16"):
        batches = list(eval_pipeline(urls, 8, 16, 4, shard_clips=dm.shard_clip_counts("eval")))
    delivered = sum(len(b["caption"]) for b in batches)
    skipped = sum(int(b["num_skipped"]) for b in batches)
    assert delivered < 32 and delivered + skipped == 32  # every clip delivered or counted


def test_the_training_stream_counts_each_lost_clip_once_however_often_it_reads_the_shard(tmp_path):
    from tpdiff_lightning.data.datamodule import VideoDataModule
    from tpdiff_lightning.data.pipelines import eval_pipeline, train_pipeline

    root, names = _two_shards_one_cut(tmp_path)
    dm = VideoDataModule(root=str(root), num_frames=8, resolution=16)
    urls = dm.shard_urls("train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eval_delivered = sum(len(b["caption"]) for b in eval_pipeline(urls[:1], 8, 16, 4))  # one read of the cut shard
        batches = list(train_pipeline(urls, 8, 16, 4, shuffle_buffer=4, shard_clips=dm.shard_clip_counts("train"))
                       .with_epoch(40))  # 160 clips: the cut shard is read several times
    lost = [clip for b in batches for clip in b["skipped"]]
    assert len(lost) == len(set(lost)) == 16 - eval_delivered  # each lost clip once, not once per read
    assert sum(int(b["num_skipped"]) for b in batches) == len(lost)


def test_a_fit_logs_the_distinct_clips_it_lost(tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tpdiff_lightning.data.pipelines import eval_pipeline

    root, names = _two_shards_one_cut(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delivered = sum(len(b["caption"]) for b in eval_pipeline([str(root / names[0])], 8, 16, 4))
        cli = main(["fit", "--config", str(DEFAULT), *shrink_args(tmp_path / "out", root, max_steps=30,
                                                                   steps_per_epoch=15),
                    "--data.init_args.num_frames=8", "--data.init_args.batch_size=4",
                    "--data.init_args.build_synthetic=false", "--trainer.limit_val_batches=0"])  # keep the damage
    accumulator = EventAccumulator(str(_run_dir(tmp_path / "out")), size_guidance={"scalars": 0})
    accumulator.Reload()
    values = [e.value for e in accumulator.Scalars("data/skipped")]
    assert values and values[-1] == 16 - delivered and values == sorted(values), values  # cumulative, distinct
    assert len(cli.trainer.callbacks[[type(c).__name__ for c in cli.trainer.callbacks].index("ClipAccounting")]
               .lost_training_clips) == 16 - delivered


def test_synthetic_manifest_records_each_shards_sample_count(tmp_path):
    from tpdiff_lightning.data.synthetic import read_manifest, write_synthetic_shards

    write_synthetic_shards(tmp_path, num_train=5, num_eval=2, num_frames=8, size=16, seed=0, clips_per_shard=2,
                           progress=False)
    splits = read_manifest(tmp_path)["splits"]
    assert splits["train"]["shard_clips"] == [2, 2, 1] and splits["eval"]["shard_clips"] == [2]


def test_validation_with_a_truncated_eval_shard_logs_and_warns_the_skipped_clips(tmp_path, one_thread):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tpdiff_lightning.data.synthetic import write_synthetic_shards

    root = tmp_path / "data"
    write_synthetic_shards(root, num_train=4, num_eval=6, num_frames=16, size=16, seed=0, progress=False,
                           paths="centred")  # as the default builds, so the damaged folder is read, not rebuilt
    shard = root / json.loads((root / "manifest.json").read_text())["splits"]["eval"]["shards"][0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    args = [a for a in shrink_args(out, root) if "limit_val_batches" not in a and "synthetic_num" not in a]
    with pytest.warns(UserWarning, match=r"evaluation skipped [1-5] of 6 clips") as record:
        main(["validate", "--config", str(DEFAULT), *args, "--data.init_args.synthetic_num_train=4",
              "--data.init_args.synthetic_num_eval=6"])
    assert any("ended early" in str(w.message) and "its length is 6" in str(w.message) for w in record)
    accumulator = EventAccumulator(str(_run_dir(out) / "validate"), size_guidance={"scalars": 0})  # its sub-run
    accumulator.Reload()
    [event] = accumulator.Scalars("data/eval_skipped")
    assert 1 <= event.value <= 5


# --- 4. One run folder, one run --------------------------------------------------------------------------------

def test_a_fresh_fit_into_a_folder_with_checkpoints_is_refused_and_writes_nothing(run_with_checkpoints,
                                                                                   tiny_data_root, capsys):
    out, folder = run_with_checkpoints
    before = _folder_state(out)
    line = _command_line_error(capsys, ["fit", "--config", str(DEFAULT),
                                        *shrink_args(out, tiny_data_root, max_steps=6, callbacks=CHECKPOINT_EVERY_2)])
    assert "already holds 3 checkpoint(s)" in line
    assert "resume with --ckpt_path last, or choose another version" in line
    assert _folder_state(out) == before


def test_a_second_fit_into_a_live_runs_folder_is_refused(tmp_path, tiny_data_root, capsys):
    import json
    import socket

    out = tmp_path / "out"
    run_dir = _run_dir(out)
    run_dir.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".run.lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        line = _command_line_error(capsys, ["fit", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root)])
        assert f"run folder {run_dir} is in use by pid {live.pid}" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock"]  # nothing else was written
    finally:
        live.kill()
        live.wait()


def test_a_stale_lock_is_taken_over_and_every_fit_releases_its_lock(tmp_path, tiny_data_root, one_thread):
    import json
    import socket

    out = tmp_path / "out"
    run_dir = _run_dir(out)
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {dead.pid}, which no longer runs"):
        cli = _fit(out, tiny_data_root, 2)
    assert cli.trainer.global_step == 2
    assert not (run_dir / ".run.lock").exists()


# --- 5. Resume with another network ----------------------------------------------------------------------------

def test_resume_with_another_network_names_the_setting_before_anything_is_written(run_with_checkpoints,
                                                                                   tiny_data_root, capsys):
    out, folder = run_with_checkpoints
    before = _folder_state(out)
    line = _command_line_error(capsys, ["fit", "--config", str(DEFAULT),
                                        *shrink_args(out, tiny_data_root, max_steps=6, callbacks=CHECKPOINT_EVERY_2),
                                        "--model.init_args.backbone.init_args.size=dit-s", "--ckpt_path", "last"])
    assert "checkpoint has backbone size 'dit-tiny', config asks 'dit-s'" in line, line
    assert _folder_state(out) == before  # config.yaml and the event files are untouched


@pytest.mark.parametrize("setting, expected", [
    ("--model.init_args.sampling.steps=0", r"model\.init_args\.sampling\.steps=0 is invalid; expected an integer of "
                                          r"at least one step per stage"),
    ("--model.init_args.sampling.num_frames=15", r"model\.init_args\.sampling\.num_frames=15 is invalid: .*stride"),
    ("--model.init_args.sampling.guidance_scale=-3", r"model\.init_args\.sampling\.guidance_scale=-3\.0 is invalid"),
])
def test_bad_sampling_settings_stop_predict_before_it_writes(run_with_checkpoints, tiny_data_root, capsys,
                                                             setting, expected):
    out, folder = run_with_checkpoints
    before = _folder_state(out)
    line = _command_line_error(capsys, ["predict", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root),
                                        "--ckpt_path", str(folder / "last.ckpt"), setting])
    assert re.search(expected, line), line
    assert _folder_state(out) == before  # no config_predict.yaml, no predictions


def test_predict_without_a_checkpoint_needs_the_untrained_flag(tmp_path, tiny_data_root, capsys, one_thread):
    out = tmp_path / "out"
    args = ["predict", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root), "--return_predictions=false",
            "--model.init_args.sampling.steps=3"]
    line = _command_line_error(capsys, args)
    assert "predict needs --ckpt_path" in line and "--untrained true" in line
    assert not out.exists()
    command_line([*args, "--untrained=true"])
    assert list(out.rglob("predictions/*.mp4"))


@pytest.mark.slow
def test_tensorboard_steps_stay_strictly_increasing_after_a_sigkill_and_resume(tmp_path, tiny_data_root):
    out = tmp_path / "out"
    # Checkpoints far enough apart (25 steps) that none lands between seeing events past the last one and the
    # kill: with every 4 steps the run sometimes saved again first, and then nothing past the checkpoint was on disk.
    every_25 = [{"class_path": "tpdiff_lightning.callbacks.checkpoint.LinkedLastCheckpoint",
                 "init_args": {"every_n_train_steps": 25, "save_top_k": -1}}]
    args = [*shrink_args(out, tiny_data_root, max_steps=10_000, steps_per_epoch=10_000, callbacks=every_25),
            "--trainer.logger.init_args.flush_secs=1"]  # the killed run's events past its checkpoint reach disk
    proc = subprocess.Popen([sys.executable, str(ROOT / "lightning_cli.py"), "fit", "--config", str(DEFAULT), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = _run_dir(out) / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                saved = _step(last)
                logged = max(_scalar_steps(_run_dir(out), "train/loss"))
            except Exception:  # nothing saved or flushed yet
                continue
            if saved >= 25 and logged >= saved + 1:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_steps = _scalar_steps(_run_dir(out), "train/loss")
    resumed_from = _step(last)
    assert max(killed_steps) >= resumed_from, proc.stderr.read().decode()[-3000:]  # steps past the checkpoint
    _fit(out, tiny_data_root, resumed_from + 3, "--ckpt_path", "last", callbacks=every_25)
    steps = _scalar_steps(_run_dir(out), "train/loss")
    assert steps == sorted(set(steps)), steps  # strictly increasing: no duplicates, nothing going backwards
    assert steps == list(range(resumed_from + 3)), steps
