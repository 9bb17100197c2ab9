"""Pure tensor functions of the foundation-model teacher (cast.teachers.vfm): the text prompt,
per-class detection scores, box selection, overlap resolution, SAM frame geometry, the
sampler's class log-probabilities and SAM's mask loss. No model state, so each is unit-testable
on hand-made tensors."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def build_prompt(tokenizer: Any, classes: Sequence[str], delimiter_ids: Sequence[int],
                 max_text_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt "c_1 . c_2 . ... c_C ." framed by [CLS] / [SEP], and for every
    token the index of the class it spells (-1 for [CLS], [SEP] and the " . " delimiters).

    Each class is tokenised on its own so the spans are exact; BERT's tokenizer splits "." off
    as its own token, so this equals tokenising " . ".join(classes) + " .". `delimiter_ids` are
    the ids Grounding-DINO treats as phrase boundaries: a class name producing one of them (or
    no token at all) would break the phrase <-> class mapping and is refused.
    """
    dot = tokenizer.convert_tokens_to_ids(".")
    ids, owner = [tokenizer.cls_token_id], [-1]
    for c, name in enumerate(classes):
        tokens = tokenizer(name, add_special_tokens=False)["input_ids"]
        bad = sorted({t for t in tokens if t in set(delimiter_ids) or t == tokenizer.pad_token_id})
        if not tokens or bad:
            raise ValueError(f"class {name!r} tokenises to {tokens}: a class name must give at least one token "
                             f"and no delimiter token ({sorted(set(delimiter_ids))})")
        ids += tokens + [dot]
        owner += [c] * len(tokens) + [-1]
    ids.append(tokenizer.sep_token_id)
    owner.append(-1)
    if len(ids) > max_text_len:
        raise ValueError(f"the prompt of {len(classes)} classes has {len(ids)} tokens; Grounding-DINO reads at "
                         f"most max_text_len={max_text_len}")
    return ids, owner


def class_scores(logits: torch.Tensor, token_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., C) per-class scores: for each class, the max over its prompt tokens of sigmoid(logit).

    logits (..., T') token logits (T' >= prompt length; padding tokens are never read);
    token_class (T,) long, the class of each prompt token or -1.
    """
    positions = (token_class >= 0).nonzero().squeeze(1)
    probs = logits[..., positions].float().sigmoid()
    index = token_class[positions].expand_as(probs)
    # Probabilities are >= 0, so a zero start is neutral for the max.
    out = probs.new_zeros((*probs.shape[:-1], num_classes))
    return out.scatter_reduce(-1, index, probs, reduce="amax")


def select_detections(scores: torch.Tensor, box_threshold: float, text_threshold: float,
                      max_instances: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept queries of one image, best first: (query indices, class labels, scores).

    scores (Q, C) per-class scores. A query's score is its best class score and its label that
    class. It is kept when the score exceeds box_threshold (Grounding-DINO's box rule) and
    reaches text_threshold (its phrase rule: a box whose best token is below it names no
    class); with the defaults (0.3 > 0.25) box_threshold decides. At most `max_instances`.
    """
    best, labels = scores.max(dim=-1)
    keep = (best > box_threshold) & (best >= text_threshold)
    queries = keep.nonzero().squeeze(1)
    order = best[queries].argsort(descending=True, stable=True)[:max_instances]
    queries = queries[order]
    return queries, labels[queries], best[queries]


def resolve_overlaps(masks: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every pixel to at most one instance: higher-scoring instances (earlier ones on ties)
    keep their pixels, later ones lose them; instances left empty are dropped.

    masks (N, H, W) bool, scores (N,). Returns the resolved masks in descending score order and
    the index of each into the input.
    """
    order = scores.argsort(descending=True, stable=True)
    masks = masks[order]
    if masks.shape[0] == 0:
        return masks, order
    # argmax returns the first maximum: the best-scoring instance covering the pixel.
    owner = masks.to(torch.uint8).argmax(dim=0)
    ranks = torch.arange(masks.shape[0], device=masks.device).view(-1, 1, 1)
    resolved = masks & (owner.unsqueeze(0) == ranks)
    nonempty = resolved.flatten(1).any(dim=1)
    return resolved[nonempty], order[nonempty]


def class_log_probs(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., C + 1) log-probabilities with "no object" last, from independent per-class scores.

    Grounding-DINO's class scores are independent sigmoids, not a distribution. The query is an
    object with probability o = max_c p_c (its detection score); that mass is split over the
    classes in proportion to p_c, and 1 - o goes to "no object":
        P(c) = o * p_c / sum_c' p_c',   P(no object) = 1 - o.
    The log of a distribution is a valid logit vector: softmax returns P.
    """
    scores = scores.float().clamp(0.0, 1.0)
    objectness = scores.amax(dim=-1, keepdim=True)
    classes = objectness * scores / scores.sum(dim=-1, keepdim=True).clamp_min(eps)
    return torch.cat([classes, 1.0 - objectness], dim=-1).clamp_min(eps).log()


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, 4) pixel boxes (x0, y0, x1, y1) of (K, H, W) masks, x1 / y1 exclusive; empty masks
    give (0, 0, 0, 0)."""
    k, h, w = masks.shape
    if k == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.bool().any(dim=2), masks.bool().any(dim=1)
    # The first True from each end; argmax of a bool-as-uint8 vector returns the first maximum.
    y0 = rows.to(torch.uint8).argmax(dim=1)
    y1 = h - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x0 = cols.to(torch.uint8).argmax(dim=1)
    x1 = w - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return boxes * rows.any(dim=1, keepdim=True)


def boxes_to_cxcywh(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel (x0, y0, x1, y1) boxes of an image of size (h, w) -> normalised (cx, cy, w, h)."""
    h, w = size
    scale = boxes.new_tensor([w, h, w, h])
    x0, y0, x1, y1 = (boxes / scale).unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def sam_resized_size(size: tuple[int, int], frame: int, keep_aspect: bool) -> tuple[int, int]:
    """Size an image of `size` takes inside SAM's square input of side `frame`: SAM 2 stretches
    it to the whole square; SAM scales its longest side to `frame` (the rest is padding)."""
    if not keep_aspect:
        return frame, frame
    scale = frame / max(size)
    return int(size[0] * scale + 0.5), int(size[1] * scale + 0.5)


def region_logits(low_res: torch.Tensor, region: tuple[float, float], out_size: tuple[int, int]) -> torch.Tensor:
    """Resample the top-left `region` (fractions of height and width) of (N, L, L) mask logits
    to (N, *out_size), bilinearly; equal to upsampling to SAM's input, cropping the image and
    resizing it, without the full-resolution intermediate."""
    n = low_res.shape[0]
    out_h, out_w = out_size
    ys = (torch.arange(out_h, device=low_res.device, dtype=low_res.dtype) + 0.5) / out_h * region[0]
    xs = (torch.arange(out_w, device=low_res.device, dtype=low_res.dtype) + 0.5) / out_w * region[1]
    grid = torch.stack(torch.meshgrid(xs * 2 - 1, ys * 2 - 1, indexing="xy"), dim=-1)
    return F.grid_sample(low_res[:, None], grid.expand(n, -1, -1, -1), mode="bilinear",
                         padding_mode="border", align_corners=False)[:, 0]


def mask_target(masks: torch.Tensor, region_size: tuple[int, int], low_res: int) -> torch.Tensor:
    """(K, h, w) 0/1 ground-truth masks of an image -> (K, L, L) 0/1 targets in the frame of SAM's
    low-resolution logits: resized to the image's region there, zero (background) outside."""
    k = masks.shape[0]
    resized = F.interpolate(masks[:, None].float(), size=region_size, mode="bilinear", align_corners=False,
                            antialias=True)[:, 0] > 0.5
    target = masks.new_zeros((k, low_res, low_res), dtype=torch.float32)
    target[:, :region_size[0], :region_size[1]] = resized.float()
    return target


def mask_losses(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid binary cross-entropy and mean dice loss of (K, h, w) logits vs 0/1 targets."""
    logits, targets = logits.flatten(1).float(), targets.flatten(1).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * targets).sum(1) + eps) / (probs.sum(1) + targets.sum(1) + eps)
    return bce.mean(), dice.mean()


def valid_sizes(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Each image's extent (h, w) inside a bottom/right-padded batch: up to its last real row and
    column (the whole canvas when an image has no real pixel)."""
    _, height, width = pixel_mask.shape
    rows, cols = pixel_mask.any(dim=2), pixel_mask.any(dim=1)
    h = height - rows.flip(1).to(torch.uint8).argmax(dim=1)
    w = width - cols.flip(1).to(torch.uint8).argmax(dim=1)
    empty = ~rows.any(dim=1)
    h, w = h.masked_fill(empty, height), w.masked_fill(empty, width)
    return [(int(a), int(b)) for a, b in zip(h.tolist(), w.tolist())]
