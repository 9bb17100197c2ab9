"""The SAM 3 teacher (transformers `Sam3Model`, facebook/sam3): every instance of a text concept in
one model, behind the project's model interface (cast.models.protocol.SegmentationModel), so 1a,
1b, pseudo-labelling, the app and `predict` treat it like any other teacher.

Input: each image's real region is resized (stretched, bilinear) to SAM 3's square input (1008)
and normalised with mean = std = 0.5, as Sam3Processor does.

Zero-shot (`predict`): one text prompt per class name (tokenised as Sam3Processor does: padded to
32 tokens). The vision features are computed once per image and shared by the class prompts; each
prompt runs SAM 3's DETR encoder / decoder and mask decoder. An instance is a (prompt, query)
pair scored query score x presence score (sigmoid(pred_logits) * sigmoid(presence_logits), as
transformers documents); pairs above box_threshold are kept, best first, at most
max_instances; their mask probabilities are resized to the image's original resolution and
binarised at mask_threshold (Sam3Processor.post_process_instance_segmentation's order: sigmoid,
then bilinear resize); overlaps go to the higher-scoring instance; instances left empty are
dropped.

Adaptation (`forward` with targets): the Hungarian set loss of cast.teachers.sam3_loss on every
(image, class prompt), on the final decoder layer. What trains, and why:
- the DETR decoder (queries, presence token, box head, box-relative position bias), the
  dot-product scoring head (the query scores) and the mask decoder (its pixel decoder, prompt
  cross-attention and mask embedder): the parts that say where a domain's objects are, what
  extent they have and whether a concept is there: about 15 M of SAM 3's 840 M parameters;
- the projection head of the contrastive term.
Frozen (and kept in eval mode): the vision encoder (Perception-Encoder ViT and its FPN neck,
454 M, trained on billions of images: its features would drift on a few hundred), the CLIP text
encoder and its projection (the class names must keep their pre-trained embeddings, as for
Grounding-DINO's BERT), the DETR encoder (the text-image fusion over the whole feature map, run
once per class prompt: frozen, it builds no graph there, which keeps the memory of C prompts per
image in check), the geometry encoder (box prompts, unused with text prompts) and the mask
decoder's semantic-segmentation head and its pixel-decoder stage that never runs (unused).

The contrastive term L_pxl reads a projection head (1x1 conv -> ReLU -> 1x1 conv) on the vision
encoder's stride-14 FPN level (the one the DETR encoder reads), resampled to the input's grid at
`projection_stride`. That encoder is frozen, so here L_pxl trains the head alone (the
Grounding-DINO teacher's shapes its Swin backbone).

For the contrastive sampler, `forward` returns the K best (prompt, query) pairs per image (K =
sampler_queries) as `class_logits` (B, K, C+1): log P(its class) = log(score), log P(no object)
= log(1 - score), and `mask_logits` (B, K, ceil(H/4), ceil(W/4)): their mask logits on the
image's stride-4 grid. `aux_outputs` is empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTokenizer, Sam3Config, Sam3Model
from transformers.modeling_outputs import BaseModelOutputWithPooling

from cast.models.outputs import SegmentationOutput
from cast.models.param_groups import adamw_parameter_groups
from cast.structures import Instances
from cast.teachers.hub import ZeroShotSettings
from cast.teachers.foundation import (PAD_LOGIT, FoundationTeacher, binary_masks, check_hf_folder, input_mask,
                                      no_instances, projection_head, ranked_instances, require_tokenizer)
from cast.teachers.sam3_configs import clip_like_tokenizer, sam3_config
from cast.teachers.sam3_loss import PromptOutputs, Sam3SetLoss
from cast.teachers.vfm_ops import (boxes_to_cxcywh, class_log_probs, cxcywh_to_xyxy, mask_target, masks_to_boxes,
                                   region_logits, valid_sizes)

# Sam3ImageProcessor normalises with transformers' IMAGENET_STANDARD_MEAN / STD.
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
PROMPT_LENGTH = 32  # Sam3Processor pads every text prompt to 32 tokens
PROJECTION_SCALE = 1.0  # the FPN level (scale factor of the ViT grid) the projection head reads
# The folder's config.json: "sam3" (Sam3Model) or "sam3_video" (facebook/sam3: detector + tracker).
HUB_MODEL_TYPES = ("sam3", "sam3_video")
NO_DECAY_NAMES = ("query_embed", "reference_points", "presence_token")


@dataclass(kw_only=True)
class Sam3Settings(ZeroShotSettings):
    """What the SAM 3 teacher needs besides its model (saved in config.json). Of ZeroShotSettings'
    thresholds, box_threshold applies to an instance's score (query score x presence score);
    SAM 3 has no text threshold."""

    classes: list[str]
    projection_dim: int = 128
    projection_stride: int = 8  # grid of the input the embeddings are resampled to
    sampler_queries: int = 20  # K (prompt, query) pairs handed to the contrastive sampler
    mask_points: int = 12544  # points per mask of the mask terms (Mask2Former's)
    class_weight: float = 2.0  # Grounding-DINO's focal-loss weight in transformers
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    mask_bce_weight: float = 5.0
    mask_dice_weight: float = 5.0
    presence_weight: float = 2.0

    def validate(self) -> None:
        if not self.classes:
            raise ValueError("the teacher needs at least one class name")
        for key, problem in self.problems():
            raise ValueError(f"{key} {problem}")
        for key in ("projection_dim", "projection_stride", "sampler_queries", "mask_points"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def loss_weights(self) -> dict[str, float]:
        return {"loss_ce": self.class_weight, "loss_bbox": self.bbox_weight, "loss_giou": self.giou_weight,
                "loss_mask": self.mask_bce_weight, "loss_dice": self.mask_dice_weight,
                "loss_presence": self.presence_weight}


class Sam3Teacher(FoundationTeacher):
    """SAM 3 as one segmentation model (see the module docstring).

    Images arrive in [0, 1] (B, 3, H, W), padded bottom/right; `pixel_mask` marks real pixels.
    Build it with `from_hub_folder` (a transformers folder), `from_pretrained` (a folder written by
    `save_pretrained`) or `random_sam3_teacher` (random weights, for tests and cost benchmarks).
    """

    model_type = "cast_sam3_teacher"
    settings_class = Sam3Settings
    tokenizer_class = CLIPTokenizer

    def __init__(self, settings: Sam3Settings, sam3: Sam3Model, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        settings.validate()
        self.settings, self.sam3, self.tokenizer = settings, sam3, tokenizer
        prompts = tokenizer(list(settings.classes), padding="max_length", max_length=PROMPT_LENGTH)
        too_long = [name for name, ids in zip(settings.classes, prompts["input_ids"]) if len(ids) > PROMPT_LENGTH]
        if too_long:
            raise ValueError(f"class names {too_long} take more than the {PROMPT_LENGTH} tokens of a SAM 3 prompt")
        self.register_buffer("prompt_ids", torch.tensor(prompts["input_ids"]), persistent=False)
        self.register_buffer("prompt_mask", torch.tensor(prompts["attention_mask"]), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

        vision = sam3.config.vision_config
        image_size, patch = vision.backbone_config.image_size, vision.backbone_config.patch_size
        self.input_size = int(image_size if isinstance(image_size, int) else image_size[0])
        grid = self.input_size // int(patch if isinstance(patch, int) else patch[0])
        self.mask_size = int(grid * max(vision.scale_factors))  # side of the mask logits (the finest FPN level)
        self.projection_level = list(vision.scale_factors).index(PROJECTION_SCALE)
        self.projection_head = projection_head(vision.fpn_hidden_size, settings.projection_dim)
        self.criterion = Sam3SetLoss(settings.loss_weights(), settings.mask_points)
        self._freeze()

    # ------------------------------------------------------------------ interface

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                targets: list[dict[str, torch.Tensor]] | None = None) -> SegmentationOutput:
        """pixel_values (B, 3, H, W) in [0, 1]; pixel_mask (B, H, W) True on real pixels; targets
        [{"masks": (K, H, W) 0/1, "labels": (K,)}] at the input's size. With targets, `loss` is
        the set loss of cast.teachers.sam3_loss summed over its weighted terms."""
        pixel_mask = input_mask(pixel_values, pixel_mask)
        input_size = tuple(pixel_values.shape[-2:])
        sizes = valid_sizes(pixel_mask)
        goals = None if targets is None else self._class_targets(targets, sizes, input_size)
        vision = self._vision(pixel_values, sizes)
        prompts = self._prompt_outputs(vision)
        class_logits, mask_logits = self._sampler_outputs(prompts, sizes, input_size)
        output = SegmentationOutput(class_logits=class_logits, mask_logits=mask_logits,
                                    embeddings=self._project(vision, sizes, input_size))
        if goals is not None:
            output.loss_dict = self.criterion(prompts, goals)
            output.loss = sum(output.loss_dict.values())
        return output

    def pixel_embeddings(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The projection head on the vision encoder alone (no prompt, no decoder): what the
        contrastive loss needs of its stop-gradient strong view."""
        sizes = valid_sizes(input_mask(pixel_values, pixel_mask))
        return self._project(self._vision(pixel_values, sizes), sizes, tuple(pixel_values.shape[-2:]))

    def _predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, image_sizes: list[tuple[int, int]],
                 orig_sizes: list[tuple[int, int]]) -> list[tuple[Instances, torch.Tensor]]:
        vision = self._vision(pixel_values, image_sizes)
        kept: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in image_sizes]
        for c, out in enumerate(self._prompt_outputs(vision)):  # masks are kept for the pairs above threshold only
            scores = out.logits.float().sigmoid() * out.presence.float().sigmoid()[:, None]
            for b, image_scores in enumerate(scores):
                queries = (image_scores > self.settings.box_threshold).nonzero().squeeze(1)
                kept[b].append((image_scores[queries], torch.full_like(queries, c), out.boxes[b, queries].float(),
                                out.masks[b, queries].float()))
        return [self._instances(*(torch.cat(parts) for parts in zip(*per_image)), orig_size)
                for per_image, orig_size in zip(kept, orig_sizes)]

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_multiplier: float) -> list[dict]:
        """AdamW groups of the trainable parameters, all at lr (the vision backbone is frozen, so
        backbone_lr_multiplier has nothing to act on); no weight decay on norms, biases, queries,
        reference points and the presence token; empty groups left out."""
        return adamw_parameter_groups(self, lr, weight_decay, backbone_lr_multiplier, "sam3.vision_encoder.",
                                      NO_DECAY_NAMES)

    # ------------------------------------------------------------------ building

    def _sub_configs(self) -> dict[str, dict[str, Any]]:
        return {"sam3": self.sam3.config.to_dict()}

    @classmethod
    def _from_configs(cls, settings: Sam3Settings, config: dict[str, Any], tokenizer: CLIPTokenizer) -> "Sam3Teacher":
        return cls(settings, Sam3Model(Sam3Config.from_dict(config["sam3"])), tokenizer)

    @classmethod
    def from_hub_folder(cls, sam3_dir: str | Path, classes: list[str], **settings: Any) -> "Sam3Teacher":
        """theta_T^0 from a transformers folder in the hub layout (facebook/sam3: config.json,
        the weights and the CLIP tokenizer files). `settings`: Sam3Settings fields."""
        directory = check_hf_folder(sam3_dir, HUB_MODEL_TYPES, "SAM 3")
        require_tokenizer(directory, CLIPTokenizer)
        sam3 = Sam3Model.from_pretrained(str(directory))
        return cls(Sam3Settings(classes=list(classes), **settings), sam3, CLIPTokenizer.from_pretrained(str(directory)))

    # ------------------------------------------------------------------ internals

    def _frozen_modules(self) -> list[nn.Module]:
        m = self.sam3
        # transformers' pixel decoder builds num_upsampling_stages (3) stages but runs one per FPN level
        # it fuses (the levels above the coarsest of the 3 Sam3Model feeds it): the rest never runs.
        used = len(m.config.vision_config.scale_factors) - 2
        unused = [*m.mask_decoder.pixel_decoder.conv_layers[used:], *m.mask_decoder.pixel_decoder.norms[used:]]
        return [m.vision_encoder, m.text_encoder, m.text_projection, m.geometry_encoder, m.detr_encoder,
                m.mask_decoder.semantic_projection, *unused]

    def _vision(self, pixel_values: torch.Tensor, sizes: list[tuple[int, int]]) -> Any:
        """The frozen vision encoder's output for each image's real region, resized to SAM 3's input."""
        crops = [F.interpolate(pixel_values[b:b + 1, :, :h, :w], size=(self.input_size, self.input_size),
                               mode="bilinear", align_corners=False, antialias=True) for b, (h, w) in enumerate(sizes)]
        with torch.no_grad():
            return self.sam3.get_vision_features((torch.cat(crops) - self.pixel_mean) / self.pixel_std)

    def _prompt_outputs(self, vision: Any) -> list[PromptOutputs]:
        """SAM 3 on the shared vision features, once per class prompt."""
        batch = vision.fpn_hidden_states[0].shape[0]
        with torch.no_grad():  # frozen text encoder
            text = self.sam3.get_text_features(input_ids=self.prompt_ids, attention_mask=self.prompt_mask).pooler_output
        outputs = []
        for c in range(len(self.settings.classes)):
            prompt = BaseModelOutputWithPooling(pooler_output=text[c:c + 1].expand(batch, -1, -1))
            out = self.sam3(vision_embeds=vision, text_embeds=prompt,
                            attention_mask=self.prompt_mask[c:c + 1].expand(batch, -1))
            x0, y0, x1, y1 = out.pred_boxes.unbind(-1)
            cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
            outputs.append(PromptOutputs(out.pred_logits, out.presence_logits[:, 0], cxcywh, out.pred_masks))
        return outputs

    def _project(self, vision: Any, sizes: list[tuple[int, int]], input_size: tuple[int, int]) -> torch.Tensor:
        """Projection-head embeddings of each image's region, resampled to its cells of the input's
        grid at projection_stride (zero on padding)."""
        stride = self.settings.projection_stride
        embeddings = self.projection_head(vision.fpn_hidden_states[self.projection_level])
        out = embeddings.new_zeros((len(sizes), embeddings.shape[1], math.ceil(input_size[0] / stride),
                                    math.ceil(input_size[1] / stride)))
        for b, (h, w) in enumerate(sizes):
            cells = (math.ceil(h / stride), math.ceil(w / stride))
            out[b, :, :cells[0], :cells[1]] = F.interpolate(embeddings[b:b + 1], size=cells, mode="bilinear",
                                                            align_corners=False, antialias=True)[0]
        return out

    def _class_targets(self, targets: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]],
                       input_size: tuple[int, int]) -> list[list[dict[str, torch.Tensor]]]:
        """Per class, per image: its instances' boxes (normalised (cx, cy, w, h) of the image's real
        extent, as SAM 3's boxes are) and masks in SAM 3's square mask frame."""
        if len(targets) != len(sizes):
            raise ValueError(f"{len(targets)} targets for a batch of {len(sizes)} images")
        num_classes = len(self.settings.classes)
        per_class: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(num_classes)]
        for t, (h, w) in zip(targets, sizes):
            if tuple(t["masks"].shape[-2:]) != input_size:
                raise ValueError(f"target masks {tuple(t['masks'].shape)} do not cover the input of size {input_size}")
            labels = t["labels"].long()
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(f"target labels {labels.tolist()} outside 0..{num_classes - 1}")
            masks = t["masks"][:, :h, :w] > 0.5
            boxes = masks_to_boxes(masks)
            nonempty = boxes[:, 2] > boxes[:, 0]
            boxes, labels = boxes_to_cxcywh(boxes[nonempty], (h, w)), labels[nonempty]
            frame = mask_target(masks[nonempty], (self.mask_size, self.mask_size), self.mask_size)
            for c in range(num_classes):
                per_class[c].append({"boxes": boxes[labels == c], "masks": frame[labels == c]})
        return per_class

    def _sampler_outputs(self, prompts: list[PromptOutputs], sizes: list[tuple[int, int]],
                         input_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class log-probabilities (B, K, C+1) and stride-4 mask logits (B, K, h, w) of the K best
        (prompt, query) pairs of each image (see the module docstring)."""
        num_classes = len(prompts)
        scores = torch.stack([p.logits.float().sigmoid() * p.presence.float().sigmoid()[:, None] for p in prompts], 1)
        flat = scores.flatten(1)  # (B, C * Q), class-major
        k = min(self.settings.sampler_queries, flat.shape[1])
        top = flat.detach().topk(k, dim=1).indices
        classes, queries = top // scores.shape[2], top % scores.shape[2]
        one_hot = F.one_hot(classes, num_classes).to(flat.dtype) * flat.gather(1, top)[..., None]
        mask_logits = flat.new_full((len(sizes), k, math.ceil(input_size[0] / 4), math.ceil(input_size[1] / 4)),
                                    PAD_LOGIT)
        with torch.no_grad():  # the sampler reads these detached
            for b, (h, w) in enumerate(sizes):
                low_res = torch.stack([prompts[c].masks[b, q] for c, q in zip(classes[b].tolist(), queries[b].tolist())])
                out_size = (math.ceil(h / 4), math.ceil(w / 4))
                mask_logits[b, :, :out_size[0], :out_size[1]] = region_logits(low_res.float(), (1.0, 1.0), out_size)
        return class_log_probs(one_hot), mask_logits

    def _instances(self, scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, low_res: torch.Tensor,
                   orig_size: tuple[int, int]) -> tuple[Instances, torch.Tensor]:
        """Kept (prompt, query) pairs of one image -> masks at orig_size -> overlap-free Instances
        and their boxes in pixels at orig_size."""
        order = scores.argsort(descending=True, stable=True)[:self.settings.max_instances]
        if order.numel() == 0:
            return no_instances(orig_size, scores.device)
        masks = binary_masks(low_res[order], (1.0, 1.0), orig_size, self.settings.mask_threshold, probabilities=True)
        out_h, out_w = orig_size
        xyxy = cxcywh_to_xyxy(boxes[order]) * boxes.new_tensor([out_w, out_h, out_w, out_h])
        return ranked_instances(masks, labels[order], scores[order], xyxy)


def random_sam3_teacher(classes: list[str], size: str = "tiny", **settings: Any) -> Sam3Teacher:
    """A SAM 3 teacher with random weights from transformers configurations (no download):
    size="paper" is facebook/sam3's architecture (840 M parameters, cast.teachers.sam3_configs),
    "tiny" about 0.3 M; for tests and cost benchmarks. The tokenizer is CLIP-like over the class
    names (cast.teachers.sam3_configs.clip_like_tokenizer)."""
    tokenizer = clip_like_tokenizer(classes, None if size == "tiny" else sam3_config("paper").text_config.vocab_size)
    return Sam3Teacher(Sam3Settings(classes=list(classes), **settings), Sam3Model(sam3_config(size, len(tokenizer))),
                       tokenizer)
