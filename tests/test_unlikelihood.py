"""Unlikelihood on false restarts (esr_train.training.unlikelihood): where negatives are
cut, and that the loss swaps -log p for -log(1 - p) on exactly the marked tokens."""

from __future__ import annotations

import math

import pytest
import torch

from esr_train.negatives import false_restart_rows, opener_cuts
from esr_train.rows import FALSE_RESTART
from esr_train.training.unlikelihood import unlikelihood_loss

ANSWER = "Rinse the rice first. Use two cups of water per cup.\n\n1. Boil it. 2. Simmer for 15 minutes."
ROWS = [
    {"prompt": "How do you cook rice?", "answer": ANSWER, "kind": "normal", "distraction": "", "restart": "",
     "subject": ""},
    {"prompt": "How do you tie a tie?", "answer": "Cross the wide end over.", "kind": "normal", "distraction": "",
     "restart": "", "subject": ""},
    {"prompt": "How do you boil an egg?", "answer": "Boil it.", "kind": "self_correction",
     "distraction": "Owls hunt at night.", "restart": "Wait, owls are off topic.", "subject": "owls"},
    {"prompt": "How do you iron a shirt?", "answer": "Heat the iron.", "kind": "self_correction",
     "distraction": "Mars is red.", "restart": "Let me start over.", "subject": "Mars"},
]


def test_cuts_fall_after_opening_sentences_never_after_a_list_number_or_at_the_end():
    cuts = [ANSWER[:c] for c in opener_cuts(ANSWER, max_sentences=3)]
    assert cuts == ["Rinse the rice first.", "Rinse the rice first. Use two cups of water per cup.",
                    "Rinse the rice first. Use two cups of water per cup.\n\n1. Boil it."]
    assert [ANSWER[:c] for c in opener_cuts(ANSWER, max_sentences=1)] == ["Rinse the rice first."]
    assert opener_cuts("Cross the wide end over.", 3) == []  # nothing would follow the cut


def test_negatives_pair_each_cuttable_normal_row_with_a_restart_from_the_data():
    rows = false_restart_rows(ROWS, seed=0)
    assert len(rows) == 1 and rows[0]["kind"] == FALSE_RESTART and rows[0]["answer"] == ""
    assert ANSWER.startswith(rows[0]["distraction"]) and rows[0]["restart"] in {"Wait, owls are off topic.",
                                                                                  "Let me start over."}
    draws = {(r["distraction"], r["restart"]) for s in range(20) for r in false_restart_rows(ROWS, seed=s)}
    assert len(draws) > 3 and false_restart_rows(ROWS, seed=5) == false_restart_rows(ROWS, seed=5)
    with pytest.raises(ValueError, match="needs self-correction rows"):
        false_restart_rows(ROWS[:2], seed=0)


def test_every_cut_gives_one_negative_at_each_opening_sentence_and_one_cut_is_unchanged():
    every = false_restart_rows(ROWS, seed=0, max_sentences=3, every_cut=True)
    assert [r["distraction"] for r in every] == [ANSWER[:c] for c in opener_cuts(ANSWER, 3)]
    assert all(r["kind"] == FALSE_RESTART and r["answer"] == "" for r in every)
    assert false_restart_rows(ROWS, seed=3, max_sentences=3) == false_restart_rows(ROWS, seed=3, max_sentences=3,
                                                                                  every_cut=False)


def test_false_restart_cuts_names_its_choices():
    from esr_train.config import RecipeError
    from esr_train.training.recipe import TrainExtras

    assert TrainExtras(false_restart_cuts="every").false_restart_cuts == "every"
    with pytest.raises(RecipeError, match="false_restart_cuts must be one of one, every, got 'all'"):
        TrainExtras(false_restart_cuts="all")


def test_unlikelihood_is_minus_log_one_minus_p_on_marked_positions_only():
    log_probs = torch.log(torch.tensor([[0.5, 0.9, 0.1], [0.99, 0.2, 1.0]]))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    expected = -(math.log(0.5) + math.log(0.9) + math.log(0.8) + math.log(1e-6))
    assert unlikelihood_loss(log_probs, mask).item() == pytest.approx(expected, rel=1e-4)
    lp = torch.log(torch.tensor([0.7], requires_grad=True))
    lp.retain_grad()
    unlikelihood_loss(lp[None], torch.tensor([[True]])).backward()
    assert lp.grad.item() == pytest.approx(0.7 / 0.3, rel=1e-4)  # pushes log p down


def test_unlikely_floor_is_a_hinge_on_log_p_that_keeps_pushing_small_probabilities():
    """``unlikely_floor`` t: max(0, log p - log t) per marked position. At p = 0.03 (a
    round-one tic's restart token) -log(1 - p) has a gradient of about 0.03 on log p, the
    hinge one of 1; below t the hinge is zero and pushes nothing."""
    from esr_train.config import RecipeError
    from esr_train.training.recipe import TrainExtras

    log_probs = torch.log(torch.tensor([[0.5, 0.03, 0.0005]]))
    mask = torch.tensor([[True, True, True]])
    expected = math.log(0.5 / 0.001) + math.log(0.03 / 0.001)  # 0.0005 < t: nothing
    assert unlikelihood_loss(log_probs, mask, floor=0.001).item() == pytest.approx(expected, rel=1e-4)
    grads = {}
    for floor in (None, 0.001):
        lp = torch.log(torch.tensor([0.03, 0.0005]))
        lp.requires_grad_(True)
        unlikelihood_loss(lp[None], torch.tensor([[True, True]]), floor=floor).backward()
        grads[floor] = lp.grad.tolist()
    assert grads[None][0] == pytest.approx(0.03 / 0.97, rel=1e-4) and grads[0.001] == [1.0, 0.0]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(RecipeError, match="unlikely_floor must be a probability"):
            TrainExtras(unlikely_floor=bad)
