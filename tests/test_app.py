"""The inspection app: run reading, overlays, the contrastive sampler at a clicked pixel, upload and
path checks (cast.inspection), then the Gradio app driven over HTTP with gradio_client.

`make_synthetic_run` (also used by test_app_browser.py and test_fiftyone.py) writes a tiny run
folder: demo images with COCO ground truth, a split, two stages' pseudo-labels and one model's
val predictions (COCO results with RLE masks), and a tiny random student.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from cast.config import CastConfig, DataConfig, LossConfig, save_config
from cast.data import demo
from cast.data.coco import read_coco
from cast.data.splits import make_split, save_split
from cast.inspection import (GROUND_TRUTH, ImageInstances, PixelGrid, RunContents, RunInspector, UnsafePathError,
                             colour_of, draw_instances, enlarge, explain_pixel, instance_id_map, read_upload,
                             resolve_inside)
from cast.models.outputs import SegmentationOutput
from cast.models.student import build_student
from cast.runs import RunFolder
from cast.utils.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
MODEL_STAGE = "student_refinement"
CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


# --------------------------------------------------------------------------- synthetic run


def _result(mask: np.ndarray, image_id: int, category_id: int, score: float) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"image_id": int(image_id), "category_id": int(category_id), "score": float(score),
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def _perturbed_predictions(dataset, rng: np.random.Generator) -> list[dict]:
    """Imperfect predictions: masks grown or shrunk, some classes wrong, missed objects, false
    positives, random scores; a non-trivial AP."""
    kernel = np.ones((3, 3), np.uint8)
    results = []
    for index, record in enumerate(dataset.records):
        target = dataset.target(index)
        for mask, label in zip(target.masks, target.labels):
            if rng.random() < 0.15:
                continue  # missed
            m = mask.astype(np.uint8)
            m = cv2.dilate(m, kernel) if rng.random() < 0.5 else cv2.erode(m, kernel)
            if m.sum() == 0:
                m = mask.astype(np.uint8)
            wrong = rng.random() < 0.2
            label = (label + 1) % len(dataset.classes) if wrong else label
            results.append(_result(m.astype(bool), record.image_id, dataset.category_ids[label], rng.uniform(0.2, 1.0)))
        h, w = target.size
        box = np.zeros((h, w), bool)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        box[y:y + h // 4, x:x + w // 4] = True
        results.append(_result(box, record.image_id, dataset.category_ids[0], rng.uniform(0.0, 0.6)))
    return results


def make_synthetic_run(root: Path, image_size: int = 64, num_train: int = 6, num_val: int = 4) -> Path:
    """A run folder under root/runs/synthetic over demo data in root/data; returns the run folder.

    pseudo_labels/teacher_adaptation: the ground truth of the unlabeled images, scores 0.9-1.0.
    pseudo_labels/teacher_self_training: the same with the first instance of each unlabeled image
    given the next class (score 0.8): known mistakes. predictions/student_refinement: perturbed.
    """
    data_root, run = root / "data", RunFolder(root / "runs" / "synthetic")
    demo.generate(data_root, image_size=image_size, num_source_train=1, num_target_train=num_train,
                  num_target_val=num_val, max_objects=4, progress=False)
    run.root.mkdir(parents=True)
    cfg = CastConfig(name="synthetic", output_dir=str(root / "runs"),
                     data=DataConfig(kind="demo", root=str(data_root), test_size=image_size),
                     losses=LossConfig(num_negatives=16))
    save_config(cfg, run.config)
    train = read_coco(data_root / "target_train" / "annotations.json", progress=False)
    val = read_coco(data_root / "target_val" / "annotations.json", progress=False)
    split = make_split(train.image_ids, 0.34, 0)
    save_split(split, run.split)
    rng = np.random.default_rng(0)
    adapted, self_trained = [], []
    unlabeled = set(split["unlabeled_image_ids"])
    for index, record in enumerate(train.records):
        if record.image_id not in unlabeled:
            continue
        target = train.target(index)
        for k, (mask, label) in enumerate(zip(target.masks, target.labels)):
            adapted.append(_result(mask, record.image_id, train.category_ids[label], rng.uniform(0.9, 1.0)))
            wrong = (label + 1) % len(train.classes) if k == 0 else label
            self_trained.append(_result(mask, record.image_id, train.category_ids[wrong], 0.8))
    atomic_write_json(run.pseudo_labels("teacher_adaptation"), adapted)
    atomic_write_json(run.pseudo_labels("teacher_self_training"), self_trained)
    atomic_write_json(run.predictions(MODEL_STAGE), _perturbed_predictions(val, rng))
    torch.manual_seed(0)
    student = build_student("cast-tiny", len(demo.DEMO_CLASSES), list(demo.DEMO_CLASSES), projection_stride=8)
    student.save_pretrained(run.model(MODEL_STAGE))
    return run.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_app_module():
    """apps/inspect.py under another name (as a script name, `inspect` would shadow the stdlib)."""
    spec = importlib.util.spec_from_file_location("cast_inspect_app", REPO / "apps" / "inspect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_synthetic_run(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def inspector(run_dir) -> RunInspector:
    return RunInspector(run_dir)


# --------------------------------------------------------------------------- run contents


def test_run_data_lists_every_image_source_and_model(inspector, run_dir):
    data = inspector.data
    split = data.run.split.read_text()
    assert len(data.keys) == 6 + 4
    tags = [data.images[k].split for k in data.keys]
    assert tags[:4] == ["val"] * 4  # val first
    assert tags.count("labeled") == 2 and tags.count("unlabeled") == 4 and '"labeled_image_ids"' in split
    assert data.sources() == [GROUND_TRUTH, "pseudo_labels/teacher_adaptation", "pseudo_labels/teacher_self_training",
                              f"predictions/{MODEL_STAGE}"]
    assert data.models() == [MODEL_STAGE]
    val_key = data.keys[0]
    unlabeled_key = next(k for k in data.keys if data.images[k].split == "unlabeled")
    # Predictions cover val images, pseudo-labels the unlabeled ones, never the other way round.
    assert len(data.instances(val_key, f"predictions/{MODEL_STAGE}")) > 0
    assert len(data.instances(val_key, "pseudo_labels/teacher_adaptation")) == 0
    truth = data.instances(unlabeled_key, GROUND_TRUTH)
    pseudo = data.instances(unlabeled_key, "pseudo_labels/teacher_adaptation")
    assert len(pseudo) == len(truth) > 0
    # The adapted teacher's labels are the ground truth masks (sorted by score there).
    assert sorted(m.sum() for m in pseudo.masks) == sorted(m.sum() for m in truth.masks)
    with pytest.raises(ValueError, match="no such label source"):
        data.instances(val_key, "predictions/../../secret")


def test_overlay_outlines_each_instance_in_its_colour_and_respects_the_threshold(inspector):
    data = inspector.data
    key = data.keys[0]
    raw = data.pixels(key)
    truth = data.instances(key, GROUND_TRUTH)
    shown = draw_instances(raw, truth, inspector.data.classes)
    assert shown.shape == raw.shape and shown.dtype == np.uint8
    for i, mask in enumerate(truth.masks):
        boundary = mask & ~cv2.erode(mask.astype(np.uint8), CROSS).astype(bool)
        exact = (shown[boundary] == colour_of(i)).all(axis=1).mean()
        assert exact > 0.6, f"instance {i}: only {exact:.0%} of its outline has its colour"
    # The app shows the 64-pixel image enlarged 6x (to a 384-pixel side); no prediction scores
    # above 1, so at that threshold the overlay is the bare (enlarged) image.
    scale = inspector.scale(key)
    assert scale == 6 and inspector.image_coordinates(key, 6 * 10 + 5, 6 * 20) == (10, 20)
    bare = enlarge(raw, scale)
    assert inspector.overlay(key, GROUND_TRUTH).shape == bare.shape
    np.testing.assert_array_equal(inspector.overlay(key, f"predictions/{MODEL_STAGE}", 1.01), bare)
    assert not np.array_equal(inspector.overlay(key, f"predictions/{MODEL_STAGE}", 0.0), bare)


def test_draw_instances_blends_the_inside():
    image = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 20:36, 4:36] = True  # below the class name, which is drawn above the mask
    out = draw_instances(image, ImageInstances(mask, np.array([0])), ["thing"], alpha=0.5)
    expected = np.round(0.5 * 100 + 0.5 * colour_of(0).astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(out[28, 20], expected)
    np.testing.assert_array_equal(out[5:15, 38], image[5:15, 38])  # outside: untouched


# --------------------------------------------------------------------------- sampler at a pixel


def test_pixel_grid_maps_cells_and_pixels_both_ways():
    grid = PixelGrid(orig_size=(90, 120), input_size=(48, 64), cover=(48, 64), size=(6, 8))
    cells = np.arange(grid.num_cells)
    centres = grid.centres(cells)
    assert [grid.cell_of(x, y) for x, y in centres] == cells.tolist()
    expanded = grid.expand(cells.reshape(grid.size))
    assert expanded.shape == (90, 120)
    assert expanded[0, 0] == 0 and expanded[-1, -1] == grid.num_cells - 1
    # A batch padded below the image (input 48 rows in 64): the image's last row lies in cell row
    # 5, and the centres of padding rows map back onto the image's last row.
    padded = PixelGrid(orig_size=(45, 60), input_size=(48, 64), cover=(64, 64), size=(8, 8))
    assert padded.cell_of(59, 44) == 5 * 8 + 7 and padded.centres(np.array([63]))[0].tolist() == [55.75, 44.0]


class OracleModel(torch.nn.Module):
    """Stands in for a perfectly trained student: confident masks and classes of known instances."""

    def __init__(self, instance_ids: np.ndarray, labels: list[int], num_classes: int) -> None:
        super().__init__()
        ids = torch.from_numpy(instance_ids)[None, None].float()
        ids = torch.nn.functional.interpolate(ids, scale_factor=0.25, mode="nearest")[0, 0].long()
        k = len(labels) + 1  # one query per instance + one for the background
        self.mask_logits = torch.stack([torch.where(ids == q, 12.0, -12.0) for q in range(len(labels))]
                                       + [torch.where(ids < 0, 12.0, -12.0)])
        self.class_logits = torch.full((k, num_classes + 1), -12.0)
        for q, label in enumerate(labels):
            self.class_logits[q, label] = 12.0
        self.class_logits[-1, num_classes] = 12.0  # background query: "no object"

    def forward(self, pixel_values: torch.Tensor, pixel_mask=None, targets=None) -> SegmentationOutput:
        b = pixel_values.shape[0]
        h, w = self.mask_logits.shape[-2:]
        return SegmentationOutput(class_logits=self.class_logits.expand(b, -1, -1),
                                  mask_logits=self.mask_logits.expand(b, -1, -1, -1),
                                  embeddings=self.pixel_embeddings(pixel_values))

    def pixel_embeddings(self, pixel_values: torch.Tensor, pixel_mask=None) -> torch.Tensor:
        h, w = self.mask_logits.shape[-2:]
        return torch.randn(pixel_values.shape[0], 8, h, w)


def _oracle_scene() -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A 64x64 image with instances A, B (class 0) and C (class 1), aligned to 4-pixel cells."""
    ids = np.full((64, 64), -1, np.int64)
    ids[4:28, 4:28] = 0  # A
    ids[36:60, 4:28] = 1  # B, same class as A
    ids[4:60, 36:60] = 2  # C, another class
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return image, ids, [0, 0, 1]


@pytest.mark.parametrize("strategy", ["fusion", "mask", "class", "uniform"])
def test_sampler_weights_follow_instances_under_confident_predictions(strategy):
    image, ids, labels = _oracle_scene()
    model = OracleModel(ids, labels, num_classes=2)
    explanation = explain_pixel(model, image, x=15, y=15, strategy=strategy, num_negatives=64, seed=0,
                                instance_ids=ids)
    weights = explanation.grid.expand(explanation.weights)
    own, same_class, other_class = ids == 0, ids == 1, ids == 2
    assert explanation.weights.reshape(-1)[explanation.anchor] == 0.0
    if strategy == "mask":
        # s_deb is 0 on the clicked pixel's own instance and ~1 on every other instance.
        assert weights[own].max() < 1e-3
        assert weights[same_class].min() > 0.9 and weights[other_class].min() > 0.9
        assert explanation.false_negative_rate == 0.0
    elif strategy == "fusion":
        # [P_m | F_c] / sqrt(2): another instance of the same class shares the class half (cosine
        # 1/2, s_deb 1/2), another class shares nothing (s_deb 1); the own instance is never drawn.
        assert weights[own].max() < 1e-3
        np.testing.assert_allclose(weights[same_class], 0.5, atol=1e-3)
        assert weights[other_class].min() > 0.999
        assert explanation.false_negative_rate == 0.0
    elif strategy == "class":
        # Only the class part: another instance of the same class looks like the anchor's own.
        assert weights[own].max() < 1e-3 and weights[same_class].max() < 1e-3
        assert weights[other_class].min() > 0.9
        assert explanation.false_negative_rate == 0.0
    else:
        assert np.count_nonzero(explanation.weights == 1.0) == explanation.grid.num_cells - 1
        assert explanation.false_negative_rate > 0.0  # uniform draws land in the anchor's instance too
    drawn = explanation.weights.reshape(-1)[explanation.negatives]
    assert len(explanation.negatives) == 64 and (drawn > 0).all() and explanation.anchor not in explanation.negatives


def test_explain_with_a_saved_student(inspector):
    key = inspector.data.keys[0]
    heat, positive, summary = inspector.explain(key, MODEL_STAGE, "fusion", x=20, y=30, num_negatives=16)
    image = inspector.data.pixels(key)
    assert heat.shape == positive.shape == enlarge(image, inspector.scale(key)).shape
    assert summary["grid"] == [8, 8] and summary["weight_at_anchor"] == 0.0 and summary["anchor_cell_on_image"]
    assert summary["num_negatives"] == len(summary["negative_cells"]) == 16
    assert summary["anchor_cell"] not in summary["negative_cells"]
    assert all(w > 0 for w in summary["negative_weights"])
    assert -1.0 <= summary["positive_cosine"] <= 1.0
    truth = inspector.data.instances(key, GROUND_TRUTH)
    ys, xs = np.nonzero(truth.masks[0])
    _, _, inside = inspector.explain(key, MODEL_STAGE, "uniform", x=int(xs[0]), y=int(ys[0]), num_negatives=16)
    assert 0.0 <= inside["false_negative_rate"] <= 1.0  # the clicked pixel is in a ground-truth instance
    ids = instance_id_map(truth, image.shape[:2])
    assert ids[ys[0], xs[0]] >= 0


class Recorder(torch.nn.Module):
    """A model that records what it was given and what it returned."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, {}

    def forward(self, pixel_values, pixel_mask=None, targets=None):
        self.seen.update(pixel_mask=pixel_mask, output=self.model(pixel_values, pixel_mask))
        return self.seen["output"]

    def pixel_embeddings(self, pixel_values, pixel_mask=None):
        self.seen["strong"] = self.model.pixel_embeddings(pixel_values, pixel_mask)
        return self.seen["strong"]


@pytest.mark.parametrize("strategy", ["fusion", "uniform"])
def test_the_heat_map_is_the_law_the_loss_draws_negatives_from(monkeypatch, strategy):
    """The app's s_deb map of a clicked pixel is, value for value, the law the training loss
    (PixelContrastiveLoss) samples that anchor's negatives from on the same inputs, and the loss's
    draws follow it."""
    from scipy import stats

    from cast.losses import contrastive
    from cast.losses.sampling import sampling_law

    image, ids, labels = _oracle_scene()
    model = Recorder(OracleModel(ids, labels, num_classes=2))
    explanation = explain_pixel(model, image, x=15, y=40, strategy=strategy, num_negatives=16)
    captured, real = {}, contrastive.sample_negatives
    monkeypatch.setattr(contrastive, "sample_negatives",
                        lambda y, r, gen, **kw: captured.setdefault("draws", real(y, r, gen, **kw)) if
                        captured.update(y=y, valid=kw["valid"]) is None else None)
    out = model.seen["output"]
    contrastive.PixelContrastiveLoss(strategy, num_negatives=20000)(
        out.embeddings, model.seen["strong"], out.mask_logits, out.class_logits, pixel_mask=model.seen["pixel_mask"],
        generator=torch.Generator().manual_seed(1))
    law = sampling_law(captured["y"], captured["valid"], torch.tensor([explanation.anchor]))[0].numpy()
    np.testing.assert_array_equal(explanation.weights.reshape(-1), law)
    assert law[explanation.anchor] == 0.0 and (law > 0).sum() > 10
    counts = np.bincount(captured["draws"][0, explanation.anchor].numpy(), minlength=law.size)
    drawable = law > 0
    assert counts[~drawable].sum() == 0  # never a cell of weight 0 (the anchor itself, padding)
    expected = law[drawable].astype(np.float64) / law[drawable].astype(np.float64).sum() * counts.sum()
    assert stats.chisquare(counts[drawable], expected).pvalue > 1e-3


def test_a_run_with_the_foundation_model_teacher_is_inspected_at_its_teacher_stages(tmp_path):
    from cast.teachers.vfm import random_teacher

    run_dir = make_synthetic_run(tmp_path)
    torch.manual_seed(0)
    random_teacher(list(demo.DEMO_CLASSES), projection_stride=8).save_pretrained(
        RunFolder(run_dir).model("teacher_adaptation"))
    inspector = RunInspector(run_dir)
    assert inspector.data.models() == [MODEL_STAGE, "teacher_adaptation"]
    key = inspector.data.keys[0]
    heat, positive, summary = inspector.explain(key, "teacher_adaptation", "fusion", x=20, y=30, num_negatives=8)
    assert heat.shape == enlarge(inspector.data.pixels(key), inspector.scale(key)).shape
    assert summary["weight_at_anchor"] == 0.0 and summary["num_negatives"] == 8 and summary["grid"] == [8, 8]
    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    assert inspector.predict(image, "teacher_adaptation", score_threshold=0.0).shape == image.shape


def test_predict_on_an_image_draws_at_its_own_size(inspector):
    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    out = inspector.predict(image, MODEL_STAGE, score_threshold=0.0)
    assert out.shape == image.shape and not np.array_equal(out, image)


# --------------------------------------------------------------------------- uploads and paths


def test_read_upload_refuses_what_is_not_an_acceptable_image(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(ValueError, match="notes.png: not an image"):
        read_upload(text)
    good = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good)
    assert read_upload(good).shape == (20, 30, 3)
    with pytest.raises(ValueError, match="30x20 pixels is more than the 500 allowed"):
        read_upload(good, max_pixels=500)
    with pytest.raises(ValueError, match="MiB allowed"):
        read_upload(good, max_bytes=10)
    truncated = tmp_path / "cut.png"
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy)
    truncated.write_bytes(noisy.read_bytes()[:6000])  # header intact, pixel data cut
    with pytest.raises(ValueError, match="cut.png: truncated or corrupt"):
        read_upload(truncated)
    gif = tmp_path / "anim.gif"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gif)
    with pytest.raises(ValueError, match="GIF images are not accepted"):
        read_upload(gif)


def test_paths_outside_the_run_and_data_folders_are_refused(inspector, tmp_path):
    data = inspector.data
    for bad in ("../../etc/passwd", "/etc/passwd", "target_val/../../../etc/passwd", "", "a\x00b"):
        with pytest.raises(UnsafePathError, match="refused"):
            data.image(bad)
    with pytest.raises(ValueError, match="not an image of run"):
        data.image("target_val/annotations.json")  # inside, but not an image of the run
    assert data.image(data.keys[0]).key == data.keys[0]
    # A link inside an allowed folder that points outside is refused as well.
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    link = data.run.root / "link.png"
    os.symlink(outside, link)
    try:
        with pytest.raises(UnsafePathError):
            resolve_inside("link.png", [data.run.root])
    finally:
        link.unlink()


def test_run_data_names_missing_pieces(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        RunContents(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        RunContents(tmp_path / "empty")


# --------------------------------------------------------------------------- the Gradio app


def test_gradio_app_over_http(inspector, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    app_module = load_app_module()
    port = free_port()
    app = app_module.launch(inspector, port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        key = inspector.data.keys[0]
        path = client.predict(key, GROUND_TRUTH, 0.5, api_name="/overlay")
        shown = np.asarray(Image.open(path).convert("RGB"))
        assert shown.shape == enlarge(inspector.data.pixels(key), inspector.scale(key)).shape
        assert (shown == colour_of(0)).all(axis=-1).sum() > 5  # the first instance's outline

        heat, positive, summary = client.predict(key, MODEL_STAGE, "fusion", 16, 20, 30, api_name="/explain")
        assert np.asarray(Image.open(heat)).shape[:2] == shown.shape[:2]
        assert Image.open(positive).size == (shown.shape[1], shown.shape[0])
        assert summary["weight_at_anchor"] == 0.0 and summary["num_negatives"] == 16

        upload = tmp_path / "upload.png"
        Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(upload)
        predicted = client.predict(handle_file(str(upload)), MODEL_STAGE, 0.0, api_name="/predict_upload")
        assert Image.open(predicted).size == (40, 48)

        fake = tmp_path / "fake.png"
        fake.write_text("plain text dressed as a png")
        with pytest.raises(AppError, match="not an image"):
            client.predict(handle_file(str(fake)), MODEL_STAGE, 0.0, api_name="/predict_upload")
        text = tmp_path / "notes.txt"
        text.write_text("plain text")
        with pytest.raises(AppError, match="Invalid file type"):
            client.predict(handle_file(str(text)), MODEL_STAGE, 0.0, api_name="/predict_upload")
        with pytest.raises(AppError):
            client.predict("../../etc/passwd", GROUND_TRUTH, 0.5, api_name="/overlay")

        # Gradio's file route serves neither system files nor the run's own files.
        for target in ("/etc/passwd", str(inspector.data.run.config), str(inspector.data.images[key].path)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={target}", timeout=10)
            assert refused.value.code in (403, 404)
    finally:
        app.close()


# --------------------------------------------------------------------------- hostile requests


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _call(base: str, api: str, data: list) -> str:
    """Gradio's two-step call API over plain HTTP; the event stream's text."""
    import json

    status, body = _http("POST", f"{base}/gradio_api/call/{api}", json.dumps({"data": data}).encode(),
                         {"Content-Type": "application/json"})
    assert status == 200, body
    status, stream = _http("GET", f"{base}/gradio_api/call/{api}/{json.loads(body)['event_id']}")
    return stream.decode()


def _multipart(filename: str, content: bytes) -> tuple[bytes, dict]:
    boundary = "castHostileBoundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_gradio_app_refuses_hostile_requests(inspector, tmp_path, monkeypatch):
    """Path traversal (relative, absolute, URL-encoded once and twice, through a link pointing
    outside), file paths smuggled into an input, huge uploads, decompression bombs and
    non-images dressed as images, over HTTP against the running app: refused, nothing served or
    written outside, and the app keeps answering."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from cast.inspection import MAX_UPLOAD_BYTES

    data = inspector.data
    secret = tmp_path / "secret.png"  # an image outside the run and data folders
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(secret)
    link = data.data_root / "target_val" / "images" / "link_outside.png"
    os.symlink(secret, link)
    opened = []
    real_predict_upload = inspector.predict_upload
    monkeypatch.setattr(inspector, "predict_upload", lambda path, *a: opened.append(str(path)) or
                        real_predict_upload(path, *a))
    app = load_app_module().launch(inspector, port=(port := free_port()), prevent_thread_lock=True)
    base = f"http://127.0.0.1:{port}"
    try:
        client = Client(f"{base}/", verbose=False, download_files=str(tmp_path / "downloads"))
        key = data.keys[0]

        # Image keys, label sources and models leading outside: refused, whatever the spelling.
        hostile_keys = ["../../../../etc/passwd", "/etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "..%2F..%2Fetc%2Fpasswd",
                        "target_val/images/link_outside.png", f"target_val/../../../..{secret}", "a\x00b.png",
                        str(data.run.config)]
        for bad in hostile_keys:
            with pytest.raises(AppError):
                client.predict(bad, GROUND_TRUTH, 0.5, api_name="/overlay")
            with pytest.raises((UnsafePathError, ValueError)):
                data.image(bad)  # and the app's own check refuses them too, behind gradio's
        for bad in ("predictions/../../../etc/passwd", "pseudo_labels/../config.yaml", "/etc/passwd"):
            with pytest.raises(AppError):
                client.predict(key, bad, 0.5, api_name="/overlay")
        for bad in ("../../../etc", "/etc", "student_refinement/../../.."):
            with pytest.raises(AppError):
                client.predict(key, bad, "fusion", 16, 5, 5, api_name="/explain")

        # A path smuggled into the upload input instead of an uploaded file: gradio refuses it
        # before the app sees it (system files, the run's files, the data's images, the link).
        for target in ("/etc/passwd", str(data.run.config), str(data.images[key].path), str(link), str(secret)):
            stream = _call(base, "predict_upload", [{"path": target, "meta": {"_type": "gradio.FileData"}},
                                                    MODEL_STAGE, 0.0])
            assert "event: error" in stream and "root:" not in stream, stream
        assert opened == []

        # The file route, however the path is spelled.
        for target in ("../../../../etc/passwd", "%2e%2e/%2e%2e/%2e%2e/etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd",
                       "%252e%252e%252f%252e%252e%252fetc%252fpasswd", "%2Fetc%2Fpasswd", str(secret), str(link),
                       str(data.run.config), "/tmp/gradio/../../etc/passwd"):
            status, body = _http("GET", f"{base}/gradio_api/file={target}")
            assert status in (403, 404) and b"root:" not in body, (target, status, body[:80])

        # An upload whose file name climbs out of gradio's cache is stored inside it, by its base name.
        escape = tmp_path / "escaped_upload.png"
        status, body = _http("POST", f"{base}/gradio_api/upload", *_multipart(f"../../../../../..{escape}", b"x"))
        assert status == 200 and not escape.exists(), body
        assert b"/escaped_upload.png" in body and b".." not in body

        # Huge uploads: refused while streaming, at the configured limit (20 MiB).
        huge = b"\x00" * (MAX_UPLOAD_BYTES + 1)
        status, body = _http("POST", f"{base}/gradio_api/upload", *_multipart("huge.png", huge))
        assert status == 413 and b"maximum allowed size" in body

        # Images that are not what they claim, each refused with the reason, without decoding pixels.
        noisy = tmp_path / "noisy.png"
        Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy)
        gif = tmp_path / "anim.gif"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gif)
        uploads = {
            "bomb.png": (_png_header(60_000, 50_000), "too large to decode safely"),
            "wide.png": (_png_header(5_000, 5_000), "more than the 16777216 allowed"),
            "page.jpg": (b"<html><script>alert(1)</script></html>", "not an image"),
            "drawing.png": (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "not an image"),
            "cut.png": (noisy.read_bytes()[:3000], "truncated or corrupt"),
            "disguised.png": (gif.read_bytes(), "GIF images are not accepted"),
            "empty.png": (b"", "not an image"),
        }
        for name, (content, reason) in uploads.items():
            path = tmp_path / name
            path.write_bytes(content)
            with pytest.raises(AppError, match=reason):
                client.predict(handle_file(str(path)), MODEL_STAGE, 0.0, api_name="/predict_upload")

        # After all that, the app still serves a normal request.
        upload = tmp_path / "fine.png"
        Image.fromarray(np.random.default_rng(5).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(upload)
        assert Image.open(client.predict(handle_file(str(upload)), MODEL_STAGE, 0.0,
                                         api_name="/predict_upload")).size == (24, 20)
    finally:
        app.close()
        link.unlink()
