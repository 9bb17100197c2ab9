"""The SAM 3 teacher (cast.teachers.sam3) on tiny random configurations: zero-shot from a hub-layout
folder, masks landing where SAM 3 puts them (a stub), one adaptation step through the project's
stage trainer (only the trainable parts change), the set loss, save/load and clear errors."""
from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Sam3Model

from cast.data.demo import DEMO_CLASSES
from cast.teachers.sam3 import Sam3Settings, Sam3Teacher, random_sam3_teacher
from cast.teachers.sam3_configs import clip_like_tokenizer, sam3_config
from test_vfm_teacher import adapt_one_step, batch, training_samples

CLASSES = list(DEMO_CLASSES)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_sam3_folder(root: Path, classes: list[str] = CLASSES) -> Path:
    """A tiny random SAM 3 with its CLIP tokenizer files, as facebook/sam3 lies on disk."""
    tokenizer = clip_like_tokenizer(classes)
    Sam3Model(sam3_config("tiny", len(tokenizer))).save_pretrained(root)
    tokenizer.save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return write_sam3_folder(tmp_path_factory.mktemp("sam3"))


def test_zero_shot_predict_from_a_hub_folder(sam3_dir):
    teacher = Sam3Teacher.from_hub_folder(sam3_dir, classes=CLASSES, box_threshold=0.2, max_instances=7)
    sam3 = teacher.sam3
    for frozen in (sam3.vision_encoder, sam3.text_encoder, sam3.text_projection, sam3.geometry_encoder,
                   sam3.detr_encoder, sam3.mask_decoder.semantic_projection):
        assert not any(p.requires_grad for p in frozen.parameters())
    for trained in (sam3.detr_decoder, sam3.dot_product_scoring, sam3.mask_decoder.mask_embedder,
                    sam3.mask_decoder.prompt_cross_attn, teacher.projection_head):
        assert all(p.requires_grad for p in trained.parameters())
    # Sam3Processor's prompt: <|startoftext|> name <|endoftext|>, padded to 32 tokens.
    assert teacher.prompt_ids.shape == (4, 32) and teacher.prompt_mask.sum(1).tolist() == [3, 3, 3, 3]
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch()
    teacher.train()
    preds = teacher.predict_with_boxes(pixel_values, pixel_mask, image_sizes, orig_sizes)
    assert teacher.training and not teacher.sam3.vision_encoder.training  # predict restores the mode
    assert sum(len(inst) for inst, _ in preds) > 0  # random weights score pairs above 0.2: the test bites
    for (inst, boxes), (h, w) in zip(preds, orig_sizes):
        assert len(inst) <= 7 and inst.masks.shape == (len(inst), h, w) and inst.masks.dtype == torch.bool
        assert (inst.masks.sum(0) <= 1).all() and inst.masks.flatten(1).any(1).all()  # disjoint, none empty
        assert (inst.scores > 0.2).all() and torch.equal(inst.scores, inst.scores.sort(descending=True).values)
        assert inst.labels.dtype == torch.int64 and ((inst.labels >= 0) & (inst.labels < len(CLASSES))).all()
        assert boxes.shape == (len(inst), 4) and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert [len(p) for p in teacher.predict(pixel_values, pixel_mask, image_sizes, orig_sizes)] == \
        [len(inst) for inst, _ in preds]


def stub_sam3(teacher: Sam3Teacher, rects: dict[int, tuple[float, float, float, float]]):
    """Replace SAM 3's prompted forward: class c's prompt (prompts run in class order) finds one
    instance (query 0, logits +-12) whose box and mask are the normalised rectangle rects[c]
    (x0, y0, x1, y1 of the image); other classes find nothing."""
    size, queries = teacher.mask_size, 5
    calls = itertools.count()
    centres = (torch.arange(size) + 0.5) / size

    def forward(vision_embeds, text_embeds, attention_mask):
        c = next(calls) % len(teacher.settings.classes)
        batch = vision_embeds.fpn_hidden_states[0].shape[0]
        logits = torch.full((batch, queries), -12.0)
        masks = torch.full((batch, queries, size, size), -12.0)
        boxes = torch.zeros(batch, queries, 4)
        boxes[..., 2:] = 0.1
        presence = torch.full((batch, 1), -12.0)
        if c in rects:
            x0, y0, x1, y1 = rects[c]
            inside = ((centres[:, None] > y0) & (centres[:, None] < y1)) & ((centres[None] > x0) & (centres[None] < x1))
            logits[:, 0], presence[:] = 12.0, 12.0
            masks[:, 0] = torch.where(inside, 12.0, -12.0)
            boxes[:, 0] = torch.tensor(rects[c])
        return SimpleNamespace(pred_logits=logits, presence_logits=presence, pred_boxes=boxes, pred_masks=masks)

    teacher.sam3.forward = forward


def test_stub_masks_land_where_sam3_puts_them_at_original_resolution():
    teacher = random_sam3_teacher(CLASSES)
    rects = {1: (0.25, 0.125, 0.75, 0.5), 3: (0.0, 0.625, 0.5, 1.0)}
    stub_sam3(teacher, rects)
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch()
    for (inst, boxes), (h, w) in zip(teacher.predict_with_boxes(pixel_values, pixel_mask, image_sizes, orig_sizes),
                                     orig_sizes):
        assert inst.labels.tolist() == [1, 3] and torch.allclose(inst.scores, torch.full((2,), 0.99999), atol=1e-4)
        for mask, label, box in zip(inst.masks, inst.labels.tolist(), boxes):
            x0, y0, x1, y1 = rects[label]
            torch.testing.assert_close(box, torch.tensor([x0 * w, y0 * h, x1 * w, y1 * h]))
            # One cell of SAM 3's mask frame, in pixels of the original image: the bilinear edge.
            tol_y, tol_x = h / teacher.mask_size, w / teacher.mask_size
            ys, xs = (torch.arange(h) + 0.5)[:, None], (torch.arange(w) + 0.5)[None]
            inner = (ys > y0 * h + tol_y) & (ys < y1 * h - tol_y) & (xs > x0 * w + tol_x) & (xs < x1 * w - tol_x)
            outer = (ys > y0 * h - tol_y) & (ys < y1 * h + tol_y) & (xs > x0 * w - tol_x) & (xs < x1 * w + tol_x)
            assert inner.any() and (mask >= inner).all() and (mask <= outer).all()


def test_one_adaptation_step_trains_only_the_trainable_parts(sam3_dir, tmp_path):
    stage_dir = tmp_path / "teacher_adaptation"
    trained, params, changed, frozen = adapt_one_step(
        Sam3Teacher.from_hub_folder(sam3_dir, classes=CLASSES, mask_points=256), training_samples(), stage_dir)
    assert frozen and not changed & frozen
    for prefix in ("sam3.vision_encoder.", "sam3.text_encoder.", "sam3.text_projection.", "sam3.geometry_encoder.",
                   "sam3.detr_encoder.", "sam3.mask_decoder.semantic_projection."):
        assert {name for name in params if name.startswith(prefix)} <= frozen, prefix
    for prefix in ("sam3.detr_decoder.layers.", "sam3.detr_decoder.box_head.", "sam3.detr_decoder.presence_head.",
                   "sam3.dot_product_scoring.", "sam3.mask_decoder.mask_embedder.", "sam3.mask_decoder.pixel_decoder.",
                   "projection_head."):
        assert any(name.startswith(prefix) for name in changed), prefix
    assert {name for name, p in params.items() if p.requires_grad} == changed  # every trainable part learned

    # The stage's model folder loads offline, by its model_type, and predicts like the trained teacher.
    import cast

    reloaded = cast.load_model(stage_dir / "model")
    assert isinstance(reloaded, Sam3Teacher) and reloaded.settings == trained.settings
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch(1)
    torch.testing.assert_close(reloaded.pixel_embeddings(pixel_values, pixel_mask),
                               reloaded(pixel_values, pixel_mask).embeddings)
    for a, b in zip(trained.predict(pixel_values, pixel_mask, image_sizes, orig_sizes),
                    reloaded.predict(pixel_values, pixel_mask, image_sizes, orig_sizes)):
        assert torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)


def test_set_loss_terms_and_sampler_outputs():
    teacher = random_sam3_teacher(CLASSES, mask_points=256).train()
    pixel_values, pixel_mask, _, _ = batch(3)
    masks = torch.zeros(3, 64, 96)
    masks[0, 5:30, 8:40] = masks[1, 30:60, 40:90] = masks[2, 40:47, 10:20] = 1
    targets = [{"masks": masks[:2], "labels": torch.tensor([0, 2])},
               {"masks": masks[2:], "labels": torch.tensor([1])}]
    out = teacher(pixel_values, pixel_mask, targets)
    assert set(out.loss_dict) == {"loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_presence"}
    assert all(torch.isfinite(v) and v > 0 for v in out.loss_dict.values())
    torch.testing.assert_close(out.loss, sum(out.loss_dict.values()))
    # Sampler inputs: K best (prompt, query) pairs; padding of the 48 x 80 image holds the pad logit.
    k = teacher.settings.sampler_queries
    assert out.class_logits.shape == (2, k, len(CLASSES) + 1) and out.mask_logits.shape == (2, k, 16, 24)
    torch.testing.assert_close(out.class_logits.exp().sum(-1), torch.ones(2, k))
    assert (out.mask_logits[1, :, 12:] == -20.0).all() and (out.mask_logits[1, :, :, 20:] == -20.0).all()
    assert out.embeddings.shape == (2, 128, 8, 12) and (out.embeddings[1, :, 6:] == 0).all()
    # No instance at all: only the presence term, which still pushes every prompt's presence down.
    empty = [{"masks": masks[:0], "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    out = teacher(pixel_values, pixel_mask, empty)
    assert float(out.loss_dict["loss_presence"].detach()) > 0
    assert all(float(v.detach()) == 0.0 for k, v in out.loss_dict.items() if k != "loss_presence")
    out.loss.backward()
    assert teacher.sam3.detr_decoder.presence_head.layer1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="outside 0..3"):
        teacher(pixel_values, pixel_mask, [{"masks": masks[:1], "labels": torch.tensor([4])}] * 2)


def test_save_load_round_trip_parameter_groups_and_clear_errors(sam3_dir, tmp_path):
    teacher = Sam3Teacher.from_hub_folder(sam3_dir, classes=CLASSES, box_threshold=0.2, max_instances=5)
    teacher.save_pretrained(tmp_path / "teacher")
    assert {p.name for p in (tmp_path / "teacher").iterdir()} == {"config.json", "model.safetensors", "tokenizer"}
    reloaded = Sam3Teacher.from_pretrained(tmp_path / "teacher")
    assert reloaded.settings == teacher.settings
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch(2)
    for a, b in zip(teacher.predict(pixel_values, pixel_mask, image_sizes, orig_sizes),
                    reloaded.predict(pixel_values, pixel_mask, image_sizes, orig_sizes)):
        assert len(a) and torch.equal(a.masks, b.masks) and torch.equal(a.scores, b.scores)

    groups = teacher.parameter_groups(lr=1e-4, weight_decay=0.01, backbone_lr_multiplier=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in teacher.parameters() if p.requires_grad}
    assert {g["name"] for g in groups} == {"head_decay", "head_no_decay"} and all(g["lr"] == 1e-4 for g in groups)
    no_decay = {id(p) for g in groups if g["name"] == "head_no_decay" for p in g["params"]}
    assert id(teacher.sam3.detr_decoder.query_embed.weight) in no_decay
    assert id(teacher.sam3.detr_decoder.presence_token.weight) in no_decay

    with pytest.raises(FileNotFoundError, match="missing: teacher folder not found"):
        Sam3Teacher.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a cast_sam3_teacher configuration"):
        from cast.teachers.vfm import random_teacher

        random_teacher(CLASSES).save_pretrained(tmp_path / "vfm")
        Sam3Teacher.from_pretrained(tmp_path / "vfm")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        Sam3Teacher.from_hub_folder(tmp_path / "nowhere", classes=CLASSES)
    with pytest.raises(ValueError, match="model_type is 'grounding-dino', a SAM 3 folder has 'sam3' or 'sam3_video'"):
        (tmp_path / "gdino").mkdir()
        (tmp_path / "gdino" / "config.json").write_text('{"model_type": "grounding-dino"}')
        Sam3Teacher.from_hub_folder(tmp_path / "gdino", classes=CLASSES)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(sam3_dir / name)
    with pytest.raises(FileNotFoundError, match=f"{bare}: no CLIP tokenizer"):
        Sam3Teacher.from_hub_folder(bare, classes=CLASSES)
    with pytest.raises(ValueError, match="box_threshold must be in"):
        Sam3Settings(classes=CLASSES, box_threshold=1.5).validate()
    with pytest.raises(ValueError, match="more than the 32 tokens"):
        Sam3Teacher(Sam3Settings(classes=[" ".join(["disc"] * 40)]), teacher.sam3, teacher.tokenizer)


def test_the_cityscapes_config_with_sam3_as_teacher_is_valid():
    from cast.config import load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "cityscapes_10pct_sam3.yaml"
    cfg = load_config(config, check_paths=False)  # the model folders exist on a GPU machine only
    assert (cfg.teacher.kind, cfg.teacher.sam3_dir, cfg.student.preset) == ("sam3", "models/sam3", "cast-s")
    assert cfg.data.kind == "cityscapes" and cfg.data.labeled_fraction == pytest.approx(0.1)


def test_a_sam3_video_folder_serves_as_well(sam3_dir, tmp_path):
    """facebook/sam3 itself is a "sam3_video" folder (detector + tracker, detector weights under
    "detector_model."): the teacher takes its detector."""
    from safetensors.torch import load_file, save_file
    from transformers import Sam3VideoConfig

    image = Sam3Model.from_pretrained(sam3_dir)
    Sam3VideoConfig(detector_config=image.config.to_dict()).save_pretrained(tmp_path)
    weights = load_file(str(sam3_dir / "model.safetensors"))
    save_file({f"detector_model.{k}": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    clip_like_tokenizer(CLASSES).save_pretrained(str(tmp_path))
    teacher = Sam3Teacher.from_hub_folder(tmp_path, classes=CLASSES)
    for name, tensor in image.state_dict().items():
        assert torch.equal(teacher.sam3.state_dict()[name], tensor), name
