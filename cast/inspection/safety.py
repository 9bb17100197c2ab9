"""What the inspection app accepts from a request: image keys that stay inside the run and data
folders, and uploads that are images of an accepted format and size (checked before decoding)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cast.data.dataset import load_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


class UnsafePathError(ValueError):
    """A request named a file outside the folders the app may read."""


def resolve_inside(relative: str, roots: Sequence[Path]) -> Path:
    """`relative` resolved against the first root, refused unless it stays inside one of `roots`.

    Symbolic links are followed before the check, so a link inside a root that points outside
    it is refused too. Absolute paths, NUL bytes and empty names are refused outright.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UnsafePathError(f"{relative!r}: refused: not a file name")
    if Path(relative).is_absolute() or Path(relative).drive:
        raise UnsafePathError(f"{relative!r}: refused: absolute paths are not accepted")
    resolved_roots = [Path(r).resolve() for r in roots]
    path = (resolved_roots[0] / relative).resolve()
    if not any(path.is_relative_to(root) for root in resolved_roots):
        raise UnsafePathError(f"{relative!r}: refused: resolves outside the run and data folders")
    return path


def read_upload(path: str | os.PathLike, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_UPLOAD_PIXELS) -> np.ndarray:
    """An uploaded file as (H, W, 3) uint8 RGB; ValueError naming the file when it is no image of
    an accepted format, larger than `max_bytes` or has more than `max_pixels` pixels (checked from
    the header, before decoding). Decoding is `cast.data.dataset.load_image`'s (EXIF orientation,
    alpha, 16-bit), so an upload is read exactly like a data set image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.name}: uploaded file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path.name}: file is {size / 2**20:.1f} MiB, more than the "
                         f"{max_bytes / 2**20:.0f} MiB allowed")
    try:
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise ValueError(f"{path.name}: not an image (no image format recognised)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path.name}: image too large to decode safely: {e}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path.name}: unreadable image header ({e})") from None
    if kind not in UPLOAD_FORMATS:
        raise ValueError(f"{path.name}: {kind} images are not accepted; use one of {', '.join(UPLOAD_FORMATS)}")
    if width * height > max_pixels:
        raise ValueError(f"{path.name}: {width}x{height} pixels is more than the {max_pixels} allowed")
    return load_image(path)
