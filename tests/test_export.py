"""ONNX export of the student and the onnxruntime predictor: the shaped graph agrees with eager and
with the literal graph, `export` writes the graph and its sidecar, `predict` with the .onnx equals
`predict` with the student folder, int8 export, and clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import cast
from cast.cli import main
from cast.models.export import OnnxStudent, agreement, export_onnx, sidecar_path
from cast.models.student import build_student

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_student("cast-tiny", num_classes=2, class_names=["disc", "square"]).eval()
    # At initialisation every mask logit is slightly negative (no instance survives); spread them
    # so the post-processing comparison below has masks to compare.
    torch.nn.init.normal_(model.decoder.mask_features.weight, std=2.0)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "student.onnx", image_size=(64, 96))
    return model, path


def test_onnxruntime_matches_pytorch(exported):
    model, path = exported
    onnx_model = OnnxStudent(path)
    assert onnx_model.classes == ["disc", "square"] and onnx_model.image_size == (64, 96)
    for batch in (1, 3):  # the batch axis is dynamic
        images = torch.rand(batch, 3, 64, 96)
        pixel_mask = torch.ones(batch, 64, 96, dtype=torch.bool)
        pixel_mask[0, :, 80:] = False
        with torch.no_grad():
            expected = model(images, pixel_mask)
        class_logits, mask_logits = onnx_model(images, pixel_mask)
        torch.testing.assert_close(class_logits, expected.class_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mask_logits, expected.mask_logits, atol=1e-4, rtol=1e-4)


def test_onnx_predict_matches_student_predict(exported):
    model, path = exported
    images = torch.rand(2, 3, 64, 96)
    sizes, orig = [(64, 96), (60, 90)], [(128, 192), (30, 45)]
    expected = model.predict(images, image_sizes=sizes, orig_sizes=orig)
    actual = OnnxStudent(path).predict(images.numpy(), image_sizes=sizes, orig_sizes=orig)
    assert all(len(e) > 5 for e in expected)
    for a, e in zip(actual, expected):
        assert a.masks.shape == e.masks.shape
        # Scores agree to float noise; compare the confident part, whose order is stable.
        n = min(len(a), len(e), 10)
        torch.testing.assert_close(a.scores[:n], e.scores[:n], atol=1e-4, rtol=1e-3)
        assert torch.equal(a.labels[:n], e.labels[:n])
        agreement = (a.masks[:n] == e.masks[:n]).float().mean()
        assert agreement > 0.999


def test_onnx_student_errors(exported, tmp_path):
    _, path = exported
    with pytest.raises(ValueError, match=r"student\.onnx.*\(B, 3, 64, 96\)"):
        OnnxStudent(path)(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        OnnxStudent(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match=r"junk\.onnx: its sidecar junk\.onnx\.json is missing"):
        cast.load_model(tmp_path / "junk.onnx")
    shutil.copy(sidecar_path(path), sidecar_path(tmp_path / "junk.onnx"))
    with pytest.raises(ValueError, match="junk.onnx: not a loadable ONNX model"):
        OnnxStudent(tmp_path / "junk.onnx")


def test_the_shaped_graph_computes_what_the_literal_graph_and_eager_compute(exported, tmp_path):
    model, shaped = exported
    literal = export_onnx(model, tmp_path / "literal.onnx", image_size=(64, 96), optimize=False)
    ops = {p: {n.op_type for n in __import__("onnx").load(str(p)).graph.node} for p in (shaped, literal)}
    assert "MultiHeadAttention" in ops[shaped] and "MultiHeadAttention" not in ops[literal]
    for path in (shaped, literal):
        check = agreement(model, path)
        assert check["class_logits_max_abs_diff"] < 1e-3 and check["mask_logits_max_abs_diff"] < 1e-3
        assert check["mask_iou_min"] > 0.99 and check["instances"] == 10
    info = json.loads(sidecar_path(shaped).read_text())
    assert info["classes"] == ["disc", "square"] and info["input"]["size"] == [64, 96]
    assert info["normalisation"]["applied"] == "inside the graph" and info["graph"] == "shaped"


def _annotations(path):
    data = json.loads(path.read_text())
    return {im["id"]: [a for a in data["annotations"] if a["image_id"] == im["id"]] for im in data["images"]}


def _iou(a, b):
    rles = [{"size": x["segmentation"]["size"], "counts": x["segmentation"]["counts"].encode()} for x in (a, b)]
    return float(mask_utils.iou([rles[0]], [rles[1]], [0])[0, 0])


def test_export_command_then_predict_with_the_onnx_file_equals_eager_predict(exported, tmp_path, capsys):
    model, _ = exported
    model.save_pretrained(tmp_path / "student")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(images / f"{i}.png")
    onnx_path = tmp_path / "deploy" / "student.onnx"
    assert main(["export", "--model", str(tmp_path / "student"), "--format", "onnx", "--out", str(onnx_path),
                 "--image-size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert "agreement with eager on a test input: max |diff| class logits" in out and sidecar_path(onnx_path).is_file()
    assert isinstance(cast.load_model(onnx_path), OnnxStudent)
    for name, model_path in (("eager", tmp_path / "student"), ("onnx", onnx_path)):
        assert main(["predict", "--model", str(model_path), "--source", str(images), "--out", str(tmp_path / name),
                     "--score-threshold", "0.1", "--batch-size", "2"]) == 0
    eager, onnx = _annotations(tmp_path / "eager" / "predictions.json"), _annotations(tmp_path / "onnx" / "predictions.json")
    assert eager.keys() == onnx.keys() and sum(map(len, eager.values())) > 10
    for image_id, ours in onnx.items():
        assert len(ours) == len(eager[image_id])
        for theirs in eager[image_id]:  # the same instance (class, mask) is there, whatever the order of near ties
            same_class = [a for a in ours if a["category_id"] == theirs["category_id"]]
            assert max(_iou(theirs, a) for a in same_class) >= 0.95


def test_int8_export_and_what_cannot_be_exported(exported, tmp_path, capsys):
    model, _ = exported
    path = export_onnx(model, tmp_path / "int8.onnx", image_size=(64, 96), int8=True)
    assert json.loads(sidecar_path(path).read_text())["quantisation"].startswith("dynamic int8")
    assert len(OnnxStudent(path).predict_images(np.zeros((30, 40, 3), np.uint8), score_threshold=0.0)) == 1
    model.save_pretrained(tmp_path / "student")
    assert main(["export", "--model", str(tmp_path / "student"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "pass --image-size H W" in capsys.readouterr().err
    from cast.teachers.vfm import random_teacher

    random_teacher(["disc", "square"]).save_pretrained(tmp_path / "teacher")
    assert main(["export", "--model", str(tmp_path / "teacher"), "--out", str(tmp_path / "t.onnx"),
                 "--image-size", "64", "64"]) == 2
    assert "only CAST students export to ONNX" in capsys.readouterr().err


def test_winograd_convolution_computes_the_convolution(exported, tmp_path, monkeypatch):
    from cast.models import onnx_graph

    monkeypatch.setattr(onnx_graph, "WINOGRAD_MIN_TILES", 1)  # tiny maps take the Winograd path too
    conv = torch.nn.Conv2d(24, 16, 3, padding=1)
    x = torch.randn(2, 24, 16, 28)
    with torch.no_grad():
        direct = conv(x)
        with onnx_graph._winograd_convolutions(torch.nn.Sequential(conv)):
            winograd = conv(x)
            odd = conv(x[..., :15, :])  # sides not multiples of 4: computed directly
        torch.testing.assert_close(winograd, direct, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(odd, conv(x[..., :15, :]))
    assert "forward" not in vars(conv)  # the module's own forward again
    model, _ = exported
    path = export_onnx(model, tmp_path / "winograd.onnx", image_size=(64, 96))
    ops = [n.op_type for n in __import__("onnx").load(str(path)).graph.node]
    assert ops.count("DepthToSpace") >= 8  # the neck's 3x3 convolutions at strides 4 and 8
    check = agreement(model, path)
    assert check["class_logits_max_abs_diff"] < 1e-3 and check["mask_logits_max_abs_diff"] < 1e-3
