"""TRL's fused LM head with only the labelled positions projected (esr_train.speed.labelled_head):
the same loss and gradients as TRL's every-position CPU path, from fewer rows through the head."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile
from trl.trainer.utils import add_fused_lm_head

from esr_train.speed.labelled_head import labelled_positions_only
from tests.conftest import tiny_llama


def _loss_grads_and_head_rows(model, ids, labels):
    model.zero_grad()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
    rows = [e.input_shapes[0][0] for e in prof.events() if e.name == "ChunkedLogProbFunction"]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return out.loss.detach(), grads, rows


def test_only_labelled_positions_reach_the_head_and_nothing_else_changes():
    model = tiny_llama().train()
    add_fused_lm_head(model)
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100  # a masked prompt and distraction
    labels[2, 8:] = -100  # and one row with nothing to learn
    labelled = int((labels[:, 1:] != -100).sum())

    loss_all, grads_all, rows_all = _loss_grads_and_head_rows(model, ids, labels)
    with labelled_positions_only() as switched:
        loss_few, grads_few, rows_few = _loss_grads_and_head_rows(model, ids, labels)

    assert switched  # the installed TRL still has the switch this module sets
    assert rows_all == [3 * 11] and rows_few == [labelled]
    torch.testing.assert_close(loss_few, loss_all)
    for a, b in zip(grads_few, grads_all, strict=True):
        torch.testing.assert_close(a, b)
    # the switch is put back after the block
    assert _loss_grads_and_head_rows(model, ids, labels)[2] == [3 * 11]
