"""Fault injection across the whole CAST pipeline: SIGKILL at random points inside every stage,
re-run until the run completes, and compare with a run that was never interrupted.

    python benchmarks/fault_injection.py                    # 3 kill points per stage -> results/faults.json
    python benchmarks/fault_injection.py --per-stage 1 --out /tmp/faults.json

The pipeline is `python -m cast run --config <config>` on a micro configuration (32-pixel demo
images, cast-tiny teacher and student, `steps` optimizer steps per stage, a checkpoint after
every step), each run a subprocess with one intra-op thread so that interrupted and
uninterrupted runs compute alike (CPU). No hook in the production code: a kill point is "stage S
has just written its checkpoint for step k" (this process's write of checkpoints/latest.json,
watched every few milliseconds), then a random delay (up to one step of that stage, as the
uninterrupted run measured it), then SIGKILL. So kills
land mid-step, during a checkpoint or model write, in the stage's evaluation, in the next
pseudo-labelling or at the start of the next stage; where each one landed is recorded from the
files present at that moment. Stages: the stand-in teacher's pretraining, 1a, 1b, 2, 3 and the
supervised baseline. After each stage's kills, a read-only fault: at its next checkpoint the
output folders (run folder, teacher cache) lose their write permission, as when a file system is
remounted read-only; the run must stop by itself with an error naming the path (no traceback),
and once writable again resume like after a kill. As root, whom permissions do not bind, runs go
through setpriv without the capabilities that override them.

After every kill, everything a later run could pick up must be whole: each checkpoint pointer's
files load (safetensors, torch), each pseudo-label file its manifest vouches for is reused, each
stage marked complete has its model, every published json parses (atomic writes leave only
hidden temporaries). When the run has completed, its report rows (model, AP, AP50), every
stage's final weights and the stand-in teacher's (sha256 of the tensors), pseudo-labels,
predictions, evaluated weights hashes and per-step training metrics (timings excepted) must
equal the uninterrupted run's.

Then damaged files, as a disk or a user could leave them: truncated and stale pseudo-labels and a
truncated evaluation cache are redone (the result equals the reference again); a checkpoint
pointer naming a truncated state file or a missing weights file stops the run with an error
naming the file, and once restored the run completes equal to the reference.

tests/test_fault_injection.py runs a handful of kill points with this module.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cast.utils.folder_lock import LOCK_NAME  # noqa: E402
NAME = "faults"
# Pipeline order; teacher_pretrain is the stand-in teacher's training (in the cache folder).
STAGES = ("teacher_pretrain", "teacher_adaptation", "teacher_self_training", "knowledge_transfer",
          "student_refinement", "student_supervised")
EVALUATED = ("teacher_zero_shot", "teacher_adaptation", "teacher_self_training", "knowledge_transfer",
             "student_refinement", "student_supervised")
PSEUDO_LABELLERS = ("teacher_adaptation", "teacher_self_training")


# --------------------------------------------------------------------------- the runs


def micro_config(root: Path, steps: int = 2) -> dict[str, Any]:
    """A run of every stage in seconds on CPU (the pipeline's behaviour, not its results)."""
    train = {"steps": steps, "checkpoint_every": 1}
    return {
        "name": NAME, "output_dir": str(root / "runs"), "seed": 0, "device": "cpu",
        "data": {"kind": "demo", "root": str(root / "data"), "labeled_fraction": 0.5, "crop_size": [32, 32],
                 "test_size": 32, "batch_size": 2, "unlabeled_batch_size": 2, "eval_batch_size": 4,
                 "demo": {"image_size": 32, "num_source_train": 2, "num_target_train": 4, "num_target_val": 2,
                          "max_objects": 2}},
        "teacher": {"kind": "standin", "preset": "cast-tiny",
                    "pretrain": {"cache_dir": str(root / "cache"), "train": dict(train)}},
        "student": {"preset": "cast-tiny"},
        "training": {stage: dict(train) for stage in STAGES[1:]},
        "losses": {"num_negatives": 8, "embedding_stride": 8},
        "pseudo_labels": {"score_threshold": 0.0, "min_area": 0, "max_instances": 3},
    }


def write_config(root: Path, steps: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(micro_config(root, steps)))
    return path


def child_env() -> dict[str, str]:
    # One intra-op thread in every run: results then do not depend on how busy the machine is.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}


def start(config: Path, log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python -m cast run --config config` (after the command `prefix`, e.g. setpriv) in its own
    process group, output to `log` (a new file)."""
    with open(log, "wb") as out:
        return subprocess.Popen([*prefix, sys.executable, "-m", "cast", "run", "--config", str(config)], cwd=REPO,
                                env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(config: Path, log: Path, timeout: float = 600, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run to the end; (exit code, the last lines of its output)."""
    proc = start(config, log, prefix)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return code, tail(log)


def tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


# --------------------------------------------------------------------------- the run folder


def run_dir(root: Path) -> Path:
    return root / "runs" / NAME


def stage_dir(root: Path, stage: str) -> Path | None:
    if stage == "teacher_pretrain":
        found = sorted((root / "cache").glob("standin-*"))
        return found[0] if found else None
    return run_dir(root) / "stages" / stage


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkpoint_step(root: Path, stage: str) -> tuple[int | None, int | None]:
    """(step named by the stage's checkpoint pointer, the pointer's mtime in ns), Nones when absent."""
    folder = stage_dir(root, stage)
    pointer = folder / "checkpoints" / "latest.json" if folder is not None else None
    try:
        mtime = pointer.stat().st_mtime_ns
    except (AttributeError, OSError):
        return None, None
    info = _read_json(pointer)
    return (info.get("step") if isinstance(info, dict) else None), mtime


def stage_complete(root: Path, stage: str) -> bool:
    folder = stage_dir(root, stage)
    summary = _read_json(folder / "summary.json") if folder is not None else None
    return isinstance(summary, dict) and "settings" in summary and (folder / "model" / "config.json").is_file()


def landed(root: Path, steps: int) -> str:
    """The phase of the pipeline that a kill interrupted, from the files present."""
    run = run_dir(root)
    phases: list[tuple[str, bool]] = [("data and teacher pretraining", stage_complete(root, "teacher_pretrain"))]
    for stage in STAGES[1:]:
        if stage == "teacher_adaptation":
            phases.append(("evaluation of teacher_zero_shot",
                           (run / "predictions" / "teacher_zero_shot_val.meta.json").is_file()))
        phases.append((stage, stage_complete(root, stage)))
        phases.append((f"evaluation of {stage}", (run / "predictions" / f"{stage}_val.meta.json").is_file()))
        if stage in PSEUDO_LABELLERS:
            phases.append((f"pseudo-labelling with {stage}",
                           (run / "pseudo_labels" / f"{stage}.manifest.json").is_file()))
    phases.append(("report", (run / "report.json").is_file()))
    for phase, done in phases:
        if not done:
            stage = "teacher_pretrain" if phase.startswith("data and") else phase
            if stage in STAGES:
                step, _ = checkpoint_step(root, stage)
                where = "before its first checkpoint" if step is None else (
                    f"after its last step ({step}/{steps}): model, summary" if step >= steps
                    else f"in step {step + 1}/{steps}")
                return f"{stage}, {where}"
            return phase
    return "after the report"


def published_problems(root: Path) -> list[str]:
    """Files a later run (or a reader) could pick up that are not whole; [] when all are."""
    from safetensors.torch import load_file

    from cast.pipeline.pseudo_labels import load_if_current
    from cast.training.checkpoint import load_checkpoint

    problems = []
    for pointer in sorted(root.rglob("checkpoints/latest.json")):
        try:
            ckpt = load_checkpoint(pointer.parent)
            load_file(ckpt.model_path)
            if ckpt.state.get("step") != ckpt.step:
                problems.append(f"{pointer}: state of step {ckpt.state.get('step')} behind step {ckpt.step}")
        except Exception as e:  # noqa: BLE001 - any failure is a finding
            problems.append(f"{pointer}: {type(e).__name__}: {e}")
    run = run_dir(root)
    for manifest_path in sorted((run / "pseudo_labels").glob("*.manifest.json")):
        labels = manifest_path.with_name(manifest_path.name.replace(".manifest.json", ".json"))
        manifest = _read_json(manifest_path)
        expected = manifest.get("settings", {}) if isinstance(manifest, dict) else {}
        if load_if_current(labels, manifest_path, expected) is None:
            problems.append(f"{labels}: its manifest vouches for it, but it is not whole")
    for meta in sorted((run / "predictions").glob("*.meta.json")):
        if _read_json(meta.with_name(meta.name.replace(".meta.json", ".json"))) is None:
            problems.append(f"{meta}: the predictions it describes do not parse")
    for stage in STAGES:
        folder = stage_dir(root, stage)
        if folder is not None and (folder / "summary.json").is_file():
            try:
                load_file(folder / "model" / "model.safetensors")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{folder}: complete, but its model does not load: {type(e).__name__}: {e}")
    for path in sorted(root.rglob("*.json")):
        if not path.name.startswith(".") and _read_json(path) is None:
            problems.append(f"{path}: does not parse")
    return problems


def temporaries(root: Path) -> list[str]:
    """Hidden temporaries of killed writes still there after the final run (each run sweeps those
    of its folders on entry: cast.utils.folder_lock); the folder locks are not temporaries."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name not in (".write-test", LOCK_NAME))


# --------------------------------------------------------------------------- comparison


def _tensor_hash(path: Path) -> str:
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(path).items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _json_hash(path: Path) -> str | None:
    data = _read_json(path)
    return None if data is None else hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def fingerprint(root: Path) -> dict[str, Any]:
    """What must not depend on interruptions (timings and wall times excluded)."""
    run = run_dir(root)
    report = _read_json(run / "report.json") or {}
    out: dict[str, Any] = {"rows": [(r["model"], r["AP"], r["AP50"]) for r in report.get("rows", [])],
                           "weights": {}, "metrics": {}, "evaluated_weights": {}, "predictions": {},
                           "pseudo_labels": {}}
    for stage in STAGES:
        folder = stage_dir(root, stage)
        out["weights"][stage] = _tensor_hash(folder / "model" / "model.safetensors")
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        out["metrics"][stage] = [{k: v for k, v in r.items() if k != "sec_per_step"} for r in records]
    for model in EVALUATED:
        meta = _read_json(run / "predictions" / f"{model}_val.meta.json") or {}
        out["evaluated_weights"][model] = meta.get("settings", {}).get("weights_hash")
        out["predictions"][model] = _json_hash(run / "predictions" / f"{model}_val.json")
    for stage in PSEUDO_LABELLERS:
        out["pseudo_labels"][stage] = _json_hash(run / "pseudo_labels" / f"{stage}.json")
    return out


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {str(a)[:80]} != {str(b)[:80]}"]


# --------------------------------------------------------------------------- kill points


@dataclass
class KillPoint:
    stage: str
    after_step: int  # strike once the stage has written its checkpoint for this step...
    delay_s: float  # ...this long after
    fault: str = "kill"  # "kill": SIGKILL; "read-only": the output folders lose their write permission


@dataclass
class Kill:
    point: KillPoint
    killed: bool  # False: the run got past the point (or ended) before the fault could strike
    landed: str = ""
    seconds_into_run: float = 0.0
    problems: list[str] = field(default_factory=list)
    exit_code: int | None = None
    error: str = ""  # the run's own "error: ..." line (read-only faults)


def kill_points(per_stage: int, steps: int, stages: tuple[str, ...], max_delay: float | dict[str, float], seed: int,
                read_only: bool = False) -> list[KillPoint]:
    """`per_stage` SIGKILL points per stage at checkpoints spread over 1..steps, random delays up
    to `max_delay` (seconds, or per stage); with `read_only`, then a read-only fault at the next
    step when the stage has one left."""
    rng = random.Random(seed)
    points = []
    for stage in stages:
        limit = max_delay[stage] if isinstance(max_delay, dict) else max_delay
        afters = sorted({min(steps, 1 + (i * steps) // per_stage if per_stage <= steps else 1 + i % steps)
                         for i in range(per_stage)})
        points += [KillPoint(stage, after, round(rng.uniform(0.0, limit), 4)) for after in afters]
        if read_only and afters[-1] < steps:
            points.append(KillPoint(stage, afters[-1] + 1, round(rng.uniform(0.0, limit), 4), "read-only"))
    return points


def output_folders(root: Path) -> list[Path]:
    """What a run writes: the run folder and the stand-in teacher's cache (not the data)."""
    return [root / "runs", root / "cache"]


def set_read_only(root: Path, read_only: bool) -> None:
    for folder in output_folders(root):
        for path in [folder, *folder.rglob("*")]:
            try:
                path.chmod((0o555 if path.is_dir() else 0o444) if read_only else (0o755 if path.is_dir() else 0o644))
            except FileNotFoundError:  # a temporary the run renamed meanwhile
                pass


def permissions_prefix() -> tuple[str, ...] | None:
    """A command prefix under which file permissions bind a run, or None when there is none: root
    ignores permissions, so as root runs go without the capabilities that let it (setpriv)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        return None
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable", "--")


def step_seconds(root: Path, stage: str) -> float:
    """Median time of one of the stage's steps in the run under `root` (its metrics.jsonl)."""
    records = [json.loads(line) for line in (stage_dir(root, stage) / "metrics.jsonl").read_text().splitlines()]
    times = sorted(r["sec_per_step"] for r in records if "sec_per_step" in r)
    return times[len(times) // 2] if times else 0.1


def wait_for(proc: subprocess.Popen, root: Path, point: KillPoint, since_ns: int, timeout: float) -> bool:
    """Poll until this process has written the stage's checkpoint of step >= point.after_step;
    False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step, mtime = checkpoint_step(root, point.stage)
        if step is not None and step >= point.after_step and mtime is not None and mtime >= since_ns:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError(f"no checkpoint {point} within {timeout} s")


def run_with_kills(config: Path, root: Path, points: list[KillPoint], steps: int, timeout: float = 600,
                   log: Path | None = None, prefix: tuple[str, ...] = ()) -> tuple[list[Kill], int, str]:
    """Run the pipeline, striking at each point in turn (restarting after each), then to the end;
    (kills, final exit code, final output tail). Read-only faults need `permissions_prefix()`."""
    log = log or root / "faulted"
    kills = []
    t0 = time.monotonic()
    for i, point in enumerate(points):
        step, _ = checkpoint_step(root, point.stage)
        if stage_complete(root, point.stage) or (step is not None and step >= point.after_step):
            kills.append(Kill(point, killed=False, landed="skipped: an earlier kill landed past this point"))
            continue
        since = time.time_ns()
        attempt_log = log.with_name(f"{log.name}-{i}.log")
        proc = start(config, attempt_log, prefix)
        if not wait_for(proc, root, point, since, timeout):
            kills.append(Kill(point, killed=False, landed=f"run ended first (exit {proc.returncode})"))
            continue
        time.sleep(point.delay_s)
        if point.fault == "read-only":
            # e.g. the file system remounted read-only: the run must stop by itself, saying where.
            set_read_only(root, True)
            try:
                proc.wait(timeout)
                errors = [line for line in tail(attempt_log, 40).splitlines() if line.startswith("error: ")]
                kills.append(Kill(point, killed=proc.returncode != 0, landed=landed(root, steps),
                                  seconds_into_run=round(time.monotonic() - t0, 2), problems=published_problems(root),
                                  exit_code=proc.returncode,
                                  error=(errors[-1] if errors else tail(attempt_log, 40)) if proc.returncode else ""))
            finally:
                set_read_only(root, False)
            continue
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        kills.append(Kill(point, killed=killed, landed=landed(root, steps) if killed else "run ended first",
                          seconds_into_run=round(time.monotonic() - t0, 2), problems=published_problems(root),
                          exit_code=proc.returncode))
    code, out = run_to_end(config, log.with_name(f"{log.name}-final.log"), timeout, prefix)
    return kills, code, out


# --------------------------------------------------------------------------- damaged files


def damaged_file_runs(config: Path, root: Path, missing_weights: bool = True) -> dict[str, Any]:
    """Damage a completed run as a disk or a user could, re-run, and record what each run did.

    1. Truncated pseudo-labels (1a), stale ones (1b: valid json, not what the manifest counted),
       a truncated evaluation cache (stage 2), and the baseline stage reopened (model and summary
       removed, so it resumes from its last checkpoint) with the state file its pointer names cut
       in half: the run must redo the labels (byte for byte) and the evaluation, then stop at the
       checkpoint with an error naming the state file, leaving it as found.
    2. (missing_weights) state restored, the weights file the pointer names deleted: stops naming it.
    3. Everything restored: the run completes (the caller compares it with the reference).
    """
    from cast.training.checkpoint import POINTER

    folder = run_dir(root)
    adapted = folder / "pseudo_labels" / "teacher_adaptation.json"
    self_trained = folder / "pseudo_labels" / "teacher_self_training.json"
    meta = folder / "predictions" / "knowledge_transfer_val.meta.json"
    labels = {p: p.read_bytes() for p in (adapted, self_trained)}
    adapted.write_bytes(labels[adapted][: max(1, len(labels[adapted]) // 2)])
    stale = [{"image_id": -1, "category_id": 1, "segmentation": {"size": [1, 1], "counts": "01"}, "score": 1.0}]
    self_trained.write_text(json.dumps(stale))
    meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 2])

    baseline = stage_dir(root, "student_supervised")
    checkpoints = baseline / "checkpoints"
    pointer = json.loads((checkpoints / POINTER).read_text())
    state, weights = checkpoints / pointer["state"], checkpoints / pointer["model"]
    saved = {p: p.read_bytes() for p in (state, weights)}
    shutil.rmtree(baseline / "model")
    (baseline / "summary.json").unlink()
    truncated = saved[state][: len(saved[state]) // 2]
    state.write_bytes(truncated)

    def as_found(state_bytes: bytes | None, weights_bytes: bytes | None) -> bool:
        # Refused, not "repaired": nothing overwrote the damaged checkpoint or moved its pointer.
        return ((state.read_bytes() if state.exists() else None) == state_bytes
                and (weights.read_bytes() if weights.exists() else None) == weights_bytes
                and json.loads((checkpoints / POINTER).read_text()) == pointer)

    out: dict[str, Any] = {"files": {"state": str(state), "weights": str(weights)}}
    code, text = run_to_end(config, root / "damaged-1.log")
    out["damaged_outputs_and_truncated_state"] = {
        "exit_code": code, "output": text, "left_as_found": as_found(truncated, saved[weights]),
        "labels_redone_identical": all(p.read_bytes() == b for p, b in labels.items()),
        "eval_cache_whole": _read_json(meta) is not None}
    state.write_bytes(saved[state])
    if missing_weights:
        weights.unlink()
        code, text = run_to_end(config, root / "damaged-2.log")
        out["missing_weights"] = {"exit_code": code, "output": text, "left_as_found": as_found(saved[state], None)}
        weights.write_bytes(saved[weights])
    code, text = run_to_end(config, root / "damaged-3.log")
    out["restored"] = {"exit_code": code, "output": text}
    return out


# --------------------------------------------------------------------------- the benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-stage", type=int, default=3, help="SIGKILL points per stage")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    parser.add_argument("--no-read-only", action="store_true", help="no read-only fault after the kills")
    parser.add_argument("--delay-scale", type=float, default=1.0,
                        help="kills land up to this many of the stage's step times after their checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--work-dir", type=Path, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "faults.json")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="cast-faults-"))
    started = time.monotonic()
    ref_root, faulted_root = work / "reference", work / "faulted"
    ref_config, config = write_config(ref_root, args.steps), write_config(faulted_root, args.steps)
    t = time.monotonic()
    ref_code, ref_out = run_to_end(ref_config, ref_root / "reference.log")
    ref_wall = time.monotonic() - t
    if ref_code != 0:
        print(ref_out, file=sys.stderr)
        return 1
    reference = fingerprint(ref_root)

    prefix = permissions_prefix()
    read_only = not args.no_read_only and prefix is not None
    step_s = {stage: step_seconds(ref_root, stage) * args.delay_scale for stage in args.stages}
    points = kill_points(args.per_stage, args.steps, tuple(args.stages), step_s, args.seed, read_only)
    t = time.monotonic()
    kills, code, out = run_with_kills(config, faulted_root, points, args.steps, prefix=prefix or ())
    faulted_wall = time.monotonic() - t
    diffs = differences(reference, fingerprint(faulted_root)) if code == 0 else [f"final run failed: {out}"]
    leftovers = temporaries(faulted_root)
    damaged = damaged_file_runs(config, faulted_root)
    damaged["equal_to_reference_once_restored"] = not differences(reference, fingerprint(faulted_root))

    def clear(k: Kill) -> bool:  # stopped by itself, naming a file of the run (not a temporary), no traceback
        return (k.exit_code == 1 and k.error.startswith("error: ") and str(faulted_root) in k.error
                and ".tmp'" not in k.error and "Traceback" not in k.error)

    def count(stage: str, fault: str, what) -> int:
        return sum(bool(what(k)) for k in kills if k.point.stage == stage and k.point.fault == fault)

    per_stage = {stage: {"kill_points": count(stage, "kill", lambda k: True),
                         "killed": count(stage, "kill", lambda k: k.killed),
                         "landed_inside_the_stage": count(stage, "kill",
                                                          lambda k: k.killed and k.landed.startswith(stage)),
                         "read_only_faults": count(stage, "read-only", lambda k: k.killed),
                         "read_only_stopped_with_a_clear_error": count(stage, "read-only", clear)}
                 for stage in args.stages}
    import torch

    result = {
        "benchmark": "fault_injection",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "config": {"steps_per_stage": args.steps, "checkpoint_every": 1, "images": "demo, 32 px, 2 source / 4 "
                   "target train / 2 val", "models": "cast-tiny teacher and student", "threads": 1,
                   "max_delay_s": {k: round(v, 3) for k, v in step_s.items()}, "seed": args.seed},
        "reference_wall_s": round(ref_wall, 1),
        "faulted_wall_s": round(faulted_wall, 1),
        "kills": [{**asdict(k.point), "killed": k.killed, "landed": k.landed, "seconds_into_run": k.seconds_into_run,
                   "exit_code": k.exit_code, "error": k.error, "problems": k.problems} for k in kills],
        "read_only_faults": "on" if read_only else "off (as root without setpriv, permissions cannot bind)",
        "per_stage": per_stage,
        "restarts": sum(k.killed for k in kills),
        "all_read_only_faults_stopped_clearly": all(v["read_only_stopped_with_a_clear_error"] == v["read_only_faults"]
                                                    for v in per_stage.values()),
        "torn_or_untrusted_files_after_kills": sum(len(k.problems) for k in kills),
        "final_exit_code": code,
        "equal_to_uninterrupted": code == 0 and not diffs,
        "differences": diffs,
        "compared": ["report rows (model, AP, AP50)", "final weights of every stage and the stand-in teacher",
                     "weights hash of every evaluated model", "predictions", "pseudo-labels",
                     "per-step training metrics except sec_per_step"],
        "hidden_temporaries_left": leftovers,
        "damaged_files": damaged,
        "total_wall_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("per_stage", "restarts", "equal_to_uninterrupted",
                                              "torn_or_untrusted_files_after_kills",
                                              "all_read_only_faults_stopped_clearly", "total_wall_s")}, indent=1))
    first, missing = damaged["damaged_outputs_and_truncated_state"], damaged["missing_weights"]
    ok = (result["equal_to_uninterrupted"] and not result["torn_or_untrusted_files_after_kills"]
          and result["all_read_only_faults_stopped_clearly"]
          and first["exit_code"] == 1 and first["left_as_found"] and first["labels_redone_identical"]
          and first["eval_cache_whole"] and damaged["files"]["state"] in first["output"]
          and missing["exit_code"] == 1 and missing["left_as_found"]
          and damaged["files"]["weights"] in missing["output"]
          and damaged["restored"]["exit_code"] == 0 and damaged["equal_to_reference_once_restored"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
