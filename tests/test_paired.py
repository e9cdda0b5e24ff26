"""Paired comparisons over shared trials, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from eval.paired import mcnemar_exact_p, paired_against, paired_comparison, pair_key


@pytest.mark.parametrize("b,c,expected", [
    (0, 0, 1.0),
    (5, 0, 2 / 32),            # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    (0, 5, 2 / 32),
    (6, 2, 2 * (1 + 8 + 28) / 256),
    (3, 3, 1.0),               # capped at 1
    (10, 1, 2 * (1 + 11) / 2048),
])
def test_mcnemar_exact_p(b, c, expected):
    assert math.isclose(mcnemar_exact_p(b, c), expected)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def _trial(cond: str, pid: int, scores, steered: bool = True, seed: int = 0) -> dict:
    return {"key": f"{cond}|{'steered' if steered else 'unsteered'}|p{pid}|ocean|0.5|{seed}", "condition": cond,
            "steered": steered, "level": 1.0 if steered else None,
            "attempts": [{"text": "x", "score": s} for s in scores] if scores is not None else [],
            **({"error": "judge failed"} if scores is None else {})}


def test_pairs_are_matched_by_trial_not_by_order():
    assert pair_key(_trial("adapter", 3, [10])) == pair_key(_trial("base", 3, [20]))
    adapter = [_trial("adapter", i, s) for i, s in enumerate([[10, 80], [20, 90], [30], [40, 10], [50]])]
    base = [_trial("base", i, s) for i, s in reversed(list(enumerate([[15], [25], [35], [45], [55, 60]])))]
    got = paired_comparison(adapter, base)
    assert got["n"] == 5
    multi = got["multi_attempt"]
    # adapter multi on p0, p1, p3; base multi on p4: b = 3 (adapter only), c = 1 (base only)
    assert (multi["only_a"], multi["only_b"]) == (3, 1)
    assert math.isclose(multi["difference"], (3 - 1) / 5) and math.isclose(multi["rate_a"], 0.6)
    assert math.isclose(multi["mcnemar_p"], mcnemar_exact_p(3, 1))
    esr = got["esr"]  # adapter improves on p0, p1; base on p4
    assert (esr["only_a"], esr["only_b"]) == (2, 1)
    assert math.isclose(got["first_score_difference"], -5.0)
    lo, hi = multi["difference_ci"]
    assert lo <= multi["difference"] <= hi


def test_failed_or_empty_trials_drop_their_pair():
    adapter = [_trial("adapter", 0, [10, 80]), _trial("adapter", 1, None), _trial("adapter", 2, [])]
    base = [_trial("base", 0, [15]), _trial("base", 1, [20]), _trial("base", 2, [30]), _trial("base", 9, [5])]
    assert paired_comparison(adapter, base)["n"] == 1


def test_every_condition_against_the_base_steered_and_unsteered_apart():
    trials = [_trial("base", 0, [10]), _trial("adapter", 0, [10, 90]), _trial("base", 0, [50], steered=False),
              _trial("adapter", 0, [50, 60], steered=False), _trial("base+metaprompt:notice", 0, [12])]
    got = paired_against(trials, ["base", "base+metaprompt:notice", "adapter"])
    assert set(got) == {"adapter vs base", "base+metaprompt:notice vs base"}
    assert got["adapter vs base"]["steered"]["n"] == 1 and got["adapter vs base"]["unsteered"]["n"] == 1
    assert got["adapter vs base"]["unsteered"]["multi_attempt"]["only_a"] == 1
    assert paired_against(trials, ["adapter"]) == {}


def test_identical_conditions_differ_by_nothing():
    """An empty intervention: the same trials under two names give zero difference, p = 1."""
    base = [_trial("base", i, s) for i, s in enumerate([[10, 80], [20], [30, 10]])]
    twin = [{**t, "condition": "twin", "key": "twin|" + pair_key(t)} for t in base]
    got = paired_comparison(twin, base)
    for metric in ("multi_attempt", "esr", "drift_restart"):
        assert got[metric]["difference"] == 0 and got[metric]["mcnemar_p"] == 1.0
    assert got["first_score_difference"] == 0
