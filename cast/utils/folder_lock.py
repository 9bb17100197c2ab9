"""One writer per folder: a run folder is refused while another process writes it, the folders runs
share (the stand-in teacher's cache, a teacher shared by seeds) are waited for, and what killed
writers left behind is swept when the next one enters.

A process killed inside an atomic write (SIGKILL, OOM killer, power loss) cannot remove its
temporary: the hidden ".<name>.<8 random chars>.tmp" file or ".<name>.<8 random chars>" folder that
tempfile made next to the target. Nothing ever reads them, but they pile up on every resume; they
are only safe to delete while no other process may be writing them, hence the lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from cast.utils.distributed import DistContext, barrier

LOCK_NAME = ".lock"
# tempfile's names (mkstemp / mkdtemp with prefix ".<name>." and, for files, suffix ".tmp"), and
# ".tmpXXXXXX", what safetensors' Rust writer (the tempfile crate) leaves when killed mid-save.
_TEMP_FILE = re.compile(r"^(\..+\.[a-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6})$")
_TEMP_DIR = re.compile(r"^\..+\.[a-z0-9_]{8}$")
_held: set[Path] = set()  # the folders this process holds


class FolderInUseError(OSError):
    """Another process holds the folder."""


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of interrupted atomic writes below `root`; the paths removed.
    Only call while holding `root` (see `exclusive_folder`). A folder below it with a lock of its own
    (a seed's run inside the run whose teacher it shares) is left to its own holder, who may be
    writing it now."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d / LOCK_NAME).exists()]
        for name in [d for d in dirnames if _TEMP_DIR.match(d)]:
            shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
            dirnames.remove(name)
            removed.append(Path(dirpath) / name)
        for name in filenames:
            if _TEMP_FILE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    (Path(dirpath) / name).unlink()
                removed.append(Path(dirpath) / name)
    return removed


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, enabled: bool = True, label: str = "folder",
                     wait: bool = False) -> Iterator[None]:
    """Hold `folder` (created if missing) for this process; when another process holds it, wait
    for it (`wait`) or raise FolderInUseError naming the folder and the holder's pid. An
    unwritable folder raises OSError "<label> <folder> is not writable: ...".
    Re-entrant within a process; the OS drops the lock when the holder exits, however it exits, so
    a killed run never leaves the folder locked. `enabled=False` (the non-main ranks of a torchrun
    launch, which write nothing) holds nothing."""
    key = Path(folder).resolve()
    if not enabled or key in _held:
        yield
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(f"{label} {folder} is not writable: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FolderInUseError(f"{label} {folder} is in use by another process (pid {holder}); wait for it "
                                   "to finish, or give this run another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held.add(key)
        try:
            remove_stale_temporaries(folder)
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def shared_folder(folder: str | os.PathLike, ctx: DistContext, label: str) -> Iterator[None]:
    """Hold a folder that runs share (waiting for whoever holds it) from rank 0 of `ctx`; the other
    ranks go on only once rank 0 holds it, so that every rank sees the same finished work."""
    with exclusive_folder(folder, enabled=ctx.is_main, label=label, wait=True):
        barrier()
        yield
