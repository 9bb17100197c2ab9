"""A run as the inspection tools read it: its images (val, labeled, unlabeled), their ground
truth, every stage's pseudo-labels, every model's val predictions (read from the run folder,
`cast.runs.RunFolder`, and the data folder its config names) and its saved models, whichever
kind they are (`cast.load_model`). Images are asked for by a key (their path relative to the
data folder) that is resolved and checked: no request reads a file outside the run and data
folders.
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cast.config import CastConfig, load_config
from cast.data.dataset import load_image
from cast.data.registry import read_train_val
from cast.data.splits import load_split
from cast.evaluation.coco import decode_results
from cast.inspection.draw import ImageInstances
from cast.inspection.safety import resolve_inside
from cast.models.auto import load_model
from cast.runs import STAGES, RunFolder
from cast.utils.io import read_json

GROUND_TRUTH = "ground_truth"
# Models the app prefers to explain and predict with, best first.
MODEL_PREFERENCE = ("student_refinement", "knowledge_transfer", "student_supervised", "teacher_self_training",
                    "teacher_adaptation")


@dataclass(frozen=True)
class RunImage:
    """One image of a run: `key` (its path relative to the data folder) is how the app names it."""

    key: str
    image_id: int
    path: Path
    split: str  # "val" | "labeled" | "unlabeled"
    partition: str  # "val" | "train": the data set it belongs to (ids are unique within one)
    index: int  # position in that data set


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
        self.train, self.val = read_train_val(self.config.data.kind, self.data_root, self.config.data.max_val_images)
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
        results = sorted(by_image.get(item.image_id, []) if applies else [], key=lambda r: -float(r.get("score", 1.0)))
        unknown = sorted({r["category_id"] for r in results} - self.label_of.keys())
        if unknown:
            raise ValueError(f"{source}: category ids {unknown} are not classes of the data set")
        masks, category_ids, scores = decode_results(results, height, width, source)
        return ImageInstances(masks, np.array([self.label_of[int(c)] for c in category_ids], np.int64), scores)

    def models(self) -> list[str]:
        """Stages with a saved model, in the app's order of preference."""
        available = self.run.available_models()
        return [s for s in MODEL_PREFERENCE if s in available] + [s for s in available if s not in MODEL_PREFERENCE]

    def load_model(self, stage: str) -> torch.nn.Module:
        """The saved model of `stage`: the student, the stand-in or a foundation-model teacher."""
        if stage not in STAGES or stage not in self.run.available_models():
            raise ValueError(f"{stage!r}: run {self.run.name} has no saved model of that stage; "
                             f"available: {self.models() or 'none'}")
        return load_model(self.run.model(stage))
