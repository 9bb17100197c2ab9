"""Mask2Former masked-attention transformer decoder (transformers' `Mask2FormerTransformerModule`)
with the class head, fed by the neck's stride-32/16/8 maps and stride-4 mask features."""
from __future__ import annotations

import torch
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (Mask2FormerMaskedAttentionDecoderLayer,
                                                                  Mask2FormerTransformerModule)

from cast.models.config import CastStudentConfig


def mask2former_config(config: CastStudentConfig) -> Mask2FormerConfig:
    """The transformers config that drives the decoder and the loss.

    transformers' `decoder_layers` counts predictions (one before the first layer, one after each
    layer), ours counts layers, hence the +1. Dropout stays 0: the transformers decoder also uses it
    as layer-drop probability, and Mask2Former trains without either.
    """
    return Mask2FormerConfig(
        num_labels=config.num_classes, hidden_dim=config.hidden_dim, feature_size=config.pixel_dim,
        mask_feature_size=config.hidden_dim, num_queries=config.num_queries,
        decoder_layers=config.decoder_layers + 1, num_attention_heads=config.num_heads,
        dim_feedforward=config.dim_feedforward, dropout=0.0, pre_norm=False,
        no_object_weight=config.no_object_weight, class_weight=config.class_weight,
        mask_weight=config.mask_weight, dice_weight=config.dice_weight,
        train_num_points=config.train_num_points, oversample_ratio=config.oversample_ratio,
        importance_sample_ratio=config.importance_sample_ratio)


class MaskedAttentionDecoder(nn.Module):
    """Queries attend, layer by layer, to the stride-32, 16, 8 maps in turn, each restricted to the
    foreground of the previous layer's mask prediction; masks are dot products of query embeddings
    with the stride-4 mask features."""

    def __init__(self, config: CastStudentConfig) -> None:
        super().__init__()
        # Neck maps (pixel_dim wide) are projected to hidden_dim by the module when widths differ.
        self.mask_features = nn.Conv2d(config.pixel_dim, config.hidden_dim, kernel_size=1)
        self.transformer = Mask2FormerTransformerModule(in_features=config.pixel_dim,
                                                        config=mask2former_config(config))
        self.class_head = nn.Linear(config.hidden_dim, config.num_classes + 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # As Mask2Former: Xavier-uniform for input projections and attention/FFN matrices.
        for projection in self.transformer.input_projections:
            if isinstance(projection, nn.Conv2d):
                nn.init.xavier_uniform_(projection.weight)
                nn.init.zeros_(projection.bias)
        for module in self.transformer.modules():
            if isinstance(module, Mask2FormerMaskedAttentionDecoderLayer):
                for p in module.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
                nn.init.zeros_(module.cross_attn.in_proj_bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """features: neck maps at strides 4/8/16/32. Returns per-prediction class logits (B, Q, C+1)
        and mask logits (B, Q, H/4, W/4), first prediction first, final prediction last."""
        mask_features = self.mask_features(features[0])
        output = self.transformer(multi_scale_features=[features[3], features[2], features[1]],
                                  mask_features=mask_features)
        # intermediate_hidden_states are layer-normed (Q, B, D) query states, one per prediction.
        class_logits = [self.class_head(h.transpose(0, 1)) for h in output.intermediate_hidden_states]
        return class_logits, list(output.masks_queries_logits)
