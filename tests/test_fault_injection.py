"""Faults across the whole pipeline (`python -m cast run` on a micro configuration, CPU):

- SIGKILL at random points inside the stages, re-run until complete: the report rows, every
  stage's final weights, pseudo-labels, predictions and training metrics equal an uninterrupted
  run's, and after every kill each file a later run could read is whole.
- Damaged files: truncated or stale pseudo-labels and a truncated evaluation cache are redone; a
  checkpoint pointer naming a truncated state file stops the run with an error naming it.
- The run folder turning read-only mid-stage (real file permissions): a clear error naming the
  path, the last checkpoint intact, and the resumed run equal to the uninterrupted one.
- A non-finite loss stops the run, says so, and leaves the last checkpoint as it was.
- A full disk (real write failures under RLIMIT_FSIZE, so the serializers' own error types are
  exercised) while writing a checkpoint, a model folder, pseudo-labels or metrics: an error
  naming the file, and the previous good files intact.

The machinery (micro config, kill points, fingerprints) is benchmarks/fault_injection.py, which
runs many more kill points and records them in benchmarks/results/faults.json.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
# A handful of fault points: (stage, checkpoint step after which the fault strikes, delay in
# seconds, fault). After step 1 of 2 a kill lands mid-step; after step 2 of 2 in the model save,
# the stage's evaluation, the pseudo-labelling or the next stage's start. "read-only": the output
# folders lose their write permission (file permissions, really enforced) and the run must stop
# by itself with a clear error.
KILL_POINTS = (("teacher_pretrain", 1, 0.03, "kill"), ("teacher_adaptation", 2, 0.05, "kill"),
               ("teacher_self_training", 1, 0.02, "kill"), ("knowledge_transfer", 1, 0.06, "kill"),
               ("student_refinement", 2, 0.01, "kill"), ("student_supervised", 1, 0.0, "read-only"))


def _load_faults():
    spec = importlib.util.spec_from_file_location("cast_fault_injection", REPO / "benchmarks" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


faults = _load_faults()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, started at once so that it runs beside the interrupted one."""
    root = tmp_path_factory.mktemp("reference")
    config = faults.write_config(root, STEPS)
    proc = faults.start(config, root / "reference.log")
    yield {"root": root, "proc": proc}
    if proc.poll() is None:
        proc.kill()


def _fingerprint_of(reference) -> dict:
    proc = reference["proc"]
    assert proc.wait(600) == 0, faults.tail(reference["root"] / "reference.log")
    return faults.fingerprint(reference["root"])


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, reference):
    root = tmp_path_factory.mktemp("faulted")
    config = faults.write_config(root, STEPS)
    prefix = faults.permissions_prefix()
    points = [faults.KillPoint(*point) for point in KILL_POINTS if prefix is not None or point[3] == "kill"]
    kills, code, out = faults.run_with_kills(config, root, points, STEPS, prefix=prefix or ())
    return {"root": root, "config": config, "kills": kills, "exit_code": code, "output": out,
            "read_only_tested": prefix is not None}


@pytest.mark.slow
def test_sigkill_inside_stages_then_rerun_equals_the_uninterrupted_run(killed_run, reference):
    kills = killed_run["kills"]
    assert killed_run["exit_code"] == 0, killed_run["output"]
    for kill in kills:
        assert kill.killed, kill  # each point was reached by a live run and struck there
        assert kill.problems == [], kill  # nothing torn or untrusted was left for the next run
    sigkills = [k for k in kills if k.point.fault == "kill"]
    inside = [k for k in sigkills if k.landed.startswith(k.point.stage)]
    assert len(inside) >= 3, [k.landed for k in sigkills]  # most kills landed inside their own stage
    expected = _fingerprint_of(reference)
    got = faults.fingerprint(killed_run["root"])
    assert faults.differences(expected, got) == []
    assert [r[0] for r in got["rows"]] == list(faults.EVALUATED[:3]) + ["student_supervised", "knowledge_transfer",
                                                                      "student_refinement"]
    # Every resumed stage logged each step exactly once, in order.
    for stage, records in got["metrics"].items():
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), stage


@pytest.mark.slow
def test_damaged_labels_and_caches_are_redone_and_a_damaged_checkpoint_is_refused(killed_run, reference):
    root, config = killed_run["root"], killed_run["config"]
    assert killed_run["exit_code"] == 0
    out = faults.damaged_file_runs(config, root, missing_weights=False)
    first = out["damaged_outputs_and_truncated_state"]
    # The truncated and the stale pseudo-labels were redone, byte for byte, and the truncated
    # evaluation cache rewritten whole, before the run reached the damaged checkpoint ...
    assert first["labels_redone_identical"] and first["eval_cache_whole"]
    # ... where it stopped, naming the state file, and touched nothing.
    assert first["exit_code"] == 1, first["output"]
    assert f"error: {out['files']['state']}: damaged checkpoint state" in first["output"]
    assert "to restart the stage" in first["output"] and first["left_as_found"]
    assert out["restored"]["exit_code"] == 0, out["restored"]["output"]
    assert faults.differences(_fingerprint_of(reference), faults.fingerprint(root)) == []


@pytest.mark.slow
def test_run_folder_turning_read_only_mid_stage_stops_with_a_clear_error(killed_run):
    """Write permission taken from the output folders mid-stage (as a read-only remount would):
    the run stops by itself, naming the path, no traceback; the last checkpoint stays whole and
    the resumed run ends equal to the uninterrupted one (previous test)."""
    if not killed_run["read_only_tested"]:
        pytest.skip("running as root without setpriv: file permissions cannot make a folder read-only")
    (fault,) = [k for k in killed_run["kills"] if k.point.fault == "read-only"]
    run = faults.run_dir(killed_run["root"])
    assert fault.exit_code == 1 and fault.error.startswith("error: "), fault
    assert str(run) in fault.error and "Permission denied" in fault.error, fault.error
    assert ".tmp'" not in fault.error  # the file being written, not its hidden temporary
    assert "Traceback" not in fault.error and fault.problems == []


# --------------------------------------------------------------------------- non-finite loss


@pytest.mark.slow
def test_infinite_loss_stops_the_run_says_so_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    from cast.training.trainer import Trainer

    config = faults.write_config(tmp_path, STEPS)
    stage = faults.run_dir(tmp_path) / "stages" / "knowledge_transfer"
    real = Trainer._part_loss

    def poisoned(self, net, part, batch, step, micro):
        total, terms, diagnostics = real(self, net, part, batch, step, micro)
        if self.stage == "knowledge_transfer" and step == 1 and part == "unlabeled":  # step 2 of stage 2
            total = total + math.inf
            terms = {**terms, "loss_semi": terms["loss_semi"] + math.inf, "total": total}
        return total, terms, diagnostics

    monkeypatch.setattr(Trainer, "_part_loss", poisoned)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs; two threads crawl on a busy 2-core machine
    try:
        _run_poisoned_then_clean(config, stage, monkeypatch, capsys, real)
    finally:
        torch.set_num_threads(threads)


def _run_poisoned_then_clean(config, stage, monkeypatch, capsys, real) -> None:
    from safetensors.torch import load_file

    from cast.cli import main
    from cast.training.checkpoint import load_checkpoint
    from cast.training.metrics import read_metrics
    from cast.training.trainer import Trainer

    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert (f"error: stage knowledge_transfer, step 2: loss term 'loss_semi' is inf; the step was not applied and "
            f"the last checkpoint in {stage / 'checkpoints'} is untouched") in err
    checkpoint = load_checkpoint(stage / "checkpoints")
    assert checkpoint.step == 1
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint.model_path).values())
    assert not (stage / "model").exists() and not (stage / "summary.json").exists()
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1]  # the bad step was not logged

    monkeypatch.setattr(Trainer, "_part_loss", real)
    assert main(["run", "--config", str(config)]) == 0
    records = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


# --------------------------------------------------------------------------- disk full

DISK_FULL = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from cast.models.student import build_student
from cast.pipeline.pseudo_labels import make_manifest, write_pseudo_labels
from cast.config import PseudoLabelConfig
from cast.training.checkpoint import save_checkpoint, save_model_dir
from cast.training.metrics import MetricsLogger

root = Path(sys.argv[1])
big, small = torch.nn.Linear(200, 200), torch.nn.Linear(2, 2)
manifest = make_manifest("abc", [1], PseudoLabelConfig(), 32, "t")
result = {"image_id": 1, "category_id": 1, "segmentation": {"size": [4, 4], "counts": "0@0"}, "score": 0.5}
logger = MetricsLogger(root / "metrics.jsonl")
# The last good files, written with room to spare.
save_checkpoint(root / "weights", 1, small, {"step": 1})
save_checkpoint(root / "state", 1, small, {"step": 1})
torch.manual_seed(0)
save_model_dir(build_student("cast-tiny", 2, ["a", "b"]), root / "model")
write_pseudo_labels(root / "labels.json", root / "labels.manifest.json", [result], manifest)
logger.log(1, {"loss": 1.0})

# From here on no file may grow beyond 32 KB: write() fails with EFBIG, as with a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768))
torch.manual_seed(1)
attempts = {
    "weights": lambda: save_checkpoint(root / "weights", 2, big, {"step": 2}),  # safetensors fails
    "state": lambda: save_checkpoint(root / "state", 2, small, {"step": 2, "big": torch.zeros(20000)}),  # torch.save
    "model": lambda: save_model_dir(build_student("cast-tiny", 2, ["a", "b"]), root / "model"),
    "labels": lambda: write_pseudo_labels(root / "labels.json", root / "labels.manifest.json", [result] * 2000,
                                          manifest),
    "metrics": lambda: logger.log(2, {"note": "x" * 40000}),
}
out = {}
for name, attempt in attempts.items():
    try:
        attempt()
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__name__, str(e), getattr(e, "errno", None)]
print(json.dumps(out))
"""


def test_disk_full_names_the_file_and_keeps_the_last_good_files(tmp_path):
    from safetensors.torch import load_file

    from cast.pipeline.pseudo_labels import load_if_current, make_manifest
    from cast.config import PseudoLabelConfig
    from cast.models.student import CastStudent
    from cast.training.checkpoint import load_checkpoint
    from cast.training.metrics import read_metrics

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("weights", "state"):
        kind, message, errno = errors[name]
        assert kind == "CheckpointWriteError" and errno == 27, errors[name]
        assert message == (f"cannot write checkpoint for step 2 to {tmp_path / name}: File too large; "
                           "the last good checkpoint (step 1) is kept")
        checkpoint = load_checkpoint(tmp_path / name)
        assert checkpoint.step == 1 and checkpoint.state == {"step": 1}
        load_file(checkpoint.model_path)
        assert not list((tmp_path / name).glob(".*"))  # no temporaries left
        # Nothing of step 2 that a reader could take for a checkpoint (in "state", the step-2
        # weights were written before the state failed: an orphan no pointer names).
        assert not (tmp_path / name / "state-00000002.pt").exists()
        assert (tmp_path / name / "model-00000002.safetensors").exists() == (name == "state")
    kind, message, _ = errors["model"]
    assert kind == "CheckpointWriteError" and message.startswith(f"cannot write model to {tmp_path / 'model'}: "
                                                                 "File too large")
    torch.manual_seed(0)
    from cast.models.student import build_student

    expected = build_student("cast-tiny", 2, ["a", "b"]).state_dict()
    kept = CastStudent.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(kept[k], expected[k]) for k in expected)  # the previous model, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    kind, message, errno = errors["labels"]
    assert kind == "OSError" and errno == 27 and message == f"[Errno 27] File too large: '{tmp_path / 'labels.json'}'"
    # The previous labels are intact but no manifest vouches for them any more: they are redone.
    assert json.loads((tmp_path / "labels.json").read_text())[0]["score"] == 0.5
    manifest = make_manifest("abc", [1], PseudoLabelConfig(), 32, "t")
    assert load_if_current(tmp_path / "labels.json", tmp_path / "labels.manifest.json", manifest) is None
    kind, message, errno = errors["metrics"]
    assert kind == "OSError" and errno == 27 and str(tmp_path / "metrics.jsonl") in message
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]  # a torn line is skipped


def test_read_only_folder_for_labels_and_model_names_the_path(tmp_path, monkeypatch):
    """Writes refused by the operating system (EROFS) at the calls every writer goes through."""
    import errno
    import tempfile

    from cast.config import PseudoLabelConfig
    from cast.pipeline import pseudo_labels as pl
    from cast.training.checkpoint import CheckpointWriteError, save_model_dir
    from cast.models.student import build_student

    manifest = pl.make_manifest("abc", [1], PseudoLabelConfig(), 32, "t")
    result = {"image_id": 1, "category_id": 1, "segmentation": {"size": [4, 4], "counts": "0@0"}, "score": 0.5}
    labels, manifest_path = tmp_path / "pseudo_labels" / "s.json", tmp_path / "pseudo_labels" / "s.manifest.json"
    pl.write_pseudo_labels(labels, manifest_path, [result], manifest)
    model = build_student("cast-tiny", 2, ["a", "b"])
    save_model_dir(model, tmp_path / "model")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def refuse(name):
        real = getattr(os, name) if hasattr(os, name) else getattr(tempfile, name)

        def call(*args, **kwargs):
            target = Path(kwargs.get("dir") or args[0])
            if target == tmp_path or tmp_path in target.parents:
                if name == "mkdir" and target.exists():  # as Linux does: EEXIST before EROFS
                    raise FileExistsError(errno.EEXIST, "File exists", str(target))
                raise OSError(errno.EROFS, "Read-only file system", str(target))
            return real(*args, **kwargs)
        return call

    for name in ("mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse(name))
    for name in ("unlink", "replace", "rename", "mkdir", "rmdir"):
        monkeypatch.setattr(os, name, refuse(name))

    with pytest.raises(OSError, match=rf"\[Errno 30\] Read-only file system: '{manifest_path}'"):
        pl.write_pseudo_labels(labels, manifest_path, [result, result], manifest)
    with pytest.raises(CheckpointWriteError, match=rf"cannot write model to {tmp_path / 'model'}: Read-only file "
                                                   r"system; the stage's checkpoints and any previous model"):
        save_model_dir(model, tmp_path / "model")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert pl.load_if_current(labels, manifest_path, manifest) == [result]  # still whole and vouched for


def test_kill_points_are_spread_over_the_steps():
    points = faults.kill_points(3, 3, ("teacher_adaptation",), 0.3, seed=0)
    assert [p.after_step for p in points] == [1, 2, 3] and all(0 <= p.delay_s <= 0.3 for p in points)
    assert faults.kill_points(3, 3, ("teacher_adaptation",), 0.3, seed=0) == points  # reproducible
    assert [p.after_step for p in faults.kill_points(2, 4, ("x",), 0.1, seed=1)] == [1, 3]
