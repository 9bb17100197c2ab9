"""Atomic, resumable training checkpoints.

A checkpoint folder holds `model-<step>.safetensors` (weights), `state-<step>.pt` (optimizer,
scheduler, grad scaler, RNG states, data position) and `latest.json`, the pointer that is
written last: a crash at any moment of a save leaves the previous pointer and the files it
names intact, so the last good checkpoint always loads.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from cast.models.protocol import unwrap
from cast.utils.io import atomic_save, atomic_write_json, read_json

POINTER = "latest.json"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only folder); the last good one is kept."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointReadError(OSError):
    """The pointer or a file it names is damaged (not written by `save_checkpoint`, or truncated
    behind its back): nothing is resumed from it."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Checkpoint:
    step: int
    model_path: Path
    state: dict[str, Any]
    state_path: Path | None = None


def seed_all(seed: int) -> None:
    """Seed every global RNG a training step may draw from (python, numpy, torch, CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state_to_list(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_list(state: tuple) -> list:
    # torch.load(weights_only=True) refuses numpy arrays; plain lists load everywhere.
    name, keys, pos, has_gauss, gauss = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _describe(directory: Path) -> str:
    try:
        return f"step {read_json(directory / POINTER)['step']}"
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return "none"


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep_last: int = 2) -> None:
    """Write weights + training `state` for `step`, then move the pointer; keep `keep_last` saves."""
    directory = Path(directory)
    model_name, state_name = f"model-{step:08d}.safetensors", f"state-{step:08d}.pt"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save(directory / model_name, lambda p: save_model(unwrap(model), str(p)))
        atomic_save(directory / state_name, lambda p: _torch_save(state, p))
        atomic_write_json(directory / POINTER, {"step": step, "model": model_name, "state": state_name})
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoint for step {step} to {directory}: {e.strerror or e}; "
            f"the last good checkpoint ({_describe(directory)}) is kept", e.errno) from e
    _prune(directory, keep_last)


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file object: a failed write (disk full) then surfaces as the OSError behind
    # torch's RuntimeError; torch.save(obj, path) reports only "unexpected pos".
    with open(path, "wb") as f:
        torch.save(obj, f)


def _prune(directory: Path, keep_last: int) -> None:
    steps = sorted({int(p.stem.split("-")[1]) for p in directory.glob("model-*.safetensors")})
    for old in steps[:-keep_last]:
        for name in (f"model-{old:08d}.safetensors", f"state-{old:08d}.pt"):
            (directory / name).unlink(missing_ok=True)


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The checkpoint the pointer names, or None when the folder holds no checkpoint."""
    directory = Path(directory)
    pointer = directory / POINTER
    if not pointer.exists():
        return None
    restart = f"delete {directory} to restart the stage"
    try:
        info = read_json(pointer)
    except ValueError as e:  # read_json names the file and the position
        raise CheckpointReadError(f"{e}; {restart}") from None
    # save_checkpoint writes exactly these names: anything else (another step's files, a path
    # leading out of the folder) is not a pointer it wrote.
    step = info.get("step") if isinstance(info, dict) else None
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0
            and info.get("model") == f"model-{step:08d}.safetensors" and info.get("state") == f"state-{step:08d}.pt"):
        raise CheckpointReadError(f"{pointer}: not a checkpoint pointer (expected step, model-<step>.safetensors and "
                                  f"state-<step>.pt), got {info!r:.200}; {restart}")
    model_path, state_path = directory / info["model"], directory / info["state"]
    for path in (model_path, state_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: named by {pointer} but missing; delete {directory} to restart")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file: OSError, RuntimeError, EOFError, UnpicklingError...
        raise CheckpointReadError(f"{state_path}: damaged checkpoint state ({type(e).__name__}: {e}); "
                                  f"{restart}") from None
    if not isinstance(state, dict):
        raise CheckpointReadError(f"{state_path}: not a checkpoint state (got {type(state).__name__}); {restart}")
    return Checkpoint(step=step, model_path=model_path, state=state, state_path=state_path)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into `model`; a damaged file raises CheckpointReadError naming it."""
    try:
        missing, unexpected = load_model(unwrap(model), str(path), strict=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: weights file not found") from None
    except (SafetensorError, OSError) as e:  # truncated or not safetensors at all
        raise CheckpointReadError(f"{path}: damaged weights file ({type(e).__name__}: {e})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {type(unwrap(model)).__name__} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def save_model_dir(model: torch.nn.Module, directory: str | Path) -> None:
    """`save_pretrained` into a fresh temporary folder, then swap it in, so that `directory`
    either holds a complete model or nothing (a stage counts as done when it exists)."""
    directory = Path(directory)
    tmp = None
    try:
        # Inside the try: a read-only or full disk fails here already, and must say so the same way.
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        unwrap(model).save_pretrained(tmp)
        # The old model is only removed once the new one is complete.
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write model to {directory}: {e.strerror or e}; the stage's checkpoints "
                                   "and any previous model there are kept", e.errno) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
