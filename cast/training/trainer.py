"""One trainer for every CAST stage.

It minimises the unified objective
    J = L_sup(D_l) + lambda_semi * L_semi(D_u) + lambda_pxl * L_pxl(D_l u D_u)
for any (lambda_semi, lambda_pxl) and any model following cast.models.protocol.SegmentationModel:
stage 1a is (0, lambda_pxl) on labeled data, 1b (1, lambda_pxl) with pseudo-labels, 2
(lambda_semi, lambda_pxl) on the student, 3 (0, 0).

Each optimizer step draws one labeled and (when D_u is used) one unlabeled micro-batch per
accumulation step from a deterministic stream (cast.training.data), so a run resumed from a
checkpoint reproduces an uninterrupted one bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cast.config import LossConfig, TrainConfig
from cast.models.outputs import SegmentationOutput
from cast.models.protocol import unwrap
from cast.training.checkpoint import (CheckpointReadError, CheckpointWriteError, load_checkpoint, load_weights,
                                      rng_state, save_checkpoint, save_model_dir, seed_all, set_rng_state)
from cast.training.data import batch_stream
from cast.utils.distributed import DistContext, all_ranks_true, barrier, broadcast_object, mean_over_ranks
from cast.training.metrics import MetricsLogger
from cast.training.objective import Objective, weighted_sum
from cast.training.optim import build_optimizer, build_scheduler
from cast.training.plots import plot_training_curves
from cast.utils.cache import require_same_settings


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the step was not applied and nothing was saved."""


@dataclass
class TrainData:
    """What a stage trains on: labeled samples and, when its objective reads them, the unlabeled
    ones (pseudo-labeled for L_semi).

    Both datasets follow cast.data.batches.InstanceTorchDataset: `[(epoch, index)]` -> one item
    (its augmentation a function of seed, epoch and index) that `collate_fn` turns into the
    batch dict of cast.structures.
    Batch sizes are global (summed over processes).
    """

    labeled: Any
    labeled_batch_size: int
    collate_fn: Callable[[list], dict]
    unlabeled: Any = None
    unlabeled_batch_size: int = 0
    num_workers: int = 0


def build_contrastive(cfg: LossConfig) -> torch.nn.Module:
    """The instance-aware pixel contrastive loss of cast.losses.contrastive, from the config."""
    from cast.losses.contrastive import PixelContrastiveLoss

    return PixelContrastiveLoss(strategy=cfg.sampler, num_negatives=cfg.num_negatives,
                                temperature_start=cfg.temperature_start, temperature_end=cfg.temperature_end)


def move_batch(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor (targets included) on `device`."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif k == "targets":
            out[k] = [{tk: tv.to(device, non_blocking=True) for tk, tv in t.items()} for t in v]
        else:
            out[k] = v
    return out


class Trainer:
    """Trains `model` for one stage into `stage_dir` (checkpoints/, model/, metrics.jsonl, plots/).

    `evaluate(model) -> {"AP": ..., "AP50": ...}` is called every `cfg.eval_every` steps on all
    ranks (it may be collective). `on_step_end(step)` runs after each finished step (after its
    checkpoint), e.g. to report progress. `settings` (json-able: what the result is a function of)
    is saved with each checkpoint; a checkpoint saved under other settings is not resumed.
    """

    def __init__(self, model: torch.nn.Module, stage: str, cfg: TrainConfig, objective: Objective,
                 data: TrainData, stage_dir: str | Path, ctx: DistContext = DistContext(), seed: int = 0,
                 contrastive: torch.nn.Module | None = None,
                 evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 on_step_end: Callable[[int], None] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        if objective.lambda_pxl > 0 and contrastive is None:
            raise ValueError(f"stage {stage}: lambda_pxl={objective.lambda_pxl} needs a contrastive loss")
        if objective.lambda_semi > 0 and data.unlabeled is None:
            raise ValueError(f"stage {stage}: lambda_semi={objective.lambda_semi} needs pseudo-labeled data")
        if data.unlabeled is not None and not objective.reads_unlabeled:
            raise ValueError(f"stage {stage}: lambda_semi = lambda_pxl = 0 reads no unlabeled images; pass none")
        self.model, self.stage, self.cfg, self.objective = model, stage, cfg, objective
        self.data, self.ctx, self.seed = data, ctx, seed
        self.contrastive, self.evaluate, self.on_step_end = contrastive, evaluate, on_step_end
        self.settings = settings
        self.stage_dir = Path(stage_dir)
        self.checkpoint_dir = self.stage_dir / "checkpoints"
        self.logger = MetricsLogger(self.stage_dir / "metrics.jsonl", enabled=ctx.is_main)
        self.use_unlabeled = data.unlabeled is not None
        self.weights = objective.term_weights(data.labeled_batch_size,
                                              data.unlabeled_batch_size if self.use_unlabeled else None)
        amp = cfg.amp if ctx.device.type == "cuda" else "none"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    # ------------------------------------------------------------------ public

    def fit(self) -> torch.nn.Module:
        """Train (resuming from the last checkpoint if there is one), save model/, return the model."""
        cfg, ctx = self.cfg, self.ctx
        model = self.model.to(ctx.device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        start = self._resume(model, optimizer, scheduler)
        self.logger.truncate_after(start)
        net = model
        if ctx.distributed and torch.distributed.is_initialized():
            # Unused parameters: the projection head gets no gradient when lambda_pxl = 0.
            net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                          find_unused_parameters=True)
        streams = self._streams(start)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=self.stage,
                   disable=not ctx.is_main, dynamic_ncols=True)
        try:
            for step in bar:
                t0 = time.perf_counter()
                model.train()
                values = self._train_step(net, optimizer, streams, step)
                scheduler.step()
                done = step + 1
                values["lr"] = optimizer.param_groups[0]["lr"]
                values = mean_over_ranks(values, ctx.device)
                values["sec_per_step"] = time.perf_counter() - t0
                evaluated = self.evaluate is not None and cfg.eval_every > 0 and done % cfg.eval_every == 0
                if evaluated:
                    values.update({f"val_{k}": v for k, v in self.evaluate(model).items()})
                if evaluated or done % cfg.log_every == 0 or done == cfg.steps:
                    self.logger.log(done, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)  # drawn at the bar's own pace
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    self._checkpoint(model, optimizer, scheduler, done)
                if self.on_step_end is not None:
                    self.on_step_end(done)
        finally:
            bar.close()
            self.logger.close()
        model.eval()
        if ctx.is_main:
            save_model_dir(model, self.stage_dir / "model")
            plot_training_curves(self.logger.path, self.stage_dir / "plots", title=self.stage)
        barrier()
        return model

    # ------------------------------------------------------------------ internals

    def _resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
        ckpt = load_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            # Dropout and stochastic depth draw from the global RNGs: seed them from the stage, or
            # the result would depend on what the process ran before (a notebook vs the CLI).
            seed_all(self.seed * 1_000_003 + self.ctx.rank)
            return 0
        if self.settings is not None:
            require_same_settings(ckpt.state.get("settings"), self.settings, self.checkpoint_dir, "saved")
        if ckpt.step > self.cfg.steps:
            raise ValueError(f"{self.checkpoint_dir}: checkpoint at step {ckpt.step} is past this stage's "
                             f"{self.cfg.steps} steps; delete the folder to retrain")
        missing = [k for k in ("optimizer", "scheduler", "scaler", "rng") if k not in ckpt.state]
        if missing or ckpt.state.get("step") != ckpt.step:
            raise CheckpointReadError(f"{ckpt.state_path}: not the training state of step {ckpt.step} (missing "
                                      f"{missing}, step {ckpt.state.get('step')!r}); delete {self.checkpoint_dir} "
                                      "to restart the stage")
        load_weights(model, ckpt.model_path)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        self.scaler.load_state_dict(ckpt.state["scaler"])
        set_rng_state(ckpt.state["rng"])
        return ckpt.step

    def _checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
        error = None
        if self.ctx.is_main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rng_state(), "settings": self.settings}
            try:
                save_checkpoint(self.checkpoint_dir, step, model, state)
            except CheckpointWriteError as e:
                error = str(e)
        # Every rank stops together when the main one cannot write.
        error = broadcast_object(error)
        if error is not None:
            raise CheckpointWriteError(f"stage {self.stage}: {error}")

    def _streams(self, start_step: int) -> dict[str, Iterator[dict]]:
        d, ctx, acc = self.data, self.ctx, self.cfg.grad_accumulation
        streams = {"labeled": batch_stream(d.labeled, d.labeled_batch_size, self.seed, d.collate_fn, ctx.rank,
                                           ctx.world_size, start_step * acc, d.num_workers)}
        if self.use_unlabeled:
            streams["unlabeled"] = batch_stream(d.unlabeled, d.unlabeled_batch_size, self.seed + 1, d.collate_fn,
                                                ctx.rank, ctx.world_size, start_step * acc, d.num_workers)
        return streams

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _train_step(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    streams: dict[str, Iterator[dict]], step: int) -> dict[str, float]:
        acc = self.cfg.grad_accumulation
        parts = list(streams)
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(acc):
            for i, part in enumerate(parts):
                batch = move_batch(next(streams[part]), self.ctx.device)
                last = micro == acc - 1 and i == len(parts) - 1
                # Gradients are all-reduced once per optimizer step, on the last backward.
                sync = contextlib.nullcontext() if last or not isinstance(net, DistributedDataParallel) else net.no_sync()
                with sync:
                    with self._autocast():
                        total, terms, diagnostics = self._part_loss(net, part, batch, step, micro)
                    self._check_finite(terms, step)
                    self.scaler.scale(total / acc).backward()
                for k, v in {**terms, **diagnostics}.items():
                    if k == "total":
                        continue
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) / acc
        self.scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        sums["loss"] = weighted_sum(sums, self.weights)
        sums["grad_norm"] = float(grad_norm)
        return sums

    def _part_loss(self, net: torch.nn.Module, part: str, batch: dict, step: int,
                   micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """Weighted loss of one micro-batch, its unweighted terms, and contrastive diagnostics."""
        term = "loss_sup" if part == "labeled" else "loss_semi"
        targets = batch["targets"] if self.weights[term] > 0 else None
        out = net(batch["pixel_values"], batch["pixel_mask"], targets)
        terms: dict[str, torch.Tensor] = {}
        if targets is not None:
            if out.loss is None:
                raise RuntimeError(f"stage {self.stage}: {type(unwrap(net)).__name__} returned no loss for targets")
            terms[term] = out.loss
        diagnostics: dict[str, float] = {}
        if self.objective.lambda_pxl > 0:
            if out.embeddings is None:
                raise RuntimeError(f"stage {self.stage}: {type(unwrap(net)).__name__} has no projection head; "
                                   "set losses.lambda_pxl=0")
            if "pixel_values_strong" not in batch:
                raise RuntimeError(f"stage {self.stage}: lambda_pxl > 0 needs batches with strong views")
            with torch.no_grad():  # the strong view is a stop-gradient target from the same model
                emb_strong = unwrap(net).pixel_embeddings(batch["pixel_values_strong"], batch["pixel_mask"])
            # Negative sampling is a pure function of (seed, step, micro, part, rank) for exact resume.
            key = ((self.seed * 1_000_003 + step) * 131 + micro) * 2 + (part == "unlabeled")
            gen = torch.Generator(device=self.ctx.device).manual_seed(key * 64 + self.ctx.rank)
            c = self.contrastive(out.embeddings, emb_strong, out.mask_logits.detach(), out.class_logits.detach(),
                                 pixel_mask=batch["pixel_mask"], progress=step / max(self.cfg.steps, 1),
                                 instance_ids=batch.get("instance_ids"), generator=gen)
            terms[f"loss_pxl_{part}"] = c.loss
            diagnostics = {f"pxl_temperature_{part}": float(c.temperature), f"pxl_margin_{part}": float(c.margin)}
            if c.false_negative_rate is not None:  # only measurable when the batch has instance ids
                diagnostics[f"pxl_false_negative_rate_{part}"] = float(c.false_negative_rate)
        # DDP expects every output to reach the loss (else it waits for gradients of e.g. the
        # projection head when lambda_pxl = 0): add them with weight 0.
        total = torch.zeros((), device=self.ctx.device) + weighted_sum(terms, self.weights)
        total = total + 0.0 * sum(t.float().mean() for t in _output_tensors(out))
        terms["total"] = total
        return total, terms, diagnostics

    def _check_finite(self, terms: dict[str, torch.Tensor], step: int) -> None:
        bad = next((k for k, v in terms.items() if not torch.isfinite(v.detach()).all()), None)
        # All ranks must agree, or the healthy ones would wait forever in the next all-reduce.
        if all_ranks_true(bad is None, self.ctx.device):
            return
        where = f"loss term '{bad}' is {float(terms[bad].detach())}" if bad else "a loss term is not finite on another process"
        raise NonFiniteLossError(f"stage {self.stage}, step {step + 1}: {where}; the step was not applied "
                                 f"and the last checkpoint in {self.checkpoint_dir} is untouched")


def _output_tensors(out: SegmentationOutput) -> list[torch.Tensor]:
    tensors = [out.class_logits, out.mask_logits] + [t for aux in out.aux_outputs for t in aux.values()]
    if out.embeddings is not None:
        tensors.append(out.embeddings)
    return [t for t in tensors if t.requires_grad]
