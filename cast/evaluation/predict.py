"""A model's instances on a data set as COCO results: inference sharded over the processes of a
torchrun launch, gathered so that every process ends with all results."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cast.data.batches import EvalTransform, InstanceTorchDataset, collate_instances
from cast.evaluation.coco import instances_to_results
from cast.models.protocol import unwrap
from cast.structures import InstanceSample
from cast.utils.distributed import DistContext, all_gather_objects, shard


@torch.no_grad()
def predict_results(model: torch.nn.Module, samples: Sequence[InstanceSample], category_ids: Sequence[int],
                    test_size: int | None, batch_size: int, ctx: DistContext = DistContext(),
                    desc: str = "predict", num_workers: int = 0) -> list[dict[str, Any]]:
    """COCO results of `model` on `samples` (a possibly lazy sequence) resized to short side
    `test_size`, masks at each image's stored size; every rank gets all results."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    mine = shard(list(range(len(samples))), ctx.rank, ctx.world_size)
    results: list[dict[str, Any]] = []
    if mine:
        # A list of indices is a valid sampler: only this rank's images are ever loaded.
        loader = DataLoader(InstanceTorchDataset(samples, EvalTransform(test_size)), batch_size=batch_size,
                            sampler=mine, collate_fn=collate_instances, num_workers=num_workers)
        for batch in tqdm(loader, desc=desc, disable=not ctx.is_main, leave=False):
            preds = model.predict(batch["pixel_values"].to(ctx.device), batch["pixel_mask"].to(ctx.device),
                                  image_sizes=batch["image_sizes"], orig_sizes=batch["orig_sizes"])
            for image_id, inst in zip(batch["image_ids"], preds):
                results += instances_to_results(inst.to("cpu"), image_id, category_ids)
    model.train(was_training)
    return merge_shards(all_gather_objects(results))


def merge_shards(shards: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result list from the ranks' lists, ordered by image id, then by decreasing score."""
    return sorted((r for part in shards for r in part), key=lambda r: (r["image_id"], -r["score"]))
