"""The CAST teacher: Grounding-DINO (text-prompted boxes) + SAM 2 or SAM (box-prompted masks),
behind the project's model interface (cast.models.protocol.SegmentationModel), so the one trainer
adapts it and the pseudo-labeler runs it unchanged.

Zero-shot (`predict`): one prompt for the batch, the class names joined by " . "; a query's
score for a class is the max over that class's tokens of sigmoid(logit); boxes above
box_threshold (and text_threshold) are kept, best first, at most max_instances; each box prompts
SAM for one mask (multimask_output=False), binarised at mask_threshold at the image's original
resolution; overlaps go to the higher-scoring instance; instances left empty are dropped.

Adaptation (`forward` with targets) trains what matters for a new domain, and nothing else:
- Grounding-DINO's detection loss (transformers' Hungarian focal + L1 + GIoU, on the last
  decoder layer, every earlier one and the encoder proposals) on boxes derived from the target
  masks. Trains its image backbone (Swin, at lr x backbone_lr_multiplier, see
  `parameter_groups`), the feature projections, the deformable encoder/decoder, the
  text-image fusion and the box heads. Its BERT text encoder stays frozen (method: the class
  names' embeddings must stay those it was pre-trained with; a few labeled images would
  overfit 110 M parameters).
- SAM's mask decoder (sigmoid BCE + dice on its low-resolution logits) prompted with the
  ground-truth boxes: it learns the domain's object extents. SAM's image encoder (hundreds of
  millions of parameters, trained on 1 B masks) and its prompt encoder stay frozen: they are
  generic, and their features would drift on a few hundred images.
- The contrastive term L_pxl reads a projection head (1x1 conv -> ReLU -> 1x1 conv to
  `projection_dim`) on Grounding-DINO's backbone features at `projection_stride`. Not on SAM's
  image embeddings: that encoder is frozen, so L_pxl could only train the head there, while on
  the Swin backbone it shapes the features the detector itself reads.
Frozen modules also stay in eval mode in training (no dropout noise in their features).

For the contrastive sampler, `forward` returns the top-K queries (K = sampler_queries, by
detection score) as `class_logits` (B, K, C+1): log-probabilities from the per-class scores
(cast.teachers.vfm_ops.class_log_probs: P(c) = o p_c / sum p, P(no object) = 1 - o with o the
detection score), and `mask_logits` (B, K, ceil(H/4), ceil(W/4)): SAM's masks for their
(detached) predicted boxes. `aux_outputs` is empty.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, Sam2Config, Sam2Model,
                          SamConfig, SamModel)
from transformers.models.grounding_dino.modeling_grounding_dino import SPECIAL_TOKENS

from cast.inference.api import PredictImages
from cast.models.outputs import SegmentationOutput
from cast.models.param_groups import adamw_parameter_groups
from cast.structures import Instances
from cast.teachers.vfm_configs import (BERT_BASE_VOCAB_SIZE, SAM_KINDS, bert_like_tokenizer, grounding_dino_config,
                                      sam_config)
from cast.teachers.vfm_ops import (boxes_to_cxcywh, build_prompt, class_log_probs, class_scores, cxcywh_to_xyxy,
                                   mask_losses, mask_target, masks_to_boxes, region_logits, resolve_overlaps,
                                   sam_resized_size, select_detections, valid_sizes)
from cast.utils.io import atomic_save, atomic_write_json, read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# Grounding-DINO's and SAM's processors both normalise with the ImageNet statistics.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# Masks are resized and binarised this many at a time: 100 float masks at 1024 x 2048 are 800 MB.
MASK_CHUNK = 16
# Sampler mask logits on padding (ignored by the loss; any constant would do).
PAD_LOGIT = -20.0
BACKBONE_PREFIX = "detector.model.backbone.conv_encoder."
# Embeddings and tokens that should not be pulled towards zero, besides all norms and biases.
NO_DECAY_NAMES = ("level_embed", "query_position_embeddings", "relative_position_bias_table", "iou_token",
                  "mask_tokens", "obj_score_token")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class TeacherSettings:
    """What the teacher needs besides its two sub-models (saved in config.json)."""

    classes: list[str]
    sam_kind: str = "sam2"  # "sam2": Sam2Model, "sam": SamModel
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    mask_threshold: float = 0.5
    max_instances: int = 100
    projection_dim: int = 128
    projection_stride: int = 8  # Grounding-DINO backbone level the projection head reads
    sampler_queries: int = 20  # K queries handed to the contrastive sampler (SAM decodes K masks)
    max_train_prompts: int = 32  # ground-truth boxes per image prompting SAM in training (largest first)
    mask_bce_weight: float = 5.0
    mask_dice_weight: float = 5.0

    def validate(self) -> None:
        if not self.classes:
            raise ValueError("the teacher needs at least one class name")
        if self.sam_kind not in SAM_KINDS:
            raise ValueError(f"sam_kind must be one of {SAM_KINDS}, got {self.sam_kind!r}")
        for key in ("box_threshold", "text_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("max_instances", "projection_dim", "sampler_queries", "max_train_prompts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


class GroundingDinoSamTeacher(PredictImages, nn.Module):
    """Grounding-DINO + SAM 2 / SAM as one segmentation model (see the module docstring).

    Images arrive in [0, 1] (B, 3, H, W), padded bottom/right; `pixel_mask` marks real pixels.
    Build it with `from_hub_folders` (transformers folders), `from_pretrained` (a folder written by
    `save_pretrained`) or `random_teacher` (random weights, for tests and cost benchmarks).
    """

    model_type = "cast_vfm_teacher"

    def __init__(self, settings: TeacherSettings, detector: GroundingDinoForObjectDetection,
                 sam: Sam2Model | SamModel, tokenizer: BertTokenizer) -> None:
        super().__init__()
        settings.validate()
        expected = Sam2Model if settings.sam_kind == "sam2" else SamModel
        if not isinstance(sam, expected):
            raise ValueError(f"sam_kind={settings.sam_kind!r} needs a {expected.__name__}, got {type(sam).__name__}")
        self.settings, self.detector, self.sam, self.tokenizer = settings, detector, sam, tokenizer
        # Deep supervision of every decoder layer, as Grounding-DINO was trained (only the loss changes).
        detector.config.auxiliary_loss = True

        got = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.convert_tokens_to_ids("."))
        if list(got) != SPECIAL_TOKENS[:3]:
            raise ValueError(f"the tokenizer gives [CLS], [SEP], '.' the ids {got}; Grounding-DINO's code expects "
                             f"{SPECIAL_TOKENS[:3]} (bert-base-uncased)")
        ids, owner = build_prompt(tokenizer, settings.classes, SPECIAL_TOKENS, detector.config.max_text_len)
        self.register_buffer("prompt_ids", torch.tensor([ids]), persistent=False)
        self.register_buffer("token_class", torch.tensor(owner), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

        # Swin and ResNet stage i (0 = stem) have stride 2 ** (i + 1).
        strides = [2 ** (i + 1) for i in detector.config.backbone_config.out_indices]
        if settings.projection_stride not in strides:
            raise ValueError(f"projection_stride={settings.projection_stride}: Grounding-DINO's backbone gives "
                             f"features at strides {strides}")
        self.projection_level = strides.index(settings.projection_stride)
        channels = detector.model.backbone.conv_encoder.intermediate_channel_sizes[self.projection_level]
        hidden = 2 * settings.projection_dim
        # A fixed seed: theta_T^0 (and the hash its predictions are cached under) is the same on every load.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.projection_head = nn.Sequential(nn.Conv2d(channels, hidden, kernel_size=1), nn.ReLU(),
                                                 nn.Conv2d(hidden, settings.projection_dim, kernel_size=1))

        prompt_config = sam.config.prompt_encoder_config
        self.sam_size = int(prompt_config.image_size)  # SAM's square input; box coordinates live there
        self.low_res = 4 * (self.sam_size // int(prompt_config.patch_size))  # side of its mask logits
        for module in self._frozen_modules():
            module.requires_grad_(False)
        if isinstance(sam, Sam2Model):
            sam.no_memory_embedding.requires_grad_(False)  # added to the image embedding: encoder side

    # ------------------------------------------------------------------ interface

    @property
    def classes(self) -> list[str]:
        return list(self.settings.classes)

    def train(self, mode: bool = True) -> "GroundingDinoSamTeacher":
        super().train(mode)
        for module in self._frozen_modules():
            module.train(False)
        return self

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                targets: list[dict[str, torch.Tensor]] | None = None) -> SegmentationOutput:
        """pixel_values (B, 3, H, W) in [0, 1]; pixel_mask (B, H, W) True on real pixels; targets
        [{"masks": (K, H, W) 0/1, "labels": (K,)}] at the input's size. With targets, `loss` is
        Grounding-DINO's detection loss + SAM's weighted mask BCE and dice."""
        _check_pixels(pixel_values)
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.bool, device=pixel_values.device)
        sizes = valid_sizes(pixel_mask)
        labels = None if targets is None else self._detection_labels(targets, sizes, (height, width))
        det, features = self._detect(pixel_values, pixel_mask, labels)
        embeddings = self._project(features, (height, width))
        sam_embeddings = self._sam_embeddings(pixel_values, sizes)
        class_logits, mask_logits = self._sampler_outputs(det, sam_embeddings, sizes, (height, width))
        output = SegmentationOutput(class_logits=class_logits, mask_logits=mask_logits, embeddings=embeddings)
        if targets is not None:
            bce, dice = self._mask_loss(sam_embeddings, targets, sizes)
            s = self.settings
            output.loss = det.loss + s.mask_bce_weight * bce + s.mask_dice_weight * dice
            output.loss_dict = {"loss_detection": det.loss, "loss_mask_bce": bce, "loss_mask_dice": dice,
                                **{f"detection_{k}": v for k, v in det.loss_dict.items()}}
        return output

    def pixel_embeddings(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The projection head on Grounding-DINO's backbone alone (no detector heads, no SAM):
        what the contrastive loss needs of its stop-gradient strong view."""
        _check_pixels(pixel_values)
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.bool, device=pixel_values.device)
        levels = self.detector.model.backbone.conv_encoder(self._normalise(pixel_values, pixel_mask), pixel_mask.long())
        return self._project(levels[self.projection_level][0], (height, width))

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                image_sizes: list[tuple[int, int]] | None = None,
                orig_sizes: list[tuple[int, int]] | None = None) -> list[Instances]:
        """Zero-shot instances per image (eval mode for the call), cropped to image_sizes inside
        the padded batch, masks at orig_sizes, best first."""
        _check_pixels(pixel_values)
        batch, _, height, width = pixel_values.shape
        image_sizes = [(height, width)] * batch if image_sizes is None else [tuple(map(int, s)) for s in image_sizes]
        orig_sizes = image_sizes if orig_sizes is None else [tuple(map(int, s)) for s in orig_sizes]
        if len(image_sizes) != batch or len(orig_sizes) != batch:
            raise ValueError(f"{len(image_sizes)} image_sizes / {len(orig_sizes)} orig_sizes for a batch of {batch}")
        for h, w in image_sizes:
            if not (0 < h <= height and 0 < w <= width):
                raise ValueError(f"image size {(h, w)} does not fit in the input of size {(height, width)}")
        if pixel_mask is None:
            pixel_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=pixel_values.device)
            for b, (h, w) in enumerate(image_sizes):
                pixel_mask[b, :h, :w] = True
        was_training = self.training
        self.eval()
        try:
            det, _ = self._detect(pixel_values, pixel_mask, None)
            scores = class_scores(det.logits, self.token_class, len(self.settings.classes))
            sam_embeddings = self._sam_embeddings(pixel_values, image_sizes)
            return [self._instances(b, scores[b], det.pred_boxes[b], sam_embeddings, image_sizes[b], orig_sizes[b])
                    for b in range(batch)]
        finally:
            self.train(was_training)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_multiplier: float) -> list[dict]:
        """AdamW groups of the trainable parameters: Grounding-DINO's image backbone at
        lr * backbone_lr_multiplier, the rest at lr; no weight decay on norms, biases and
        embeddings/tokens; empty groups left out."""
        return adamw_parameter_groups(self, lr, weight_decay, backbone_lr_multiplier, BACKBONE_PREFIX, NO_DECAY_NAMES)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (settings + both sub-model configurations), model.safetensors (every
        weight, projection head included) and tokenizer/, so that `load` rebuilds it offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save(directory / WEIGHTS_NAME, lambda tmp: save_model(self, str(tmp)))
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        atomic_write_json(directory / CONFIG_NAME, {
            "model_type": self.model_type, "settings": asdict(self.settings),
            "grounding_dino": self.detector.config.to_dict(), "sam": self.sam.config.to_dict()}, indent=1)

    @classmethod
    def from_pretrained(cls, directory: str | Path,
                        map_location: str | torch.device = "cpu") -> "GroundingDinoSamTeacher":
        """A teacher written by `save_pretrained`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: teacher folder not found")
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: file not found")
        config = read_json(config_path)
        if not isinstance(config, dict) or config.get("model_type") != cls.model_type:
            raise ValueError(f"{config_path}: not a {cls.model_type} configuration (written by "
                             "GroundingDinoSamTeacher.save_pretrained)")
        weights, tokenizer_dir = directory / WEIGHTS_NAME, directory / TOKENIZER_DIR
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: file not found")
        _require_tokenizer(tokenizer_dir)
        try:
            settings = TeacherSettings(**{k: v for k, v in config["settings"].items()
                                          if k in {f.name for f in fields(TeacherSettings)}})
            detector = GroundingDinoForObjectDetection(GroundingDinoConfig.from_dict(config["grounding_dino"]))
            sam_class, sam_config_class = ((Sam2Model, Sam2Config) if settings.sam_kind == "sam2"
                                           else (SamModel, SamConfig))
            sam = sam_class(sam_config_class.from_dict(config["sam"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: invalid teacher configuration: {e}") from None
        model = cls(settings, detector, sam, BertTokenizer.from_pretrained(str(tokenizer_dir)))
        try:
            load_model(model, str(weights), strict=True, device=str(map_location))
        except (SafetensorError, RuntimeError) as e:
            raise ValueError(f"{weights}: cannot load the weights into the teacher {config_path} describes: "
                             f"{e}") from None
        return model

    @classmethod
    def from_hub_folders(cls, grounding_dino_dir: str | Path, sam_dir: str | Path, classes: list[str],
                         sam_kind: str = "sam2", **settings: Any) -> "GroundingDinoSamTeacher":
        """theta_T^0 from transformers folders in the hub layout: Grounding-DINO with its BERT
        tokenizer in `grounding_dino_dir` (e.g. IDEA-Research/grounding-dino-base), SAM 2
        (facebook/sam2.1-hiera-large) or SAM (facebook/sam-vit-huge) in `sam_dir`.
        `settings`: TeacherSettings fields (thresholds, max_instances, projection_stride, ...)."""
        expected_sam = "sam2" if sam_kind == "sam2" else "sam"
        gdino_dir = _check_hf_folder(grounding_dino_dir, "grounding-dino", "Grounding-DINO")
        sam_path = _check_hf_folder(sam_dir, expected_sam, "SAM 2" if sam_kind == "sam2" else "SAM")
        _require_tokenizer(gdino_dir)
        detector = GroundingDinoForObjectDetection.from_pretrained(str(gdino_dir))
        sam = (Sam2Model if sam_kind == "sam2" else SamModel).from_pretrained(str(sam_path))
        tokenizer = BertTokenizer.from_pretrained(str(gdino_dir))
        return cls(TeacherSettings(classes=list(classes), sam_kind=sam_kind, **settings), detector, sam, tokenizer)

    # ------------------------------------------------------------------ internals

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.detector.model.text_backbone, self.sam.vision_encoder, self.sam.prompt_encoder,
                self.sam.shared_image_embedding]

    def _detect(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor,
                labels: list[dict[str, torch.Tensor]] | None) -> tuple[Any, torch.Tensor]:
        """Grounding-DINO on the batch with the class prompt; also returns its backbone's
        feature map at projection_stride (captured on the way, not computed twice)."""
        pixels = self._normalise(pixel_values, pixel_mask)
        ids = self.prompt_ids.expand(pixels.shape[0], -1)
        captured: list = []
        hook = self.detector.model.backbone.conv_encoder.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output))
        try:
            out = self.detector(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                                pixel_mask=pixel_mask.long(), labels=labels)
        finally:
            hook.remove()
        return out, captured[0][self.projection_level][0]

    def _normalise(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        return (pixel_values - self.pixel_mean) / self.pixel_std * pixel_mask[:, None].to(pixel_values.dtype)

    def _project(self, features: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """Projection-head embeddings cropped to the input's extent at projection_stride."""
        stride = self.settings.projection_stride
        return self.projection_head(features)[..., :math.ceil(input_size[0] / stride), :math.ceil(input_size[1] / stride)]

    def _detection_labels(self, targets: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]],
                          input_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Grounding-DINO's labels: class indices (= prompt phrases) and the target masks' boxes,
        normalised (cx, cy, w, h) relative to each image's real extent, as its boxes are."""
        if len(targets) != len(sizes):
            raise ValueError(f"{len(targets)} targets for a batch of {len(sizes)} images")
        labels = []
        for t, (h, w) in zip(targets, sizes):
            if tuple(t["masks"].shape[-2:]) != input_size:
                raise ValueError(f"target masks {tuple(t['masks'].shape)} do not cover the input of size {input_size}")
            classes = t["labels"].long()
            if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= len(self.settings.classes)):
                raise ValueError(f"target labels {classes.tolist()} outside 0..{len(self.settings.classes) - 1}")
            boxes = masks_to_boxes(t["masks"][:, :h, :w] > 0.5)
            nonempty = boxes[:, 2] > boxes[:, 0]
            labels.append({"class_labels": classes[nonempty], "boxes": boxes_to_cxcywh(boxes[nonempty], (h, w))})
        return labels

    def _sam_embeddings(self, pixel_values: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """SAM's image embeddings of each image's real region (resized into SAM's input frame):
        [embedding] for SAM, [stride-4 features, stride-8 features, embedding] for SAM 2."""
        keep_aspect = self.settings.sam_kind == "sam"
        inputs = []
        for b, size in enumerate(sizes):
            crop = pixel_values[b:b + 1, :, :size[0], :size[1]]
            resized = sam_resized_size(size, self.sam_size, keep_aspect)
            crop = F.interpolate(crop, size=resized, mode="bilinear", align_corners=False, antialias=True)
            crop = (crop - self.pixel_mean) / self.pixel_std
            # SAM pads the resized image bottom/right with zeros after normalising.
            inputs.append(F.pad(crop, (0, self.sam_size - resized[1], 0, self.sam_size - resized[0])))
        pixels = torch.cat(inputs)
        if isinstance(self.sam, SamModel):
            return [self.sam.get_image_embeddings(pixels)]
        # Not SAM 2's get_image_embeddings (no_grad): it applies the mask decoder's conv_s0 / conv_s1,
        # which train, to the (frozen, so graph-free) encoder's features.
        features = self.sam.get_image_features(pixels).fpn_hidden_states
        features[-1] = features[-1] + self.sam.no_memory_embedding
        return [f.permute(1, 2, 0).reshape(len(sizes), -1, *size)
                for f, size in zip(features, self.sam.backbone_feature_sizes)]

    def _decode(self, sam_embeddings: list[torch.Tensor], index: int, boxes: torch.Tensor) -> torch.Tensor:
        """(N, L, L) single-mask logits of image `index` for (N, 4) boxes in SAM's input frame."""
        image = [e[index:index + 1] for e in sam_embeddings]
        out = self.sam(image_embeddings=image if isinstance(self.sam, Sam2Model) else image[0],
                       input_boxes=boxes[None], multimask_output=False)
        return out.pred_masks[0, :, 0]

    def _frame(self, size: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor]:
        """The image's size inside SAM's input and the (x, y, x, y) scale of normalised boxes there."""
        rh, rw = sam_resized_size(size, self.sam_size, self.settings.sam_kind == "sam")
        return (rh, rw), self.pixel_mean.new_tensor([rw, rh, rw, rh])

    def _mask_loss(self, sam_embeddings: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                   sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's mask decoder prompted with each target's box, against the target mask."""
        logits, goals = [], []
        for b, (t, (h, w)) in enumerate(zip(targets, sizes)):
            masks = t["masks"][:, :h, :w] > 0.5
            boxes = masks_to_boxes(masks)
            nonempty = boxes[:, 2] > boxes[:, 0]
            masks, boxes = masks[nonempty], boxes[nonempty]
            if masks.shape[0] > self.settings.max_train_prompts:  # memory grows with the prompt count
                largest = masks.flatten(1).sum(1).topk(self.settings.max_train_prompts).indices
                masks, boxes = masks[largest], boxes[largest]
            if masks.shape[0] == 0:
                continue
            (rh, rw), scale = self._frame((h, w))
            logits.append(self._decode(sam_embeddings, b, boxes / boxes.new_tensor([w, h, w, h]) * scale))
            region = (round(rh * self.low_res / self.sam_size), round(rw * self.low_res / self.sam_size))
            goals.append(mask_target(masks, region, self.low_res))
        if not logits:
            zero = sam_embeddings[-1].new_zeros(())
            return zero, zero
        return mask_losses(torch.cat(logits), torch.cat(goals))

    def _sampler_outputs(self, det: Any, sam_embeddings: list[torch.Tensor], sizes: list[tuple[int, int]],
                         input_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class log-probabilities (B, K, C+1) and stride-4 SAM mask logits (B, K, h, w) of the K
        best queries (see the module docstring)."""
        num_classes = len(self.settings.classes)
        scores = class_scores(det.logits, self.token_class, num_classes)
        k = min(self.settings.sampler_queries, scores.shape[1])
        top = scores.detach().amax(dim=-1).topk(k, dim=1).indices
        class_logits = class_log_probs(scores.gather(1, top[..., None].expand(-1, -1, num_classes)))
        boxes = cxcywh_to_xyxy(det.pred_boxes.detach().gather(1, top[..., None].expand(-1, -1, 4))).clamp(0, 1)
        mask_logits = scores.new_full((len(sizes), k, math.ceil(input_size[0] / 4), math.ceil(input_size[1] / 4)),
                                      PAD_LOGIT)
        with torch.no_grad():  # the sampler reads these detached
            for b, (h, w) in enumerate(sizes):
                (rh, rw), scale = self._frame((h, w))
                low_res = self._decode(sam_embeddings, b, boxes[b] * scale)
                out_size = (math.ceil(h / 4), math.ceil(w / 4))
                region = (rh / self.sam_size, rw / self.sam_size)
                mask_logits[b, :, :out_size[0], :out_size[1]] = region_logits(low_res.float(), region, out_size)
        return class_logits, mask_logits

    def _instances(self, index: int, scores: torch.Tensor, boxes: torch.Tensor, sam_embeddings: list[torch.Tensor],
                   image_size: tuple[int, int], orig_size: tuple[int, int]) -> Instances:
        """Kept detections of one image -> SAM masks at orig_size -> overlap-free Instances."""
        s = self.settings
        queries, labels, kept = select_detections(scores, s.box_threshold, s.text_threshold, s.max_instances)
        out_h, out_w = orig_size
        if queries.numel() == 0:
            return Instances(masks=torch.zeros((0, out_h, out_w), dtype=torch.bool, device=scores.device),
                             labels=labels.long(), scores=kept.float())
        (rh, rw), scale = self._frame(image_size)
        low_res = self._decode(sam_embeddings, index, cxcywh_to_xyxy(boxes[queries]).clamp(0, 1) * scale).float()
        region = (rh / self.sam_size, rw / self.sam_size)
        masks = torch.empty((queries.numel(), out_h, out_w), dtype=torch.bool, device=scores.device)
        for start in range(0, queries.numel(), MASK_CHUNK):
            chunk = region_logits(low_res[start:start + MASK_CHUNK], region, (out_h, out_w))
            masks[start:start + MASK_CHUNK] = chunk.sigmoid() > s.mask_threshold
        masks, order = resolve_overlaps(masks, kept)
        return Instances(masks=masks, labels=labels[order].long(), scores=kept[order].float())


def random_teacher(classes: list[str], size: str = "tiny", sam_kind: str = "sam2",
                   **settings: Any) -> GroundingDinoSamTeacher:
    """A teacher with random weights from transformers configurations (no download):
    size="paper" is Grounding-DINO-L + SAM2-L (559 M parameters, see cast.teachers.vfm_configs),
    "tiny" a few hundred thousand; for tests and cost benchmarks. The tokenizer is BERT-like
    over the class names (cast.teachers.vfm_configs.bert_like_tokenizer)."""
    tokenizer = bert_like_tokenizer(classes, None if size == "tiny" else BERT_BASE_VOCAB_SIZE)
    detector = GroundingDinoForObjectDetection(grounding_dino_config(size, vocab_size=len(tokenizer)))
    sam = (Sam2Model if sam_kind == "sam2" else SamModel)(sam_config(size, sam_kind))
    return GroundingDinoSamTeacher(TeacherSettings(classes=list(classes), sam_kind=sam_kind, **settings),
                                   detector, sam, tokenizer)


def _check_pixels(pixel_values: torch.Tensor) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")


def _check_hf_folder(directory: str | Path | None, model_type: str, what: str) -> Path:
    """A transformers model folder: exists, its config.json names `model_type`, it has weights."""
    if directory is None:
        raise FileNotFoundError(f"no {what} folder given")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: {what} folder not found")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: file not found (expected a transformers {what} folder)")
    try:
        found = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config_path}: not a transformers configuration: {e}") from None
    if found != model_type:
        raise ValueError(f"{config_path}: model_type is {found!r}, a {what} folder has {model_type!r}")
    if not any((directory / name).is_file() for name in HF_WEIGHT_FILES):
        raise FileNotFoundError(f"{directory}: no {what} weights (none of {', '.join(HF_WEIGHT_FILES)})")
    return directory


def _require_tokenizer(directory: Path) -> None:
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory}: no BERT tokenizer (none of {', '.join(TOKENIZER_FILES)})")
