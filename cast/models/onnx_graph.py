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
  stride 4;
- the neck's 3x3 convolutions on large maps by Winograd's minimal filtering F(4x4, 3x3) (Lavin &
  Gray, 2016), as cuDNN and oneDNN may choose to: each 6x6 input tile is transformed (B^T d B, a
  depthwise convolution with constant kernels), multiplied with the transformed filters
  (G g G^T, folded into constants by onnxruntime) in 36 matrix products of (C_out x C_in) by
  (C_in x tiles), and transformed back (A^T m A, a grouped 1x1 convolution and a pixel shuffle):
  4x fewer multiplications than the direct convolution, float32 rounding of ~1e-5 relative.
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


# Winograd F(4x4, 3x3) transforms (interpolation points 0, +-1, +-2, infinity).
_WINOGRAD_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
               (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
# Below this many 4x4 output tiles (a 64 x 128 map has 512) the transforms cost more than they save.
WINOGRAD_MIN_TILES = 512


def _winograd_forward(conv: nn.Conv2d) -> Any:
    """`conv`'s forward (3x3, stride 1, padding 1) computed by F(4x4, 3x3) on maps whose sides are
    multiples of 4 with at least WINOGRAD_MIN_TILES tiles; directly otherwise."""
    original = conv.forward
    bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_WINOGRAD_BT, _WINOGRAD_G, _WINOGRAD_AT))
    c_in, c_out = conv.in_channels, conv.out_channels
    tile_in = torch.einsum("ai,bj->abij", bt, bt).reshape(36, 1, 6, 6).float().repeat(c_in, 1, 1, 1)
    tile_out = torch.einsum("ai,bj->abij", at, at).reshape(16, 36, 1, 1).float().repeat(c_out, 1, 1, 1)
    g = g.float()

    def forward(x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if height % 4 or width % 4 or (height // 4) * (width // 4) < WINOGRAD_MIN_TILES:
            return original(x)
        tiles = (height // 4) * (width // 4)
        # Transformed filters (36, C_out, C_in): computed from the weight in the graph, a constant
        # expression onnxruntime folds when it loads the model (the file keeps the 3x3 weights).
        filters = torch.einsum("ay,oiyx,bx->aboi", g, conv.weight, g).reshape(36, c_out, c_in)
        v = F.conv2d(F.pad(x, (1, 1, 1, 1)), tile_in, stride=4, groups=c_in)  # (B, C_in * 36, H/4, W/4)
        v = v.reshape(-1, c_in, 36, tiles).transpose(1, 2)  # (B, 36, C_in, tiles)
        m = torch.matmul(filters, v).transpose(1, 2).reshape(-1, c_out * 36, height // 4, width // 4)
        y = F.pixel_shuffle(F.conv2d(m, tile_out, groups=c_out), 4)  # (B, C_out, H, W)
        return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)

    return forward


@contextlib.contextmanager
def _winograd_convolutions(neck: nn.Module) -> Iterator[None]:
    convs = [m for m in neck.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
             and m.stride == (1, 1) and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1
             and m.padding_mode == "zeros"]
    for conv in convs:
        conv.forward = _winograd_forward(conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward  # the class's forward again


@contextlib.contextmanager
def export_shaped(model: nn.Module, image_size: tuple[int, int]) -> Iterator[None]:
    """Within this context `model` (a CastStudent) computes its forward for inputs of `image_size`
    in the shape described in the module docstring; outside it, as always."""
    with (_fused_vit_attention(model.encoder), _constant_position_embeddings(model.encoder, image_size),
          _low_resolution_attention_masks(model.decoder), _winograd_convolutions(model.neck)):
        yield
