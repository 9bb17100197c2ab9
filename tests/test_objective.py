"""The loss the trainer backpropagates is the paper's unified objective
J = L_sup + lambda_semi * L_semi + lambda_pxl * L_pxl, written out here by hand with the real
PixelContrastiveLoss: same gradient. And the term weights, decided in one place."""
from __future__ import annotations

import copy

import pytest
import torch

from cast.losses.contrastive import PixelContrastiveLoss
from cast.training.objective import Objective, weighted_sum
from test_training import TinySegModel, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
LAMBDA_SEMI, LAMBDA_PXL = 0.5, 0.2


class Recording(PixelContrastiveLoss):
    """The real loss, remembering the state of the generator each call drew its negatives with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.states: list[torch.Tensor] = []

    def forward(self, *args, generator=None, **kwargs):
        self.states.append(generator.get_state().clone())
        return super().forward(*args, generator=generator, **kwargs)


def test_the_trainer_backpropagates_the_hand_written_objective(tmp_path):
    torch.manual_seed(0)
    model = TinySegModel()
    model.dropout.p = 0.0  # the hand computation must see the same forward
    start = copy.deepcopy(model)
    contrastive = Recording(strategy="fusion", num_negatives=8)
    # lr 0 and no clipping: one step leaves the weights as they were and the gradient in .grad.
    trainer = make_trainer(tmp_path, steps=1, objective=Objective(LAMBDA_SEMI, LAMBDA_PXL), model=model,
                           contrastive=contrastive, lr=0.0, weight_decay=0.0, clip_grad_norm=0.0, warmup_steps=0)
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))

    streams = trainer._streams(0)
    labeled, unlabeled = next(streams["labeled"]), next(streams["unlabeled"])
    loss = PixelContrastiveLoss(strategy="fusion", num_negatives=8)
    start.train()

    def part(batch: dict, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = start(batch["pixel_values"], batch["pixel_mask"], batch["targets"])
        with torch.no_grad():
            strong = start.pixel_embeddings(batch["pixel_values_strong"], batch["pixel_mask"])
        pixel = loss(out.embeddings, strong, out.mask_logits.detach(), out.class_logits.detach(),
                     pixel_mask=batch["pixel_mask"], progress=0.0, instance_ids=batch["instance_ids"],
                     generator=torch.Generator().set_state(state))
        return out.loss, pixel.loss

    l_sup, pxl_labeled = part(labeled, contrastive.states[0])
    l_semi, pxl_unlabeled = part(unlabeled, contrastive.states[1])
    b_l, b_u = trainer.data.labeled_batch_size, trainer.data.unlabeled_batch_size
    # L_pxl is one mean over the pixels of D_l u D_u: each part by its share of the images.
    l_pxl = (b_l * pxl_labeled + b_u * pxl_unlabeled) / (b_l + b_u)
    objective = l_sup + LAMBDA_SEMI * l_semi + LAMBDA_PXL * l_pxl
    params = [p for p in start.parameters()]
    expected = torch.autograd.grad(objective, params)
    got = [p.grad for p in model.parameters()]
    assert all(g is not None for g in got)
    for name, a, b in zip([n for n, _ in model.named_parameters()], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in expected)


def test_term_weights_follow_the_objective():
    objective = Objective(lambda_semi=0.5, lambda_pxl=0.2)
    assert objective.term_weights(4, 2) == pytest.approx(
        {"loss_sup": 1.0, "loss_semi": 0.5, "loss_pxl_labeled": 0.2 * 4 / 6, "loss_pxl_unlabeled": 0.2 * 2 / 6})
    assert objective.term_weights(4, None) == {"loss_sup": 1.0, "loss_pxl_labeled": 0.2}
    assert weighted_sum({"loss_sup": 2.0, "loss_pxl_labeled": 10.0, "lr": 1.0}, objective.term_weights(4, None)) \
        == pytest.approx(4.0)
    assert Objective(0.0, 0.0).reads_unlabeled is False and Objective(0.0, 0.1).reads_unlabeled
