"""The training engine on a tiny model that follows the SegmentationModel protocol: optimizer
groups, poly schedule, the unified objective's terms, gradient accumulation, NaN handling.

The tiny model, data set and contrastive loss defined here are reused by the checkpoint and
distributed tests (`from test_training import ...`)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model

from cast.config import TrainConfig
from cast.losses.contrastive import PixelContrastiveLoss
from cast.models.outputs import SegmentationOutput
from cast.structures import Instances
from cast.training.checkpoint import load_checkpoint
from cast.training.metrics import read_metrics
from cast.training.optim import build_optimizer, build_scheduler, poly_factor
from cast.training.objective import Objective
from cast.training.trainer import NonFiniteLossError, TrainData, Trainer

NUM_CLASSES, SIZE = 2, 16


class TinySegModel(torch.nn.Module):
    """A few thousand parameters; its loss matches query i to target i (no Hungarian step)."""

    def __init__(self, queries: int = 3, dim: int = 8, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.classes = [f"class{i}" for i in range(NUM_CLASSES)]
        self.backbone = torch.nn.Conv2d(3, dim, 4, stride=4)
        self.query = torch.nn.Parameter(torch.randn(queries, dim))
        self.class_head = torch.nn.Linear(dim, NUM_CLASSES + 1)
        self.proj = torch.nn.Conv2d(dim, 8, 1)
        self.dropout = torch.nn.Dropout(0.1)  # makes RNG state part of what resume must restore
        self.nan_at_call, self.calls = nan_at_call, 0

    def _features(self, pixel_values):
        return self.dropout(torch.relu(self.backbone(pixel_values * 2 - 1)))

    def pixel_embeddings(self, pixel_values, pixel_mask=None):
        return self.proj(self._features(pixel_values))

    def forward(self, pixel_values, pixel_mask=None, targets=None) -> SegmentationOutput:
        feats = self._features(pixel_values)
        mask_logits = torch.einsum("qd,bdhw->bqhw", self.query, feats)
        pooled = torch.einsum("bqhw,bdhw->bqd", mask_logits.sigmoid(), feats) / feats[0, 0].numel()
        class_logits = self.class_head(pooled + self.query)
        out = SegmentationOutput(class_logits=class_logits, mask_logits=mask_logits, embeddings=self.proj(feats))
        if targets is not None:
            self.calls += 1
            out.loss = self._loss(class_logits, mask_logits, targets)
            if self.nan_at_call is not None and self.calls >= self.nan_at_call:
                out.loss = out.loss * float("nan")
        return out

    def _loss(self, class_logits, mask_logits, targets) -> torch.Tensor:
        losses = []
        q = class_logits.shape[1]
        for b, t in enumerate(targets):
            k = min(len(t["labels"]), q)
            labels = torch.full((q,), NUM_CLASSES, dtype=torch.long)
            labels[:k] = t["labels"][:k]
            loss = F.cross_entropy(class_logits[b], labels)
            if k:
                tm = F.interpolate(t["masks"][None, :k], size=mask_logits.shape[-2:], mode="area")[0]
                loss = loss + F.binary_cross_entropy_with_logits(mask_logits[b, :k], tm)
            losses.append(loss)
        return torch.stack(losses).mean()

    @torch.no_grad()
    def predict(self, pixel_values, pixel_mask=None, image_sizes=None, orig_sizes=None) -> list[Instances]:
        out = self.forward(pixel_values)
        masks = F.interpolate(out.mask_logits, size=pixel_values.shape[-2:], mode="bilinear") > 0
        probs = out.class_logits.softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        return [Instances(masks[b], labels[b], scores[b]) for b in range(len(masks))]

    def parameter_groups(self, lr, weight_decay, backbone_lr_multiplier) -> list[dict]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        return [{"params": backbone, "lr": lr * backbone_lr_multiplier, "weight_decay": weight_decay},
                {"params": rest, "lr": lr, "weight_decay": weight_decay}]

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"classes": self.classes}))


class TinyDataset:
    """Random images with one or two box instances; the augmentation (a flip) and the strong
    view's brightness are pure functions of (seed, epoch, index), keyed like InstanceTorchDataset."""

    def __init__(self, n: int = 12, seed: int = 0, with_targets: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, SIZE, SIZE, generator=g)
        self.seed, self.with_targets = seed, with_targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        g = torch.Generator().manual_seed((self.seed * 1000 + epoch) * 1000 + i)
        img = self.images[i]
        masks = torch.zeros(1 + i % 2, SIZE, SIZE)
        masks[0, :8, :8] = 1
        if len(masks) > 1:
            masks[1, 8:, 4:12] = 1
        if torch.rand((), generator=g) < 0.5:
            img, masks = img.flip(-1), masks.flip(-1)
        strong = (img * (0.6 + 0.8 * torch.rand((), generator=g))).clamp(0, 1)
        labels = torch.arange(len(masks)) % NUM_CLASSES
        return {"image": img, "strong": strong, "masks": masks if self.with_targets else masks[:0],
                "labels": labels if self.with_targets else labels[:0], "image_id": i}


def collate(items: list[dict]) -> dict:
    ids = torch.full((len(items), SIZE, SIZE), -1, dtype=torch.long)
    for b, it in enumerate(items):
        for k in range(len(it["masks"])):
            ids[b][it["masks"][k] > 0] = k
    return {"pixel_values": torch.stack([it["image"] for it in items]),
            "pixel_values_strong": torch.stack([it["strong"] for it in items]),
            "pixel_mask": torch.ones(len(items), SIZE, SIZE, dtype=torch.bool),
            "targets": [{"masks": it["masks"], "labels": it["labels"]} for it in items],
            "instance_ids": ids, "image_ids": [it["image_id"] for it in items],
            "image_sizes": [(SIZE, SIZE)] * len(items), "orig_sizes": [(SIZE, SIZE)] * len(items)}


class TinyContrastive(torch.nn.Module):
    """InfoNCE with uniformly drawn negatives; records what it was given."""

    def __init__(self, num_negatives: int = 4) -> None:
        super().__init__()
        self.num_negatives, self.seen = num_negatives, []

    def forward(self, emb_weak, emb_strong, mask_logits, class_logits, pixel_mask=None, progress=0.0,
                instance_ids=None, generator=None):
        self.seen.append({"weak_grad": emb_weak.requires_grad, "strong_grad": emb_strong.requires_grad,
                          "mask_grad": mask_logits.requires_grad, "class_grad": class_logits.requires_grad,
                          "progress": progress})
        zw = F.normalize(emb_weak.flatten(2).transpose(1, 2).reshape(-1, emb_weak.shape[1]), dim=-1)
        zs = F.normalize(emb_strong.flatten(2).transpose(1, 2).reshape(-1, emb_strong.shape[1]), dim=-1)
        t = 0.5 - 0.3 * progress
        idx = torch.randint(0, len(zw), (len(zw), self.num_negatives), generator=generator, device=zw.device)
        pos = (zw * zs).sum(-1, keepdim=True) / t
        neg = torch.einsum("nd,nrd->nr", zw, zw[idx]) / t
        loss = -torch.log_softmax(torch.cat([pos, neg], 1), 1)[:, 0].mean()
        return SimpleNamespace(loss=loss, temperature=t, margin=0.0, false_negative_rate=0.0,
                               pos_distance=0.0, neg_distance=0.0)


def make_trainer(tmp: Path, steps: int = 6, objective: Objective = Objective(), model: TinySegModel | None = None,
                 contrastive: torch.nn.Module | None = None, **cfg_kwargs) -> Trainer:
    cfg = TrainConfig(**{"steps": steps, "lr": 1e-2, "weight_decay": 0.01, "backbone_lr_multiplier": 0.5,
                         "warmup_steps": 1, "clip_grad_norm": 1.0, "checkpoint_every": 2, **cfg_kwargs})
    data = TrainData(labeled=TinyDataset(10, seed=1), labeled_batch_size=4, collate_fn=collate,
                     unlabeled=TinyDataset(7, seed=2) if objective.reads_unlabeled else None, unlabeled_batch_size=2)
    if contrastive is None and objective.lambda_pxl > 0:
        contrastive = PixelContrastiveLoss(num_negatives=8)  # the real loss and its debiased sampler
    return Trainer(model or TinySegModel(), "teacher_adaptation", cfg, objective, data, tmp, seed=3,
                   contrastive=contrastive)


# ----------------------------------------------------------------------------- optimizer


def test_poly_factor_values():
    assert poly_factor(0, 10, 0, 1.0) == 1.0
    assert poly_factor(5, 10, 0, 1.0) == pytest.approx(0.5)
    assert poly_factor(10, 10, 0, 1.0) == 0.0
    assert poly_factor(5, 10, 0, 0.9) == pytest.approx(0.5 ** 0.9)
    # warm-up: 1/2, 2/2, then decay over the remaining 8 steps
    assert [poly_factor(s, 10, 2, 1.0) for s in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_optimizer_groups_and_schedule():
    model = TinySegModel()
    model.class_head.weight.requires_grad_(False)  # frozen parameters are not optimised
    cfg = TrainConfig(steps=4, lr=0.1, weight_decay=0.05, backbone_lr_multiplier=0.1, warmup_steps=0, poly_power=1.0)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.01, 0.1])
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.class_head.weight) not in params and id(model.class_head.bias) in params
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [s[1] for s in seen] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert [s[0] for s in seen] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])


# ----------------------------------------------------------------------------- trainer


def test_supervised_stage_learns_and_writes_its_folder(tmp_path):
    trainer = make_trainer(tmp_path, steps=25, checkpoint_every=10, warmup_steps=0, lr=3e-2)
    trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 26))
    assert {"loss", "loss_sup", "lr", "grad_norm"} <= set(records[0])
    assert not any(k.startswith("loss_semi") or k.startswith("loss_pxl") for k in records[0])
    first = sum(r["loss_sup"] for r in records[:3]) / 3
    last = sum(r["loss_sup"] for r in records[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    assert load_checkpoint(tmp_path / "checkpoints").step == 25
    # The same curves for TensorBoard, beside metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    assert {"loss/loss", "loss/loss_sup", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("loss/loss_sup")
    assert [e.step for e in logged] == list(range(1, 26))
    assert [e.value for e in logged] == pytest.approx([r["loss_sup"] for r in records], rel=1e-6)


def test_a_stage_does_not_depend_on_what_the_process_drew_before(tmp_path):
    """Dropout draws from the global RNG: a notebook kernel and the CLI reach a stage with
    different RNG states, and must still train the same weights."""
    weights = []
    for i, earlier_seed in enumerate((1, 12345)):
        torch.manual_seed(0)
        model = TinySegModel()
        torch.manual_seed(earlier_seed)
        torch.rand(17)  # whatever ran before the stage
        make_trainer(tmp_path / str(i), steps=3, model=model).fit()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_unified_objective_terms_and_stop_gradient(tmp_path):
    contrastive = TinyContrastive()
    trainer = make_trainer(tmp_path, steps=2, objective=Objective(lambda_semi=0.5, lambda_pxl=0.2),
                           contrastive=contrastive)
    trainer.fit()
    rec = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for key in ("loss_sup", "loss_semi", "loss_pxl_labeled", "loss_pxl_unlabeled", "pxl_temperature_labeled"):
        assert key in rec
    # labeled batch 4, unlabeled 2: L_pxl is a mean over the pixels of D_l u D_u
    expected = (rec["loss_sup"] + 0.5 * rec["loss_semi"]
                + 0.2 * (4 / 6 * rec["loss_pxl_labeled"] + 2 / 6 * rec["loss_pxl_unlabeled"]))
    assert rec["loss"] == pytest.approx(expected, rel=1e-5)
    assert len(contrastive.seen) == 4  # 2 steps x (labeled, unlabeled)
    for s in contrastive.seen:
        assert s["weak_grad"] and not s["strong_grad"] and not s["mask_grad"] and not s["class_grad"]
    assert contrastive.seen[-1]["progress"] == pytest.approx(0.5)


def test_pixel_loss_on_unlabeled_data_without_semi(tmp_path):
    """lambda_semi = 0 with unlabeled data: D_u feeds only L_pxl and needs no pseudo-labels."""
    trainer = make_trainer(tmp_path, steps=1, objective=Objective(lambda_semi=0.0, lambda_pxl=0.1))
    trainer.data.unlabeled = TinyDataset(5, seed=4, with_targets=False)
    trainer.fit()
    rec = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert "loss_pxl_unlabeled" in rec and "loss_semi" not in rec


def test_gradient_accumulation_matches_a_large_batch(tmp_path):
    def run(folder, batch, acc):
        torch.manual_seed(0)
        model = TinySegModel()
        model.dropout.p = 0.0
        trainer = make_trainer(tmp_path / folder, steps=3, model=model, grad_accumulation=acc)
        trainer.data.labeled_batch_size = batch
        return trainer.fit().state_dict()

    big, small = run("big", 4, 1), run("acc", 2, 2)
    for k in big:
        torch.testing.assert_close(big[k], small[k], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    model = TinySegModel(nan_at_call=3)  # the labeled loss of step 3 is NaN
    trainer = make_trainer(tmp_path, steps=6, model=model, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"stage teacher_adaptation, step 3: loss term 'loss_sup' is nan"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "checkpoints")
    assert ckpt.step == 2
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(ckpt.model_path).values())
    assert not (tmp_path / "model").exists()


def test_trainer_refuses_an_objective_it_cannot_compute(tmp_path):
    with pytest.raises(ValueError, match="lambda_pxl"):
        Trainer(TinySegModel(), "s", TrainConfig(steps=1), Objective(lambda_pxl=0.1),
                TrainData(TinyDataset(), 2, collate), tmp_path)
    with pytest.raises(ValueError, match="pseudo-labeled"):
        Trainer(TinySegModel(), "s", TrainConfig(steps=1), Objective(lambda_semi=1.0),
                TrainData(TinyDataset(), 2, collate), tmp_path)


def test_diagnostics_of_several_stages_share_one_figure(tmp_path):
    from cast.training.plots import _diagnostics_figure, plot_diagnostics

    for name, margin in (("uniform", 0.1), ("fusion", 0.3)):
        lines = [json.dumps({"step": s, "pxl_margin_labeled": margin * s, "pxl_margin_unlabeled": margin,
                             "pxl_false_negative_rate_unlabeled": 0.5 - margin}) for s in (1, 2, 3)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    metrics = {name: tmp_path / f"{name}.jsonl" for name in ("uniform", "fusion")}
    assert plot_diagnostics({n: [p] for n, p in metrics.items()}, tmp_path / "samplers.png", "t").read_bytes()[:4] \
        == b"\x89PNG"
    margin, fnr = _diagnostics_figure({n: read_metrics(p) for n, p in metrics.items()}, "t").axes
    assert [line.get_label() for line in margin.lines] == ["uniform labeled", "uniform unlabeled",
                                                          "fusion labeled", "fusion unlabeled"]
    assert list(margin.lines[2].get_ydata()) == pytest.approx([0.3, 0.6, 0.9])
    assert [line.get_label() for line in fnr.lines] == ["uniform unlabeled", "fusion unlabeled"]
    smoothed = _diagnostics_figure({"fusion": read_metrics(metrics["fusion"])}, "t", window=2).axes[0].lines[0]
    assert list(smoothed.get_xdata()) == [2, 3] and list(smoothed.get_ydata()) == pytest.approx([0.45, 0.75])
    (tmp_path / "none.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert plot_diagnostics({"sup": [tmp_path / "none.jsonl"]}, tmp_path / "none.png", "t") is None


def test_the_seeds_of_a_stage_are_averaged_step_by_step():
    from cast.training.plots import mean_records

    seeds = [[{"step": 1, "pxl_margin_unlabeled": 0.2, "loss": 3.0}, {"step": 2, "pxl_margin_unlabeled": 0.4}],
             [{"step": 1, "pxl_margin_unlabeled": 0.6, "loss": None}, {"step": 2, "pxl_margin_unlabeled": 0.8},
              {"step": 3, "pxl_margin_unlabeled": 1.0}, {"event": "no step"}]]
    assert mean_records(seeds) == [{"step": 1, "pxl_margin_unlabeled": pytest.approx(0.4), "loss": 3.0},
                                   {"step": 2, "pxl_margin_unlabeled": pytest.approx(0.6)},
                                   {"step": 3, "pxl_margin_unlabeled": 1.0}]
    assert mean_records([seeds[0]]) == seeds[0]  # one seed: its own records
