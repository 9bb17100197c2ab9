"""Checkpoints are atomic, a failed write keeps the last good one, and a killed stage resumes to
exactly the weights of a run that was never interrupted (CPU)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cast.losses.contrastive import PixelContrastiveLoss
from cast.training import checkpoint as ckpt_mod
from cast.training.checkpoint import CheckpointWriteError, load_checkpoint, load_weights, save_checkpoint
from cast.utils.cache import SettingsChangedError, settings_changes
from cast.training.metrics import read_metrics
from cast.training.objective import Objective
from test_training import TinySegModel, make_trainer

OBJECTIVE = Objective(lambda_semi=0.5, lambda_pxl=0.1)  # every stream and the negative sampler


class Crash(RuntimeError):
    pass


def _crash_at(k: int):
    def hook(step: int) -> None:
        if step == k:
            raise Crash(f"injected crash after step {step}")
    return hook


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crash_during_save_leaves_the_old_checkpoint_readable(tmp_path, monkeypatch):
    model = TinySegModel()
    save_checkpoint(tmp_path, 2, model, {"step": 2})
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.query.add_(1.0)

    def torn_save(m, path):  # writes half a file, then the process "dies"
        Path(path).write_bytes(b"\x00" * 100)
        raise Crash("killed while writing")

    monkeypatch.setattr(ckpt_mod, "save_model", torn_save)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, 4, model, {"step": 4})
    ck = load_checkpoint(tmp_path)
    assert ck.step == 2 and ck.state == {"step": 2}
    fresh = TinySegModel()
    load_weights(fresh, ck.model_path)
    _assert_same_weights(fresh.state_dict(), old)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "model-00000004.safetensors").exists()


def test_disk_full_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=4, checkpoint_every=2)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    with pytest.raises(CheckpointWriteError, match=r"stage teacher_adaptation: cannot write checkpoint for step 4 "
                                                   r"to .*checkpoints: No space left on device; the last good "
                                                   r"checkpoint \(step 2\) is kept"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints").step == 2


def test_keeps_only_the_last_checkpoints(tmp_path):
    model = TinySegModel()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("model-*")) == ["model-00000002.safetensors",
                                                                "model-00000003.safetensors"]


def test_missing_checkpoint_file_names_the_path(tmp_path):
    save_checkpoint(tmp_path, 1, TinySegModel(), {"step": 1})
    (tmp_path / "state-00000001.pt").unlink()
    with pytest.raises(FileNotFoundError, match="state-00000001.pt"):
        load_checkpoint(tmp_path)


def test_injected_crash_then_resume_gives_identical_weights(tmp_path):
    torch.manual_seed(0)
    reference = make_trainer(tmp_path / "ref", steps=7, objective=OBJECTIVE, checkpoint_every=3).fit().state_dict()

    torch.manual_seed(0)
    crashing = make_trainer(tmp_path / "run", steps=7, objective=OBJECTIVE, checkpoint_every=3)
    crashing.on_step_end = _crash_at(5)  # dies two steps after the step-3 checkpoint
    assert type(crashing.contrastive) is PixelContrastiveLoss  # the real debiased sampler draws negatives
    with pytest.raises(Crash):
        crashing.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints").step == 3

    torch.manual_seed(123)  # a different fresh init: everything must come from the checkpoint
    resumed = make_trainer(tmp_path / "run", steps=7, objective=OBJECTIVE, checkpoint_every=3).fit().state_dict()
    _assert_same_weights(resumed, reference)
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 8))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # TensorBoard drops what the crashed run logged after its checkpoint: each step shows once.
    assert [e.step for e in EventAccumulator(str(tmp_path / "run")).Reload().Scalars("loss/loss")] == steps
    assert all(r["loss_pxl_unlabeled"] > 0 for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    ref_losses = [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    run_losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert ref_losses == run_losses


def test_a_checkpoint_saved_under_other_settings_is_not_resumed(tmp_path):
    first = make_trainer(tmp_path, steps=6, checkpoint_every=2)
    first.settings = {"train": {"lr": 0.01, "steps": 6}, "seed": 3}
    first.on_step_end = _crash_at(3)
    with pytest.raises(Crash):
        first.fit()
    saved = (tmp_path / "checkpoints" / "state-00000002.pt").read_bytes()

    again = make_trainer(tmp_path, steps=6, checkpoint_every=2)
    again.settings = {"train": {"lr": 0.02, "steps": 6}, "seed": 3}
    with pytest.raises(SettingsChangedError, match=r"checkpoints: saved under other settings \(train.lr: 0.01 -> "
                                                   r"0.02\); run under another name, or delete that folder"):
        again.fit()
    assert (tmp_path / "checkpoints" / "state-00000002.pt").read_bytes() == saved  # nothing overwritten

    same = make_trainer(tmp_path, steps=6, checkpoint_every=2)
    same.settings = {"train": {"lr": 0.01, "steps": 6}, "seed": 3}
    same.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 7))


def test_settings_changes_name_each_difference():
    assert settings_changes({"a": 1, "b": {"x": 1, "y": 2}}, {"a": 1, "b": {"x": 1, "y": 2}}) == []
    assert settings_changes({"a": 1, "b": {"x": 1, "y": 2}}, {"a": 2, "b": {"x": 1, "z": 3}}) == [
        "a: 1 -> 2", "b.y: 2 -> None", "b.z: None -> 3"]
    assert settings_changes(None, {"a": 1}) == ["no record of its settings (made by an older version)"]


CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_training import make_trainer
from test_checkpoint_resume import OBJECTIVE
from pathlib import Path
torch.set_num_threads({threads})  # the parent's: another thread count changes float reduction order
torch.manual_seed(0)
trainer = make_trainer(Path({folder!r}), steps=8, objective=OBJECTIVE, checkpoint_every=2)
def report(step):
    Path({progress!r}).write_text(str(step))
    if step == 5:
        time.sleep(60)  # the parent kills us here, one step past the step-4 checkpoint
trainer.on_step_end = report
trainer.fit()
"""


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_gives_identical_weights(tmp_path):
    torch.manual_seed(0)
    reference = make_trainer(tmp_path / "ref", steps=8, objective=OBJECTIVE, checkpoint_every=2).fit().state_dict()

    progress = tmp_path / "progress.txt"
    code = CHILD.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "run"), progress=str(progress),
                        threads=torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 60
    while not (progress.exists() and progress.read_text().strip() == "5"):
        assert child.poll() is None, "the child run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "run" / "checkpoints").step == 4

    torch.manual_seed(7)
    resumed = make_trainer(tmp_path / "run", steps=8, objective=OBJECTIVE, checkpoint_every=2).fit().state_dict()
    _assert_same_weights(resumed, reference)
