"""ESR protocol metrics with standard errors and intervals.

Why: the study reports, per condition and over trials with at least one scored
attempt, the multi-attempt rate, the ESR rate (>= 2 attempts and the last
attempt scores higher than the first), the improvement rate among
multi-attempt trials, the mean first-attempt score and the mean (last - first)
change, with binomial SEs for rates and sd/sqrt(n) for means. Headline rates
are small (a few percent), so Wilson intervals are used for rates (the normal
approximation collapses near 0) and percentile bootstrap intervals for means.

Everything here is pure Python (``math`` + ``random``) so results are
identical wherever they are computed, and ``summarize_trials`` returns only
JSON-serialisable values (``None`` instead of NaN).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from statistics import fmean, stdev
from typing import Any

__all__ = [
    "binomial_se",
    "bootstrap_mean_interval",
    "mean_se",
    "summarize_trials",
    "wilson_interval",
]


DRIFT_SCORE = 50.0
"""A first attempt scoring below this had drifted: a restart after it is a correction
(``drift_restart_rate``), one after an on-topic opener may be a reflex to the push."""


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; ``(0.0, 1.0)`` when n == 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The bounds are exactly 0 / 1 at the extremes; pin them against rounding.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return (lo, hi)


def binomial_se(k: int, n: int) -> float:
    """Binomial standard error sqrt(p(1-p)/n) of the rate k/n; NaN when n == 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan
    p = k / n
    return math.sqrt(p * (1 - p) / n)


def mean_se(values: Sequence[float]) -> float:
    """Standard error of the mean, sample sd / sqrt(n); NaN when fewer than 2 values."""
    if len(values) < 2:
        return math.nan
    return stdev(values) / math.sqrt(len(values))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def bootstrap_mean_interval(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean; ``(nan, nan)`` when ``values`` is empty.

    Deterministic for a given ``seed`` (uses ``random.Random(seed)``), so
    reported intervals are reproducible across machines.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    data = [float(v) for v in values]
    if not data:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(data)
    means = sorted(math.fsum(rng.choices(data, k=n)) / n for _ in range(n_boot))
    return (_quantile(means, alpha / 2), _quantile(means, 1 - alpha / 2))


def _finite(x: float) -> float | None:
    """NaN/inf -> None so the summary stays valid JSON."""
    return x if math.isfinite(x) else None


def _interval(ci: tuple[float, float]) -> list[float] | None:
    lo, hi = ci
    return [lo, hi] if math.isfinite(lo) and math.isfinite(hi) else None


def _rate(k: int, n: int) -> tuple[float | None, list[float] | None, float | None]:
    """(rate, Wilson CI, binomial SE), all None when there is no denominator."""
    if n == 0:
        return None, None, None
    return k / n, list(wilson_interval(k, n)), _finite(binomial_se(k, n))


def _scores(trial: Mapping[str, Any]) -> list[float] | None:
    """Scores of a trial's attempts, or None when the judge failed on it.

    A trial is an error when it is flagged (``"error"``), has no ``"attempts"``
    list, or any attempt's score is missing/None.
    """
    attempts = trial.get("attempts")
    if trial.get("error") or not isinstance(attempts, list):
        return None
    scores: list[float] = []
    for attempt in attempts:
        score = attempt.get("score") if isinstance(attempt, Mapping) else None
        if score is None or isinstance(score, bool):
            return None
        scores.append(float(score))
    return scores


def summarize_trials(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Protocol metrics for one condition.

    Each trial has ``"attempts": [{"text": ..., "score": 0-100 or None}, ...]``.
    Trials with a failed judge (a None score) are excluded and counted in
    ``n_errors``; trials with zero attempts (e.g. only a clarifying question)
    are excluded and counted in ``n_no_attempt``. ``n`` is the number of
    remaining trials, the denominator of every rate and mean below (``drift_restart_rate``
    counts multi-attempt trials whose first attempt scored below ``DRIFT_SCORE``) except
    ``improvement_rate`` (over multi-attempt trials) and ``mean_delta`` (mean of
    last - first over multi-attempt trials). Intervals are ``[lo, hi]`` lists.
    """
    n_errors = n_no_attempt = 0
    scored: list[list[float]] = []
    for trial in trials:
        scores = _scores(trial)
        if scores is None:
            n_errors += 1
        elif not scores:
            n_no_attempt += 1
        else:
            scored.append(scores)

    n = len(scored)
    multi = [s for s in scored if len(s) >= 2]
    n_multi = len(multi)
    n_esr = sum(1 for s in multi if s[-1] > s[0])
    n_drift_restart = sum(1 for s in multi if s[0] < DRIFT_SCORE)
    firsts = [s[0] for s in scored]
    lasts = [s[-1] for s in scored]
    deltas = [s[-1] - s[0] for s in multi]

    multi_rate, multi_ci, multi_se = _rate(n_multi, n)
    esr_rate, esr_ci, esr_se = _rate(n_esr, n)
    improvement_rate, improvement_ci, _ = _rate(n_esr, n_multi)
    drift_rate, drift_ci, drift_se = _rate(n_drift_restart, n)

    return {
        "n": n,
        "n_errors": n_errors,
        "n_no_attempt": n_no_attempt,
        "n_multi_attempt": n_multi,
        "n_esr": n_esr,
        "multi_attempt_rate": multi_rate,
        "multi_attempt_ci": multi_ci,
        "multi_attempt_se": multi_se,
        "esr_rate": esr_rate,
        "esr_ci": esr_ci,
        "esr_se": esr_se,
        "n_drift_restart": n_drift_restart,
        "drift_restart_rate": drift_rate,
        "drift_restart_ci": drift_ci,
        "drift_restart_se": drift_se,
        "improvement_rate": improvement_rate,
        "improvement_ci": improvement_ci,
        "mean_first_score": fmean(firsts) if firsts else None,
        "mean_first_score_ci": _interval(bootstrap_mean_interval(firsts)),
        "mean_first_score_se": _finite(mean_se(firsts)),
        "mean_last_score": fmean(lasts) if lasts else None,
        "mean_delta": fmean(deltas) if deltas else None,
        "mean_delta_ci": _interval(bootstrap_mean_interval(deltas)),
        "mean_delta_se": _finite(mean_se(deltas)),
    }
