"""ONNX export of the student and the onnxruntime predictor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cast.models.export import OnnxStudent, export_onnx
from cast.models.student import build_student


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
    with pytest.raises(ValueError, match="junk.onnx"):
        OnnxStudent(tmp_path / "junk.onnx")
