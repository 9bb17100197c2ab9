"""Mask2Former instance inference: raw class/mask logits -> `Instances` per image.

A plain function of tensors, shared by `CastStudent.predict` and the ONNX-runtime `OnnxStudent`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cast.structures import Instances

# Masks are resized in chunks: 100 float masks at 1024x2048 would need 800 MB at once.
MASK_CHUNK = 16


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
