"""The CAST student: encoder -> neck (pixel decoder) -> masked-attention decoder, plus a pixel
projection head for the contrastive loss. Computes the set-prediction loss when given targets;
`instance_inference` turns its logits into instances (shared with the ONNX runtime model)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from cast.inference.api import PredictImages
from cast.losses.set_prediction import SetPredictionLoss
from cast.models.config import FEATURE_STRIDES, CastStudentConfig, preset_config
from cast.models.decoder import MaskedAttentionDecoder, mask2former_config
from cast.models.encoders import build_encoder, pretrained_encoder_config
from cast.models.necks import DPTNeck, FPNNeck
from cast.models.outputs import SegmentationOutput
from cast.models.param_groups import adamw_parameter_groups
from cast.structures import Instances
from cast.utils.io import atomic_save, atomic_write_json, read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Inputs are padded to a multiple of the coarsest stride so every level has an integer size.
SIZE_DIVISIBILITY = FEATURE_STRIDES[-1]
# Masks are resized in chunks: 100 float masks at 1024x2048 would need 800 MB at once.
MASK_CHUNK = 16
# Embeddings/tokens that should not be pulled towards zero, besides all norms and biases.
NO_DECAY_NAMES = ("queries_embedder", "queries_features", "level_embed", "position_embeddings", "cls_token",
                  "mask_token", "register_tokens")


class CastStudent(PredictImages, nn.Module):
    """Mask2Former-style instance segmenter on a DINOv2 (or ResNet) encoder.

    `forward` takes images in [0, 1] of any size and returns a `SegmentationOutput` whose mask
    logits cover the input at stride 4 (ceil(H/4) x ceil(W/4)); it follows
    `cast.models.protocol.SegmentationModel`.
    """

    model_type = "cast_student"

    def __init__(self, config: CastStudentConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder_type, config.encoder_config)
        if config.neck_type == "dpt":
            self.neck: nn.Module = DPTNeck(self.encoder.hidden_size, config.neck_hidden_sizes, config.pixel_dim)
        else:
            self.neck = FPNNeck(self.encoder.out_channels, config.pixel_dim)
        self.decoder = MaskedAttentionDecoder(config)
        self.projection_head = nn.Sequential(nn.Conv2d(config.pixel_dim, config.pixel_dim, kernel_size=1), nn.ReLU(),
                                             nn.Conv2d(config.pixel_dim, config.projection_dim, kernel_size=1))
        self.criterion = SetPredictionLoss(mask2former_config(config))
        self.register_buffer("pixel_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def classes(self) -> list[str]:
        return list(self.config.class_names)

    def freeze_encoder(self) -> "CastStudent":
        """Keep the encoder as it is while the rest trains: no gradient, and eval mode (no stochastic
        depth) even when the model trains. Not saved: a loaded model trains whole."""
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self._frozen_encoder = True
        return self

    def train(self, mode: bool = True) -> "CastStudent":
        super().train(mode)
        if getattr(self, "_frozen_encoder", False):
            self.encoder.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                targets: list[dict[str, torch.Tensor]] | None = None) -> SegmentationOutput:
        """pixel_values (B, 3, H, W) in [0, 1]; pixel_mask (B, H, W) True on real pixels; targets
        as in `SetPredictionLoss` (masks covering the input, at its size or any other)."""
        height, width = pixel_values.shape[-2:]
        features = self._features(pixel_values, pixel_mask)
        class_logits, mask_logits = self.decoder(features)
        mask_size = (math.ceil(height / 4), math.ceil(width / 4))
        mask_logits = [m[..., :mask_size[0], :mask_size[1]] for m in mask_logits]
        embeddings = self._embeddings(features, (height, width))

        aux_outputs = [{"class_logits": c, "mask_logits": m} for c, m in zip(class_logits[:-1], mask_logits[:-1])]
        output = SegmentationOutput(class_logits=class_logits[-1], mask_logits=mask_logits[-1],
                                    aux_outputs=aux_outputs, embeddings=embeddings)
        if targets is not None:
            targets = _pad_targets(targets, (height, width), (4 * mask_size[0], 4 * mask_size[1]))
            output.loss, output.loss_dict = self.criterion(output.class_logits, output.mask_logits, targets,
                                                           aux_outputs)
        return output

    def pixel_embeddings(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The projection head's output alone (B, D, h, w), without the decoder: what the
        contrastive loss needs of its stop-gradient strong view."""
        return self._embeddings(self._features(pixel_values, pixel_mask), tuple(pixel_values.shape[-2:]))

    def _features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The neck's maps at strides 4/8/16/32 of the input padded to a multiple of 32."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        height, width = pixel_values.shape[-2:]
        pixels = (pixel_values - self.pixel_mean) / self.pixel_std
        if pixel_mask is not None:
            # Collate padding becomes the mean colour (0 after normalising), like the padding below.
            pixels = pixels * pixel_mask[:, None].to(pixels.dtype)
        pixels = F.pad(pixels, (0, (-width) % SIZE_DIVISIBILITY, 0, (-height) % SIZE_DIVISIBILITY))
        if not self.encoder.is_vit:  # oneDNN's NHWC convolutions: faster on some CPUs (docs/results.md)
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.neck(self.encoder(pixels))

    def _embeddings(self, features: list[torch.Tensor], input_size: tuple[int, int]) -> torch.Tensor:
        stride = self.config.projection_stride
        embeddings = self.projection_head(features[FEATURE_STRIDES.index(stride)])
        return embeddings[..., :math.ceil(input_size[0] / stride), :math.ceil(input_size[1] / stride)]

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                image_sizes: list[tuple[int, int]] | None = None,
                orig_sizes: list[tuple[int, int]] | None = None) -> list[Instances]:
        """Instances per image (eval mode for the call), cropped to image_sizes, resized to orig_sizes."""
        was_training = self.training
        self.eval()
        try:
            output = self.forward(pixel_values, pixel_mask)
        finally:
            self.train(was_training)
        return instance_inference(output.class_logits, output.mask_logits, tuple(pixel_values.shape[-2:]),
                                  image_sizes, orig_sizes, top_k=self.config.top_k,
                                  score_threshold=self.config.score_threshold)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_multiplier: float) -> list[dict]:
        """AdamW groups: encoder at lr * backbone_lr_multiplier; no weight decay on norms, biases,
        position/query/level embeddings; trainable parameters only; empty groups left out."""
        return adamw_parameter_groups(self, lr, weight_decay, backbone_lr_multiplier, "encoder.", NO_DECAY_NAMES)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors into `directory` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save(directory / WEIGHTS_NAME, lambda tmp: save_model(self, str(tmp)))
        atomic_write_json(directory / CONFIG_NAME, {"model_type": self.model_type, **self.config.to_dict()}, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "CastStudent":
        """Load a student written by `save_pretrained`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: student folder not found")
        config_path = directory / CONFIG_NAME
        values = read_json(config_path)
        found = values.pop("model_type", cls.model_type) if isinstance(values, dict) else None
        if found != cls.model_type:
            raise ValueError(f"{config_path}: model_type {found!r} is not a CAST student ({cls.model_type!r})")
        model = cls(CastStudentConfig.from_dict(values, source=str(config_path)))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: file not found")
        try:
            load_model(model, str(weights), strict=True, device=str(map_location))
        except (SafetensorError, RuntimeError) as e:
            raise ValueError(f"{weights}: cannot load the weights into a {model.config.preset or 'custom'} "
                             f"student: {e}") from None
        return model


def _pad_targets(targets: list[dict[str, torch.Tensor]], input_size: tuple[int, int],
                 covered_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Pad input-sized target masks to the extent the stride-4 logits cover (input rounded up to 4)."""
    if input_size == covered_size:
        return targets
    pad = (0, covered_size[1] - input_size[1], 0, covered_size[0] - input_size[0])
    return [{**t, "masks": F.pad(t["masks"], pad)} if tuple(t["masks"].shape[-2:]) == input_size else t
            for t in targets]


def build_student(preset: str, num_classes: int, class_names: list[str] | None = None,
                  pretrained_encoder: str | Path | None = None, **overrides: Any) -> CastStudent:
    """A student from a preset ("cast-s", "cast-r50", "cast-tiny", "demo-student", "demo-teacher").

    `pretrained_encoder`: a local transformers folder (facebook/dinov2-small layout, or
    microsoft/resnet-50 for "cast-r50") whose architecture and weights replace the preset's
    encoder; otherwise the encoder is randomly initialised. `overrides` replace config fields.
    """
    config = preset_config(preset, num_classes, class_names, **overrides)
    if pretrained_encoder is not None:
        # The preset's block choice fits the preset's depth, not necessarily the pretrained one's.
        out_features = overrides.get("encoder_config", {}).get("out_features")
        config.encoder_config = pretrained_encoder_config(config.encoder_type, pretrained_encoder, out_features)
        config.pretrained_encoder = str(pretrained_encoder)
    model = CastStudent(config)
    if pretrained_encoder is not None:
        model.encoder.load_pretrained(pretrained_encoder)
    return model


def instance_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor, input_size: tuple[int, int],
                       image_sizes: list[tuple[int, int]] | None = None,
                       orig_sizes: list[tuple[int, int]] | None = None, top_k: int = 100,
                       score_threshold: float = 0.0, mask_threshold: float = 0.5) -> list[Instances]:
    """Turn a batch of predictions into instances at each image's original resolution.

    class_logits (B, Q, C + 1) with "no object" last; mask_logits (B, Q, h, w) at stride 4 of the
    (padded) input of size `input_size` = (H, W). Per image: class probabilities (no-object
    excluded) over all queries x classes, the `top_k` best (query, class) pairs; each mask is
    upsampled x4, cropped to the input then to `image_sizes[b]`, resized to `orig_sizes[b]` and
    binarised at `mask_threshold`. Score = class probability x mean mask probability inside the
    binary mask; instances scoring <= `score_threshold` (e.g. empty masks) are dropped. Results
    are sorted by score.
    """
    batch_size, num_queries, num_labels = class_logits.shape
    num_classes = num_labels - 1
    height, width = int(input_size[0]), int(input_size[1])
    image_sizes = [(height, width)] * batch_size if image_sizes is None else [tuple(s) for s in image_sizes]
    orig_sizes = image_sizes if orig_sizes is None else [tuple(s) for s in orig_sizes]
    if mask_logits.shape[:2] != (batch_size, num_queries):
        raise ValueError(f"mask logits {tuple(mask_logits.shape)} do not match class logits "
                         f"{tuple(class_logits.shape)}")
    if len(image_sizes) != batch_size or len(orig_sizes) != batch_size:
        raise ValueError(f"{len(image_sizes)} image_sizes / {len(orig_sizes)} orig_sizes for a batch of {batch_size}")
    for h, w in image_sizes:
        if not (0 < h <= height and 0 < w <= width):
            raise ValueError(f"image size {(h, w)} does not fit in the input of size {(height, width)}")

    results = []
    for b in range(batch_size):
        probs = class_logits[b].float().softmax(-1)[:, :num_classes]
        k = min(top_k, num_queries * num_classes)
        class_scores, flat = probs.flatten().topk(k)
        queries, labels = flat // num_classes, flat % num_classes
        masks, mask_scores = _resize_and_binarise(mask_logits[b, queries].float(), (height, width),
                                                  image_sizes[b], orig_sizes[b], mask_threshold)
        scores = class_scores * mask_scores
        order = scores.argsort(descending=True)
        order = order[scores[order] > score_threshold]
        results.append(Instances(masks=masks[order], labels=labels[order].to(torch.int64),
                                 scores=scores[order].to(torch.float32)))
    return results


def _resize_and_binarise(logits: torch.Tensor, input_size: tuple[int, int], image_size: tuple[int, int],
                         orig_size: tuple[int, int], threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, h, w) stride-4 logits -> (K, H_o, W_o) bool masks and (K,) mean probability inside them."""
    out_h, out_w = int(orig_size[0]), int(orig_size[1])
    masks = torch.zeros((logits.shape[0], out_h, out_w), dtype=torch.bool, device=logits.device)
    scores = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], MASK_CHUNK):
        chunk = logits[start:start + MASK_CHUNK, None]
        chunk = F.interpolate(chunk, scale_factor=4, mode="bilinear", align_corners=False)
        chunk = chunk[..., :input_size[0], :input_size[1]][..., :image_size[0], :image_size[1]]
        if chunk.shape[-2:] != (out_h, out_w):
            chunk = F.interpolate(chunk, size=(out_h, out_w), mode="bilinear", align_corners=False)
        prob = chunk[:, 0].sigmoid()
        binary = prob > threshold
        masks[start:start + MASK_CHUNK] = binary
        scores[start:start + MASK_CHUNK] = (prob * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
    return masks, scores
