"""``--ckpt_path last`` with sharded checkpoints (FSDP, FSDP2, DeepSpeed write folders), and the run lock of a
requeued scheduler job. The real FSDP2 round trip is `test_strategies.py`'s two-process fit-and-resume test."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tpdiff_lightning.runs.resume import NoLoadableCheckpointError, find_resume_point, load_problem
from tpdiff_lightning.runs.run_lock import RunFolderInUseError, RunFolderLock


def fsdp_folder(path, step, metadata=True):
    path.mkdir(parents=True)
    torch.save({"global_step": step, "epoch": 0}, path / "meta.pt")
    (path / "__0_0.distcp").write_bytes(b"shard")
    if metadata:
        (path / ".metadata").write_bytes(b"meta")
    return path


def deepspeed_folder(path, step):
    (path / "checkpoint").mkdir(parents=True)
    torch.save({"global_step": step, "module": None}, path / "checkpoint" / "mp_rank_00_model_states.pt")
    (path / "latest").write_text("checkpoint")
    return path


def test_a_sharded_last_checkpoint_link_resumes(tmp_path):
    target = fsdp_folder(tmp_path / "epoch=0-step=4.ckpt", 4)
    os.symlink(target.name, tmp_path / "last.ckpt")
    point = find_resume_point([tmp_path])
    assert point is not None and point.path == tmp_path / "last.ckpt" and point.global_step == 4 and point.reason is None


def test_a_deepspeed_folder_loads_and_an_interrupted_shard_save_falls_back(tmp_path):
    assert load_problem(deepspeed_folder(tmp_path / "ds" / "epoch=0-step=6.ckpt", 6)) == (6, None)
    fsdp_folder(tmp_path / "run" / "epoch=0-step=2.ckpt", 2)
    fsdp_folder(tmp_path / "run" / "epoch=0-step=4.ckpt", 4, metadata=False)  # killed while saving
    point = find_resume_point([tmp_path / "run"])
    assert point.global_step == 2 and "without its .metadata" in point.reason


def test_a_folder_that_holds_no_checkpoint_is_named(tmp_path):
    (tmp_path / "epoch=0-step=2.ckpt").mkdir()
    with pytest.raises(NoLoadableCheckpointError, match="holds no checkpoint"):
        find_resume_point([tmp_path])


def test_a_requeued_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": 1, "host": "node017", "job": "SLURM_JOB_ID=4242"}))
    lock = RunFolderLock(tmp_path)
    with pytest.warns(UserWarning, match="earlier attempt of this job"):
        lock.acquire()
    assert lock.holder()["pid"] == os.getpid()
    lock.release()
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": 1, "host": "node017", "job": "SLURM_JOB_ID=7"}))
    with pytest.raises(RunFolderInUseError, match="in use by pid 1 on node017"):
        RunFolderLock(tmp_path).acquire()  # another job's live run on another node


def test_the_last_link_replaces_a_real_sharded_last_folder(tmp_path):
    from types import SimpleNamespace

    from tpdiff_lightning.callbacks.checkpoint import LinkedLastCheckpoint

    old_last = fsdp_folder(tmp_path / "last.ckpt", 2)  # written as a whole folder by an older version
    newer = fsdp_folder(tmp_path / "epoch=0-step=4.ckpt", 4)
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    LinkedLastCheckpoint._link_checkpoint(trainer, str(newer), str(old_last))
    assert old_last.is_symlink() and os.readlink(old_last) == newer.name
    assert find_resume_point([tmp_path]).global_step == 4
