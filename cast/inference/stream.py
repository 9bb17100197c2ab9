"""Predictions over many images, streamed to disk: sharded over torchrun processes, resumable
after a kill, ending in one COCO instances json (`cast.inference.coco_output`).

The images (sorted by id) are cut into chunks of `shard_size`. Each finished chunk is written
atomically to `<out>/.shards/<k>.json` (its images, their annotations as compressed RLE, the
files skipped); a process holds one batch of masks and one chunk of RLEs at a time, so memory
stays flat however many images there are. The chunks still missing are dealt out to the
processes of a torchrun launch. When every chunk exists, rank 0 writes the final json from them
in chunk order (one chunk in memory at a time) and removes `.shards/`. A killed run started
again with the same settings (recorded in `.shards/settings.json`; other settings are refused)
skips the chunks it finished: chunks and the batches inside them do not depend on when the run
was interrupted nor on the number of processes, so it ends with the same file, byte for byte,
as an uninterrupted run on the same machine.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cast.data.dataset import ImageRecord
from cast.data.errors import DataError
from cast.inference.api import as_sample, collate_views, eval_view, predict_batch
from cast.inference.coco_output import (DESCRIPTION, categories, image_entry, instance_annotations, relative_name,
                                        write_instances_json)
from cast.inference.sources import ImageSource
from cast.utils.cache import Record, SettingsChangedError, json_digest, settings_changes
from cast.utils.distributed import DistContext, all_gather_objects, barrier
from cast.utils.io import atomic_save, atomic_write_json, read_json

SHARDS = ".shards"
OVERLAYS = "overlays"  # <out>/overlays/: never read back as input when <out> lies inside the source folder


@dataclass
class StreamOptions:
    output_name: str = "predictions.json"  # file written into the output folder
    score_threshold: float = 0.5
    test_size: int | None = None
    batch_size: int = 1
    shard_size: int = 64  # images per chunk: the resume granularity
    save_overlays: bool = False
    strict: bool = False  # an unreadable image stops the command instead of being skipped
    workers: int = 0  # image-decoding processes (DataLoader workers)


@dataclass
class StreamSummary:
    path: Path
    images: int
    instances: int
    skipped: list[str]
    resumed_images: int  # images found done from an earlier, interrupted run
    seconds: float


class _Views(Dataset):
    """Decodes record i and makes its evaluation view; a bad file becomes an error entry."""

    def __init__(self, records: list[ImageRecord], test_size: int | None, input_size: tuple[int, int] | None,
                 keep_image: bool) -> None:
        self.records, self.test_size, self.input_size, self.keep_image = records, test_size, input_size, keep_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            sample = as_sample(record.path, record.image_id)
            size = (sample.height, sample.width)
            if record.height is not None and size != (record.height, record.width):
                raise DataError(record.path, f"image is {size[1]}x{size[0]} (w x h) but its record (image id "
                                             f"{record.image_id}) says {record.width}x{record.height}")
        except DataError as e:
            return {"record": record, "error": str(e)}
        view = eval_view(sample, self.test_size, self.input_size)
        return {"record": record, "view": view, "image": sample.image if self.keep_image else None}


def _items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _chunk_path(shards: Path, k: int) -> Path:
    return shards / f"{k:06d}.json"


def stream_predictions(model: Any, source: ImageSource, out_dir: str | os.PathLike, options: StreamOptions,
                       identity: dict[str, Any], ctx: DistContext = DistContext(),
                       device: torch.device | str = "cpu") -> StreamSummary | None:
    """Predict `model` on every image of `source` into `out_dir/options.output_name` (see the
    module docstring). `identity` names the model (its path and weights hash) for the resume check.
    Returns the summary on rank 0 (None on the others)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    shards = out_dir / SHARDS
    classes = list(model.classes)
    settings = {"model": identity, "classes": classes, "category_ids": source.category_ids,
                "source": {"path": os.path.abspath(source.path), "images": len(source),
                           "digest": json_digest([[r.image_id, r.file_name] for r in source.records])},
                "output": options.output_name, "score_threshold": options.score_threshold,
                "test_size": options.test_size, "batch_size": options.batch_size, "shard_size": options.shard_size,
                "overlays": options.save_overlays}
    # Every rank checks (and, finding none, writes the same) settings record before any chunk is written.
    _agree_on(lambda: _claim(shards, settings, out_dir))
    barrier()

    chunks = [source.records[i:i + options.shard_size] for i in range(0, len(source), options.shard_size)]
    remaining = [k for k in range(len(chunks)) if not _chunk_path(shards, k).is_file()]
    resumed = len(source) - sum(len(chunks[k]) for k in remaining)
    mine = remaining[ctx.rank::ctx.world_size]
    if ctx.is_main and resumed:
        print(f"resuming: {resumed} of {len(source)} images already done in {shards}", file=sys.stderr)
    _agree_on(lambda: _run_chunks(model, chunks, mine, shards, out_dir, source, options, ctx, device))
    barrier()
    if not ctx.is_main:
        return None
    missing = [k for k in range(len(chunks)) if not _chunk_path(shards, k).is_file()]
    if missing:
        raise DataError(shards, f"{len(missing)} chunks were not written (e.g. {missing[0]}); run the command again")
    skipped, passes = list(source.skipped), []

    def parts():
        passes.append(len(passes))
        for k in range(len(chunks)):
            chunk = read_json(_chunk_path(shards, k))
            if len(passes) == 1:  # the skipped files are collected on the first of the two passes
                skipped.extend(chunk["skipped"])
            yield chunk["images"], chunk["annotations"]

    def info() -> dict[str, Any]:
        return {"description": DESCRIPTION, "source": str(source.path), "skipped_images": skipped}

    path = out_dir / options.output_name
    images, instances = write_instances_json(path, info, categories(classes, source.category_ids), parts)
    shutil.rmtree(shards, ignore_errors=True)
    return StreamSummary(path, images, instances, skipped, resumed, time.perf_counter() - start)


def _agree_on(work) -> None:
    """Run `work` on every rank; when it fails on any rank, every rank raises the first failure
    (so that no process waits forever at a barrier for one that stopped)."""
    error: BaseException | None = None
    try:
        work()
    except (DataError, OSError, SettingsChangedError) as e:
        error = e
    errors = all_gather_objects(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise DataError("another process", f"{failed[0]}: {failed[1]}")


def _claim(shards: Path, settings: dict[str, Any], out_dir: Path) -> None:
    """Create the shard folder and record the settings; refuse shards made under other settings."""
    record = Record(shards / "settings.json")
    try:
        shards.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the output folder: {e.strerror}", str(out_dir)) from None
    if record.read() is not None and not record.matches(settings):
        changes = settings_changes(record.read()["settings"], settings)
        raise SettingsChangedError(f"{shards}: holds the partial results of a run under other settings "
                                   f"({'; '.join(changes[:4])}); use another --out, or delete {shards}")
    if record.read() is None:
        if any(shards.glob("*.json")):
            raise SettingsChangedError(f"{shards}: holds chunks without a settings record; delete it")
        record.write(settings)


def _run_chunks(model: Any, chunks: list[tuple[ImageRecord, ...]], mine: list[int], shards: Path, out_dir: Path,
                source: ImageSource, options: StreamOptions, ctx: DistContext, device: torch.device | str) -> None:
    if not mine:
        return
    records = [r for k in mine for r in chunks[k]]
    batches, offset = [], 0
    for k in mine:  # batches never cross a chunk's boundary: a chunk's results do not depend on the others
        n = len(chunks[k])
        batches += [list(range(offset + i, offset + min(i + options.batch_size, n))) for i in range(0, n, options.batch_size)]
        offset += n
    input_size = getattr(model, "fixed_input_size", None)
    loader = DataLoader(_Views(records, options.test_size, input_size, options.save_overlays),
                        batch_sampler=batches, collate_fn=_items, num_workers=options.workers)
    chunk_of = iter(mine)
    k, pending, done = next(chunk_of), {"images": [], "annotations": [], "skipped": []}, 0
    # On rank 0 and on a terminal only (None: tqdm's "off when not a TTY"), so that logs stay readable.
    progress = tqdm(total=len(records), desc="predict", unit="img", disable=None if ctx.is_main else True)
    with torch.no_grad():
        for items in loader:
            _predict_items(model, items, pending, out_dir, source, options, input_size, device)
            done += len(items)
            progress.update(len(items))
            if done == len(chunks[k]):
                atomic_write_json(_chunk_path(shards, k), pending)
                pending, done = {"images": [], "annotations": [], "skipped": []}, 0
                k = next(chunk_of, None)
    progress.close()


def _predict_items(model: Any, items: list[dict[str, Any]], pending: dict[str, list], out_dir: Path,
                   source: ImageSource, options: StreamOptions, input_size: tuple[int, int] | None,
                   device: torch.device | str) -> None:
    good = []
    for item in items:
        if "error" in item:
            if options.strict:
                raise DataError(item["record"].path, item["error"].removeprefix(f"{item['record'].path}: "))
            print(f"skipped: {item['error']}", file=sys.stderr)
            pending["skipped"].append(item["error"])
        else:
            good.append(item)
    if not good:
        return
    batch = collate_views([item["view"] for item in good], input_size)
    for item, inst in zip(good, predict_batch(model, batch, options.score_threshold, device)):
        record, (height, width) = item["record"], item["view"]["orig_size"]
        name = relative_name(record.path, out_dir)
        pending["images"].append(image_entry(record.image_id, name, height, width))
        pending["annotations"] += instance_annotations(inst, record.image_id, source.category_ids)
        if options.save_overlays:
            _save_overlay(out_dir, record, item["image"], inst, list(model.classes))


def overlay_path(out_dir: Path, record: ImageRecord) -> Path:
    """<out>/overlays/<the image's name in its source>.png (no part of it leaving the folder)."""
    parts = [p for p in Path(record.file_name).parts if p not in ("..", ".", "/") and not p.endswith(":\\")]
    return out_dir.joinpath(OVERLAYS, *parts[:-1], f"{parts[-1] if parts else record.image_id}.png")


def _save_overlay(out_dir: Path, record: ImageRecord, image: Any, inst: Any, classes: list[str]) -> None:
    from PIL import Image

    from cast.inspection.draw import ImageInstances, draw_instances

    drawn = draw_instances(image, ImageInstances(inst.masks.numpy(), inst.labels.numpy(), inst.scores.numpy()),
                           classes)
    atomic_save(overlay_path(out_dir, record), lambda tmp: Image.fromarray(drawn).save(tmp, format="PNG"))
