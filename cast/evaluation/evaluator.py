"""The run's evaluator: a model's val predictions, its mask AP (COCO, by pycocotools; on
Cityscapes also the official metric) and its efficiency profile, cached under its weights hash.

`predictions/<key>_val.json` holds the COCO results; `<key>_val.meta.json` is their
`cast.utils.cache.Record` (settings: weights hash and image ids; with the metrics and profile).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from cast.config import CastConfig
from cast.data.dataset import InstanceDataset
from cast.efficiency import profile_model
from cast.evaluation.coco import evaluate_instances
from cast.evaluation.predict import predict_results
from cast.models.protocol import unwrap, weights_hash
from cast.utils.cache import Record
from cast.utils.distributed import DistContext, broadcast_object
from cast.utils.io import atomic_write_json


def _none_if_nan(value: Any) -> Any:
    # json has no NaN; pycocotools' "no data" becomes null.
    return None if isinstance(value, float) and math.isnan(value) else value


class Evaluator:
    """Evaluates models of a run on its val set; `predictions_dir` holds the cache."""

    def __init__(self, cfg: CastConfig, val: InstanceDataset, predictions_dir: str | Path,
                 ctx: DistContext = DistContext()) -> None:
        self.cfg, self.val, self.dir, self.ctx = cfg, val, Path(predictions_dir), ctx
        self._gt: dict[str, Any] | None = None
        first = val[0]
        scale = cfg.data.test_size / min(first.height, first.width)
        self.profile_size = (round(first.height * scale), round(first.width * scale))

    def path(self, key: str) -> Path:
        return self.dir / f"{key}_val.json"

    @property
    def gt(self) -> dict[str, Any]:
        """The val ground truth as a COCO json dict (built once)."""
        if self._gt is None:
            self._gt = self.val.coco_gt(progress=False)
        return self._gt

    def metrics(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Mask AP metrics in percent (pycocotools), metrics without data None; on Cityscapes the
        official metric too ("cityscapes": {"AP", "AP50", "per_class"})."""
        metrics = evaluate_instances(self.gt, results)
        metrics.pop("summary", None)
        metrics["per_class"] = {k: _none_if_nan(v) for k, v in metrics.get("per_class", {}).items()}
        metrics = {k: v if k == "per_class" else _none_if_nan(v) for k, v in metrics.items()}
        if self.cfg.data.kind == "cityscapes":
            from cast.evaluation.cityscapes import official_metric

            metrics["cityscapes"] = official_metric(self.val, results, self.cfg.data.root)
        return metrics

    def _predict(self, model: torch.nn.Module, desc: str) -> list[dict[str, Any]]:
        d = self.cfg.data
        return predict_results(model, self.val, self.val.category_ids, d.test_size, d.eval_batch_size, self.ctx,
                               desc=desc, num_workers=d.num_workers)

    def during_training(self, model: torch.nn.Module) -> dict[str, float]:
        """AP / AP50 for the metrics log (no files written)."""
        results = self._predict(model, "val")
        if not self.ctx.is_main:
            return broadcast_object(None)
        metrics = evaluate_instances(self.gt, results, per_class=False)
        return broadcast_object({"AP": _none_if_nan(metrics["AP"]), "AP50": _none_if_nan(metrics["AP50"])})

    def __call__(self, key: str, model: torch.nn.Module) -> dict[str, Any]:
        """{"metrics", "efficiency", ...} of `model`, its predictions written as predictions/<key>_val.json."""
        record = Record(self.path(key).with_suffix(".meta.json"))
        settings = {"weights_hash": weights_hash(model), "image_ids": self.val.image_ids}
        if record.matches(settings) and self.path(key).is_file():
            return record.read()
        results = self._predict(model, f"evaluate {key}")
        meta = None
        if self.ctx.is_main:
            record.clear()
            atomic_write_json(self.path(key), results)
            info = {"model": key, "metrics": self.metrics(results),
                    "efficiency": profile_model(unwrap(model), self.profile_size, device=self.ctx.device)}
            record.write(settings, **info)
            meta = record.read()
        return broadcast_object(meta)
