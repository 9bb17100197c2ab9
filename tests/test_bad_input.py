"""Every kind of bad input gives an error naming the file and the problem; lenient readers skip,
warn and count instead."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cast.data.ade20k import read_ade20k_instances
from cast.data.cityscapes import read_cityscapes
from cast.data.coco import read_coco
from cast.data.errors import DataError, DataWarning, MissingFileError
from cast.data.folder import read_image_folder
from cast.data.dataset import load_image
from cast.data.splits import load_split

H, W = 16, 20


def _save_png(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------- images

def test_missing_image(tmp_path):
    with pytest.raises(MissingFileError, match=r"nothere\.png: image file not found") as info:
        load_image(tmp_path / "nothere.png")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_truncated_image(tmp_path, fmt, ext):
    _save_png(tmp_path / "full.png", 40, 40)
    full = tmp_path / f"full.{ext}"
    Image.open(tmp_path / "full.png").save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"cut\.{ext}: truncated or corrupt"):
        load_image(cut)


def test_non_image_bytes_and_wrong_extension(tmp_path):
    (tmp_path / "text.png").write_text("this is not a picture")
    with pytest.raises(DataError, match=r"text\.png: not an image file"):
        load_image(tmp_path / "text.png")
    _save_png(tmp_path / "photo.png")
    (tmp_path / "photo.gif").write_bytes((tmp_path / "photo.png").read_bytes())
    with pytest.raises(DataError, match=r"photo\.gif: unsupported image extension '\.gif'"):
        load_image(tmp_path / "photo.gif")


# ------------------------------------------------------------------------------------------------ COCO

def _polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


BASE = {
    "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
               {"id": 2, "file_name": "b.png", "height": H, "width": W}],
    "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "segmentation": _polygon(1, 1, 8, 8),
                     "bbox": [1, 1, 7, 7], "iscrowd": 0},
                    {"id": 11, "image_id": 2, "category_id": 2, "segmentation": _polygon(2, 2, 9, 6), "iscrowd": 0},
                    {"id": 12, "image_id": 2, "category_id": 1, "segmentation": _polygon(10, 8, 18, 14), "iscrowd": 0}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
}


def _write(tmp_path: Path, data) -> Path:
    for name in ("a.png", "b.png"):
        if not (tmp_path / name).exists():
            _save_png(tmp_path / name)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _set(index, key, value):
    def mutate(data):
        data["annotations"][index][key] = value
    return mutate


def _drop_segmentation(data):
    del data["annotations"][1]["segmentation"]


def _rle_all_zero(data):
    data["annotations"][1]["segmentation"] = {"size": [H, W], "counts": [H * W]}


def _rle_wrong_size(data):
    data["annotations"][1]["segmentation"] = {"size": [H + 1, W], "counts": [(H + 1) * W]}


def _rle_wrong_total(data):
    data["annotations"][1]["segmentation"] = {"size": [H, W], "counts": "0"}  # one run of 0 pixels


def _duplicate_annotation(data):
    data["annotations"][1]["id"] = 10


def _image_file_missing(data):
    data["images"][1]["file_name"] = "gone.png"


def _image_key_missing(data):
    del data["images"][1]["height"]


# (mutation, LoadReport reason, text the message must contain, valid annotations left when lenient)
ANNOTATION_CASES = {
    "unknown image": (_set(1, "image_id", 99), "unknown_image",
                      r"annotation 11 \(image 99\): refers to image id 99", 2),
    "unknown category": (_set(1, "category_id", 5), "unknown_category", r"annotation 11 .*category id 5", 2),
    "missing key": (_drop_segmentation, "missing_key", r"annotation 11 .*missing key 'segmentation'", 2),
    "two points": (_set(1, "segmentation", [[1, 1, 5, 5]]), "degenerate_polygon",
                   r"annotation 11 .*polygon 0 has 4 coordinates", 2),
    "zero area": (_set(1, "segmentation", [[1, 1, 5, 5, 9, 9]]), "degenerate_polygon",
                  r"annotation 11 .*polygon 0 has zero area", 2),
    "empty rle": (_rle_all_zero, "empty_mask", r"annotation 11 .*the mask has no pixels", 2),
    "polygon outside": (_set(1, "segmentation", _polygon(2, 2, W + 5, 6)), "out_of_bounds",
                        rf"annotation 11 .*outside the {W}x{H} image", 2),
    "bbox outside": (_set(0, "bbox", [1, 1, 7, H + 3]), "out_of_bounds", r"annotation 10 \(image 1\): bbox", 2),
    "rle size": (_rle_wrong_size, "out_of_bounds", r"annotation 11 .*RLE size \[17, 20\] differs", 2),
    "rle total": (_rle_wrong_total, "out_of_bounds", r"annotation 11 .*RLE runs cover 0 pixels", 2),
    "duplicate id": (_duplicate_annotation, "duplicate_id",
                     r"annotation 10 \(image 2\): annotation id appears twice", 2),
    "missing image file": (_image_file_missing, "missing_image", r"image 2: image file .*gone\.png not found", 1),
    "image key missing": (_image_key_missing, "missing_key", r"image 2: missing key 'height'", 1),
}


@pytest.mark.parametrize("case", list(ANNOTATION_CASES))
def test_bad_coco_strict_and_lenient(tmp_path, case):
    mutate, reason, message, valid_left = ANNOTATION_CASES[case]
    data = copy.deepcopy(BASE)
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(DataError, match=r"instances\.json: " + message):
        read_coco(path, progress=False)
    with pytest.warns(DataWarning, match=message):
        dataset = read_coco(path, lenient=True, progress=False)
    assert dataset.report.skipped[reason] == 1 and reason in dataset.report.skipped
    assert sum(len(s.labels) for s in dataset) == valid_left
    assert len(dataset.report.warnings) == 1


def test_bad_coco_files(tmp_path):
    with pytest.raises(MissingFileError, match=r"absent\.json: annotation file not found"):
        read_coco(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json: invalid json at line 1"):
        read_coco(broken)
    no_images = _write(tmp_path, {"categories": BASE["categories"], "annotations": []})
    with pytest.raises(DataError, match=r"instances\.json: missing top-level key 'images'"):
        read_coco(no_images)
    duplicate = copy.deepcopy(BASE)
    duplicate["categories"].append({"id": 2, "name": "again"})
    with pytest.raises(DataError, match=r"instances\.json: category id 2 appears twice"):
        read_coco(_write(tmp_path, duplicate))


def test_image_size_differs_from_json(tmp_path):
    data = copy.deepcopy(BASE)
    data["images"][0]["height"] = H + 4
    data["annotations"] = []
    dataset = read_coco(_write(tmp_path, data), progress=False)
    with pytest.raises(DataError, match=rf"a\.png: image is {W}x{H} \(w x h\) but its record .* says {W}x{H + 4}"):
        dataset[0]


# ------------------------------------------------------------------------------- Cityscapes and ADE20K

def test_cityscapes_missing_annotation(tmp_path):
    with pytest.raises(MissingFileError, match=r"leftImg8bit/train: folder not found"):
        read_cityscapes(tmp_path)
    for stem in ("ulm_000000_000001", "ulm_000000_000002"):
        _save_png(tmp_path / "leftImg8bit" / "train" / "ulm" / f"{stem}_leftImg8bit.png")
    gt = tmp_path / "gtFine" / "train" / "ulm" / "ulm_000000_000002_gtFine_instanceIds.png"
    gt.parent.mkdir(parents=True)
    Image.fromarray(np.full((H, W), 26001, np.uint16)).save(gt)
    with pytest.raises(DataError, match=r"ulm_000000_000001_leftImg8bit\.png: instanceIds file .*"
                                        r"ulm_000000_000001_gtFine_instanceIds\.png not found"):
        read_cityscapes(tmp_path)
    with pytest.warns(DataWarning):
        dataset = read_cityscapes(tmp_path, lenient=True)
    assert dataset.report.skipped["missing_annotation"] == 1
    assert dataset.image_ids == [2] and len(dataset[0].labels) == 1  # ids stay those of the full listing
    with pytest.raises(ValueError, match="unknown Cityscapes split 'training'"):
        read_cityscapes(tmp_path, split="training")


def test_ade20k_missing_and_bad_annotation(tmp_path):
    images = tmp_path / "images" / "training"
    annotations = tmp_path / "annotations_instance" / "training"
    annotations.mkdir(parents=True)
    for i in (1, 2):
        images.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / f"ADE_train_{i:08d}.jpg")
    bad = np.zeros((H, W, 3), np.uint8)
    bad[:4, :4] = (150, 1, 0)  # category 150 does not exist in the instance track
    Image.fromarray(bad).save(annotations / "ADE_train_00000002.png")
    with pytest.raises(DataError, match=r"ADE_train_00000001\.jpg: annotation .*ADE_train_00000001\.png not found"):
        read_ade20k_instances(tmp_path)
    with pytest.warns(DataWarning):
        dataset = read_ade20k_instances(tmp_path, lenient=True)
    assert dataset.report.skipped["missing_annotation"] == 1 and dataset.image_ids == [2]
    with pytest.raises(DataError, match=r"ADE_train_00000002\.png: category value 150"):
        dataset[0]


# -------------------------------------------------------------------------------------- folder, split

def test_folder_with_non_image(tmp_path):
    _save_png(tmp_path / "good.png")
    (tmp_path / "fake.jpg").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"fake\.jpg: not an image file"):
        read_image_folder(tmp_path)
    with pytest.warns(DataWarning, match="fake.jpg"):
        dataset = read_image_folder(tmp_path, lenient=True)
    assert dataset.report.skipped["unreadable_image"] == 1
    assert [r.file_name for r in dataset.records] == ["good.png"] and dataset.image_ids == [2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images"):
        read_image_folder(tmp_path / "empty")


def test_bad_split_file(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"labeled_fraction": 0.5, "seed": 0, "labeled_image_ids": [1, 2],
                                "unlabeled_image_ids": [2, 3]}))
    with pytest.raises(DataError, match=r"split\.json: 1 image ids are both labeled and unlabeled"):
        load_split(path)
    path.write_text(json.dumps({"labeled_fraction": 0.5, "seed": 0, "labeled_image_ids": [1]}))
    with pytest.raises(DataError, match=r"split\.json: split is missing keys \['unlabeled_image_ids'\]"):
        load_split(path)
    path.write_text("{")
    with pytest.raises(ValueError, match=r"split\.json: invalid json"):
        load_split(path)


def test_annotations_made_before_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: the loaded image is H x W transposed
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "phone.jpg", "height": H, "width": W}],
                                "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    dataset = read_coco(path, progress=False)
    with pytest.raises(DataError, match=r"phone\.jpg: image is .* before their EXIF rotation"):
        dataset[0]
