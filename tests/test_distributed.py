"""Two CPU processes (gloo, DDP) agree with one process on the same global batch, and the
deterministic stream shards each global batch across ranks without overlap."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cast.training.data import StreamBatchSampler, epoch_permutation
from cast.utils.distributed import DistContext, all_gather_objects, cleanup, init_distributed, shard
from cast.training.objective import Objective
from test_training import TinySegModel, make_trainer

OBJECTIVE = Objective(lambda_semi=0.5, lambda_pxl=0.0)
# With L_pxl each process draws its anchors' negatives from its own share of the batch (as the
# sampler sees it), so a DDP step is the mean of the ranks' objectives, not one process's.
PXL_OBJECTIVE = Objective(lambda_semi=0.5, lambda_pxl=0.2)
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> TinySegModel:
    torch.manual_seed(0)
    model = TinySegModel()
    model.dropout.p = 0.0  # dropout masks differ per process by design
    return model


def _worker(rank: int, world_size: int, port: int, folder: str, objective: Objective, steps: int,
            train: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        trainer = make_trainer(Path(folder), steps=steps, objective=objective, model=_model(), checkpoint_every=2,
                               **train)
        trainer.ctx = ctx
        trainer.logger.enabled = ctx.is_main
        model = trainer.fit()
        gathered = all_gather_objects({**{k: v.clone() for k, v in model.state_dict().items()},
                                       **{f"grad.{k}": p.grad.clone() for k, p in model.named_parameters()
                                          if p.grad is not None}})
        if ctx.is_main:
            torch.save(gathered, Path(folder) / "weights.pt")
    finally:
        cleanup()


def _ddp(folder: Path, objective: Objective, steps: int, **train) -> list[dict]:
    mp.spawn(_worker, args=(2, _free_port(), str(folder), objective, steps, train), nprocs=2, join=True)
    return torch.load(folder / "weights.pt", weights_only=True)


def test_stream_shards_each_global_batch_across_ranks():
    n, batch = 5, 4
    single = StreamBatchSampler(n, batch, seed=3)
    ranks = [StreamBatchSampler(n, batch, seed=3, rank=r, world_size=2) for r in range(2)]
    it1, its = iter(single), [iter(s) for s in ranks]
    for _ in range(4):  # crosses epoch boundaries (5 samples, batches of 4)
        full = next(it1)
        parts = [next(it) for it in its]
        assert sorted(parts[0] + parts[1]) == sorted(full)
        assert not set(parts[0]) & set(parts[1])
    # positions 0..7 of the stream: epoch 0 in full, then the first three of epoch 1
    stream = iter(StreamBatchSampler(n, batch, seed=3))
    batches = [next(stream) for _ in range(3)]
    flat = batches[0] + batches[1]
    assert [i for _, i in flat[:5]] == epoch_permutation(n, 3, 0) and all(e == 0 for e, _ in flat[:5])
    assert [i for _, i in flat[5:]] == epoch_permutation(n, 3, 1)[:3] and all(e == 1 for e, _ in flat[5:])
    # resuming at micro-batch 2 yields what the uninterrupted stream yields third
    assert next(iter(StreamBatchSampler(n, batch, seed=3, start=2))) == batches[2]


def test_stream_needs_a_batch_divisible_by_the_processes():
    with pytest.raises(ValueError, match="not divisible"):
        StreamBatchSampler(10, 3, seed=0, rank=0, world_size=2)


def test_shard_and_gather_without_a_process_group():
    items = list(range(7))
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items
    assert all_gather_objects("x") == ["x"]
    assert init_distributed("cpu") == DistContext()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_processes_agree_with_one_process(tmp_path):
    single = make_trainer(tmp_path / "single", steps=STEPS, objective=OBJECTIVE, model=_model(),
                          checkpoint_every=2).fit().state_dict()
    per_rank = _ddp(tmp_path / "ddp", OBJECTIVE, STEPS)
    for k in single:
        torch.testing.assert_close(per_rank[0][k], per_rank[1][k], rtol=0, atol=0)  # replicas identical
        torch.testing.assert_close(per_rank[0][k], single[k], rtol=1e-4, atol=1e-5)
    # and the weights actually moved
    assert not torch.allclose(_model().query, single["query"])


@pytest.mark.distributed
@pytest.mark.slow
def test_with_the_pixel_loss_a_ddp_step_is_the_mean_of_the_ranks_objectives(tmp_path):
    """The real negative sampler and lambda_pxl > 0 under DDP: each process's gradient is that of
    its shard's objective (its negatives drawn from its shard, by its own generator), the
    all-reduce averages them, and the replicas stay identical over several steps."""
    # lr 0 and no clipping: after one step, .grad holds the all-reduced gradient of the first batch.
    ddp = _ddp(tmp_path / "ddp", PXL_OBJECTIVE, steps=1, lr=0.0, clip_grad_norm=0.0)
    per_rank = []
    for rank in range(2):  # each rank's share, computed alone (no process group: nothing is averaged)
        model = _model()
        trainer = make_trainer(tmp_path / f"rank{rank}", steps=1, objective=PXL_OBJECTIVE, model=model, lr=0.0,
                               clip_grad_norm=0.0)
        trainer.ctx = DistContext(rank=rank, world_size=2)
        trainer.fit()
        assert type(trainer.contrastive).__name__ == "PixelContrastiveLoss"
        per_rank.append({k: p.grad for k, p in model.named_parameters()})
    for k in per_rank[0]:
        expected = (per_rank[0][k] + per_rank[1][k]) / 2
        torch.testing.assert_close(ddp[0][f"grad.{k}"], expected, rtol=1e-5, atol=1e-7, msg=k)
        torch.testing.assert_close(ddp[1][f"grad.{k}"], expected, rtol=1e-5, atol=1e-7, msg=k)
    assert not torch.equal(per_rank[0]["query"], per_rank[1]["query"])  # the shards differ: the test bites
    trained = _ddp(tmp_path / "ddp3", PXL_OBJECTIVE, steps=STEPS)
    for k in _model().state_dict():
        torch.testing.assert_close(trained[0][k], trained[1][k], rtol=0, atol=0)
    assert not torch.allclose(_model().query, trained[0]["query"])
