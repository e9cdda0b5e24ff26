"""Strength calibration: per direction, the push at which the *base* model's mean
first-attempt score falls to a target (the study's threshold, about 30/100).

Directions differ wildly in how hard they push, so a fixed strength compares an
overwhelmed model on one concept with an untouched one on another. Calibrating on the base
model, then using the same strength for every condition, keeps the comparison fair. The
search is a bracketing bisection (the first-attempt score falls as the push grows), run
for all directions in shared batches, bounded to ``calibration_probes`` rounds, and cached
on disk keyed by model, direction, judge and generation settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from statistics import fmean

from esr_train.cache import atomic_write_json, cache_dir, read_json

log = logging.getLogger(__name__)

Probe = Callable[[list[tuple[object, float, str]]], list[float | None]]
"""(direction, strength, prompt) rows -> first-attempt score per row (None: no attempt)."""


def _split(probes: Sequence[tuple[float, float]], target: float) -> tuple[list, list]:
    """``(strength, mean score)`` probes scoring above the target, and at or below it."""
    return [p for p in probes if p[1] > target], [p for p in probes if p[1] <= target]


def _interpolate(above: tuple[float, float], below: tuple[float, float], target: float) -> float:
    """The strength where the line through the two bracketing probes meets the target."""
    (s0, m0), (s1, m1) = above, below
    return s0 + (s1 - s0) * (m0 - target) / (m0 - m1)


def next_strength(probes: Sequence[tuple[float, float]], target: float, hi: float) -> float:
    """Where to probe next given ``(strength, mean score)`` probes (score falls with strength)."""
    above, below = _split(probes, target)
    if above and below:
        a, b = max(above), min(below)
        return _interpolate(a, b, target) if a[1] != b[1] else (a[0] + b[0]) / 2
    if above:  # not pushed hard enough yet
        return min(2 * max(above)[0], hi)
    return min(below)[0] / 2


def pick_strength(probes: Sequence[tuple[float, float]], target: float) -> float:
    """The strength whose score is nearest the target, interpolated between the two
    probes that bracket it when there are such probes."""
    above, below = _split(probes, target)
    if above and below:
        a, b = max(above), min(below)
        if a[0] < b[0] and a[1] != b[1]:
            return round(_interpolate(a, b, target), 4)
    return round(min(probes, key=lambda p: abs(p[1] - target))[0], 4)


def _cache_key(settings: dict, direction) -> str:
    vec = direction.vector.float().contiguous().numpy().tobytes()
    blob = json.dumps(settings, sort_keys=True).encode() + hashlib.sha1(vec).digest()
    return hashlib.sha1(blob).hexdigest()[:16]


def calibrate(directions: Sequence, prompts: Sequence[str], probe: Probe, *, target: float, rounds: int,
              start: float, hi: float, shared: bool, settings: dict, use_cache: bool = True) -> dict[str, dict]:
    """{label: {"strength", "target", "probes": [[strength, mean first score], ...], "cached"}}.

    ``shared=True`` calibrates one strength on the mean over all directions (cheaper)."""
    root = cache_dir() / "calibration"
    keys = {d.label: _cache_key({**settings, "target": target, "rounds": rounds, "start": start, "hi": hi,
                                 "shared": shared, "prompts": list(prompts)}, d) for d in directions}
    out: dict[str, dict] = {}
    for d in directions:
        hit = read_json(root / f"{keys[d.label]}.json") if use_cache else None
        if hit:
            out[d.label] = {**hit, "cached": True}
    todo = [d for d in directions if d.label not in out]  # (directions hold tensors: compare labels, not objects)
    if shared and todo:
        todo = list(directions)  # a shared strength is found from all directions together
    groups = ([todo] if todo else []) if shared else [[d] for d in todo]  # (a full cache hit: nothing to probe)
    probes: list[list[tuple[float, float]]] = [[] for _ in groups]
    strengths = [start] * len(groups)
    for r in range(rounds if todo else 0):
        owner = [g for g, group in enumerate(groups) for _ in group for _ in prompts]
        rows = [(d, strengths[g], p) for g, group in enumerate(groups) for d in group for p in prompts]
        scores = probe(rows)
        for g, group in enumerate(groups):
            mine = [s for o, s in zip(owner, scores) if o == g and s is not None]
            mean = fmean(mine) if mine else 0.0
            probes[g].append((strengths[g], mean))
            strengths[g] = max(1e-3, min(hi, next_strength(probes[g], target, hi)))
        log.info("calibration round %d/%d: %s", r + 1, rounds,
                 ", ".join(f"{p[-1][0]:.3f}->{p[-1][1]:.1f}" for p in probes[:6]))
    for g, group in enumerate(groups):
        result = {"strength": pick_strength(probes[g], target), "target": target,
                  "probes": [[round(s, 4), round(m, 2)] for s, m in probes[g]]}
        for d in group:
            atomic_write_json(root / f"{keys[d.label]}.json", result)
            out[d.label] = {**result, "cached": False}
    return {d.label: out[d.label] for d in directions}
