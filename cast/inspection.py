"""What the inspection app shows, as plain functions of a run folder (the UI is apps/inspect.py).

- `RunContents`: the images of a run (val, labeled, unlabeled), their ground truth, every stage's
  pseudo-labels and every model's predictions, read from the run folder (`cast.runs.RunFolder`)
  and the data folder its config names. Images are asked for by a key (their path relative to
  the data folder) that is resolved and checked: no request reads a file outside the run and
  data folders.
- `draw_instances`: coloured instance overlays.
- `explain_pixel`: for one clicked pixel, the negative-sampling distribution s_deb of the
  contrastive loss over the image, the R negatives `sample_negatives` draws, and the positive
  (the same pixel in the strong view), computed from a student's predictions.
- `read_upload`: an uploaded file as an image, refusing what is not one or is too large.
- `RunInspector`: the three things the app does (overlay, explain a pixel, predict an upload).
"""
from __future__ import annotations

import math
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from cast.config import CastConfig, load_config
from cast.data.dataset import InstanceDataset
from cast.data.images import load_image
from cast.data.splits import load_split
from cast.data.views import EvalTransform, WeakStrongViews
from cast.losses.contrastive import STRATEGIES, WEIGHT_EPS, pixel_probabilities, sample_negatives
from cast.models.student import CastStudent
from cast.pipeline.runner import DATA_SPLITS, read_dataset
from cast.runs import STAGES, RunFolder
from cast.structures import InstanceSample
from cast.utils.io import read_json

GROUND_TRUTH = "ground_truth"
# Uploads: what the app accepts, decided before any pixel is decoded.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
# The sampler's grid is shrunk beyond this many cells so that a click stays interactive on
# large images (same rule as PixelContrastiveLoss(max_pixels=...)).
MAX_GRID_CELLS = 64 * 64
# Models the app prefers to explain and predict with, best first.
MODEL_PREFERENCE = ("student_refinement", "knowledge_transfer", "student_supervised", "teacher_self_training",
                    "teacher_adaptation")
# Saturated colours that photos rarely contain, so overlays stand out (and tests can find them).
PALETTE = np.array([(255, 0, 255), (0, 255, 0), (0, 160, 255), (255, 200, 0), (255, 0, 0), (0, 255, 255),
                    (160, 0, 255), (255, 120, 0), (0, 255, 140), (255, 0, 120)], np.uint8)
# Small images are shown enlarged by a whole factor (nearest neighbour) up to this short side:
# gradio never scales an image up, and a 128-pixel overlay is too small to click precisely.
MIN_DISPLAY_SIDE = 384
NEGATIVE_COLOUR = (0, 255, 255)
ANCHOR_COLOUR = (255, 255, 255)
POSITIVE_COLOUR = (0, 255, 0)


class UnsafePathError(ValueError):
    """A request named a file outside the folders the app may read."""


# --------------------------------------------------------------------------- safe paths


def resolve_inside(relative: str, roots: Sequence[Path]) -> Path:
    """`relative` resolved against the first root, refused unless it stays inside one of `roots`.

    Symbolic links are followed before the check, so a link inside a root that points outside
    it is refused too. Absolute paths, NUL bytes and empty names are refused outright.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UnsafePathError(f"{relative!r}: refused: not a file name")
    if Path(relative).is_absolute() or Path(relative).drive:
        raise UnsafePathError(f"{relative!r}: refused: absolute paths are not accepted")
    resolved_roots = [Path(r).resolve() for r in roots]
    path = (resolved_roots[0] / relative).resolve()
    if not any(path.is_relative_to(root) for root in resolved_roots):
        raise UnsafePathError(f"{relative!r}: refused: resolves outside the run and data folders")
    return path


# --------------------------------------------------------------------------- run contents


@dataclass(frozen=True)
class RunImage:
    """One image of a run: `key` (its path relative to the data folder) is how the app names it."""

    key: str
    image_id: int
    path: Path
    split: str  # "val" | "labeled" | "unlabeled"
    partition: str  # "val" | "train": the data set it belongs to (ids are unique within one)
    index: int  # position in that data set


@dataclass
class ImageInstances:
    """Instances of one image in numpy form (ground truth has no scores)."""

    masks: np.ndarray  # (K, H, W) bool
    labels: np.ndarray  # (K,) int64, contiguous class index
    scores: np.ndarray | None = None  # (K,) float32

    def __len__(self) -> int:
        return int(len(self.labels))

    def above(self, threshold: float) -> "ImageInstances":
        """Instances scoring at least `threshold` (all of them when there are no scores)."""
        if self.scores is None:
            return self
        keep = self.scores >= threshold
        return ImageInstances(self.masks[keep], self.labels[keep], self.scores[keep])


def decode_results(results: Sequence[dict[str, Any]], height: int, width: int,
                   label_of: dict[int, int], source: str) -> ImageInstances:
    """COCO result dicts (compressed RLE) of one image -> `ImageInstances`, best score first."""
    results = sorted(results, key=lambda r: -float(r.get("score", 1.0)))
    if not results:
        return ImageInstances(np.zeros((0, height, width), bool), np.zeros(0, np.int64), np.zeros(0, np.float32))
    rles = []
    for r in results:
        seg = r["segmentation"]
        if not isinstance(seg, dict) or tuple(seg.get("size", ())) != (height, width):
            raise ValueError(f"{source}: image {r['image_id']}: segmentation is not an RLE of size "
                             f"{(height, width)}")
        counts = seg["counts"]
        rles.append({"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    unknown = sorted({r["category_id"] for r in results} - label_of.keys())
    if unknown:
        raise ValueError(f"{source}: category ids {unknown} are not classes of the data set")
    masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
    labels = np.array([label_of[r["category_id"]] for r in results], np.int64)
    scores = np.array([float(r.get("score", 1.0)) for r in results], np.float32)
    return ImageInstances(masks, labels, scores)


def _data_root(run_dir: Path, cfg: CastConfig) -> Path:
    """The data folder of the run: relative roots are relative to where the pipeline ran, i.e. the
    folder that holds `<output_dir>/<name>` (falling back to the current folder)."""
    root = Path(cfg.data.root)
    if root.is_absolute():
        return root
    candidates = []
    output_dir = Path(cfg.output_dir)
    run_dir = run_dir.resolve()
    if not output_dir.is_absolute() and len(run_dir.parents) > len(output_dir.parts):
        candidates.append(run_dir.parents[len(output_dir.parts)] / root)
    candidates.append(Path.cwd() / root)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(f"{run_dir / 'config.yaml'}: data.root {cfg.data.root} not found (looked in "
                            f"{', '.join(str(c) for c in candidates)}); pass the data folder explicitly")


def open_datasets(cfg: CastConfig, data_root: Path) -> tuple[InstanceDataset, InstanceDataset]:
    """(train, val) data sets of the run, read as the pipeline reads them (val capped at
    `data.max_val_images` like the pipeline's evaluation)."""
    train_split, val_split = DATA_SPLITS[cfg.data.kind]
    train = read_dataset(cfg.data.kind, data_root, train_split)
    val = read_dataset(cfg.data.kind, data_root, val_split)
    if cfg.data.max_val_images is not None:
        val = val.subset(val.image_ids[: cfg.data.max_val_images])
    return train, val


class RunContents:
    """Read-only view of a run folder and its data: images, ground truth, pseudo-labels, predictions.

    Args:
        run_dir: the run folder (`runs/<name>`), laid out as `cast.runs.RunFolder` says.
        data_root: the data folder; default: the one the run's config.yaml names.
    """

    def __init__(self, run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None) -> None:
        self.run = RunFolder(Path(run_dir).resolve())
        if not self.run.root.is_dir():
            raise FileNotFoundError(f"{self.run.root}: run folder not found")
        self.config = load_config(self.run.config, check_paths=False)
        self.data_root = Path(data_root).resolve() if data_root is not None else _data_root(self.run.root, self.config)
        self.train, self.val = open_datasets(self.config, self.data_root)
        self.classes = list(self.val.classes)
        self.category_ids = list(self.val.category_ids)
        self.label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        labeled: set[int] = set()
        if self.run.split.is_file():
            labeled = set(load_split(self.run.split)["labeled_image_ids"])
        self.images: dict[str, RunImage] = {}
        for partition, dataset in (("val", self.val), ("train", self.train)):
            for index, record in enumerate(dataset.records):
                split = "val" if partition == "val" else ("labeled" if record.image_id in labeled else "unlabeled")
                path = record.path.resolve()
                key = self._key(path)
                self.images[key] = RunImage(key, record.image_id, path, split, partition, index)
        self._results: dict[str, dict[int, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def _key(self, path: Path) -> str:
        if not path.is_relative_to(self.data_root):
            raise ValueError(f"{path}: image lies outside the data folder {self.data_root}")
        return path.relative_to(self.data_root).as_posix()

    @property
    def roots(self) -> list[Path]:
        """The only folders the inspection tools read from."""
        return [self.data_root, self.run.root]

    @property
    def keys(self) -> list[str]:
        """Image keys, val images first, then the training images."""
        return list(self.images)

    def image(self, key: str) -> RunImage:
        """The image named `key`; `UnsafePathError` when it leads outside the run and data folders,
        ValueError when it is no image of this run."""
        path = resolve_inside(key, self.roots)
        try:
            return self.images[self._key(path)]
        except (KeyError, ValueError):
            raise ValueError(f"{key!r}: not an image of run {self.run.name}") from None

    def pixels(self, key: str) -> np.ndarray:
        """The image `key` as (H, W, 3) uint8 RGB."""
        return load_image(self.image(key).path)

    def sources(self) -> list[str]:
        """What can be drawn: ground truth, `pseudo_labels/<stage>`, `predictions/<model>`."""
        return ([GROUND_TRUTH] + [f"pseudo_labels/{s}" for s in self.run.available_pseudo_labels()]
                + [f"predictions/{m}" for m in self.run.available_predictions()])

    def _results_by_image(self, source: str) -> dict[int, list[dict[str, Any]]]:
        with self._lock:
            if source not in self._results:
                kind, _, name = source.partition("/")
                if kind == "pseudo_labels" and name in self.run.available_pseudo_labels():
                    path = self.run.pseudo_labels(name)
                elif kind == "predictions" and name in self.run.available_predictions():
                    path = self.run.predictions(name)
                else:
                    raise ValueError(f"{source!r}: no such label source in run {self.run.name}; "
                                     f"choose one of {self.sources()}")
                results = read_json(path)
                if not isinstance(results, list):
                    raise ValueError(f"{path}: expected a COCO result list, got {type(results).__name__}")
                grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
                for r in results:
                    if not isinstance(r, dict) or not {"image_id", "category_id", "segmentation"} <= r.keys():
                        raise ValueError(f"{path}: result {r!r:.80} lacks image_id, category_id or segmentation")
                    grouped[int(r["image_id"])].append(r)
                self._results[source] = dict(grouped)
            return self._results[source]

    def instances(self, key: str, source: str) -> ImageInstances:
        """The instances of image `key` in `source` (pseudo-labels cover the unlabeled training
        images, predictions the val images; elsewhere they are empty)."""
        item = self.image(key)
        dataset = self.val if item.partition == "val" else self.train
        if source == GROUND_TRUTH:
            target = dataset.target(item.index)
            return ImageInstances(target.masks, target.labels)
        by_image = self._results_by_image(source)
        # Ids are unique within one data set only (Cityscapes numbers train and val from 1 each).
        applies = item.partition == ("train" if source.startswith("pseudo_labels/") else "val")
        record = dataset.records[item.index]
        height, width = ((record.height, record.width) if record.height is not None
                         else dataset.target(item.index).size)
        return decode_results(by_image.get(item.image_id, []) if applies else [], height, width, self.label_of,
                              source)

    def models(self) -> list[str]:
        """Stages with a saved model, in the app's order of preference."""
        available = self.run.available_models()
        return [s for s in MODEL_PREFERENCE if s in available] + [s for s in available if s not in MODEL_PREFERENCE]

    def load_model(self, stage: str) -> CastStudent:
        """The saved model of `stage` (a CastStudent: the student, or the demo's stand-in teacher)."""
        if stage not in STAGES or stage not in self.run.available_models():
            raise ValueError(f"{stage!r}: run {self.run.name} has no saved model of that stage; "
                             f"available: {self.models() or 'none'}")
        model = CastStudent.from_pretrained(self.run.model(stage))
        return model.eval()


# --------------------------------------------------------------------------- drawing


def display_scale(height: int, width: int) -> int:
    """Whole factor by which an image of this size is enlarged for display (1 for large images)."""
    return max(1, math.ceil(MIN_DISPLAY_SIDE / max(1, min(height, width))))


def enlarge(array: np.ndarray, scale: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Repeat each pixel `scale` x `scale` times along `axes` (nearest-neighbour enlargement)."""
    if scale == 1:
        return array
    return np.repeat(np.repeat(array, scale, axis=axes[0]), scale, axis=axes[1])


def colour_of(index: int) -> np.ndarray:
    return PALETTE[index % len(PALETTE)]


def draw_instances(image: np.ndarray, instances: ImageInstances, classes: Sequence[str],
                   alpha: float = 0.5) -> np.ndarray:
    """The image with each instance filled (blended by `alpha`), outlined in its solid colour and
    named with its class (and score). Instance i gets `colour_of(i)`."""
    out = image.astype(np.float32)
    for i, mask in enumerate(instances.masks):
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour_of(i).astype(np.float32)
    out = np.ascontiguousarray(np.round(out).astype(np.uint8))
    height, width = image.shape[:2]
    thickness = max(1, round(min(height, width) / 200))
    font_scale = max(0.3, min(height, width) / 600)
    for i, mask in enumerate(instances.masks):
        colour = tuple(int(c) for c in colour_of(i))
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colour, thickness)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        text = classes[int(instances.labels[i])]
        if instances.scores is not None:
            text += f" {float(instances.scores[i]):.2f}"
        origin = (int(xs.min()), max(int(ys.min()) - 2, 8))
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, 1, cv2.LINE_AA)
    return out


def heat_colours(values: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    rgba = matplotlib.colormaps[colormap](np.clip(values, 0.0, 1.0))
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def _dot(image: np.ndarray, x: float, y: float, colour: tuple[int, int, int], radius: int, filled: bool) -> None:
    cv2.circle(image, (int(round(x)), int(round(y))), radius, colour, -1 if filled else max(1, radius // 2),
               cv2.LINE_AA)


# --------------------------------------------------------------------------- s_deb of one pixel


@dataclass(frozen=True)
class PixelGrid:
    """Cells of the contrastive loss's pixel grid over an image, and the way back to its pixels.

    The model sees the image resized to `input_size`; its projection head has one pixel per
    `stride` input pixels; the grid (possibly shrunk) has `size` cells covering `cover` input pixels.
    """

    orig_size: tuple[int, int]
    input_size: tuple[int, int]
    cover: tuple[int, int]
    size: tuple[int, int]

    @classmethod
    def build(cls, orig_size: tuple[int, int], input_size: tuple[int, int], stride: int,
              max_cells: int = MAX_GRID_CELLS) -> "PixelGrid":
        rows, cols = math.ceil(input_size[0] / stride), math.ceil(input_size[1] / stride)
        cover = (rows * stride, cols * stride)
        if rows * cols > max_cells:
            scale = math.sqrt(max_cells / (rows * cols))
            rows, cols = max(1, int(rows * scale)), max(1, int(cols * scale))
        return cls(tuple(orig_size), tuple(input_size), cover, (rows, cols))

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

    def valid(self) -> torch.Tensor:
        """(num_cells,) bool: cells at least half on the image (as the loss decides it from pixel_mask)."""
        mask = torch.zeros(1, 1, *self.cover)
        mask[..., :self.input_size[0], :self.input_size[1]] = 1.0
        return (F.adaptive_avg_pool2d(mask, self.size)[0, 0] >= 0.5).flatten()


def negative_weights(y: torch.Tensor | None, anchor: int, valid: torch.Tensor) -> torch.Tensor:
    """s_deb(anchor, q) = max(0, 1 - <y~[anchor], y~[q]>) for every cell q, (N,).

    y: (N, E) rows of `pixel_probabilities` (unit norm), None for the uniform sampler (weight 1).
    The anchor itself and invalid cells get 0, weights below WEIGHT_EPS count as 0, and an anchor
    left with no weight draws uniformly over the other valid cells: all as in `sample_negatives`,
    so the map shows the distribution the sampler really draws from.
    """
    if y is None:
        weights = torch.ones(valid.numel())
    else:
        weights = (1.0 - y @ y[anchor]).clamp(min=0.0)
        weights = weights.masked_fill(weights < WEIGHT_EPS, 0.0)
    weights = weights * valid.to(weights.dtype)
    weights[anchor] = 0.0
    if weights.sum() == 0:
        weights = valid.to(weights.dtype).clone()
        weights[anchor] = 0.0
    return weights


@dataclass
class PixelExplanation:
    """What the sampler does for one anchor pixel (`explain_pixel`)."""

    grid: PixelGrid
    anchor: int  # flat cell of the clicked pixel
    weights: np.ndarray  # (rows, cols) s_deb of every cell as a negative of the anchor
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
                "anchor_cell_on_image": bool(self.grid.valid()[self.anchor]),
                "anchor_centre": [float(x), float(y)], "weight_at_anchor": float(flat[self.anchor]),
                "max_weight": float(flat.max()), "num_negatives": int(len(self.negatives)),
                "negative_cells": [int(c) for c in self.negatives],
                "negative_weights": [float(flat[c]) for c in self.negatives],
                "positive_cosine": self.positive_cosine, "negative_cosine": self.negative_cosine,
                "false_negative_rate": self.false_negative_rate}


def model_views(image: np.ndarray, test_size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weak and strong (3, h, w) views of `image` at the evaluation size: the weak view is the
    resized image, the strong view the training recipe's photometric changes on top of it."""
    blank = np.zeros((0, *image.shape[:2]), bool)
    # A private, writable copy: decoded images can be read-only arrays, which torch warns about.
    sample = InstanceSample(image=np.array(image, copy=True), masks=blank, labels=np.zeros(0, np.int64), image_id=0)
    resized = EvalTransform(test_size)(sample)["weak"]
    resized = np.round(resized.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
    height, width = resized.shape[:2]
    views = WeakStrongViews(crop_size=(height, width), scale_range=(1.0, 1.0), hflip_prob=0.0)(
        InstanceSample(image=resized, masks=np.zeros((0, height, width), bool), labels=np.zeros(0, np.int64),
                       image_id=0), seed=seed, epoch=0, index=0)
    return views["weak"], views["strong"]


def _to_uint8(view: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    view = F.interpolate(view[None], size=size, mode="bilinear", align_corners=False)[0] \
        if tuple(view.shape[-2:]) != tuple(size) else view
    return np.round(view.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@torch.no_grad()
def explain_pixel(model: CastStudent, image: np.ndarray, x: int, y: int, strategy: str = "fusion",
                  num_negatives: int = 64, seed: int = 0, test_size: int | None = None,
                  instance_ids: np.ndarray | None = None, max_cells: int = MAX_GRID_CELLS) -> PixelExplanation:
    """The contrastive loss's view of pixel (x, y) of `image` under `model`'s predictions.

    As in training (`PixelContrastiveLoss`): the model sees a weak and a strong view, the pixel
    grid is that of the projection head (shrunk beyond `max_cells`), mask logits are resized to it,
    y~ = `pixel_probabilities(strategy)` (None for "uniform") and `sample_negatives` draws
    `num_negatives` negatives per anchor over this one image (seeded by `seed`). `instance_ids`
    (H, W) int (-1 = none), e.g. from the ground truth, gives the false-negative rate.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    height, width = image.shape[:2]
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    weak, strong = model_views(image, test_size, seed)
    was_training = model.training
    model.eval()
    try:
        output = model(torch.stack([weak, strong]))
    finally:
        model.train(was_training)
    if output.embeddings is None:
        raise ValueError(f"{type(model).__name__} has no projection head: nothing to explain")
    grid = PixelGrid.build((height, width), tuple(weak.shape[-2:]), model.config.projection_stride, max_cells)
    valid = grid.valid()
    anchor = grid.cell_of(x, y)

    y_tilde = None
    if strategy != "uniform":
        logits = F.interpolate(output.mask_logits[:1], size=grid.size, mode="bilinear", align_corners=False,
                               antialias=True)
        y_tilde = pixel_probabilities(logits, output.class_logits[:1], strategy)
    weights = negative_weights(None if y_tilde is None else y_tilde[0], anchor, valid)
    generator = torch.Generator().manual_seed(seed)
    draws = sample_negatives(y_tilde, num_negatives, generator, valid=valid[None], size=(1, grid.num_cells))
    negatives = draws[0, anchor]

    embeddings = output.embeddings
    if tuple(embeddings.shape[-2:]) != grid.size:
        embeddings = F.interpolate(embeddings, size=grid.size, mode="bilinear", align_corners=False, antialias=True)
    z = F.normalize(embeddings.flatten(2).transpose(1, 2), dim=-1)  # (2, N, D)
    positive = float(z[0, anchor] @ z[1, anchor])
    negative = float((z[0, negatives] @ z[0, anchor]).mean())

    fnr = None
    if instance_ids is not None:
        own = int(instance_ids[y, x])
        if own >= 0:
            centres = np.round(grid.centres(negatives.numpy())).astype(np.int64)
            fnr = float((instance_ids[centres[:, 1], centres[:, 0]] == own).mean())
    return PixelExplanation(grid=grid, anchor=anchor, weights=weights.view(grid.size).numpy(),
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
        _dot(out, shown(cx), shown(cy), NEGATIVE_COLOUR, radius, filled=True)
    _dot(out, shown(x), shown(y), ANCHOR_COLOUR, 2 * radius, filled=False)
    positive = np.ascontiguousarray(enlarge(explanation.strong, scale))
    _dot(positive, shown(x), shown(y), POSITIVE_COLOUR, 2 * radius, filled=False)
    return out, positive


def instance_id_map(instances: ImageInstances, size: tuple[int, int]) -> np.ndarray:
    """(H, W) int64 index of the first instance covering each pixel, -1 for none."""
    ids = np.full(size, -1, np.int64)
    for k in range(len(instances) - 1, -1, -1):
        ids[instances.masks[k]] = k
    return ids


# --------------------------------------------------------------------------- uploads


def read_upload(path: str | os.PathLike, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_UPLOAD_PIXELS) -> np.ndarray:
    """An uploaded file as (H, W, 3) uint8 RGB; ValueError naming the file when it is no image of
    an accepted format, larger than `max_bytes` or has more than `max_pixels` pixels (checked from
    the header, before decoding). Decoding is `cast.data.images.load_image`'s (EXIF orientation,
    alpha, 16-bit), so an upload is read exactly like a data set image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.name}: uploaded file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path.name}: file is {size / 2**20:.1f} MiB, more than the "
                         f"{max_bytes / 2**20:.0f} MiB allowed")
    try:
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise ValueError(f"{path.name}: not an image (no image format recognised)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path.name}: image too large to decode safely: {e}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path.name}: unreadable image header ({e})") from None
    if kind not in UPLOAD_FORMATS:
        raise ValueError(f"{path.name}: {kind} images are not accepted; use one of {', '.join(UPLOAD_FORMATS)}")
    if width * height > max_pixels:
        raise ValueError(f"{path.name}: {width}x{height} pixels is more than the {max_pixels} allowed")
    return load_image(path)


# --------------------------------------------------------------------------- the app's actions


class RunInspector:
    """The app's actions on one run. Models are loaded on first use and kept; inference is
    serialised (the app serves several requests at once on a CPU)."""

    def __init__(self, run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None) -> None:
        self.data = RunContents(run_dir, data_root)
        self._models: dict[str, CastStudent] = {}
        self._lock = threading.Lock()

    def model(self, stage: str) -> CastStudent:
        with self._lock:
            if stage not in self._models:
                self._models[stage] = self.data.load_model(stage)
            return self._models[stage]

    @property
    def test_size(self) -> int:
        return self.data.config.data.test_size

    def scale(self, key: str) -> int:
        """Display enlargement of image `key` (see `display_scale`)."""
        item = self.data.image(key)
        dataset = self.data.val if item.partition == "val" else self.data.train
        record = dataset.records[item.index]
        height, width = (record.height, record.width) if record.height is not None else self.data.pixels(key).shape[:2]
        return display_scale(height, width)

    def image_coordinates(self, key: str, x: int, y: int) -> tuple[int, int]:
        """Pixel of image `key` under a click at (x, y) of its enlarged display."""
        scale = self.scale(key)
        return int(x) // scale, int(y) // scale

    def overlay(self, key: str, source: str, score_threshold: float = 0.0) -> np.ndarray:
        """Image `key` with the instances of `source` scoring at least `score_threshold`, enlarged
        by `scale(key)` (drawn at that size, so outlines and names stay sharp)."""
        if source not in self.data.sources():
            raise ValueError(f"{source!r}: no such label source; choose one of {self.data.sources()}")
        instances = self.data.instances(key, source).above(score_threshold)
        scale = self.scale(key)
        instances = ImageInstances(enlarge(instances.masks, scale, axes=(1, 2)), instances.labels, instances.scores)
        return draw_instances(enlarge(self.data.pixels(key), scale), instances, self.data.classes)

    def explain(self, key: str, stage: str, strategy: str, x: int, y: int, num_negatives: int = 64,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(s_deb heat map with the drawn negatives, strong view with the positive, summary) for pixel
        (x, y) of image `key` (image coordinates) under the saved model of `stage`; the images are
        enlarged like `overlay`'s."""
        image = self.data.pixels(key)
        x, y = int(x), int(y)
        ids = instance_id_map(self.data.instances(key, GROUND_TRUTH), image.shape[:2])
        model = self.model(stage)
        with self._lock:
            explanation = explain_pixel(model, image, x, y, strategy, int(num_negatives), int(seed), self.test_size,
                                        instance_ids=ids)
        heat, positive = draw_explanation(image, explanation, x, y, display_scale(*image.shape[:2]))
        return heat, positive, explanation.summary(strategy)

    def predict(self, image: np.ndarray, stage: str, score_threshold: float = 0.5) -> np.ndarray:
        """Overlay of the saved model of `stage`'s instances on `image` (at the image's size)."""
        model = self.model(stage)
        weak, _ = model_views(image, self.test_size, seed=0)
        with self._lock:
            (found,) = model.predict(weak[None], orig_sizes=[image.shape[:2]])
        instances = ImageInstances(found.masks.numpy(), found.labels.numpy(), found.scores.numpy())
        return draw_instances(image, instances.above(score_threshold), self.data.classes)

    def predict_upload(self, path: str | os.PathLike, stage: str, score_threshold: float = 0.5) -> np.ndarray:
        """`predict` on an uploaded file, after `read_upload`'s checks."""
        return self.predict(read_upload(path), stage, score_threshold)
