"""The in-memory form of every data set: image records, a lazy source of annotations, and the
decoding of image files.

A reader builds an `InstanceDataset` from `ImageRecord`s (id, path, name, size) and a
`TargetSource` that decodes one image's annotations on demand, so that opening a data set of
100 k images costs a directory scan or a json parse, not 100 k mask decodes. Indexing loads the
image (`load_image`) and decodes its masks into a `cast.structures.InstanceSample`.

`InstanceDataset.unlabeled()` returns an `UnlabeledImages`: a separate class that holds the
records only, so no code path from it leads back to the annotations.

`load_image` gives every reader the same (H, W, 3) uint8 RGB array, whatever the file's mode:
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

import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm import tqdm

from cast.data.errors import DataError, LoadReport, MissingFileError
from cast.structures import InstanceSample

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


@dataclass(frozen=True)
class ImageRecord:
    """One image: its id, where it lies, the name results refer to it by, and its size if known."""

    image_id: int
    path: Path
    file_name: str  # as the source names it (COCO file_name, path relative to the data set root)
    height: int | None = None  # None: known once the image or its annotation file is read
    width: int | None = None


@dataclass(frozen=True)
class Target:
    """One image's decoded annotations; crowd regions are kept apart from instances."""

    masks: np.ndarray  # (K, H, W) bool
    labels: np.ndarray  # (K,) int64, contiguous class index
    crowd_masks: np.ndarray  # (M, H, W) bool, regions annotated as crowd / group
    crowd_labels: np.ndarray  # (M,) int64

    @property
    def size(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def ignore(self) -> np.ndarray | None:
        """Union of the crowd regions, or None when there are none."""
        return self.crowd_masks.any(axis=0) if len(self.crowd_masks) else None


def make_target(masks: list[np.ndarray], labels: list[int], crowd_masks: list[np.ndarray],
                crowd_labels: list[int], height: int, width: int) -> Target:
    """A `Target` from per-region (H, W) masks; empty lists give correctly shaped empty arrays."""
    def stack(ms: list[np.ndarray]) -> np.ndarray:
        return np.stack(ms).astype(bool) if ms else np.zeros((0, height, width), bool)
    return Target(stack(masks), np.asarray(labels, np.int64).reshape(-1),
                  stack(crowd_masks), np.asarray(crowd_labels, np.int64).reshape(-1))


class TargetSource(Protocol):
    """Decodes the annotations of one image of a data set."""

    def decode(self, record: ImageRecord) -> Target:
        """The annotations of `record`; `DataError` naming the annotation file when they are bad."""


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(K, H, W) bool masks -> K COCO compressed RLEs with ``counts`` as str (json-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def coco_annotation(rle: dict[str, Any], ann_id: int, image_id: int, category_id: int,
                    iscrowd: bool) -> dict[str, Any]:
    """A COCO instance annotation for one compressed RLE (area and bbox computed from the mask)."""
    coded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return {"id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id),
            "segmentation": rle, "area": int(mask_utils.area(coded)),
            "bbox": [float(v) for v in mask_utils.toBbox(coded)], "iscrowd": int(bool(iscrowd))}


def coco_document(images: list[dict[str, Any]], annotations: list[dict[str, Any]], classes: Sequence[str],
                  category_ids: Sequence[int]) -> dict[str, Any]:
    """The top-level COCO instance json dict."""
    return {"info": {"description": "written by CAST workbench"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": int(c), "name": name} for c, name in zip(category_ids, classes)]}


class ImageDataset(Sequence):
    """Records, class names and category ids shared by labeled and unlabeled data sets."""

    def __init__(self, records: Iterable[ImageRecord], classes: Sequence[str], category_ids: Sequence[int],
                 report: LoadReport | None = None) -> None:
        self._records = tuple(records)
        self.classes = list(classes)
        self.category_ids = [int(c) for c in category_ids]
        if len(self.classes) != len(self.category_ids):
            raise ValueError(f"{len(self.classes)} class names for {len(self.category_ids)} category ids")
        self._index = {r.image_id: i for i, r in enumerate(self._records)}
        if len(self._index) != len(self._records):
            raise ValueError("image ids are not unique")
        self.report = report if report is not None else LoadReport(source="")

    @property
    def records(self) -> tuple[ImageRecord, ...]:
        return self._records

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def index_of(self, image_id: int) -> int:
        """Position of `image_id`; ValueError when the data set has no such image."""
        try:
            return self._index[int(image_id)]
        except KeyError:
            raise ValueError(f"image id {image_id} is not in this data set") from None

    def _positions(self, image_ids: Iterable[int]) -> list[int]:
        wanted = {int(i) for i in image_ids}
        missing = sorted(wanted - self._index.keys())
        if missing:
            raise ValueError(f"{len(missing)} image ids are not in this data set, e.g. {missing[:5]}")
        return sorted(self._index[i] for i in wanted)

    def _record(self, index: int) -> ImageRecord:
        index = operator.index(index)  # a clear TypeError for slices and floats
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self._records[index]

    def _image(self, record: ImageRecord) -> np.ndarray:
        image = load_image(record.path)
        if record.height is not None and image.shape[:2] != (record.height, record.width):
            # Some tools annotate the stored pixels and ignore the EXIF rotation that load_image applies.
            hint = ("; the annotations seem to be made on the pixels before their EXIF rotation"
                    if image.shape[:2] == (record.width, record.height) else "")
            raise DataError(record.path, f"image is {image.shape[1]}x{image.shape[0]} (w x h) but its record "
                                         f"(image id {record.image_id}) says {record.width}x{record.height}{hint}")
        return image


class UnlabeledImages(ImageDataset):
    """Images without annotations; a sample is the image with zero instances."""

    def __getitem__(self, index: int) -> InstanceSample:
        record = self._record(index)
        image = self._image(record)
        h, w = image.shape[:2]
        return InstanceSample(image=image, masks=np.zeros((0, h, w), bool), labels=np.zeros((0,), np.int64),
                              image_id=record.image_id, file_name=record.file_name,
                              meta={"path": str(record.path)})

    def subset(self, image_ids: Iterable[int]) -> UnlabeledImages:
        """The images with these ids, in this data set's order."""
        records = [self._records[i] for i in self._positions(image_ids)]
        return UnlabeledImages(records, self.classes, self.category_ids, self.report)


class InstanceDataset(ImageDataset):
    """Images with instance annotations; `classes[i]` has original category id `category_ids[i]`."""

    def __init__(self, records: Iterable[ImageRecord], classes: Sequence[str], category_ids: Sequence[int],
                 source: TargetSource, report: LoadReport | None = None) -> None:
        super().__init__(records, classes, category_ids, report)
        self._source = source

    def target(self, index: int) -> Target:
        """The decoded annotations of image `index`, without loading the image."""
        return self._source.decode(self._record(index))

    def __getitem__(self, index: int) -> InstanceSample:
        record = self._record(index)
        image = self._image(record)
        target = self._source.decode(record)
        if target.size != image.shape[:2]:
            raise DataError(record.path, f"image is {image.shape[1]}x{image.shape[0]} (w x h) but its "
                                         f"annotations are {target.size[1]}x{target.size[0]}")
        return InstanceSample(image=image, masks=target.masks, labels=target.labels, image_id=record.image_id,
                              file_name=record.file_name, ignore=target.ignore, meta={"path": str(record.path)})

    def subset(self, image_ids: Iterable[int]) -> InstanceDataset:
        """The images with these ids (and their annotations), in this data set's order."""
        records = [self._records[i] for i in self._positions(image_ids)]
        return InstanceDataset(records, self.classes, self.category_ids, self._source, self.report)

    def unlabeled(self) -> UnlabeledImages:
        """The same images with no annotations and no reference to them."""
        return UnlabeledImages(self._records, self.classes, self.category_ids)

    def coco_gt(self, progress: bool = True) -> dict[str, Any]:
        """COCO instance json of the ground truth: original category ids, compressed RLE masks,
        crowd regions as ``iscrowd=1`` annotations, annotation ids 1..N in image order."""
        images, annotations = [], []
        for record in tqdm(self._records, desc="ground truth to COCO", unit="img", disable=not progress):
            target = self._source.decode(record)
            height, width = target.size
            images.append({"id": record.image_id, "file_name": record.file_name, "height": height, "width": width})
            for masks, labels, crowd in ((target.masks, target.labels, False),
                                         (target.crowd_masks, target.crowd_labels, True)):
                for rle, label in zip(encode_masks(masks), labels):
                    annotations.append(coco_annotation(rle, len(annotations) + 1, record.image_id,
                                                       self.category_ids[int(label)], crowd))
        return coco_document(images, annotations, self.classes, self.category_ids)


def image_ids_of(samples: Sequence[InstanceSample]) -> list[int]:
    """Image ids of a data set without loading its images when it can tell them directly."""
    ids = getattr(samples, "image_ids", None)
    return list(ids) if ids is not None else [s.image_id for s in samples]


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path; `MissingFileError` naming it and what it should hold when it is no folder."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(path, f"folder not found (expected {what})")
    return path
