"""Batches for training and evaluation: a torch Dataset over any sequence of samples, the collate
function that builds the batch dict documented in `cast.structures`, and a deterministic loader.

Reproducibility: the sampler yields (epoch, index) pairs, and a sample's views are a function of
(seed, epoch, index) alone, so the batches do not depend on the number of workers, on worker
state (persistent workers never see a stale epoch) or on whether the run was resumed. Views are
computed with one intra-op thread everywhere, as DataLoader workers do: some torch kernels
(bilinear upsampling, reductions) round differently with more threads.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cast.data.views import SampleTransform
from cast.structures import InstanceSample


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class InstanceTorchDataset(Dataset):
    """Views of `samples[i]` drawn by `transform` with randomness fixed by (seed, epoch, i).

    An item is either an index (the epoch set by `set_epoch` applies) or an (epoch, index)
    pair, as `EpochSampler` yields it.
    """

    def __init__(self, samples: Sequence[InstanceSample], transform: SampleTransform, seed: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        sample = self.samples[index]
        with _one_thread():  # the same rounding in the main process as in a worker
            return self.transform(sample, seed=self.seed, epoch=epoch, index=index)


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs; each full pass moves to the next epoch.

    The order comes from `inner` when given (e.g. a DistributedSampler, whose own `set_epoch` is
    called), else it is `range(size)`, shuffled by ``np.random.default_rng([seed, epoch])``.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, epoch: int = 0, inner: Sampler | None = None) -> None:
        self.size = int(size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.inner = inner

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (to resume a run)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        if self.inner is not None:
            if hasattr(self.inner, "set_epoch"):
                self.inner.set_epoch(epoch)
            order = [int(i) for i in self.inner]
        elif self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size).tolist()
        else:
            order = list(range(self.size))
        return iter([(epoch, i) for i in order])


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def collate_instances(items: Sequence[dict[str, Any]], size_divisibility: int = 32) -> dict[str, Any]:
    """Pad views to a common size (rounded up to `size_divisibility`) and build the batch dict.

    The keys are those documented at the bottom of `cast.structures`; "pixel_values_strong"
    is present only when every item carries a strong view.
    """
    if len(items) == 0:
        raise ValueError("collate_instances: empty batch")
    if size_divisibility < 1:
        raise ValueError(f"collate_instances: size_divisibility must be >= 1, got {size_divisibility}")
    with_strong = sum("strong" in item for item in items)
    if 0 < with_strong < len(items):
        raise ValueError(f"collate_instances: {with_strong} of {len(items)} items have a strong view; "
                         "a batch needs all or none")
    sizes = [tuple(item["weak"].shape[-2:]) for item in items]
    height = _round_up(max(h for h, _ in sizes), size_divisibility)
    width = _round_up(max(w for _, w in sizes), size_divisibility)
    batch_size = len(items)

    pixel_values = torch.zeros(batch_size, 3, height, width)
    strong = torch.zeros(batch_size, 3, height, width) if with_strong else None
    pixel_mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    instance_ids = torch.full((batch_size, height, width), -1, dtype=torch.int64)
    targets = []
    for b, (item, (h, w)) in enumerate(zip(items, sizes)):
        pixel_values[b, :, :h, :w] = item["weak"]
        if strong is not None:
            strong[b, :, :h, :w] = item["strong"]
        pixel_mask[b, :h, :w] = item["valid"]
        instance_ids[b, :h, :w] = item["instance_ids"]
        masks = torch.zeros(item["masks"].shape[0], height, width)
        masks[:, :h, :w] = item["masks"]
        targets.append({"masks": masks, "labels": item["labels"].to(torch.int64)})

    batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "targets": targets,
             "instance_ids": instance_ids, "image_ids": [int(item["image_id"]) for item in items],
             "image_sizes": [(int(h), int(w)) for h, w in sizes],
             "orig_sizes": [(int(item["orig_size"][0]), int(item["orig_size"][1])) for item in items]}
    if strong is not None:
        batch["pixel_values_strong"] = strong
    return batch


def build_loader(samples: Sequence[InstanceSample], batch_size: int, transform: SampleTransform,
                 shuffle: bool, seed: int, num_workers: int = 0, drop_last: bool = False,
                 sampler: Sampler | None = None, epoch: int = 0, size_divisibility: int = 32) -> DataLoader:
    """A DataLoader of batch dicts whose content depends only on (samples, transform, seed, epoch).

    Each pass over the loader is one epoch, starting at `epoch` (pass the epoch to resume at);
    `loader.sampler.set_epoch(e)` repositions it. With `sampler` (e.g. a DistributedSampler)
    the index order comes from it and `shuffle` is ignored.
    """
    if batch_size < 1:
        raise ValueError(f"build_loader: batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"build_loader: num_workers must be >= 0, got {num_workers}")
    dataset = InstanceTorchDataset(samples, transform, seed)
    dataset.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle, seed, epoch, inner=sampler),
        num_workers=num_workers,
        collate_fn=functools.partial(collate_instances, size_divisibility=size_divisibility),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
