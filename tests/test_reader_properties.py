"""Property-based tests (hypothesis) of every reader: whatever bytes or json it is given, it either
reads them, or raises the project's `DataError` naming the file, or (``lenient=True``) skips the
bad item and counts it; never another exception. What is read satisfies the `InstanceSample`
invariants and goes through the training and evaluation views into a batch (cast.data.batches).

Inputs: COCO json with random structural and value damage (polygons of odd lengths, NaN,
outside the image, degenerate; RLE with bad counts strings and wrong sizes), Cityscapes
instanceIds and ADE20K instance PNGs with odd values, modes and sizes, image files of every mode
Pillow writes (1, L, P, P with transparency, LA, PA, RGBA, I;16, I, F, CMYK, YCbCr), 1x1 and thin
sizes, headers claiming billions of pixels, wrong extensions, truncated, bit-flipped and
non-image bytes; split files; the pipeline's pseudo-label store and checkpoint pointer.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from cast.config import PseudoLabelConfig
from cast.data.ade20k import ADE20K_INSTANCE_CLASSES, read_ade20k_instances
from cast.data.cityscapes import CITYSCAPES_THING_IDS, read_cityscapes
from cast.data.coco import read_coco
from cast.data.errors import DataError, DataWarning
from cast.data.folder import read_image_folder
from cast.data.dataset import IMAGE_EXTENSIONS, load_image, probe_image
from cast.data.batches import InstanceTorchDataset, collate_instances
from cast.data.splits import load_split
from cast.data.batches import EvalTransform, WeakStrongViews
from cast.pipeline import pseudo_labels as pl
from cast.structures import InstanceSample
from cast.training import checkpoint as ckpt_mod
from cast.training.checkpoint import load_checkpoint, load_weights, save_checkpoint

# A fixed, modest set of examples in the suite (seconds); CAST_PROPERTY_EXAMPLES=500 explores
# further with fresh random examples each time.
EXPLORE = int(os.environ.get("CAST_PROPERTY_EXAMPLES", "0"))
PROPERTY = settings(max_examples=EXPLORE or 40, deadline=None, derandomize=not EXPLORE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CROP = (32, 32)


# --------------------------------------------------------------------------------- shared checks


def _inside(path: str | Path, roots: list[Path]) -> bool:
    path = Path(path)
    return any(path == root or path.is_relative_to(root) for root in roots)


def clear_error(fn: Callable[[], Any], *roots: Path) -> tuple[Any, DataError | None]:
    """(fn(), None), or (None, the DataError) when fn raises one that names a file under `roots`
    and says what is wrong. Any other exception fails the test."""
    try:
        return fn(), None
    except DataError as e:
        assert _inside(e.path, list(roots)), f"error names {e.path}, not a file of this input: {e}"
        assert str(e) == f"{e.path}: {e.problem}" and e.problem.strip(), str(e)
        return None, e


def check_sample(sample: InstanceSample, num_classes: int, disjoint: bool = False) -> None:
    """The invariants every reader's samples keep (beyond InstanceSample's own shape checks)."""
    h, w = sample.height, sample.width
    assert h >= 1 and w >= 1
    assert sample.image.shape == (h, w, 3) and sample.image.dtype == np.uint8
    assert sample.masks.dtype == bool and sample.masks.shape == (len(sample.labels), h, w)
    assert sample.labels.dtype == np.int64
    assert ((sample.labels >= 0) & (sample.labels < num_classes)).all(), sample.labels
    assert all(m.any() for m in sample.masks), "an instance without pixels"
    if disjoint and len(sample.masks) > 1:
        assert sample.masks.sum(axis=0).max() <= 1, "instances of a label map overlap"
    if sample.ignore is not None:
        assert sample.ignore.shape == (h, w) and sample.ignore.dtype == bool
    assert isinstance(sample.image_id, int)


def check_batches(samples: list[InstanceSample]) -> None:
    """The samples go through the training views (weak + strong) and the evaluation view into batches."""
    if not samples:
        return
    def one_batch(transform) -> dict:
        dataset = InstanceTorchDataset(samples, transform)
        return collate_instances([dataset[i] for i in range(len(dataset))])

    batch = one_batch(WeakStrongViews(crop_size=CROP))
    b = len(samples)
    assert batch["pixel_values"].shape == (b, 3, *CROP) and batch["pixel_values_strong"].shape == (b, 3, *CROP)
    for key in ("pixel_values", "pixel_values_strong"):
        values = batch[key]
        # [0, 1] up to float rounding (a blur's weights sum to 1 within float precision)
        assert torch.isfinite(values).all() and values.min() >= -1e-6 and values.max() <= 1 + 1e-6
    assert batch["image_ids"] == [s.image_id for s in samples]
    for target, ids in zip(batch["targets"], batch["instance_ids"]):
        k = len(target["labels"])
        assert target["masks"].shape == (k, *CROP)
        assert ids.min() >= -1 and ids.max() < k if k else (ids == -1).all()
    batch = one_batch(EvalTransform(32))
    assert batch["orig_sizes"] == [(s.height, s.width) for s in samples]


def read_all(dataset, roots: list[Path], num_classes: int, disjoint: bool = False) -> list[InstanceSample]:
    """Every sample of `dataset` that reads (others must fail with a clear DataError), checked."""
    samples = []
    for index in range(len(dataset)):
        sample, error = clear_error(lambda: dataset[index], *roots)
        if error is None:
            check_sample(sample, num_classes, disjoint)
            samples.append(sample)
    return samples


def with_warnings(fn: Callable[[], Any]) -> tuple[Any, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, DataWarning)]


# --------------------------------------------------------------------------------- image bytes

MODES = ("1", "L", "P", "P+transparency", "LA", "PA", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr")
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
SIZES = ((1, 1), (1, 9), (9, 1), (2, 3), (13, 17), (1, 150), (120, 2))
GRAY_MODES = ("1", "L", "I;16", "I")


def make_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    h, w = size
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, rgba[..., 3])  # some fully transparent pixels
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 80000, (h, w), dtype=np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
    if mode == "P+transparency":
        image = Image.fromarray(rgba[..., :3]).convert("P")
        image.info["transparency"] = 0
        return image
    return Image.fromarray(rgba, "RGBA").convert(mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    transparency = image.info.get("transparency")
    image.save(out, format=fmt, **({"transparency": transparency} if transparency is not None else {}))
    return out.getvalue()


def _can_write(mode: str, fmt: str) -> bool:
    try:
        encode(make_image(mode, (2, 3), 0), fmt)
        return True
    except (OSError, KeyError, ValueError, TypeError):
        return False


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Pillow deprecates writing mode I as PNG
    COMBOS = [(m, f) for m in MODES for f in FORMATS if _can_write(m, f)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 60_000, height: int = 50_000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels (3e9), with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


DAMAGES = st.one_of(
    st.just(("none",)), st.just(("none",)), st.just(("none",)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.98)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 255)), min_size=1, max_size=6)),
    st.tuples(st.just("garbage"), st.binary(max_size=48)),
    st.just(("empty",)),
    st.just(("bomb",)),
)


def damage(data: bytes, how: tuple) -> bytes:
    kind = how[0]
    if kind == "truncate":
        return data[: int(len(data) * how[1])]
    if kind == "flip":
        out = bytearray(data)
        for where, value in how[1]:
            out[int(where * len(out))] = value
        return bytes(out)
    if kind == "garbage":
        return how[1]
    if kind == "empty":
        return b""
    if kind == "bomb":
        return png_bomb()
    return data


@st.composite
def image_files(draw) -> dict[str, Any]:
    mode, fmt = draw(st.sampled_from(COMBOS))
    naming = draw(st.sampled_from(["own", "own", "other image extension", "upper case", "unsupported"]))
    ext = FORMATS[fmt]
    if naming == "other image extension":
        ext = draw(st.sampled_from([e for e in IMAGE_EXTENSIONS if e != ext]))
    elif naming == "upper case":
        ext = ext.upper()
    elif naming == "unsupported":
        ext = draw(st.sampled_from([".gif", ".txt", "", ".png.part", ".svg"]))
    return {"mode": mode, "format": fmt, "size": draw(st.sampled_from(SIZES)), "seed": draw(st.integers(0, 999)),
            "ext": ext, "damage": draw(DAMAGES)}


def write_image_file(folder: Path, name: str, spec: dict[str, Any]) -> tuple[Path, Image.Image]:
    source = make_image(spec["mode"], spec["size"], spec["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = damage(encode(source, spec["format"]), spec["damage"])
    path = folder / f"{name}{spec['ext']}"
    path.write_bytes(data)
    return path, source


@PROPERTY
@given(spec=image_files())
def test_any_image_file_loads_or_names_the_file(spec):
    with tempfile.TemporaryDirectory() as tmp:
        path, source = write_image_file(Path(tmp), "image", spec)
        image, error = clear_error(lambda: load_image(path), path)
        size, probe_error = clear_error(lambda: probe_image(path), path)
        supported = path.suffix.lower() in IMAGE_EXTENSIONS
        if not supported:
            assert error is not None and "unsupported image extension" in error.problem
            assert probe_error is not None and "unsupported image extension" in probe_error.problem
            return
        if spec["damage"][0] == "bomb":
            assert "too large to decode safely" in error.problem and "too large" in probe_error.problem
            return
        if image is not None:
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and image.size > 0
            if size is not None:
                assert image.shape[:2] == size  # no EXIF rotation in these files
        if spec["damage"][0] != "none":
            return  # damaged bytes: decoding or a clear error are both fine
        h, w = spec["size"]
        assert size == (h, w)
        with Image.open(path) as stored:
            stored_mode = stored.mode
            try:
                stored.load()
            except OSError:  # Pillow writes some files it cannot read back (e.g. a 1x1 YCbCr TIFF)
                assert error is not None and "truncated or corrupt" in error.problem
                return
        if stored_mode == "F":
            assert error is not None and "32-bit float" in error.problem
            return
        assert error is None and image.shape == (h, w, 3)
        if stored_mode in GRAY_MODES:
            assert (image == image[..., :1]).all(), "a gray image must read as three equal channels"
        if stored_mode == "RGB" and spec["format"] in ("PNG", "BMP", "TIFF") and spec["mode"] == "RGB":
            np.testing.assert_array_equal(image, np.asarray(source))  # lossless formats read back exactly
        if stored_mode in ("RGBA", "LA") and spec["format"] in ("PNG", "TIFF"):
            alpha = np.asarray(source.convert("RGBA"))[..., 3]
            assert (image[alpha == 0] == 0).all(), "fully transparent pixels must become black"


@PROPERTY
@given(specs=st.lists(image_files(), min_size=1, max_size=4), lenient=st.booleans())
def test_image_folder_reads_skips_or_names_the_file(specs, lenient):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, spec in enumerate(specs):
            folder = root / "sub" if i % 2 else root  # the folder reader looks into subfolders too
            folder.mkdir(exist_ok=True)
            write_image_file(folder, f"img{i}", spec)
        candidates = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        (dataset, error), caught = with_warnings(
            lambda: clear_error(lambda: read_image_folder(root, lenient=lenient, progress=False), root))
        if error is not None:
            if not candidates:
                assert error.path == str(root) and "no images" in error.problem
            else:
                assert not lenient and Path(error.path) in candidates
            return
        skipped = dataset.report.skipped["unreadable_image"]
        assert len(dataset) + skipped == len(candidates)
        assert len(caught) == skipped == len(dataset.report.warnings) and (lenient or skipped == 0)
        check_batches(read_all(dataset, [root], num_classes=1))


# --------------------------------------------------------------------------------------- COCO

COCO_IMAGES = (("a.png", 12, 16), ("b.jpg", 1, 1), ("sub/c.png", 9, 5))
CATEGORY_IDS = (1, 7)


def _rle_string(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_base() -> dict[str, Any]:
    blob = np.zeros((12, 16), bool)
    blob[6:11, 9:15] = True
    return {
        "images": [{"id": i + 1, "file_name": name, "height": h, "width": w}
                   for i, (name, h, w) in enumerate(COCO_IMAGES)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 10, 1, 10, 8, 1, 8]],
             "bbox": [1, 1, 9, 7], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "segmentation": _rle_string(blob), "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 1, "segmentation": {"size": [9, 5], "counts": [10, 20, 15]},
             "iscrowd": 1},
            {"id": 4, "image_id": 2, "category_id": 7, "segmentation": {"size": [1, 1], "counts": [0, 1]}},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


def write_coco_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, h, w in COCO_IMAGES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


BASE_PATHS = _paths(coco_base())
NUMBERS = st.one_of(st.integers(-3, 20), st.floats(-3.0, 20.0), st.integers(-2**70, 2**70),
                    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0, 2**63]))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
COORDS = st.one_of(NUMBERS, NUMBERS, NUMBERS, st.none(), st.booleans(), st.text(max_size=2))
DEGENERATE = st.sampled_from([[[1, 1, 2, 2, 3, 3]], [[4, 4, 4, 4, 4, 4]], [[0, 0, 5, 5]], [[]], [],
                              [[1, 1, 5, 1, 5, 5, 1]], [1, 1, 5, 1, 5, 5], [[1, 1, 5, 1, 5, 5], "x"],
                              [[1, 1, 40, 1, 40, 5]], [[-3, -3, 5, 1, 5, 5]], [[1.2, 1.2, 1.3, 1.2, 1.3, 1.3]]])
POLYGONS = st.one_of(DEGENERATE, st.lists(st.lists(COORDS, max_size=12), max_size=3),
                     st.lists(st.lists(st.integers(-1, 17), min_size=6, max_size=10), min_size=1, max_size=2))
RLE_CHARS = st.characters(min_codepoint=32, max_codepoint=140)


@st.composite
def rle_segmentations(draw, size: tuple[int, int]) -> dict[str, Any]:
    h, w = size
    kind = draw(st.sampled_from(["compressed", "damaged compressed", "partition", "random list", "random string",
                                 "anything"]))
    if kind in ("compressed", "damaged compressed"):
        mask = np.asarray(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))).reshape(h, w)
        seg = _rle_string(mask)
        if kind == "damaged compressed":
            counts = list(seg["counts"])
            cut = draw(st.integers(0, len(counts)))
            seg["counts"] = "".join(counts[:cut]) + draw(st.text(RLE_CHARS, max_size=3)) + "".join(counts[cut + 1:])
    elif kind == "partition":
        cuts = sorted(draw(st.lists(st.integers(0, h * w), max_size=5)))
        seg = {"size": [h, w], "counts": [b - a for a, b in zip([0] + cuts, cuts + [h * w])]}
    elif kind == "random list":
        seg = {"size": [h, w], "counts": draw(st.lists(st.integers(-2, h * w + 2), max_size=6))}
    elif kind == "random string":
        seg = {"size": [h, w], "counts": draw(st.text(RLE_CHARS, max_size=10))}
    else:
        seg = {"size": [h, w], "counts": draw(JSON_VALUES)}
    if draw(st.integers(0, 4)) == 0:  # a wrong or malformed size
        seg["size"] = draw(st.one_of(st.lists(st.integers(-1, 20), max_size=3), JSON_VALUES))
    return seg


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> None:
    node = doc
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return  # an earlier mutation removed the way there
    try:
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


@st.composite
def coco_documents(draw) -> tuple[str | bytes, dict | None]:
    """(file content, the document when the content is json of it)."""
    doc = coco_base()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "delete", "polygon", "polygon", "rle", "rle", "bbox",
                                   "duplicate", "file_name", "drop annotations"]))
        if op in ("set", "delete"):
            _set(doc, draw(st.sampled_from(BASE_PATHS)), draw(JSON_VALUES) if op == "set" else None, op == "delete")
        elif op in ("polygon", "rle", "bbox"):
            index = draw(st.integers(0, len(doc["annotations"]) - 1)) if doc.get("annotations") else None
            if index is None or not isinstance(doc["annotations"][index], dict):
                continue
            ann = doc["annotations"][index]
            image = {1: (12, 16), 2: (1, 1), 3: (9, 5)}.get(ann.get("image_id"), (12, 16))
            if op == "polygon":
                ann["segmentation"] = draw(POLYGONS)
            elif op == "rle":
                ann["segmentation"] = draw(rle_segmentations(image))
            else:
                ann["bbox"] = draw(st.one_of(st.lists(NUMBERS, max_size=5), JSON_VALUES))
        elif op == "duplicate":
            section = draw(st.sampled_from(["images", "annotations", "categories"]))
            if isinstance(doc.get(section), list) and doc[section]:
                doc[section].append(copy.deepcopy(draw(st.sampled_from(doc[section]))))
        elif op == "file_name":
            if isinstance(doc.get("images"), list) and doc["images"] and isinstance(doc["images"][0], dict):
                doc["images"][0]["file_name"] = draw(st.sampled_from(
                    ["missing.png", "a.gif", "../a.png", "", "/nowhere/a.png", "b.jpg", "sub", "a\x00.png",
                     "sub/c.png", "A.PNG"]))
        else:
            doc.pop("annotations", None)
    text = json.dumps(doc)
    damage_kind = draw(st.sampled_from(["none"] * 6 + ["truncate", "garbage", "deep", "not utf-8", "top list"]))
    if damage_kind == "none":
        return text, doc
    if damage_kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))], None
    if damage_kind == "garbage":
        return draw(st.binary(max_size=40)), None
    if damage_kind == "deep":
        return '{"images": ' + "[" * 5000 + "]" * 5000 + "}", None
    if damage_kind == "not utf-8":
        return text.encode("utf-8")[:20] + b"\xff\xfe" + text.encode("utf-8")[20:], None
    return json.dumps([doc]), None


def _regions(dataset) -> int:
    return sum(len(dataset.target(i).labels) + len(dataset.target(i).crowd_labels) for i in range(len(dataset)))


@PROPERTY
@given(content=coco_documents())
def test_coco_json_reads_skips_or_names_the_file(content):
    text, doc = content
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_coco_images(root)
        path = root / "instances.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        strict, strict_error = clear_error(lambda: read_coco(path, progress=False), path)
        (lenient, lenient_error), caught = with_warnings(
            lambda: clear_error(lambda: read_coco(path, lenient=True, progress=False), path))
        for error in (strict_error, lenient_error):
            assert error is None or error.path == str(path)  # reading names the json, samples their image
        if lenient_error is not None:  # a problem with the whole file: strict mode refuses it too
            assert strict_error is not None
            return
        report = lenient.report
        assert len(caught) == len(report.warnings) == report.num_skipped - report.skipped["annotation_of_skipped_image"]
        if strict_error is not None:
            assert report.num_skipped >= 1  # what strict mode refused, lenient mode skipped
        else:
            assert report.num_skipped == 0 and len(strict) == len(lenient) and _regions(strict) == _regions(lenient)
        if isinstance(doc, dict):  # every image and annotation is either read or counted as skipped
            assert len(lenient) + _regions(lenient) + report.num_skipped == \
                len(doc["images"]) + len(doc.get("annotations", []))
        samples = read_all(lenient, [root], num_classes=len(lenient.classes))
        check_batches(samples)


# ------------------------------------------------------------------------ Cityscapes and ADE20K

ID_VALUES = st.sampled_from([0, 1, 7, 24, 26, 29, 33, 255, 999, 1000, 24000, 24001, 26000, 26005, 29001, 30002,
                             33999, 34000, 65535])
LABEL_MODES = st.sampled_from(["I;16", "I;16", "I", "L", "RGB", "1", "F", "P", "LA"])
LABEL_DAMAGES = st.one_of(st.just(("none",)), st.just(("none",)), st.just(("none",)), st.just(("missing",)),
                          st.tuples(st.just("truncate"), st.floats(0.0, 0.95)),
                          st.tuples(st.just("garbage"), st.binary(max_size=32)), st.just(("bomb",)))


@st.composite
def label_pngs(draw, values: st.SearchStrategy, channels: int) -> dict[str, Any]:
    size = draw(st.sampled_from([(1, 1), (3, 4), (6, 5)]))
    same_size = draw(st.integers(0, 5)) > 0
    shape = size if channels == 1 else (*size, channels)
    array = np.asarray(draw(st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))))
    return {"image_size": size, "label_size": size if same_size else (size[0] + 1, size[1]),
            "array": array.reshape(shape), "mode": draw(LABEL_MODES if channels == 1 else ADE_MODES),
            "damage": draw(LABEL_DAMAGES)}


def write_label_png(path: Path, spec: dict[str, Any]) -> None:
    if spec["damage"][0] == "missing":
        return
    array = spec["array"]
    if spec["label_size"] != spec["image_size"]:
        array = np.concatenate([array, array[:1]], axis=0)
    mode = spec["mode"]
    if mode in ("I;16", "I"):
        image = Image.fromarray(np.clip(array, 0, 65535).astype(np.uint16 if mode == "I;16" else np.int32),
                                None if mode == "I;16" else "I")
    elif mode == "F":
        image = Image.fromarray(array.astype(np.float32), "F")  # only TIFF holds it: TIFF bytes named .png
    else:
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert(mode)
    fmt = "TIFF" if mode == "F" else "PNG"
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_bytes(damage(encode(image, fmt), spec["damage"]))


def write_rgb(path: Path, size: tuple[int, int], fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format=fmt)


@PROPERTY
@given(specs=st.lists(label_pngs(ID_VALUES, 1), min_size=1, max_size=2), lenient=st.booleans())
def test_cityscapes_reads_skips_or_names_the_file(specs, lenient):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "gtFine" / "train").mkdir(parents=True)
        for i, spec in enumerate(specs):
            stem = f"ulm_000000_00000{i}"
            write_rgb(root / "leftImg8bit" / "train" / "ulm" / f"{stem}_leftImg8bit.png", spec["image_size"])
            write_label_png(root / "gtFine" / "train" / "ulm" / f"{stem}_gtFine_instanceIds.png", spec)
        (dataset, error), caught = with_warnings(
            lambda: clear_error(lambda: read_cityscapes(root, lenient=lenient), root))
        missing = sum(spec["damage"][0] == "missing" for spec in specs)
        if error is not None:
            assert not lenient and missing and "instanceIds file" in error.problem
            return
        assert len(dataset) + dataset.report.skipped["missing_annotation"] == len(specs) and len(caught) == missing
        samples = read_all(dataset, [root], num_classes=len(CITYSCAPES_THING_IDS), disjoint=True)
        for sample in samples:
            spec = specs[sample.image_id - 1]
            if spec["damage"][0] == "none":  # the instances are exactly the thing values >= 1000
                gt = root / "gtFine" / "train" / "ulm" / f"ulm_000000_00000{sample.image_id - 1}_gtFine_instanceIds.png"
                stored = np.asarray(Image.open(gt))
                things = {int(v) for v in np.unique(stored) if v >= 1000 and v // 1000 in CITYSCAPES_THING_IDS}
                assert len(sample.labels) == len(things)
        check_batches(samples)


ADE_VALUES = st.sampled_from([0, 0, 1, 4, 57, 100, 101, 150, 255])
ADE_MODES = st.sampled_from(["RGB", "RGB", "RGBA", "L", "P", "LA", "I;16"])


@PROPERTY
@given(specs=st.lists(label_pngs(ADE_VALUES, 3), min_size=1, max_size=2), lenient=st.booleans())
def test_ade20k_reads_skips_or_names_the_file(specs, lenient):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "annotations_instance" / "training").mkdir(parents=True)
        for i, spec in enumerate(specs):
            name = f"ADE_train_{i + 1:08d}"
            write_rgb(root / "images" / "training" / f"{name}.jpg", spec["image_size"], fmt="JPEG")
            spec = dict(spec, array=spec["array"] if spec["mode"] in ("RGB", "RGBA") else spec["array"][..., 0])
            write_label_png(root / "annotations_instance" / "training" / f"{name}.png", spec)
        (dataset, error), caught = with_warnings(
            lambda: clear_error(lambda: read_ade20k_instances(root, lenient=lenient), root))
        missing = sum(spec["damage"][0] == "missing" for spec in specs)
        if error is not None:
            assert not lenient and missing and "annotation" in error.problem
            return
        assert len(dataset) + dataset.report.skipped["missing_annotation"] == len(specs) and len(caught) == missing
        samples = read_all(dataset, [root], num_classes=len(ADE20K_INSTANCE_CLASSES), disjoint=True)
        for sample in samples:
            spec = specs[sample.image_id - 1]
            if spec["damage"][0] == "none":  # one instance per (category, instance) pair with category > 0
                pixels = spec["array"]
                pairs = {(int(r), int(g)) for r, g in zip(pixels[..., 0].ravel(), pixels[..., 1].ravel()) if r > 0}
                assert spec["mode"] in ("RGB", "RGBA") and pixels[..., 0].max() <= 100
                assert len(sample.labels) == len(pairs)
        check_batches(samples)


# ------------------------------------------------------------------------------------- split files

SPLIT = {"labeled_fraction": 0.5, "seed": 0, "labeled_image_ids": [1, 3], "unlabeled_image_ids": [2, 4]}


@PROPERTY
@given(mutations=st.lists(st.tuples(st.sampled_from(list(SPLIT) + ["extra"]), JSON_VALUES), max_size=2),
       drop=st.sampled_from([None, None, *SPLIT]), truncate=st.one_of(st.none(), st.integers(0, 60)))
def test_split_file_loads_or_names_the_file(mutations, drop, truncate):
    split = copy.deepcopy(SPLIT)
    for key, value in mutations:
        split[key] = value
    if drop is not None:
        split.pop(drop, None)
    text = json.dumps(split)
    if truncate is not None:
        text = text[:truncate]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.json"
        path.write_text(text)
        loaded, error = clear_error(lambda: load_split(path), path)
        if error is None:
            assert set(loaded) == set(SPLIT) and 0 < loaded["labeled_fraction"] <= 1 and loaded["labeled_image_ids"]
            assert not set(loaded["labeled_image_ids"]) & set(loaded["unlabeled_image_ids"])
            assert all(isinstance(i, int) for i in loaded["labeled_image_ids"] + loaded["unlabeled_image_ids"])


# ------------------------------------------------------------- the pipeline's own stored files


def _pseudo_results(n: int) -> list[dict[str, Any]]:
    seg = _rle_string(np.eye(4, dtype=bool))
    return [{"image_id": 10 + i % 2, "category_id": 1, "segmentation": seg, "score": 0.5, "area": 4,
             "bbox": [0.0, 0.0, 4.0, 4.0]} for i in range(n)]


EXPECTED_MANIFEST = pl.make_manifest("abc", [10, 11], PseudoLabelConfig(), 32, "teacher_adaptation")


@PROPERTY
@given(n=st.integers(0, 4),
       labels=st.sampled_from(["valid", "other count", "truncated", "garbage", "object", "bad items", "missing"]),
       manifest=st.sampled_from(["valid", "other teacher", "truncated", "list", "no count", "missing"]),
       cut=st.floats(0.0, 0.99))
def test_pseudo_labels_are_reused_only_when_whole_and_vouched_for(n, labels, manifest, cut):
    """A damaged, truncated or stale pseudo-label file is never trusted: it is redone (None)."""
    results = _pseudo_results(n)
    texts = {"valid": json.dumps(results), "other count": json.dumps(_pseudo_results(n + 1)),
             "truncated": json.dumps(results)[: int(cut * len(json.dumps(results)))],
             "garbage": "\x00{[", "object": json.dumps({"results": results}),
             "bad items": json.dumps([{"image_id": 10}] * n if n else [1])}
    manifests = {"valid": {"settings": EXPECTED_MANIFEST, "num_instances": n},
                 "other teacher": {"settings": {**EXPECTED_MANIFEST, "teacher_hash": "def"}, "num_instances": n},
                 "list": [{"settings": EXPECTED_MANIFEST, "num_instances": n}],
                 "no count": {"settings": EXPECTED_MANIFEST}}
    with tempfile.TemporaryDirectory() as tmp:
        path, manifest_path = Path(tmp) / "s.json", Path(tmp) / "s.manifest.json"
        if labels != "missing":
            path.write_text(texts[labels])
        if manifest == "truncated":
            manifest_path.write_text(json.dumps(manifests["valid"])[:20])
        elif manifest != "missing":
            manifest_path.write_text(json.dumps(manifests[manifest]))
        stored = pl.load_if_current(path, manifest_path, EXPECTED_MANIFEST)
        if labels == "valid" and manifest == "valid":
            assert stored == results
        else:
            assert stored is None, (labels, manifest)


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> Path:
    from test_training import TinySegModel

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = TinySegModel()
    for step in (1, 2):
        save_checkpoint(folder, step, model, {"step": step, "optimizer": {}, "note": "x" * 50})
    return folder


@settings(max_examples=EXPLORE or 30, deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pointer=st.one_of(st.just({"step": 2, "model": "model-00000002.safetensors", "state": "state-00000002.pt"}),
                         st.fixed_dictionaries({"step": st.one_of(st.integers(-1, 3), JSON_VALUES),
                                                "model": st.sampled_from(["model-00000001.safetensors",
                                                                          "model-00000009.safetensors",
                                                                          "../model-00000001.safetensors", "", 5]),
                                                "state": st.sampled_from(["state-00000001.pt", "state-00000002.pt",
                                                                          "/etc/passwd", None])}),
                         JSON_VALUES),
       pointer_cut=st.one_of(st.none(), st.floats(0.0, 0.99)),
       damaged=st.sampled_from([None, "model", "state"]), how=st.one_of(DAMAGES.filter(lambda d: d[0] != "flip")))
def test_checkpoint_pointer_and_files_load_or_fail_clearly(checkpoint_files, pointer, pointer_cut, damaged, how):
    """A checkpoint is resumed from only when the pointer and both files it names are whole;
    otherwise the error names the checkpoint folder (no half-written file is ever used). Bit flips
    inside a whole file (media corruption) are out of scope: nothing checksums the files."""
    from test_training import TinySegModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for p in checkpoint_files.iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        text = json.dumps(pointer)
        (folder / "latest.json").write_text(text if pointer_cut is None else text[: int(pointer_cut * len(text))])
        if damaged is not None and isinstance(pointer, dict) and isinstance(pointer.get(damaged), str) \
                and (folder / pointer[damaged]).is_file() and "/" not in pointer[damaged]:
            target = folder / pointer[damaged]
            target.write_bytes(damage(target.read_bytes(), how if how[0] != "none" else ("truncate", 0.5)))
        try:
            ckpt = load_checkpoint(folder)
            load_weights(TinySegModel(), ckpt.model_path)
        except (FileNotFoundError, ckpt_mod.CheckpointReadError) as e:
            assert str(folder) in str(e), str(e)
            return
        assert ckpt.model_path.parent == folder and isinstance(ckpt.state, dict) and ckpt.state["step"] == ckpt.step
