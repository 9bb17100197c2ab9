"""The shape of the exported student graph: what `cast.models.export.export_onnx` traces instead
of the eager model's literal operations, computing the same function for the one input size the
graph is exported at (the exported logits agree with eager's within float rounding):

- DINOv2's self-attention as one `com.microsoft::MultiHeadAttention` node per layer, which
  onnxruntime runs as one fused (flash-style) kernel, instead of MatMul -> Softmax -> MatMul with
  the (heads x tokens x tokens) score tensor written out and read back twice;
- DINOv2's position embeddings, bicubically resized to the patch grid, as a constant of that grid
  (eager resizes them on every call; onnxruntime does not fold the resize);
- the masked-attention decoder's intermediate mask predictions, which only serve as the next
  layer's attention mask, computed at that mask's resolution (the stride-4 mask features resized
  once per level, then the query product) instead of at stride 4 and then resized: bilinear
  resizing is linear, so resize(q . F) = q . resize(F); only the final prediction is computed at
  stride 4.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "cast_onnx_mha"
CUSTOM_OPSETS = {"com.microsoft": 1}


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over (B, S, H * D) tensors; exported as com.microsoft::MultiHeadAttention."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                scale: float) -> torch.Tensor:
        q, k, v = (t.unflatten(2, (num_heads, -1)).transpose(1, 2) for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).flatten(2)

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, num_heads: int, scale: float) -> Any:
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=num_heads, scale_f=scale)
        out.setType(query.type())
        return out


def _onnx_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function ((B, H, S, D) in, (B, S, H, D) out) made of the one op."""
    if attention_mask is not None:
        raise ValueError("the exported attention takes no attention mask")
    # Head count and size as the module's plain ints: sizes read off a traced tensor are traced values.
    heads, head_dim = int(module.num_attention_heads), int(module.head_dim)
    scale = float(scaling if scaling is not None else head_dim ** -0.5)
    flat = [t.transpose(1, 2).flatten(2) for t in (query, key, value)]
    out = _MultiHeadAttention.apply(*flat, heads, scale)
    return out.unflatten(2, (heads, head_dim)), None


@contextlib.contextmanager
def _fused_vit_attention(encoder: nn.Module) -> Iterator[None]:
    from transformers import AttentionInterface

    backbone = getattr(encoder, "backbone", None)
    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "model_type", None) != "dinov2":
        yield
        return
    AttentionInterface.register(ATTENTION_NAME, _onnx_attention)
    configs = {id(m.config): m.config for m in backbone.modules() if hasattr(m, "config")}
    saved = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = saved[key]


@contextlib.contextmanager
def _constant_position_embeddings(encoder: nn.Module, image_size: tuple[int, int]) -> Iterator[None]:
    embeddings = getattr(getattr(encoder, "backbone", None), "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "interpolate_pos_encoding"):
        yield
        return
    from cast.models.encoders import VIT_GRID_STRIDE

    patch = encoder.patch_size
    # The sizes the encoder hands DINOv2: its input padded to 32, resized to the patch grid.
    height, width = (-(-s // 32) * 32 for s in image_size)
    grid_size = (height // VIT_GRID_STRIDE * patch, width // VIT_GRID_STRIDE * patch)
    with torch.no_grad():
        tokens = torch.zeros(1, 1 + (grid_size[0] // patch) * (grid_size[1] // patch), encoder.hidden_size)
        constant = embeddings.interpolate_pos_encoding(tokens, *grid_size).detach().clone()
    original = embeddings.interpolate_pos_encoding

    def fixed(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if (int(h), int(w)) != grid_size:
            raise ValueError(f"graph shaped for a {grid_size} patch grid input, got {(h, w)}")
        return constant

    embeddings.interpolate_pos_encoding = fixed
    try:
        yield
    finally:
        embeddings.interpolate_pos_encoding = original


@contextlib.contextmanager
def _low_resolution_attention_masks(decoder: nn.Module) -> Iterator[None]:
    predictor = decoder.transformer.decoder.mask_predictor
    original = predictor.forward
    # The mask features resized to each level's size, once per forward ("of": the features they come from).
    cache: dict[Any, Any] = {}

    def forward(outputs: torch.Tensor, pixel_embeddings: torch.Tensor, attention_mask_target_size: Any = None):
        mask_embeddings = predictor.mask_embedder(outputs.transpose(0, 1))
        outputs_mask = torch.einsum("bqc, bchw -> bqhw", mask_embeddings, pixel_embeddings)
        if cache.get("of") is not pixel_embeddings:
            cache.clear()
            cache["of"] = pixel_embeddings
        size = tuple(int(s) for s in attention_mask_target_size)
        if size not in cache:
            cache[size] = F.interpolate(pixel_embeddings, size=size, mode="bilinear", align_corners=False)
        small = torch.einsum("bqc, bchw -> bqhw", mask_embeddings, cache[size])
        attention_mask = small.sigmoid().flatten(2).unsqueeze(1).repeat(1, predictor.num_heads, 1, 1)
        return outputs_mask, (attention_mask.flatten(0, 1) < 0.5).bool().detach()

    predictor.forward = forward
    try:
        yield
    finally:
        predictor.forward = original
        cache.clear()


@contextlib.contextmanager
def export_shaped(model: nn.Module, image_size: tuple[int, int]) -> Iterator[None]:
    """Within this context `model` (a CastStudent) computes its forward for inputs of `image_size`
    in the shape described in the module docstring; outside it, as always."""
    with (_fused_vit_attention(model.encoder), _constant_position_embeddings(model.encoder, image_size),
          _low_resolution_attention_masks(model.decoder)):
        yield
