"""`python -m cast predict` and the Python API on a tiny student: a folder, one image and a COCO
json (ids and categories kept) to one COCO instances json that pycocotools and the coco reader
open; `predict_images` and `cast.save_coco`; a SIGKILL in the middle resumes to the same bytes;
chunks of another torchrun rank are taken over; bad input gives one line and exit code 1 or 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import cast
from cast.cli import main
from cast.data.coco import read_coco
from cast.data.dataset import IMAGE_EXTENSIONS
from cast.inference.sources import open_source
from cast.inference.stream import StreamOptions, stream_predictions
from cast.models.student import build_student
from cast.utils.distributed import DistContext

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["disc", "square"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_student():
    torch.manual_seed(0)
    model = build_student("cast-tiny", 2, CLASSES).eval()
    # At initialisation every mask logit is slightly negative; spread them so instances survive.
    torch.nn.init.normal_(model.decoder.mask_features.weight, std=2.0)
    return model


def write_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (48, 64)) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / ("sub" if i % 3 == 2 else "") / f"img{i}.{('png', 'jpg', 'bmp')[i % 3]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[0] + 8 * (i % 2), size[1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    tiny_student().save_pretrained(root / "student")
    paths = write_images(root / "images", 5)
    return root, paths


def predict(*args: str) -> int:
    return main(["predict", *map(str, args)])


def test_folder_to_one_coco_instances_json(setup, tmp_path):
    root, paths = setup
    out = tmp_path / "out"
    assert predict("--model", root / "student", "--source", root / "images", "--out", out,
                   "--score-threshold", "0.1", "--save-overlays", "--batch-size", "2", "--shard-size", "2") == 0
    data = json.loads((out / "predictions.json").read_text())
    files = sorted(p.relative_to(root / "images").as_posix() for p in paths)
    assert [im["id"] for im in data["images"]] == [1, 2, 3, 4, 5]
    # images outside the json's folder are named by their absolute path (below it: relative, see test_label)
    assert [im["file_name"] for im in data["images"]] == [str(root / "images" / f) for f in files]
    assert data["categories"] == [{"id": 1, "name": "disc", "supercategory": ""},
                                  {"id": 2, "name": "square", "supercategory": ""}]
    assert data["annotations"] and [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    sizes = {im["id"]: [im["height"], im["width"]] for im in data["images"]}
    for ann in data["annotations"]:
        assert ann["segmentation"]["size"] == sizes[ann["image_id"]] and ann["score"] >= 0.1 and ann["area"] > 0
        assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4
    assert not (out / ".shards").exists()
    assert sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png")) == \
        sorted(f"{f}.png" for f in files)
    # pycocotools and the project's coco reader (a data.kind: coco split) open it as it is
    coco = COCO(str(out / "predictions.json"))
    assert len(coco.getAnnIds()) == len(data["annotations"]) and coco.loadRes(data["annotations"])
    dataset = read_coco(out / "predictions.json", progress=False)
    assert dataset.classes == CLASSES and len(dataset) == 5
    sample = dataset[0]
    assert sample.image.shape[:2] == tuple(sizes[1]) and len(sample.masks) == sum(
        a["image_id"] == 1 for a in data["annotations"])


@pytest.mark.slow
def test_the_predictions_open_in_fiftyone(setup, tmp_path):
    fo = pytest.importorskip("fiftyone")
    root, paths = setup
    write_images(tmp_path / "images", 2)
    for out in (tmp_path / "images", tmp_path / "elsewhere"):  # file names relative, then absolute
        assert predict("--model", root / "student", "--source", tmp_path / "images", "--out", out,
                       "--score-threshold", "0.1") == 0
        data = json.loads((out / "predictions.json").read_text())
        dataset = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=str(out),
                                      labels_path=str(out / "predictions.json"), label_types="segmentations",
                                      label_field="predictions")
        try:
            assert len(dataset) == 2 and sum(len(s.predictions.detections) for s in dataset
                                             if s.predictions) == len(data["annotations"]) > 0
        finally:
            dataset.delete()


def test_one_image_and_the_python_api_agree(setup, tmp_path):
    root, paths = setup
    assert predict("--model", root / "student", "--source", paths[1], "--out", tmp_path, "--score-threshold", "0.1") == 0
    data = json.loads((tmp_path / "predictions.json").read_text())
    assert [im["id"] for im in data["images"]] == [1]
    model = cast.load_model(root / "student")
    assert model.default_test_size is None  # not inside a run folder: images keep their size
    [instances] = model.predict_images([paths[1]], score_threshold=0.1)
    assert instances.masks.shape[1:] == (56, 64) and (instances.scores >= 0.1).all()
    decoded = mask_utils.decode([{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                                 for a in data["annotations"]]).transpose(2, 0, 1).astype(bool)
    assert np.array_equal(decoded, instances.masks.numpy())
    # arrays and PIL images go the same way as their file
    array = np.asarray(Image.open(paths[1]).convert("RGB"))
    for image in (array, Image.open(paths[1])):
        [again] = model.predict_images(image, score_threshold=0.1)
        assert torch.equal(again.masks, instances.masks) and torch.equal(again.labels, instances.labels)
    cast.save_coco([instances], [paths[1]], tmp_path / "api.json", classes=model.classes)
    api = json.loads((tmp_path / "api.json").read_text())
    assert api["annotations"] == data["annotations"] and api["categories"] == data["categories"]
    assert api["images"] == data["images"]


def test_coco_json_source_keeps_ids_and_category_ids(setup, tmp_path):
    root, paths = setup
    gt = {"images": [{"id": 10 * (i + 1), "file_name": p.relative_to(root).as_posix(), "height": h, "width": 64}
                     for i, (p, h) in enumerate(zip(paths[:3], (48, 56, 48)))],
          "annotations": [], "categories": [{"id": 9, "name": "square"}, {"id": 4, "name": "disc"},
                                            {"id": 5, "name": "other"}]}
    (root / "gt.json").write_text(json.dumps(gt))
    source = open_source(root / "gt.json", CLASSES)
    assert [r.image_id for r in source.records] == [10, 20, 30] and source.category_ids == [4, 9]
    assert predict("--model", root / "student", "--source", root / "gt.json", "--out", tmp_path,
                   "--score-threshold", "0") == 0
    data = json.loads((tmp_path / "predictions.json").read_text())
    assert [im["id"] for im in data["images"]] == [10, 20, 30]
    assert {a["category_id"] for a in data["annotations"]} <= {4, 9}
    assert data["categories"] == [{"id": 4, "name": "disc", "supercategory": ""},
                                  {"id": 9, "name": "square", "supercategory": ""}]


def test_every_image_extension_is_found(tmp_path):
    for ext in IMAGE_EXTENSIONS:
        Image.new("RGB", (8, 8)).save(tmp_path / f"x{ext}", format={".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF",
                                                                     ".tiff": "TIFF"}.get(ext, ext[1:].upper()))
    assert {"jpg", "jpeg", "png", "webp", "bmp", "tif"} <= {e.lstrip(".") for e in IMAGE_EXTENSIONS}
    assert len(open_source(tmp_path, CLASSES)) == len(IMAGE_EXTENSIONS)


def test_a_model_inside_a_run_folder_predicts_at_the_runs_test_size(setup, tmp_path):
    root, _ = setup
    model_dir = tmp_path / "runs" / "r" / "stages" / "student_refinement" / "model"
    tiny_student().save_pretrained(model_dir)
    (tmp_path / "runs" / "r" / "config.yaml").write_text("data:\n  test_size: 40\n")
    assert cast.load_model(model_dir).default_test_size == 40


def _run_in_rank(model, source, out, rank, world_size):
    options = StreamOptions(score_threshold=0.1, batch_size=2, shard_size=2)
    identity = {"path": "tiny", "weights": "w"}
    return stream_predictions(model, source, out, options, identity, DistContext(rank=rank, world_size=world_size))


def test_chunks_of_another_rank_are_taken_over_to_the_same_file(setup, tmp_path):
    root, _ = setup
    model = cast.load_model(root / "student")
    source = open_source(root / "images", model.classes)
    _run_in_rank(model, source, tmp_path / "whole", 0, 1)
    assert _run_in_rank(model, source, tmp_path / "split", 1, 2) is None  # rank 1 of 2: chunks 1 (of 0..2)
    assert sorted(p.name for p in (tmp_path / "split" / ".shards").glob("0*.json")) == ["000001.json"]
    summary = _run_in_rank(model, source, tmp_path / "split", 0, 1)
    assert summary.resumed_images == 2 and summary.images == 5
    assert (tmp_path / "split" / "predictions.json").read_bytes() == (tmp_path / "whole" / "predictions.json").read_bytes()
    # other settings in the same folder are refused, naming what changed
    (tmp_path / "split" / ".shards").mkdir()
    from cast.utils.cache import Record

    Record(tmp_path / "split" / ".shards" / "settings.json").write({"score_threshold": 0.9})
    assert predict("--model", root / "student", "--source", root / "images", "--out", tmp_path / "split") == 1


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cast", "predict", *map(str, args)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_in_the_middle_resumes_to_the_same_file(setup, tmp_path):
    root, _ = setup
    write_images(tmp_path / "many", 16, seed=1, size=(192, 256))
    args = ["--model", root / "student", "--source", tmp_path / "many", "--shard-size", "2", "--score-threshold", "0.1"]
    killed = _cli(*args, "--out", tmp_path / "out")
    shards = tmp_path / "out" / ".shards"
    deadline = time.monotonic() + 300
    while not list(shards.glob("0*.json")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    done = len(list(shards.glob("0*.json")))
    assert 1 <= done < 8 and not (tmp_path / "out" / "predictions.json").exists()
    resumed = _cli(*args, "--out", tmp_path / "out")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert f"resuming: {2 * done} of 16 images already done" in stderr and "done by an earlier run" in stdout
    torch.set_num_threads(1)
    assert predict(*args, "--out", tmp_path / "whole") == 0  # uninterrupted, in this process, one thread as well
    assert (tmp_path / "out" / "predictions.json").read_bytes() == (tmp_path / "whole" / "predictions.json").read_bytes()


def test_bad_input_gives_one_line_and_its_exit_code(setup, tmp_path, capsys):
    root, paths = setup
    model = ["--model", root / "student"]

    def fails(code: int, *args, names: str) -> None:
        assert predict(*args) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and names in err[0], err

    (tmp_path / "empty").mkdir()
    fails(1, *model, "--source", tmp_path / "empty", "--out", tmp_path / "o1", names=str(tmp_path / "empty"))
    fails(1, *model, "--source", tmp_path / "nowhere", "--out", tmp_path / "o1", names="nowhere")
    bad = tmp_path / "bad"
    write_images(bad, 2)
    (bad / "truncated.png").write_bytes(paths[0].read_bytes()[:100])
    (bad / "text.jpg").write_text("not an image")
    fails(1, *model, "--source", bad, "--out", tmp_path / "o2", "--strict", names="text.jpg")
    assert not (tmp_path / "o2" / "predictions.json").exists()
    assert predict(*model, "--source", bad, "--out", tmp_path / "o3") == 0  # skipped and counted instead
    info = json.loads((tmp_path / "o3" / "predictions.json").read_text())["info"]
    assert len(info["skipped_images"]) == 2 and "skipped 2 unreadable images" in capsys.readouterr().out
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text('{"model_type": "bert"}')
    fails(2, "--model", tmp_path / "notmodel", "--source", paths[0], "--out", tmp_path / "o4", names="config.json")
    (tmp_path / "lonely.onnx").write_bytes(b"onnx")
    fails(2, "--model", tmp_path / "lonely.onnx", "--source", paths[0], "--out", tmp_path / "o4",
          names="lonely.onnx")
    (tmp_path / "file").write_text("")
    fails(1, *model, "--source", paths[0], "--out", tmp_path / "file" / "out", names=str(tmp_path / "file" / "out"))
    with pytest.raises(SystemExit) as exit_info:
        predict(*model, "--source", paths[0])  # no --out: argparse's usage error
    assert exit_info.value.code == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_shards_the_images_and_writes_the_same_file(setup, tmp_path):
    import socket

    root, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", root / "student", "--source", root / "images", "--shard-size", "1", "--score-threshold", "0.1",
            "--device", "cpu"]
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), "-m", "cast", "predict", *map(str, args), "--out", str(tmp_path / "two")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert launch.stdout.count("predict: ") == 1  # rank 0 reports
    assert predict(*args, "--out", tmp_path / "one") == 0
    assert (tmp_path / "two" / "predictions.json").read_bytes() == (tmp_path / "one" / "predictions.json").read_bytes()
