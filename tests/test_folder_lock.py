"""One writer per run folder, and the sweep of what killed atomic writes left behind."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cast.utils.folder_lock import LOCK_NAME, FolderInUseError, exclusive_folder, remove_stale_temporaries
from cast.utils.io import atomic_path

REPO = Path(__file__).resolve().parents[1]


def hold_in_child(folder: Path, seconds: float) -> subprocess.Popen:
    """A second process that holds `folder` for `seconds`; returns once it holds it. Its next line
    of output is the time.time() at which it lets go."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from cast.utils.folder_lock import exclusive_folder
        with exclusive_folder({str(folder)!r}):
            print("held", flush=True)
            time.sleep({seconds})
            print(time.time(), flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_is_refused_naming_the_folder_and_holder(tmp_path):
    folder = tmp_path / "runs" / "demo"
    child = hold_in_child(folder, 60)
    try:
        with pytest.raises(FolderInUseError, match=rf"run folder {folder} is in use by another process "
                                                   rf"\(pid {child.pid}\)"):
            with exclusive_folder(folder, label="run folder"):
                pass
    finally:
        child.kill()
        child.wait()
    # SIGKILL leaves no stale lock: the OS released it with the process.
    with exclusive_folder(folder):
        assert (folder / LOCK_NAME).read_text() == str(os.getpid())


def test_wait_blocks_until_the_holder_is_done(tmp_path):
    child = hold_in_child(tmp_path, 1.0)
    start = time.monotonic()
    with exclusive_folder(tmp_path, wait=True):
        waited = time.monotonic() - start
    child.wait()
    assert waited > 0.5


def test_reentrant_in_one_process_and_disabled_holds_nothing(tmp_path):
    with exclusive_folder(tmp_path):
        with exclusive_folder(tmp_path / "."):  # the same folder, spelled differently
            pass
        with exclusive_folder(tmp_path, enabled=False):
            pass
    with exclusive_folder(tmp_path / "other", enabled=False):
        assert not (tmp_path / "other").exists()


def test_entering_sweeps_temporaries_of_killed_writes_and_nothing_else(tmp_path):
    stage = tmp_path / "stages" / "knowledge_transfer"
    (stage / "checkpoints").mkdir(parents=True)
    # What a SIGKILL inside atomic_path / save_model_dir leaves: real tempfile names.
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(stage / "checkpoints" / "state-00000003.pt") as tmp:
            stale_file = tmp  # atomic_path removes its own on an exception; a SIGKILL would not
            raise KeyboardInterrupt
    stale_file.write_bytes(b"half a checkpoint")
    rust_tmp = stage / "checkpoints" / ".tmp1cSj6s"  # seen after a kill inside a safetensors save
    rust_tmp.write_bytes(b"half the weights")
    stale_dir = stage / ".model.9uevy9a2"
    (stale_dir / "sub").mkdir(parents=True)
    keep = [stage / ".hidden", stage / "notes.tmp", stage / ".model", stage / ".x.tmp", stage / ".tmpfile",
            stage / "model" / "w.bin"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    with exclusive_folder(tmp_path):
        assert not stale_file.exists() and not stale_dir.exists() and not rust_tmp.exists()
        assert all(path.read_text() == "mine" for path in keep)
    assert remove_stale_temporaries(tmp_path) == []


def test_the_sweep_leaves_a_folder_with_its_own_lock_to_its_holder(tmp_path):
    """runs/<name>/ is the shared teacher folder of its seeds' runs in runs/<name>/seed_<k>/: a seed
    entering it must not delete what another seed's process is writing in its own run folder now."""
    seed_run = tmp_path / "seed_1"
    child = hold_in_child(seed_run, 60)
    try:
        in_flight = seed_run / "stages" / "knowledge_transfer" / ".model.9uevy9a2"
        in_flight.mkdir(parents=True)
        stale = tmp_path / "stages" / "teacher_adaptation" / ".model.a1b2c3d4"
        stale.mkdir(parents=True)
        with exclusive_folder(tmp_path, wait=True):
            assert in_flight.is_dir() and not stale.exists()
    finally:
        child.kill()
        child.wait()
    with exclusive_folder(seed_run):  # its own next holder sweeps it
        assert not in_flight.exists()


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=rf"run folder {blocker / 'run'} is not writable"):
        with exclusive_folder(blocker / "run", label="run folder"):
            pass
