"""transformers' documented pipelines for the foundation-model teachers, and the hub folders they read,
for the equivalence tests (tests/test_teacher_equivalence.py).

Models: Grounding-DINO, SAM 2 and SAM 3 at their real input resolutions and processor settings
(Grounding-DINO's processor: shortest edge 800, longest 1333; SAM 2: 1024 x 1024; SAM 3:
1008 x 1008, patch 14, windows of 24), narrowed to a few thin layers so that a test runs in
seconds on 2 CPU cores; weights random, built from configurations (no download).

Processors (transformers 5.24):
- Grounding-DINO: `GroundingDinoProcessor` with `GroundingDinoImageProcessorPil` (transformers'
  own PIL backend: torchvision, its other backend, is no project dependency) and the BERT
  tokenizer, as saved in the folder.
- SAM 2 / SAM 3: `Sam2Processor` / `Sam3Processor` with transformers' `Sam2ImageProcessor` /
  `Sam3ImageProcessor`. Those exist for the torchvision backend only, and their modules import
  `torchvision.ops.batched_nms` (used by automatic mask generation alone) when loaded. Without
  torchvision they are loaded with that one name stubbed (`_torchvision_nms_stub`, raising if
  ever called), and their image operations (resize, rescale, normalise, the image reading) are
  transformers' `PilBackend` ones: `pil_backed`. Everything else (settings read from the folder's
  preprocessor_config.json, the order of operations, box normalisation, post-processing) is
  transformers' code unchanged. PIL's bilinear resize is antialiased like torchvision's; both
  round to uint8.
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (BertTokenizer, CLIPTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                          GroundingDinoProcessor, Sam2Config, Sam2Model, Sam2Processor, Sam3Config, Sam3Model,
                          Sam3Processor)
from transformers.image_processing_backends import PilBackend
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
from transformers.utils import is_torchvision_available

from cast.teachers.sam3_configs import clip_like_tokenizer
from cast.teachers.vfm_configs import bert_like_vocab


@contextlib.contextmanager
def _torchvision_nms_stub() -> Iterator[None]:
    """`torchvision.ops.boxes.batched_nms` as a stub while transformers' SAM 2 / SAM 3 image-processor
    modules load (see the module docstring); sys.modules is restored afterwards."""
    is_torchvision_available()  # cached before the stub exists, so transformers keeps seeing no torchvision

    def batched_nms(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchvision is not installed: automatic mask generation is not available")

    names = ("torchvision", "torchvision.ops", "torchvision.ops.boxes")
    saved = {name: sys.modules.get(name) for name in names}
    stubs = {name: types.ModuleType(name) for name in names}
    stubs["torchvision.ops.boxes"].batched_nms = batched_nms
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


with _torchvision_nms_stub():
    from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor


def pil_backed(processor_class: type) -> type:
    """`processor_class` (a torchvision-backend image processor) with transformers' PilBackend image
    operations; it saves under the original class name."""

    def _preprocess(self: Any, images: list, return_tensors: Any, **kwargs: Any) -> Any:
        out = PilBackend._preprocess(self, images, return_tensors=return_tensors, **kwargs)
        return out.pixel_values

    def to_dict(self: Any) -> dict[str, Any]:
        return {**processor_class.to_dict(self), "image_processor_type": processor_class.__name__}

    methods = {name: getattr(PilBackend, name) for name in ("process_image", "convert_to_rgb", "resize", "rescale",
                                                            "normalize")}
    return type(f"{processor_class.__name__}Pil", (processor_class,),
                {**methods, "_preprocess": _preprocess, "to_dict": to_dict, "backend": property(lambda self: "pil")})


Sam2ImageProcessorPil = pil_backed(Sam2ImageProcessor)
Sam3ImageProcessorPil = pil_backed(Sam3ImageProcessor)


# ---------------------------------------------------------------------------- configurations

def narrow_grounding_dino_config(vocab_size: int) -> GroundingDinoConfig:
    """Grounding-DINO's structure (Swin with windows of 12, 4 feature levels, 900 queries, 256 text
    tokens, deformable attention with 4 points) on thin, shallow layers."""
    return GroundingDinoConfig(
        backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                             window_size=12, image_size=384, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64),
        d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4)


def narrow_sam2_config() -> Sam2Config:
    """SAM 2 at 1024 x 1024 (Hiera with SAM2-L's windows, features of 256 / 128 / 64 cells), thin."""
    return Sam2Config(
        vision_config=dict(
            model_type="sam2_vision_model",
            backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1,
                                 blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                                 num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[8, 4, 16, 8],
                                 global_attention_blocks=[3], window_positional_embedding_background_size=[7, 7]),
            backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=32),
        prompt_encoder_config=dict(hidden_size=32, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))


def narrow_sam3_config(vocab_size: int) -> Sam3Config:
    """SAM 3 at 1008 x 1008 (patch 14, windows of 24 with one global block, 200 queries, masks of
    288 x 288), thin; the text vocabulary of `clip_like_vocab`."""
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, global_attn_indexes=[1]),
            fpn_hidden_size=32),
        text_config=dict(model_type="clip_text_model", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, projection_dim=32, max_position_embeddings=32,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=2, intermediate_size=64),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2))


# ---------------------------------------------------------------------------- hub folders

@torch.no_grad()
def condition_grounding_dino(model: GroundingDinoForObjectDetection, inputs: dict[str, torch.Tensor],
                             class_tokens: list[int], gain: float = 0.1, push_down: float = 10.0) -> None:
    """Give a random Grounding-DINO the two properties of a trained one that its post-processing
    relies on, by three weight changes (the same weights then serve both pipelines):
    1. its text features of different class names point apart: the bias of the encoder's last text
       LayerNorm loses the class tokens' mean feature (random class tokens share most of theirs, so
       every query scored every class alike and a phrase named several classes);
    2. its [CLS], [SEP] and "." tokens score low, as training makes them (they are never positive):
       the decoder's output LayerNorm bias becomes push_down x the least-squares direction w with
       text_feature . w = -1 on those tokens and 0 on class tokens, lowering their logits by
       push_down and leaving the class tokens' alone;
    3. its scores spread over (0, 1) instead of saturating at 1: that LayerNorm's gain is scaled by
       `gain` (random 64-wide features have dot products of about 8)."""
    text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
    text = model(**inputs).encoder_last_hidden_state_text
    text_norm.bias.sub_(text[:, class_tokens].mean((0, 1)))
    text = model(**inputs).encoder_last_hidden_state_text
    goal = torch.full(text.shape[:2], -1.0)
    goal[:, class_tokens] = 0.0
    direction = torch.linalg.lstsq(text.flatten(0, 1), goal.flatten()[:, None]).solution[:, 0]
    model.model.decoder.layer_norm.weight.mul_(gain)
    model.model.decoder.layer_norm.bias.copy_(push_down * direction)


def write_grounding_dino_folder(directory: Path, classes: list[str], seed: int,
                                images: list[Image.Image] | None = None) -> Path:
    """Model, BERT tokenizer and processor files, as IDEA-Research/grounding-dino-* lie on disk;
    with `images`, the weights are conditioned on them (`condition_grounding_dino`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(bert_like_vocab(classes)) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(narrow_grounding_dino_config(len(tokenizer))).eval()
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=tokenizer)
    if images is not None:
        inputs = processor(images=images, text=[classes] * len(images), return_tensors="pt")
        words = {i for name in classes for i in tokenizer(name, add_special_tokens=False)["input_ids"]}
        condition_grounding_dino(model, inputs, [i for i, t in enumerate(inputs.input_ids[0].tolist()) if t in words])
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@torch.no_grad()
def condition_sam2(model: Sam2Model, gain: float = 1e4) -> None:
    """A random SAM 2's mask logits are about 1e-5 (three small random layers make its mask
    tokens' hypernetwork output), where float32's sigmoid is flat at 0.5: "sigmoid > 0.5" (the
    teacher) and "logit > 0" (post_process_masks) then disagree on some pixels that any trained SAM
    puts far from 0. The hypernetworks' last layers are scaled by `gain`: every logit x gain, the
    same signs, logits of a trained model's size."""
    for mlp in model.mask_decoder.output_hypernetworks_mlps:
        mlp.proj_out.weight.mul_(gain)
        mlp.proj_out.bias.mul_(gain)


def write_sam2_folder(directory: Path, seed: int) -> Path:
    """Model and processor files, as facebook/sam2.1-hiera-* lie on disk (logits conditioned by
    `condition_sam2`)."""
    torch.manual_seed(seed)
    model = Sam2Model(narrow_sam2_config())
    condition_sam2(model)
    model.save_pretrained(directory)
    Sam2Processor(image_processor=Sam2ImageProcessorPil()).save_pretrained(directory)
    return directory


@torch.no_grad()
def condition_sam3(model: Sam3Model, score_gain: float = 30.0, mask_gain: float = 1e3) -> None:
    """A random SAM 3 scores every query about 0.2536 (query logits of about 0.03, presence 0.5) and
    its mask logits are about 1e-4: near-ties everywhere. Its query-score projection is scaled by
    `score_gain` (logits x score_gain: scores spread over (0, 0.5)) and the mask embedder's last
    layer by `mask_gain` (mask logits of a trained model's size, same signs)."""
    model.dot_product_scoring.query_proj.weight.mul_(score_gain)
    model.dot_product_scoring.query_proj.bias.mul_(score_gain)
    model.mask_decoder.mask_embedder.layers[-1].weight.mul_(mask_gain)
    model.mask_decoder.mask_embedder.layers[-1].bias.mul_(mask_gain)


def write_sam3_folder(directory: Path, classes: list[str], seed: int) -> Path:
    """Model, CLIP tokenizer and processor files, as facebook/sam3 lies on disk (scores and masks
    conditioned by `condition_sam3`)."""
    tokenizer = clip_like_tokenizer(classes)
    torch.manual_seed(seed)
    model = Sam3Model(narrow_sam3_config(len(tokenizer)))
    condition_sam3(model)
    model.save_pretrained(directory)
    Sam3Processor(image_processor=Sam3ImageProcessorPil(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------- the reference pipelines

def grounding_dino_processor(directory: Path) -> GroundingDinoProcessor:
    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil.from_pretrained(directory),
                                  tokenizer=BertTokenizer.from_pretrained(str(directory)))


def sam2_processor(directory: Path) -> Sam2Processor:
    return Sam2Processor(image_processor=Sam2ImageProcessorPil.from_pretrained(directory))


def sam3_processor(directory: Path) -> Sam3Processor:
    return Sam3Processor(image_processor=Sam3ImageProcessorPil.from_pretrained(directory),
                         tokenizer=CLIPTokenizer.from_pretrained(str(directory)))


def float_resized(image: Image.Image, image_processor: Any) -> torch.Tensor:
    """The processor's input for `image` (its size, mean and std) made as the teacher makes it: the
    image in [0, 1] as float, resized with torch's antialiased bilinear, no rounding to uint8."""
    size = image_processor.size
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    pixels = torch.nn.functional.interpolate(pixels, size=(size["height"], size["width"]), mode="bilinear",
                                             align_corners=False, antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (image_processor.image_mean, image_processor.image_std))
    return (pixels - mean) / std


@torch.no_grad()
def grounding_dino_outputs(images: list[Image.Image], classes: list[str], gdino_dir: Path) -> tuple[Any, Any, Any]:
    """GroundingDinoProcessor (the class names as candidate labels, the images as one padded batch)
    and the model: (processor, inputs, outputs)."""
    processor = grounding_dino_processor(gdino_dir)
    detector = GroundingDinoForObjectDetection.from_pretrained(str(gdino_dir)).eval()
    inputs = processor(images=images, text=[classes] * len(images), return_tensors="pt")
    return processor, inputs, detector(**inputs)


@torch.no_grad()
def gdino_sam2_reference(images: list[Image.Image], classes: list[str], detection: tuple[Any, Any, Any],
                         sam2_dir: Path, box_threshold: float, text_threshold: float, clip_boxes: bool = False,
                         float_resize: bool = False) -> list[dict[str, Any]]:
    """transformers' documented zero-shot pipeline on `grounding_dino_outputs`:
    post_process_grounded_object_detection, then Sam2Processor with those boxes + the model (one
    mask per box) + post_process_masks. Per image: boxes (x0, y0, x1, y1 pixels), scores, phrases,
    labels (class index, None unless the phrase is one class name), masks (N, H, W) bool, best
    score first. With `clip_boxes` the boxes are clipped to the image before they prompt SAM 2 (as
    the teacher does); with `float_resize` SAM 2's input is made as the teacher makes it
    (`float_resized`), not by the image processor (which rounds to uint8)."""
    processor, inputs, outputs = detection
    detections = processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=box_threshold, text_threshold=text_threshold,
        target_sizes=[image.size[::-1] for image in images])
    sam_processor, sam = sam2_processor(sam2_dir), Sam2Model.from_pretrained(str(sam2_dir)).eval()
    results = []
    for image, found in zip(images, detections):
        order = found["scores"].argsort(descending=True, stable=True)
        boxes, scores = found["boxes"][order], found["scores"][order]
        if clip_boxes:
            boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([image.width, image.height] * 2))
        phrases = [found["text_labels"][i] for i in order.tolist()]
        masks = torch.zeros((0, image.height, image.width), dtype=torch.bool)
        if len(boxes):
            sam_inputs = sam_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
            pixels = float_resized(image, sam_processor.image_processor) if float_resize else sam_inputs.pixel_values
            sam_out = sam(pixel_values=pixels, input_boxes=sam_inputs.input_boxes, multimask_output=False)
            masks = sam_processor.post_process_masks(sam_out.pred_masks, sam_inputs.original_sizes)[0][:, 0]
        results.append({"boxes": boxes, "scores": scores, "phrases": phrases,
                        "labels": [classes.index(p) if p in classes else None for p in phrases], "masks": masks})
    return results


@torch.no_grad()
def sam3_outputs(images: list[Image.Image], classes: list[str], sam3_dir: Path,
                 float_resize: bool = False) -> tuple[Any, list[list[tuple[Any, Any]]]]:
    """Sam3Processor + the model, one text prompt per class (processor, [image][class] -> (inputs,
    outputs)). With `float_resize` the model's input is made as the teacher makes it."""
    processor, model = sam3_processor(sam3_dir), Sam3Model.from_pretrained(str(sam3_dir)).eval()
    runs = []
    for image in images:
        per_class = []
        for name in classes:
            inputs = processor(images=image, text=name, return_tensors="pt")
            if float_resize:
                inputs["pixel_values"] = float_resized(image, processor.image_processor)
            per_class.append((inputs, model(**inputs)))
        runs.append(per_class)
    return processor, runs


def sam3_reference(images: list[Image.Image], outputs: tuple[Any, list[list[tuple[Any, Any]]]], threshold: float,
                   mask_threshold: float) -> list[dict[str, Any]]:
    """post_process_instance_segmentation of `sam3_outputs`, every class prompt's instances
    together, best score first: boxes, scores, labels, masks per image."""
    processor, runs = outputs
    results = []
    for image, per_class in zip(images, runs):
        parts = []
        for c, (inputs, out) in enumerate(per_class):
            found = processor.post_process_instance_segmentation(
                out, threshold=threshold, mask_threshold=mask_threshold,
                target_sizes=inputs.original_sizes.tolist())[0]
            # post_process_instance_segmentation leaves an empty (0, 288, 288) unresized
            masks = found["masks"].bool() if len(found["masks"]) else torch.zeros((0, image.height, image.width),
                                                                                      dtype=torch.bool)
            parts.append((found["boxes"], found["scores"], torch.full((len(found["scores"]),), c), masks))
        boxes, scores, labels, masks = (torch.cat(p) for p in zip(*parts))
        order = scores.argsort(descending=True, stable=True)
        results.append({"boxes": boxes[order], "scores": scores[order], "labels": labels[order].tolist(),
                        "masks": masks[order]})
    return results


def meaningful_threshold(scores: list[torch.Tensor], margin: float, min_per_image: int, max_total: int,
                         admissible: Any = lambda image, index, threshold: True) -> float:
    """The score threshold for a comparison that random weights cannot make ambiguous: no score
    within `margin` of it, the scores it keeps (in each image) at least `margin` apart (so their
    order, which decides overlaps, is not a near-tie), every kept (image, index) `admissible`, at
    least `min_per_image` kept per image and at most `max_total` in all; of those, the one keeping
    the most. `scores[b]`: the candidates' scores of image b."""
    pooled = torch.cat(scores).unique().sort(descending=True).values
    best, kept_best = None, 0
    for threshold in ((pooled[:-1] + pooled[1:]) / 2).tolist():
        kept = [s[s > threshold] for s in scores]
        total = sum(len(k) for k in kept)
        if total > max_total:
            break
        gaps_ok = all(len(k) < 2 or (k.sort().values.diff() > margin).all() for k in kept)
        clear = all(((s - threshold).abs() > margin).all() for s in scores)
        if (gaps_ok and clear and min(len(k) for k in kept) >= min_per_image and total > kept_best
                and all(admissible(b, i, threshold) for b, s in enumerate(scores)
                        for i in (s > threshold).nonzero().squeeze(1).tolist())):
            best, kept_best = threshold, total
    if best is None:
        raise AssertionError("no threshold gives a meaningful comparison for these weights")
    return best


# ---------------------------------------------------------------------------- comparing

def paper_overlap_rule(masks: torch.Tensor) -> torch.Tensor:
    """The teachers' documented last step, written independently of their code: masks in score order,
    every pixel stays with the first mask that covers it."""
    taken = torch.zeros(masks.shape[1:], dtype=torch.bool)
    out = []
    for mask in masks:
        out.append(mask & ~taken)
        taken |= mask
    return torch.stack(out) if out else masks


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of (N, 4) pixel boxes."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of (N, H, W) bool masks (1 where both are empty)."""
    inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def photo(name: str, short_side: int | None = None) -> Image.Image:
    """One of scikit-image's photos as an RGB PIL image, its short side resized (PIL bilinear) to
    `short_side` when given."""
    from skimage import data

    image = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
    if short_side is not None:
        scale = short_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    return image
