"""Atomic file writes: a reader never sees a half-written checkpoint, json or label file.

Each write goes to a temporary file in the same directory, is flushed and fsync'ed, then
renamed over the target (rename is atomic on POSIX within one file system).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _naming(error: OSError, path: Path) -> OSError:
    """`error` (same errno and reason) naming `path`, the file being written, instead of its hidden
    temporary (".<name>.XXXX.tmp", the one written or one mkstemp tried) or nothing (a failed
    write() names no file)."""
    filename = error.filename
    if filename is not None:
        filename = Path(os.fsdecode(filename))
        if filename.parent != path.parent or not filename.name.startswith(f".{path.name}."):
            return error  # about another file: keep it
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror or str(error), str(path))  # PermissionError etc. by errno


def _os_error_behind(error: BaseException) -> OSError | None:
    """The operating-system error behind a serializer's failure, if any.

    Serializers report a failed write (disk full, file too large) in their own types: torch.save
    into a file object raises RuntimeError with the OSError as its context, safetensors a
    SafetensorError whose message ends in "(os error N)".
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"\(os error (\d+)\)", str(error))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    On any exception the temporary file is removed and `path` keeps its old content; an OSError
    (disk full, read-only folder) is raised naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        cause = e if isinstance(e, OSError) else _os_error_behind(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise _naming(cause, path) from e
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_save(path: str | os.PathLike, save_fn: Callable[[Path], None]) -> None:
    """Run `save_fn(tmp_path)` (e.g. safetensors' save_file, torch.save into an open file) and
    publish atomically; a failed write raises OSError naming `path` (see `_os_error_behind`)."""
    with atomic_path(path) as tmp:
        save_fn(tmp)


def read_json(path: str | os.PathLike) -> Any:
    """Read json, naming the file and the position of the problem when it does not parse."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid json at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:  # e.g. an integer literal longer than Python converts (4300 digits)
        raise ValueError(f"{path}: invalid json: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid json: nested too deeply to parse") from None
