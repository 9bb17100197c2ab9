"""Reading one image file into an (H, W, 3) uint8 RGB array, whatever its mode or orientation.

Conversions, so that every reader sees the same kind of array:
- EXIF orientation is applied (the array is the image as a viewer shows it).
- grayscale, palette, CMYK, YCbCr, LAB, HSV: converted to RGB by Pillow.
- an alpha channel (RGBA, LA, palette with transparency) is composited on black: fully
  transparent pixels become black rather than showing whatever colour they happen to hold.
- 16-bit and 32-bit integer grayscale (modes I;16*, I): scaled from [0, 65535] to [0, 255]
  with rounding (values outside are clipped), then replicated to three channels.
The format is detected from the content; the extension only has to be one of `IMAGE_EXTENSIONS`
(data sets in the wild hold PNGs named .jpg, which decode fine).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cast.data.errors import DataError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_image_path(path: str | os.PathLike) -> Path:
    """`path` as a Path; `DataError` when its extension is not an image's, `MissingFileError` when absent."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(path, f"unsupported image extension {path.suffix!r}; expected one of "
                              f"{', '.join(IMAGE_EXTENSIONS)}")
    if not path.is_file():
        raise MissingFileError(path, "image file not found")
    return path


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return np.round(rgb).astype(np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image, dtype=np.float64)
        gray = np.round(np.clip(gray, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        raise DataError(path, "32-bit float images are not supported (no agreed range to map to 8 bits)")
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as an (H, W, 3) uint8 RGB array with EXIF orientation applied.

    Raises `MissingFileError` for a missing file and `DataError` (naming the file) for an
    unsupported extension, bytes that are no image, or a truncated or corrupt image.
    """
    path = check_image_path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: truncation and corruption surface here
            image = ImageOps.exif_transpose(image)
            array = _to_rgb(image, path)
    except UnidentifiedImageError:
        raise DataError(path, "not an image file (no known image format recognised)") from None
    except Image.DecompressionBombError as e:
        raise DataError(path, f"image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        # Pillow reports truncated and corrupt data as OSError / SyntaxError / ValueError.
        raise DataError(path, f"truncated or corrupt image ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(array)


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) as stored, from the header alone; `DataError` when `path` is not an image.

    Cheap enough to run over a whole folder when a reader starts; truncation is only found by
    `load_image`, which decodes the pixels.
    """
    path = check_image_path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise DataError(path, "not an image file (no known image format recognised)") from None
    except Image.DecompressionBombError as e:
        # Pillow refuses such headers in `open` already, with an error that is no OSError.
        raise DataError(path, f"image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"unreadable image header ({type(e).__name__}: {e})") from None
    return height, width
