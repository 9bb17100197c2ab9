"""`python -m cast label`: zero-shot labels of an image folder by a tiny random Grounding-DINO +
SAM 2 / SAM teacher read from hub-layout folders, written as a COCO training set that reads back
as a data.kind: coco split; the teacher's `predict_images`; class names the tokenizer cannot take
and missing folders are usage errors."""
from __future__ import annotations

import json

import pytest
import torch

from cast.cli import main
from cast.data.registry import read_dataset
from test_predict import write_images
from test_vfm_teacher import CLASSES, write_hub_folders

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    return {kind: write_hub_folders(root / kind, kind) for kind in ("sam2", "sam")}


def label(hub, kind: str, *args: str) -> int:
    gdino, sam = hub[kind]
    return main(["label", "--teacher", "gdino-sam2" if kind == "sam2" else "gdino-sam", "--grounding-dino", str(gdino),
                 "--sam", str(sam), "--box-threshold", "0", "--text-threshold", "0", "--max-instances", "3",
                 *map(str, args)])


@pytest.mark.parametrize("kind", ["sam2", "sam"])
def test_label_a_folder_into_a_training_set(hub, kind, tmp_path, capsys):
    write_images(tmp_path / "data" / "train", 3)
    assert label(hub, kind, "--source", tmp_path / "data" / "train", "--classes", ",".join(CLASSES),
                 "--out", tmp_path / "data" / "train", "--shard-size", "2") == 0
    assert "point a config's data.root at" in capsys.readouterr().out
    data = json.loads((tmp_path / "data" / "train" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == CLASSES
    assert [im["file_name"] for im in data["images"]] == ["img0.png", "img1.jpg", "sub/img2.bmp"]
    assert data["annotations"] and all(0.0 <= a["score"] <= 1.0 for a in data["annotations"])
    # the output folder is the data set's train split: data.kind coco, data.root the folder above
    train = read_dataset("coco", tmp_path / "data", "train")
    assert train.classes == CLASSES and len(train) == 3
    counts = [len(train[i].labels) for i in range(3)]
    assert sum(counts) == len(data["annotations"]) and max(counts) <= 3


def test_the_teacher_predicts_images_like_any_model(hub, tmp_path):
    from cast.teachers.vfm import GroundingDinoSamTeacher

    gdino, sam = hub["sam2"]
    teacher = GroundingDinoSamTeacher.from_hub_folders(gdino, sam, classes=CLASSES, box_threshold=0.0,
                                                       text_threshold=0.0, max_instances=3)
    [path] = write_images(tmp_path, 1)
    [instances] = teacher.predict_images([path], score_threshold=0.0)
    assert instances.masks.shape[1:] == (48, 64) and 0 < len(instances) <= 3


def test_bad_class_names_and_folders_are_usage_errors(hub, tmp_path, capsys):
    write_images(tmp_path / "images", 1)
    args = ["--source", tmp_path / "images", "--out", tmp_path / "out"]
    assert label(hub, "sam2", *args, "--classes", "disc,x.y") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --classes 'disc,x.y': class 'x.y' tokenises to") and "\n" not in err
    assert label(hub, "sam2", *args, "--classes", "disc,disc") == 2
    assert "named more than once" in capsys.readouterr().err
    assert main(["label", "--grounding-dino", str(tmp_path / "absent"), "--sam", str(hub["sam2"][1]),
                 *map(str, args), "--classes", "disc"]) == 2
    assert "absent: Grounding-DINO folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "annotations.json").exists()


def test_predict_runs_a_saved_teacher_folder_like_a_student(tmp_path, capsys):
    from cast.teachers.vfm import random_teacher

    random_teacher(CLASSES, box_threshold=0.0, text_threshold=0.0, max_instances=2).save_pretrained(tmp_path / "t")
    write_images(tmp_path / "images", 2)
    assert main(["predict", "--model", str(tmp_path / "t"), "--source", str(tmp_path / "images"),
                 "--out", str(tmp_path / "out"), "--score-threshold", "0"]) == 0
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [c["name"] for c in data["categories"]] == CLASSES and len(data["images"]) == 2
    assert 0 < len(data["annotations"]) <= 4


def test_label_with_the_sam3_teacher(tmp_path):
    from test_sam3_teacher import write_sam3_folder

    torch.manual_seed(0)
    sam3 = write_sam3_folder(tmp_path / "sam3")
    write_images(tmp_path / "images", 2)
    assert main(["label", "--teacher", "sam3", "--sam3", str(sam3), "--source", str(tmp_path / "images"),
                 "--classes", ",".join(CLASSES), "--out", str(tmp_path / "out"), "--box-threshold", "0.2",
                 "--max-instances", "3"]) == 0
    data = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == CLASSES and len(data["images"]) == 2
    assert data["annotations"] and all(a["score"] > 0.2 for a in data["annotations"])
