"""The Grounding-DINO + SAM 2 / SAM teacher (cast.teachers.vfm) on tiny random configurations:
loading from hub-layout folders, zero-shot prediction, the pure box/overlap functions, one
adaptation step through the project's stage trainer, parameter groups, save/load, and the
pipeline up to teacher adaptation."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer, GroundingDinoForObjectDetection, Sam2Model, SamModel

from cast.config import TrainConfig, config_from_dict, validate_config
from cast.data.demo import DEMO_CLASSES
from cast.pipeline.stages import stage_spec, train_stage
from cast.structures import InstanceSample
from cast.teachers.vfm import GroundingDinoSamTeacher, TeacherSettings
from cast.teachers.vfm_configs import bert_like_vocab, grounding_dino_config, sam_config
from cast.teachers.vfm_ops import (boxes_to_cxcywh, build_prompt, class_log_probs, class_scores, mask_losses,
                                   mask_target, masks_to_boxes, region_logits, resolve_overlaps, sam_resized_size,
                                   select_detections)
from cast.training.objective import Objective

CLASSES = list(DEMO_CLASSES)  # disc, square, triangle, cross: the pipeline smoke's data classes
SAM_KINDS = ("sam2", "sam")


pytestmark = pytest.mark.usefixtures("one_thread")


def write_hub_folders(root: Path, sam_kind: str) -> tuple[Path, Path]:
    """Tiny random Grounding-DINO (+ tokenizer) and SAM folders, as downloaded checkpoints lie."""
    gdino_dir, sam_dir = root / "grounding-dino", root / sam_kind
    gdino_dir.mkdir(parents=True)
    # BERT's own ids for [CLS] / [SEP] / "." (101 / 102 / 1012): Grounding-DINO's code expects them.
    vocab = bert_like_vocab(CLASSES)
    assert {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *CLASSES} <= set(vocab)
    (gdino_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(gdino_dir))
    GroundingDinoForObjectDetection(grounding_dino_config("tiny", vocab_size=len(tokenizer))).save_pretrained(gdino_dir)
    tokenizer.save_pretrained(str(gdino_dir))
    (Sam2Model if sam_kind == "sam2" else SamModel)(sam_config("tiny", sam_kind)).save_pretrained(sam_dir)
    return gdino_dir, sam_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    torch.manual_seed(0)
    return {kind: write_hub_folders(tmp_path_factory.mktemp(kind), kind) for kind in SAM_KINDS}


def load_teacher(folders, kind: str, **settings) -> GroundingDinoSamTeacher:
    gdino_dir, sam_dir = folders[kind]
    return GroundingDinoSamTeacher.from_hub_folders(gdino_dir, sam_dir, classes=CLASSES, sam_kind=kind, **settings)


def batch(seed: int = 0):
    """Two images padded into one 64 x 96 canvas: a full one and a 48 x 80 one."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(2, 3, 64, 96, generator=g)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.bool)
    pixel_mask[1, 48:] = pixel_mask[1, :, 80:] = False
    pixel_values[1] *= pixel_mask[1]
    return pixel_values, pixel_mask, [(64, 96), (48, 80)], [(64, 96), (96, 160)]


@pytest.mark.parametrize("kind", SAM_KINDS)
def test_zero_shot_predict_from_pretrained_folders(folders, kind):
    teacher = load_teacher(folders, kind, max_instances=3)
    frozen = [teacher.detector.model.text_backbone, teacher.sam.vision_encoder, teacher.sam.prompt_encoder]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in teacher.sam.mask_decoder.parameters())
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch()
    preds = teacher.predict(pixel_values, pixel_mask, image_sizes, orig_sizes)
    assert sum(len(p) for p in preds) > 0  # random weights still score boxes above 0.3: the test bites
    for inst, size in zip(preds, orig_sizes):
        assert len(inst) <= 3 and inst.masks.shape == (len(inst), *size) and inst.masks.dtype == torch.bool
        assert (inst.masks.sum(0) <= 1).all() and inst.masks.flatten(1).any(1).all()  # disjoint, none empty
        assert (inst.scores > 0.3).all() and torch.equal(inst.scores, inst.scores.sort(descending=True).values)
        assert inst.labels.dtype == torch.int64 and ((inst.labels >= 0) & (inst.labels < len(CLASSES))).all()


def test_prompt_scores_selection_and_overlaps():
    vocab = bert_like_vocab(["disc", "traffic light"])
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    ids, owner = build_prompt(tokenizer, ["disc", "traffic light"], [101, 102, 1012, 1029], max_text_len=16)
    word = vocab.index
    assert ids == [101, word("disc"), 1012, word("traffic"), word("light"), 1012, 102]
    assert owner == [-1, 0, -1, 1, 1, -1, -1]
    with pytest.raises(ValueError, match="delimiter"):
        build_prompt(tokenizer, ["disc.light"], [101, 102, 1012, 1029], max_text_len=16)
    with pytest.raises(ValueError, match="max_text_len=6"):
        build_prompt(tokenizer, ["disc", "traffic light"], [101, 102, 1012, 1029], max_text_len=6)

    # Per-class score = max over the class's tokens; delimiters and padding are never read.
    logits = torch.full((1, 3, 10), -9.0)
    logits[0, 0, 1], logits[0, 1, 4], logits[0, 1, 3], logits[0, 2, 2] = 2.0, 1.0, -1.0, 5.0
    scores = class_scores(logits, torch.tensor(owner), 2)
    expected = torch.tensor([[[2.0, -9.0], [-9.0, 1.0], [-9.0, -9.0]]]).sigmoid()
    assert torch.allclose(scores, expected)

    scores = torch.tensor([[0.9, 0.1], [0.2, 0.35], [0.3, 0.05], [0.6, 0.8], [0.28, 0.2]])
    queries, labels, kept = select_detections(scores, box_threshold=0.3, text_threshold=0.25, max_instances=10)
    assert queries.tolist() == [0, 3, 1] and labels.tolist() == [0, 1, 1]  # 0.3 is not above 0.3
    assert torch.allclose(kept, torch.tensor([0.9, 0.8, 0.35]))
    assert select_detections(scores, 0.3, 0.25, max_instances=2)[0].tolist() == [0, 3]
    assert select_detections(scores, 0.3, 0.7, max_instances=10)[0].tolist() == [0, 3]  # text rule bites

    masks = torch.zeros(3, 6, 6, dtype=torch.bool)
    masks[0, :3, :3] = True  # low score, overlaps the best
    masks[1, 1:5, 1:5] = True  # best
    masks[2, 2:4, 2:4] = True  # inside the best: left empty, dropped
    resolved, index = resolve_overlaps(masks, torch.tensor([0.5, 0.9, 0.7]))
    assert index.tolist() == [1, 0]
    assert torch.equal(resolved[0], masks[1]) and torch.equal(resolved[1], masks[0] & ~masks[1])
    assert resolve_overlaps(masks[:0], torch.zeros(0))[0].shape == (0, 6, 6)

    probs = class_log_probs(torch.tensor([[0.6, 0.2, 0.0]])).softmax(-1)
    assert torch.allclose(probs, torch.tensor([[0.45, 0.15, 0.0, 0.4]]), atol=1e-5)

    boxes = masks_to_boxes(masks[:2])
    assert boxes.tolist() == [[0, 0, 3, 3], [1, 1, 5, 5]]
    assert torch.allclose(boxes_to_cxcywh(boxes[1:], (6, 12)), torch.tensor([[0.25, 0.5, 4 / 12, 4 / 6]]))
    low_res = torch.randn(2, 8, 8)
    assert torch.allclose(region_logits(low_res, (1.0, 1.0), (20, 12)),
                          F.interpolate(low_res[:, None], size=(20, 12), mode="bilinear", align_corners=False)[:, 0],
                          atol=1e-5)


def training_samples(n: int = 4) -> list[InstanceSample]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        masks = np.zeros((2, 64, 64), bool)
        masks[0, 5:30, 8:40] = masks[1, 36:60, 30:62] = True
        samples.append(InstanceSample(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), masks=masks,
                                      labels=np.array([i % 4, (i + 1) % 4]), image_id=i))
    return samples


def adapt_one_step(teacher: torch.nn.Module, samples: list, stage_dir: Path):
    """One step of stage 1a (with L_pxl) through the stage trainer: (trained teacher, its
    parameters by name, the names that changed, the frozen names)."""
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    cfg = config_from_dict({"device": "cpu", "data": {"crop_size": [64, 64], "batch_size": 2},
                            "losses": {"lambda_pxl": 0.1, "num_negatives": 8, "embedding_stride": 8}})
    spec = stage_spec("teacher_adaptation", cfg, objective=Objective(0.0, 0.1),
                      train=TrainConfig(steps=1, lr=1e-3, checkpoint_every=1))
    trained = train_stage(spec, teacher, cfg, samples, None, stage_dir)
    metrics = (stage_dir / "metrics.jsonl").read_text()
    assert "loss_sup" in metrics and "loss_pxl_labeled" in metrics
    params = dict(trained.named_parameters())
    changed = {name for name, p in params.items() if not torch.equal(p, before[name])}
    return trained, params, changed, {name for name, p in params.items() if not p.requires_grad}


def test_one_adaptation_step_trains_only_the_trainable_parts(folders, tmp_path):
    stage_dir = tmp_path / "teacher_adaptation"
    trained, params, changed, frozen = adapt_one_step(load_teacher(folders, "sam2"), training_samples(), stage_dir)
    assert frozen and not changed & frozen  # text encoder, SAM image + prompt encoders bit-identical
    for prefix in ("detector.model.text_backbone.", "sam.vision_encoder.", "sam.prompt_encoder."):
        assert {name for name in params if name.startswith(prefix)} <= frozen
    for prefix in ("detector.model.backbone.conv_encoder.", "detector.model.decoder.layers.",
                   "detector.model.decoder.bbox_embed.",
                   "sam.mask_decoder.transformer.", "sam.mask_decoder.conv_s0.", "projection_head."):
        assert any(name.startswith(prefix) for name in changed), prefix

    # The stage's model folder loads offline and predicts exactly like the trained teacher.
    reloaded = GroundingDinoSamTeacher.from_pretrained(stage_dir / "model").eval()
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch(1)
    # The strong view's embeddings come from the backbone alone, equal to the full forward's.
    torch.testing.assert_close(reloaded.pixel_embeddings(pixel_values, pixel_mask),
                               reloaded(pixel_values, pixel_mask).embeddings)
    for a, b in zip(trained.predict(pixel_values, pixel_mask, image_sizes, orig_sizes),
                    reloaded.predict(pixel_values, pixel_mask, image_sizes, orig_sizes)):
        assert torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)


def test_parameter_groups_hold_exactly_the_trainable_parameters(folders):
    teacher = load_teacher(folders, "sam")
    groups = teacher.parameter_groups(lr=1e-4, weight_decay=0.01, backbone_lr_multiplier=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in teacher.parameters() if p.requires_grad}
    swin = {id(p) for p in teacher.detector.model.backbone.conv_encoder.parameters()}
    for g in groups:
        assert g["lr"] == pytest.approx(1e-5 if g["name"].startswith("backbone") else 1e-4)
        assert ({id(p) for p in g["params"]} <= swin) == g["name"].startswith("backbone")
        assert g["weight_decay"] == (0.01 if g["name"].endswith("_decay") and "no_decay" not in g["name"] else 0.0)


def test_save_load_round_trip_and_clear_errors(folders, tmp_path):
    teacher = load_teacher(folders, "sam", box_threshold=0.2, max_instances=5)
    teacher.save_pretrained(tmp_path / "teacher")
    assert {p.name for p in (tmp_path / "teacher").iterdir()} == {"config.json", "model.safetensors", "tokenizer"}
    reloaded = GroundingDinoSamTeacher.from_pretrained(tmp_path / "teacher")
    assert reloaded.settings == teacher.settings and isinstance(reloaded.sam, SamModel)
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch(2)
    for a, b in zip(teacher.predict(pixel_values, pixel_mask, image_sizes, orig_sizes),
                    reloaded.predict(pixel_values, pixel_mask, image_sizes, orig_sizes)):
        assert len(a) and torch.equal(a.masks, b.masks) and torch.equal(a.scores, b.scores)

    gdino_dir, sam_dir = folders["sam"]
    with pytest.raises(FileNotFoundError, match="missing"):
        GroundingDinoSamTeacher.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"{sam_dir}/config.json: model_type is 'sam'"):
        GroundingDinoSamTeacher.from_hub_folders(gdino_dir, sam_dir, classes=CLASSES, sam_kind="sam2")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        GroundingDinoSamTeacher.from_hub_folders(tmp_path / "nowhere", sam_dir, classes=CLASSES, sam_kind="sam")
    bare = tmp_path / "bare-gdino"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(gdino_dir / name)
    with pytest.raises(FileNotFoundError, match=f"{bare}: no BERT tokenizer"):
        GroundingDinoSamTeacher.from_hub_folders(bare, sam_dir, classes=CLASSES, sam_kind="sam")
    with pytest.raises(ValueError, match="projection_stride=4"):
        load_teacher(folders, "sam", projection_stride=4)
    # A vocabulary with its own ids for [CLS] / [SEP] / "." would silently break the phrase mapping.
    compact = BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".",
                                                                *CLASSES])})
    with pytest.raises(ValueError, match=r"ids \(2, 3, 5\); Grounding-DINO's code expects \[101, 102, 1012\]"):
        GroundingDinoSamTeacher(TeacherSettings(classes=CLASSES, sam_kind="sam"), teacher.detector, teacher.sam, compact)


def test_pipeline_runs_the_vfm_teacher_through_adaptation(folders, tmp_path):
    from cast.pipeline.runner import Pipeline

    gdino_dir, sam_dir = folders["sam2"]
    fast = {"steps": 2, "checkpoint_every": 1}
    cfg = config_from_dict({
        "name": "vfm", "output_dir": str(tmp_path / "runs"), "device": "cpu",
        "data": {"kind": "demo", "root": str(tmp_path / "demo"), "labeled_fraction": 0.25, "crop_size": [64, 64],
                 "test_size": 64, "batch_size": 2, "unlabeled_batch_size": 2, "eval_batch_size": 4,
                 "demo": {"image_size": 64, "num_source_train": 2, "num_target_train": 8, "num_target_val": 3,
                          "max_objects": 3}},
        "teacher": {"kind": "gdino-sam2", "grounding_dino_dir": str(gdino_dir), "sam_dir": str(sam_dir)},
        "student": {"preset": "cast-tiny"},
        "training": {"teacher_adaptation": fast},
        "losses": {"num_negatives": 8, "embedding_stride": 8},
    })
    validate_config(cfg)
    rows = Pipeline(cfg).run(stop_after="teacher_adaptation")["rows"]
    assert [r["model"] for r in rows] == ["teacher_zero_shot", "teacher_adaptation"]
    assert all(r["params_m"] > 0 and r["gflops"] > 0 for r in rows)
    run = tmp_path / "runs" / "vfm"
    assert "loss_pxl_labeled" in (run / "stages" / "teacher_adaptation" / "metrics.jsonl").read_text()
    # A second run reuses everything: the stage's model loads, and theta_T^0 has the same weights
    # hash (deterministic projection head), so its cached predictions stand.
    cached = {p: p.stat().st_mtime_ns for p in (run / "predictions").iterdir()}
    assert [r["AP"] for r in Pipeline(cfg).run(stop_after="teacher_adaptation")["rows"]] == [r["AP"] for r in rows]
    assert {p: p.stat().st_mtime_ns for p in cached} == cached


@pytest.mark.parametrize("kind", SAM_KINDS)
def test_stub_masks_land_where_their_boxes_are_at_original_resolution(folders, kind, monkeypatch):
    """Grounding-DINO stubbed to two known boxes, SAM's mask decoder stubbed to return its prompt
    box as the mask: on a padded, non-square batch resized to other original sizes, each mask must
    cover its box there, to within one cell of SAM's low-resolution grid (SAM 2 stretches the image
    to its square input, SAM keeps the aspect ratio and pads)."""
    teacher = load_teacher(folders, kind, max_instances=5)
    boxes = torch.tensor([[0.5, 0.3, 0.5, 0.4], [0.25, 0.75, 0.3, 0.3]])  # (cx, cy, w, h) of the image
    labels = [1, 3]
    queries = teacher.detector.config.num_queries
    logits = torch.full((2, queries, teacher.detector.config.max_text_len), -10.0)
    pred_boxes = torch.full((2, queries, 4), 0.1)
    for q, c in enumerate(labels):
        logits[:, q, (teacher.token_class == c).nonzero().squeeze(1)] = 10.0
        pred_boxes[:, q] = boxes[q]
    monkeypatch.setattr(teacher, "_detect", lambda *args: (SimpleNamespace(logits=logits, pred_boxes=pred_boxes), None))
    cells, cell = teacher.low_res, teacher.sam_size / teacher.low_res
    centres = (torch.arange(cells) + 0.5) * cell

    def box_as_mask(image_embeddings, input_boxes, multimask_output):
        x0, y0, x1, y1 = (v[:, None, None] for v in input_boxes[0].unbind(-1))
        inside = (centres[:, None] > y0) & (centres[:, None] < y1) & (centres[None] > x0) & (centres[None] < x1)
        return SimpleNamespace(pred_masks=torch.where(inside, 10.0, -10.0)[None, :, None])

    teacher.sam.forward = box_as_mask
    pixel_values, pixel_mask, image_sizes, orig_sizes = batch()
    predictions = teacher.predict_with_boxes(pixel_values, pixel_mask, image_sizes, orig_sizes)
    for (inst, found), size, (h, w) in zip(predictions, image_sizes, orig_sizes):
        assert inst.labels.tolist() == labels
        expected = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1) * torch.tensor(
            [w, h, w, h])
        torch.testing.assert_close(found, expected)
        rh, rw = sam_resized_size(size, teacher.sam_size, keep_aspect=kind == "sam")
        tol_y, tol_x = cell * h / rh, cell * w / rw  # one low-resolution cell at the original size
        ys, xs = (torch.arange(h) + 0.5)[:, None], (torch.arange(w) + 0.5)[None]
        for mask, (x0, y0, x1, y1) in zip(inst.masks, expected.tolist()):
            inner = (ys > y0 + tol_y) & (ys < y1 - tol_y) & (xs > x0 + tol_x) & (xs < x1 - tol_x)
            outer = (ys > y0 - tol_y) & (ys < y1 + tol_y) & (xs > x0 - tol_x) & (xs < x1 + tol_x)
            assert inner.any() and (mask >= inner).all() and (mask <= outer).all()


def test_frame_geometry_and_mask_terms_on_sub_regions():
    # SAM keeps the aspect ratio (longest side to the frame, rounded), SAM 2 stretches.
    assert sam_resized_size((48, 80), 64, keep_aspect=True) == (38, 64)
    assert sam_resized_size((80, 48), 64, keep_aspect=True) == (64, 38)
    assert sam_resized_size((48, 80), 64, keep_aspect=False) == (64, 64)

    # region_logits on a sub-region: bilinear resampling reproduces a linear ramp exactly, with the
    # low-resolution cells' centres at (i + 0.5) and the border clamped.
    cells = 16
    grid = torch.arange(cells, dtype=torch.float32)
    ramp = (2 * grid[:, None] + 3 * grid[None])[None]
    region, out = (38 / 64, 1.0), (30, 50)
    ys = ((torch.arange(out[0]) + 0.5) / out[0] * region[0] * cells - 0.5).clamp(0, cells - 1)
    xs = ((torch.arange(out[1]) + 0.5) / out[1] * region[1] * cells - 0.5).clamp(0, cells - 1)
    torch.testing.assert_close(region_logits(ramp, region, out)[0], 2 * ys[:, None] + 3 * xs[None], atol=1e-4, rtol=0)

    # mask_target: a 48 x 80 image's mask in a 12 x 20 region of a 24 x 24 grid (scale 1/4), zero outside.
    masks = torch.zeros(1, 48, 80, dtype=torch.bool)
    masks[0, 12:36, 20:60] = True
    target = mask_target(masks, (12, 20), 24)
    expected = torch.zeros(1, 24, 24)
    expected[0, 3:9, 5:15] = 1
    assert torch.equal(target, expected)

    # mask_losses over the whole grid, region and outside: perfect logits cost nothing, zero logits ln 2
    # (BCE) and 1 - (K + 1) / (L^2 / 2 + K + 1) (dice, K target pixels).
    bce, dice = mask_losses(torch.where(target > 0, 20.0, -20.0), target)
    assert float(bce) < 1e-6 and float(dice) < 1e-6
    bce, dice = mask_losses(torch.zeros_like(target), target)
    k = float(target.sum())
    assert float(bce) == pytest.approx(math.log(2)) and float(dice) == pytest.approx(1 - (k + 1) / (288 + k + 1))


def test_paper_size_teachers_build_with_their_parameter_counts():
    """Grounding-DINO-L + SAM2-L (559 M, cast.teachers.vfm_configs) and SAM 3 (840 M,
    cast.teachers.sam3_configs) at full size, built on the meta device (no memory, no weights)."""
    from cast.teachers.sam3 import random_sam3_teacher
    from cast.teachers.vfm import random_teacher

    classes = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    with torch.device("meta"):
        teacher, sam3 = random_teacher(classes, size="paper"), random_sam3_teacher(classes, size="paper")

    def millions(module: torch.nn.Module, trainable: bool = False) -> float:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable) / 1e6

    assert millions(teacher.detector.model.backbone) == pytest.approx(195.2, abs=0.1)  # Swin-L
    assert millions(teacher.detector.model.text_backbone) == pytest.approx(108.9, abs=0.1)  # BERT-base
    assert millions(teacher.detector) == pytest.approx(342.0, abs=0.1)
    assert millions(teacher.sam) == pytest.approx(216.9, abs=0.1)  # SAM2-L without the video memory
    assert millions(teacher) == pytest.approx(559.1, abs=0.1)  # + the projection head
    assert millions(sam3.sam3) == pytest.approx(840.4, abs=0.1)
    assert millions(sam3.sam3.vision_encoder) == pytest.approx(454.0, abs=0.1)
    assert millions(sam3.sam3.text_encoder) == pytest.approx(353.5, abs=0.1)
    assert millions(sam3, trainable=True) == pytest.approx(14.6, abs=0.1)  # decoder, heads, mask decoder, projection
