"""The DINOv3 student (`cast-s-dinov3`: DINOv3 ViT-S/16 + DPT neck + masked-attention decoder) on its
tiny preset: the tokens the DPT neck reads, forward / backward, pretrained weights from a hub-layout
folder, save / load and ONNX export."""
from __future__ import annotations

import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from cast.models.export import OnnxStudent, export_onnx
from cast.models.student import CastStudent, build_student

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> CastStudent:
    torch.manual_seed(0)
    return build_student("cast-tiny-dinov3", num_classes=2, class_names=["disc", "square"])


@pytest.fixture(scope="module")
def dinov3_dir(tmp_path_factory):
    """A random DINOv3ViTModel with 4 register tokens, as facebook/dinov3-vits16-pretrain-lvd1689m lies on disk."""
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("dinov3")
    config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                             num_register_tokens=4, layerscale_value=1.0)
    DINOv3ViTModel(config).save_pretrained(directory)
    return directory


def test_cast_s_dinov3_matches_cast_s_around_a_dinov3_vit_s16():
    model = build_student("cast-s-dinov3", num_classes=8)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert encoder == pytest.approx(21.6e6, rel=0.01)  # DINOv3 ViT-S/16 (LightlyTrain's EoMT start: 21.6 M)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(50.4e6, rel=0.01)  # cast-s: 50.9 M
    config = model.config.encoder_config
    assert (config["patch_size"], config["num_register_tokens"], config["hidden_size"]) == (16, 4, 384)
    assert config["out_features"] == ["stage3", "stage6", "stage9", "stage12"]


def test_pretrained_tokens_reach_the_neck_as_cls_then_patches(dinov3_dir):
    model = build_student("cast-tiny-dinov3", 2, pretrained_encoder=dinov3_dir).eval()
    assert model.config.pretrained_encoder == str(dinov3_dir) and model.config.encoder_config["num_register_tokens"] == 4
    reference = DINOv3ViTModel.from_pretrained(dinov3_dir).eval()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.encoder.backbone.state_dict()[name], tensor, atol=0, rtol=0)
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.encoder(pixels)
        last = reference(pixels).last_hidden_state  # layer-normed: CLS, 4 registers, 4 x 6 patches
    assert features.grid == (4, 6) and [tuple(f.shape) for f in features.features] == [(2, 25, 32)] * 4
    torch.testing.assert_close(features.features[-1], torch.cat([last[:, :1], last[:, 5:]], dim=1))
    # No RoPE augmentation in training: train and eval features agree.
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(pixels).features[-1], features.features[-1])


def test_forward_backward_reach_every_trainable_part(tiny):
    tiny.train()
    images = torch.rand(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96)
    masks[0, 10:40, 20:60] = masks[1, 30:60, 5:30] = 1
    targets = [{"masks": masks[:1], "labels": torch.tensor([0])}, {"masks": masks[1:], "labels": torch.tensor([1])}]
    tiny.zero_grad()
    out = tiny(images, targets=targets)
    assert out.class_logits.shape == (2, 16, 3) and out.mask_logits.shape == (2, 16, 16, 24)
    (out.loss + out.embeddings.square().mean()).backward()
    missing = [name for name, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = [name for name, p in tiny.named_parameters() if not p.requires_grad]
    assert frozen == ["encoder.backbone.embeddings.mask_token"]  # pretraining only
    assert float(tiny.encoder.backbone.embeddings.register_tokens.grad.abs().sum()) > 0


def test_save_load_and_onnx_export(tiny, tmp_path):
    tiny.eval()
    images = torch.rand(2, 3, 64, 96)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.bool)
    pixel_mask[1, :, 80:] = False
    with torch.no_grad():
        expected = tiny(images, pixel_mask)
    tiny.save_pretrained(tmp_path / "student")
    loaded = CastStudent.from_pretrained(tmp_path / "student").eval()
    assert loaded.config == tiny.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, pixel_mask).mask_logits, expected.mask_logits, atol=0, rtol=0)
    onnx_model = OnnxStudent(export_onnx(tiny, tmp_path / "student.onnx", image_size=(64, 96)))
    class_logits, mask_logits = onnx_model(images, pixel_mask)
    torch.testing.assert_close(class_logits, expected.class_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mask_logits, expected.mask_logits, atol=1e-4, rtol=1e-4)
