"""The contrastive loss's view of one clicked pixel, computed with the loss's own code
(`cast.losses.contrastive`, `cast.losses.sampling`) on the batch training would build from the
image: the law its negatives are drawn from (s_deb), the negatives the sampler draws, and its
positive (the same pixel in the strong view). Works for any model of the project.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cast.data.batches import EvalTransform, WeakStrongViews, collate_instances
from cast.inspection.draw import ImageInstances, dot, enlarge, heat_colours
from cast.losses import SAMPLERS
from cast.losses.contrastive import loss_grid, on_grid, sampler_descriptions, valid_cells
from cast.losses.sampling import sample_negatives, sampling_law
from cast.structures import InstanceSample

# The grid is shrunk beyond this many cells so that a click stays interactive on large images
# (as PixelContrastiveLoss(max_pixels=...) would).
MAX_GRID_CELLS = 64 * 64
NEGATIVE_COLOUR = (0, 255, 255)
ANCHOR_COLOUR = (255, 255, 255)
POSITIVE_COLOUR = (0, 255, 0)


@dataclass(frozen=True)
class PixelGrid:
    """Cells of the loss's pixel grid over an image, and the way back to its pixels: the model sees
    the image resized to `input_size` inside a padded batch of `cover` pixels, on which the loss's
    grid lays `size` cells."""

    orig_size: tuple[int, int]
    input_size: tuple[int, int]
    cover: tuple[int, int]
    size: tuple[int, int]

    @property
    def num_cells(self) -> int:
        return self.size[0] * self.size[1]

    def _axis_cells(self, axis: int, coords: np.ndarray) -> np.ndarray:
        """Cell index along `axis` of original-pixel coordinates (pixel centres)."""
        to_input = self.input_size[axis] / self.orig_size[axis]
        per_cell = self.cover[axis] / self.size[axis]
        cells = np.floor((np.asarray(coords, np.float64) + 0.5) * to_input / per_cell).astype(np.int64)
        return np.clip(cells, 0, self.size[axis] - 1)

    def cell_of(self, x: float, y: float) -> int:
        """Flat index of the cell holding original pixel (x, y)."""
        row, col = self._axis_cells(0, np.array([y]))[0], self._axis_cells(1, np.array([x]))[0]
        return int(row * self.size[1] + col)

    def centres(self, cells: np.ndarray) -> np.ndarray:
        """(n, 2) original-pixel (x, y) centres of flat cells (clipped to the image)."""
        rows, cols = np.divmod(np.asarray(cells, np.int64), self.size[1])
        out = []
        for axis, idx in ((1, cols), (0, rows)):
            per_cell = self.cover[axis] / self.size[axis]
            coord = (idx + 0.5) * per_cell * self.orig_size[axis] / self.input_size[axis] - 0.5
            out.append(np.clip(coord, 0, self.orig_size[axis] - 1))
        return np.stack(out, axis=1)

    def expand(self, values: np.ndarray) -> np.ndarray:
        """(rows, cols) cell values -> (H, W) per original pixel (each pixel takes its cell's value)."""
        rows = self._axis_cells(0, np.arange(self.orig_size[0]))
        cols = self._axis_cells(1, np.arange(self.orig_size[1]))
        return values[rows][:, cols]


@dataclass
class PixelExplanation:
    """What the sampler does for one anchor pixel (`explain_pixel`)."""

    grid: PixelGrid
    anchor: int  # flat cell of the clicked pixel
    valid: np.ndarray  # (num_cells,) cells the loss counts as image (not padding)
    weights: np.ndarray  # (rows, cols) weight of every cell as a negative of the anchor (the sampler's law)
    negatives: np.ndarray  # (R,) flat cells the sampler drew
    strong: np.ndarray  # (H, W, 3) uint8 strong view at the original size
    positive_cosine: float  # <z_weak, z_strong> at the anchor (unit embeddings)
    negative_cosine: float  # mean <z_weak[anchor], z_weak[negative]>
    false_negative_rate: float | None  # share of negatives inside the anchor's ground-truth instance

    def summary(self, strategy: str) -> dict[str, Any]:
        """A json-ready description (coordinates in original pixels)."""
        x, y = self.grid.centres(np.array([self.anchor]))[0]
        flat = self.weights.reshape(-1)
        # An anchor cell mostly off the image (bottom/right border) is padding to the loss: it is
        # no anchor there and its draws are uniform placeholders.
        return {"strategy": strategy, "grid": list(self.grid.size), "anchor_cell": int(self.anchor),
                "anchor_cell_on_image": bool(self.valid[self.anchor]),
                "anchor_centre": [float(x), float(y)], "weight_at_anchor": float(flat[self.anchor]),
                "max_weight": float(flat.max()), "num_negatives": int(len(self.negatives)),
                "negative_cells": [int(c) for c in self.negatives],
                "negative_weights": [float(flat[c]) for c in self.negatives],
                "positive_cosine": self.positive_cosine, "negative_cosine": self.negative_cosine,
                "false_negative_rate": self.false_negative_rate}


def eval_batch(image: np.ndarray, test_size: int | None) -> dict[str, Any]:
    """`image` as the evaluator batches it: resized to short side `test_size`, padded."""
    sample = InstanceSample(image=np.array(image, copy=True), masks=np.zeros((0, *image.shape[:2]), bool),
                            labels=np.zeros(0, np.int64), image_id=0)
    return collate_instances([EvalTransform(test_size)(sample)])


def training_batch(image: np.ndarray, test_size: int | None, seed: int) -> dict[str, Any]:
    """`image` at the evaluation size as a training batch of one with weak and strong views: the
    weak view is the resized image, the strong view the training recipe's photometric changes."""
    weak = eval_batch(image, test_size)
    height, width = weak["image_sizes"][0]
    # A private, writable uint8 copy of the resized image: what a data set would hand the views.
    resized = np.round(weak["pixel_values"][0, :, :height, :width].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    views = WeakStrongViews(crop_size=(height, width), scale_range=(1.0, 1.0), hflip_prob=0.0)(
        InstanceSample(image=resized, masks=np.zeros((0, height, width), bool), labels=np.zeros(0, np.int64),
                       image_id=0), seed=seed, epoch=0, index=0)
    return collate_instances([views])


def _to_uint8(view: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    view = F.interpolate(view[None], size=size, mode="bilinear", align_corners=False)[0] \
        if tuple(view.shape[-2:]) != tuple(size) else view
    return np.round(view.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@torch.no_grad()
def explain_pixel(model: torch.nn.Module, image: np.ndarray, x: int, y: int, strategy: str = "fusion",
                  num_negatives: int = 64, seed: int = 0, test_size: int | None = None,
                  instance_ids: np.ndarray | None = None, max_cells: int = MAX_GRID_CELLS) -> PixelExplanation:
    """The contrastive loss's view of pixel (x, y) of `image` under `model`'s predictions.

    As in a training step: the weak view's forward gives the embeddings and the (detached)
    predictions, `pixel_embeddings` the strong view's; the loss's grid (`loss_grid`, shrunk beyond
    `max_cells`), its padding rule (`valid_cells`) and pixel descriptions (`sampler_descriptions`)
    give the law of the negatives (`sampling_law`), from which `sample_negatives` draws
    `num_negatives` per anchor over this one image (seeded by `seed`). `instance_ids` (H, W) int
    (-1 = none), e.g. from the ground truth, gives the false-negative rate.
    """
    if strategy not in SAMPLERS:
        raise ValueError(f"strategy must be one of {SAMPLERS}, got {strategy!r}")
    height, width = image.shape[:2]
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    batch = training_batch(image, test_size, seed)
    was_training = model.training
    model.eval()
    try:
        output = model(batch["pixel_values"], batch["pixel_mask"])
        strong_embeddings = model.pixel_embeddings(batch["pixel_values_strong"], batch["pixel_mask"])
    finally:
        model.train(was_training)
    if output.embeddings is None:
        raise ValueError(f"{type(model).__name__} has no projection head: nothing to explain")
    size = loss_grid(*output.embeddings.shape[-2:], max_pixels=max_cells)
    grid = PixelGrid((height, width), tuple(batch["image_sizes"][0]), tuple(batch["pixel_values"].shape[-2:]), size)
    valid = valid_cells(batch["pixel_mask"], size)
    y_tilde = sampler_descriptions(output.mask_logits, output.class_logits, size, strategy)
    anchor = grid.cell_of(x, y)
    weights = sampling_law(y_tilde, valid, torch.tensor([anchor]))[0]
    draws = sample_negatives(y_tilde, num_negatives, torch.Generator().manual_seed(seed), valid=valid,
                             size=(1, grid.num_cells))
    negatives = draws[0, anchor]

    z_weak = F.normalize(on_grid(output.embeddings, size).flatten(2).transpose(1, 2)[0], dim=-1)  # (N, D)
    z_strong = F.normalize(on_grid(strong_embeddings, size).flatten(2).transpose(1, 2)[0], dim=-1)
    positive = float(z_weak[anchor] @ z_strong[anchor])
    negative = float((z_weak[negatives] @ z_weak[anchor]).mean())
    fnr = None
    if instance_ids is not None:
        own = int(instance_ids[y, x])
        if own >= 0:
            centres = np.round(grid.centres(negatives.numpy())).astype(np.int64)
            fnr = float((instance_ids[centres[:, 1], centres[:, 0]] == own).mean())
    strong = batch["pixel_values_strong"][0, :, :grid.input_size[0], :grid.input_size[1]]
    return PixelExplanation(grid=grid, anchor=anchor, valid=valid[0].numpy(), weights=weights.view(size).numpy(),
                            negatives=negatives.numpy(), strong=_to_uint8(strong, (height, width)),
                            positive_cosine=positive, negative_cosine=negative, false_negative_rate=fnr)


def draw_explanation(image: np.ndarray, explanation: PixelExplanation, x: int, y: int, scale: int = 1,
                     alpha: float = 0.65) -> tuple[np.ndarray, np.ndarray]:
    """(heat map of s_deb / max s_deb over the image with the drawn negatives as dots and the anchor
    as a ring, strong view with the positive marked), both enlarged by `scale`."""
    # Negatives are drawn with probability proportional to s_deb: show it relative to its maximum
    # (an untrained model's s_deb can be tiny everywhere and still shape the draws).
    peak = float(explanation.weights.max())
    relative = explanation.weights / peak if peak > 0 else explanation.weights
    heat = heat_colours(enlarge(explanation.grid.expand(relative), scale)).astype(np.float32)
    out = np.round((1.0 - alpha) * enlarge(image, scale).astype(np.float32) + alpha * heat).astype(np.uint8)
    radius = max(2, round(scale * min(image.shape[:2]) / 80))

    def shown(coord: float) -> float:  # pixel centre in the enlarged image
        return (coord + 0.5) * scale - 0.5

    for cx, cy in explanation.grid.centres(explanation.negatives):
        dot(out, shown(cx), shown(cy), NEGATIVE_COLOUR, radius, filled=True)
    dot(out, shown(x), shown(y), ANCHOR_COLOUR, 2 * radius, filled=False)
    positive = np.ascontiguousarray(enlarge(explanation.strong, scale))
    dot(positive, shown(x), shown(y), POSITIVE_COLOUR, 2 * radius, filled=False)
    return out, positive


def instance_id_map(instances: ImageInstances, size: tuple[int, int]) -> np.ndarray:
    """(H, W) int64 index of the first instance covering each pixel, -1 for none."""
    ids = np.full(size, -1, np.int64)
    for k in range(len(instances) - 1, -1, -1):
        ids[instances.masks[k]] = k
    return ids
