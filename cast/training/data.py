"""A deterministic, resumable, rank-sharded stream of training batches.

The stream is an endless sequence of epochs; epoch e visits the data in the order
randperm(N, seed, e). Global micro-batch g holds stream positions [g*B, (g+1)*B) and rank r
takes every world_size-th of them, so the union over ranks is the same global batch a single
process would see. Each element is passed to the dataset as an (epoch, index) key (as
cast.data.batches.InstanceTorchDataset takes it), and its augmentation is a pure function of
(seed, epoch, index): resuming at micro-batch g reproduces
exactly the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g).tolist()


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's (epoch, index) pairs of every global micro-batch from `start` on (endless)."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start: int = 0) -> None:
        if num_samples < 1:
            raise ValueError("cannot draw batches from an empty data set")
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by the {world_size} processes")
        self.num_samples, self.batch_size, self.seed = num_samples, global_batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached: dict[int, list[int]] = {}
        g = self.start
        while True:
            batch = []
            for pos in range(g * self.batch_size + self.rank, (g + 1) * self.batch_size, self.world_size):
                epoch, offset = divmod(pos, self.num_samples)
                if epoch not in cached:
                    cached.clear()  # a batch spans at most two epochs; keep memory flat
                    cached[epoch] = epoch_permutation(self.num_samples, self.seed, epoch)
                batch.append((epoch, cached[epoch][offset]))
            yield batch
            g += 1


def batch_stream(dataset: Any, global_batch_size: int, seed: int, collate_fn: Callable,
                 rank: int = 0, world_size: int = 1, start: int = 0, num_workers: int = 0) -> Iterator[Any]:
    """Collated batches of this rank from global micro-batch `start` on (endless iterator)."""
    sampler = StreamBatchSampler(len(dataset), global_batch_size, seed, rank, world_size, start)
    # A private generator: creating the loader must not draw from the global RNG, or a resumed
    # run would see different dropout / sampling than an uninterrupted one.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    return iter(loader)
