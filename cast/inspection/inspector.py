"""The inspection app's actions on one run (apps/inspect.py lays them out; the notebooks'
`browse` and the FiftyOne export read the same run): overlays, the contrastive sampler at a
clicked pixel, predictions on an uploaded image."""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

from cast.inspection.draw import ImageInstances, display_scale, draw_instances, enlarge
from cast.inspection.explain import draw_explanation, eval_batch, explain_pixel, instance_id_map
from cast.inspection.run import GROUND_TRUTH, RunContents
from cast.inspection.safety import read_upload


class RunInspector:
    """The app's actions on one run. Models are loaded on first use and kept; inference is
    serialised (the app serves several requests at once on a CPU)."""

    def __init__(self, run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None) -> None:
        self.data = RunContents(run_dir, data_root)
        self._models: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def model(self, stage: str) -> torch.nn.Module:
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
        batch = eval_batch(image, self.test_size)
        with self._lock:
            (found,) = model.predict(batch["pixel_values"], batch["pixel_mask"], batch["image_sizes"],
                                     orig_sizes=[image.shape[:2]])
        instances = ImageInstances(found.masks.numpy(), found.labels.numpy(), found.scores.numpy())
        return draw_instances(image, instances.above(score_threshold), self.data.classes)

    def predict_upload(self, path: str | os.PathLike, stage: str, score_threshold: float = 0.5) -> np.ndarray:
        """`predict` on an uploaded file, after `read_upload`'s checks."""
        return self.predict(read_upload(path), stage, score_threshold)
