"""Paired comparisons between conditions over the trials they share.

Two conditions share a trial when they ran the same (prompt, direction, strength, seed,
steered or not): with per-trial seeds (``eval.harness.trial_seed``) such twins also share
their random draws, so the difference between them is the condition's effect on the same
draw, and a paired test has more power than two unpaired intervals.

For a rate (multi-attempt, ESR) over n shared trials: ``b`` trials where only the first
condition has the event, ``c`` where only the second has it; the difference in rates is
(b - c) / n with a bootstrap interval over the pairs, and McNemar's exact test (a two-sided
binomial test of b against b + c at one half) gives the p-value. For the first-attempt score,
the mean paired difference with a bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb
from typing import Any

from eval.metrics import DRIFT_SCORE, _scores, bootstrap_mean_interval


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 for none)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def pair_key(trial: Mapping[str, Any]) -> str:
    """A trial's identity without its condition: the part of its key after the condition."""
    return str(trial["key"]).split("|", 1)[1]


def _flags(scores: list[float]) -> dict[str, bool]:
    multi = len(scores) >= 2
    return {"multi_attempt": multi, "esr": multi and scores[-1] > scores[0],
            "drift_restart": multi and scores[0] < DRIFT_SCORE}


def _rate_difference(a: list[bool], b: list[bool]) -> dict[str, Any]:
    n = len(a)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    lo, hi = bootstrap_mean_interval(diffs)
    return {"rate_a": sum(a) / n if n else None, "rate_b": sum(b) / n if n else None,
            "only_a": only_a, "only_b": only_b, "difference": (only_a - only_b) / n if n else None,
            "difference_ci": [lo, hi] if n else None, "mcnemar_p": mcnemar_exact_p(only_a, only_b)}


def paired_comparison(trials_a: Sequence[Mapping[str, Any]], trials_b: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Condition A against condition B over the trials both judged with at least one
    attempt (judge errors and empty answers on either side drop the pair): n, and per
    metric the two rates, the discordant counts, the difference A - B with its interval
    and McNemar's p; the mean first-score difference A - B with its interval."""
    b_by_key = {pair_key(t): t for t in trials_b}
    pairs = []
    for ta in trials_a:
        tb = b_by_key.get(pair_key(ta))
        sa, sb = _scores(ta), (_scores(tb) if tb is not None else None)
        if sa and sb:
            pairs.append((sa, sb))
    fa, fb = [_flags(s) for s, _ in pairs], [_flags(s) for _, s in pairs]
    first = [sa[0] - sb[0] for sa, sb in pairs]
    lo, hi = bootstrap_mean_interval(first)
    out: dict[str, Any] = {"n": len(pairs)}
    for metric in ("multi_attempt", "esr", "drift_restart"):
        out[metric] = _rate_difference([f[metric] for f in fa], [f[metric] for f in fb])
    out["first_score_difference"] = sum(first) / len(first) if first else None
    out["first_score_difference_ci"] = [lo, hi] if first else None
    return out


def paired_against(trials: Sequence[Mapping[str, Any]], conditions: Sequence[str], reference: str = "base",
                   level: Any = None) -> dict[str, Any]:
    """Every other condition paired against ``reference``, steered trials (at ``level`` when
    given) and unsteered controls apart: {"CONDITION vs REFERENCE": {"steered", "unsteered"}}.
    Empty when the run has no ``reference`` condition."""
    if reference not in conditions:
        return {}

    def pick(name: str, steered: bool) -> list[Mapping[str, Any]]:
        return [t for t in trials if t["condition"] == name and bool(t["steered"]) == steered
                and (not steered or level is None or t.get("level") == level)]

    return {f"{name} vs {reference}": {"steered": paired_comparison(pick(name, True), pick(reference, True)),
                                       "unsteered": paired_comparison(pick(name, False), pick(reference, False))}
            for name in conditions if name != reference}
