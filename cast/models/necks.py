"""Pixel decoders ("necks"): encoder features -> four maps at strides 4/8/16/32, `hidden_dim` wide.

`DPTNeck` reassembles ViT tokens with transformers' `DPTReassembleStage` and fuses them top-down
with DPT residual units; `FPNNeck` is the Mask2Former-style FPN for CNN encoders.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DPTConfig
from transformers.models.dpt.modeling_dpt import DPTPreActResidualLayer, DPTReassembleStage

from cast.models.encoders import EncoderOutput

# Token grid at stride 16 -> x4, x2, x1, x0.5 = strides 4, 8, 16, 32.
REASSEMBLE_FACTORS = [4, 2, 1, 0.5]


class DPTFusionBlock(nn.Module):
    """DPT feature fusion at one level: residual unit on the lateral map, add the upsampled coarser
    fused map, second residual unit, 1x1 projection.

    Unlike transformers' `DPTFeatureFusionLayer`, which upsamples x2 after fusing (outputs at
    strides 16/8/4/2), this upsamples the coarser input to the lateral's exact size first, so the
    outputs stay at strides 32/16/8/4 (what the masked-attention decoder consumes) and odd sizes work.
    """

    def __init__(self, config: DPTConfig) -> None:
        super().__init__()
        self.lateral_unit = DPTPreActResidualLayer(config)
        self.fused_unit = DPTPreActResidualLayer(config)
        self.projection = nn.Conv2d(config.fusion_hidden_size, config.fusion_hidden_size, kernel_size=1)

    def forward(self, lateral: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.lateral_unit(lateral)
        if coarser is not None:
            hidden = hidden + F.interpolate(coarser, size=hidden.shape[-2:], mode="bilinear", align_corners=False)
        return self.projection(self.fused_unit(hidden))


class DPTNeck(nn.Module):
    """Reassemble four ViT blocks to strides 4/8/16/32 (CLS readout projected in) and fuse them."""

    def __init__(self, encoder_hidden_size: int, neck_hidden_sizes: list[int], hidden_dim: int) -> None:
        super().__init__()
        config = DPTConfig(hidden_size=encoder_hidden_size, neck_hidden_sizes=list(neck_hidden_sizes),
                           reassemble_factors=REASSEMBLE_FACTORS, readout_type="project", is_hybrid=False,
                           fusion_hidden_size=hidden_dim, use_batch_norm_in_fusion_residual=False)
        self.reassemble = DPTReassembleStage(config)
        self.convs = nn.ModuleList(nn.Conv2d(c, hidden_dim, kernel_size=3, padding=1, bias=False)
                                   for c in neck_hidden_sizes)
        self.fusion = nn.ModuleList(DPTFusionBlock(config) for _ in neck_hidden_sizes)

    def forward(self, encoder_output: EncoderOutput) -> list[torch.Tensor]:
        if encoder_output.grid is None:
            raise ValueError("DPTNeck needs ViT tokens with a patch grid; use the FPN neck for CNN encoders")
        grid_h, grid_w = encoder_output.grid
        maps = self.reassemble(encoder_output.features, patch_height=grid_h, patch_width=grid_w)
        laterals = [conv(m) for conv, m in zip(self.convs, maps)]
        fused: list[torch.Tensor] = []
        coarser = None
        for lateral, block in zip(reversed(laterals), reversed(self.fusion)):
            coarser = block(lateral, coarser)
            fused.append(coarser)
        return fused[::-1]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class FPNNeck(nn.Module):
    """Top-down FPN (1x1 lateral + GroupNorm, 3x3 output conv + GroupNorm + ReLU), as Mask2Former's
    base pixel decoder, for the four stages of a CNN encoder."""

    def __init__(self, in_channels: list[int], hidden_dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False), _group_norm(hidden_dim))
            for c in in_channels)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, bias=False),
                          _group_norm(hidden_dim), nn.ReLU())
            for _ in in_channels)

    def forward(self, encoder_output: EncoderOutput) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        coarser = None
        for feature, lateral, output in zip(reversed(encoder_output.features), reversed(self.lateral),
                                            reversed(self.output)):
            hidden = lateral(feature)
            if coarser is not None:
                hidden = hidden + F.interpolate(coarser, size=hidden.shape[-2:], mode="bilinear", align_corners=False)
            coarser = output(hidden)
            outputs.append(coarser)
        return outputs[::-1]
