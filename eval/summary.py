"""``summary.json`` from the judged trials: per condition, steered and unsteered metrics,
per-direction breakdowns, every condition paired against the base over their shared trials
(:mod:`eval.paired`) and, for strength sweeps, one row of metrics per level.

Recomputed from ``trials.jsonl`` alone (plus the run's calibration and capability
numbers), so anyone can re-derive every figure in the report from the raw trials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eval.metrics import summarize_trials
from eval.paired import paired_against


def _main_level(trials: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> Any:
    """The sweep level the headline numbers use: factor 1.0 (the calibrated strength) when
    present, else every level pooled (None). A sweep over absolute ``strengths`` has no
    calibrated level (its levels are strengths, and 1.0 is just one of them): pooled."""
    if config.get("strengths"):
        return None
    levels = {t.get("level") for t in trials if t.get("steered")}
    return 1.0 if 1.0 in levels else None


def build_summary(trials: Sequence[Mapping[str, Any]], conditions: Sequence[str], *, config: dict,
                  calibration: dict | None = None, capability: dict | None = None) -> dict[str, Any]:
    main = _main_level(trials, config)
    by_cond: dict[str, Any] = {}
    for name in conditions:
        mine = [t for t in trials if t["condition"] == name]
        steered = [t for t in mine if t["steered"] and (main is None or t.get("level") == main)]
        labels = sorted({t["direction"] for t in steered})
        by_cond[name] = {
            "steered": summarize_trials(steered),
            "unsteered": summarize_trials([t for t in mine if not t["steered"]]),
            "per_direction": {lab: summarize_trials([t for t in steered if t["direction"] == lab]) for lab in labels},
        }
    summary: dict[str, Any] = {"conditions": by_cond, "capability": capability or {},
                               "calibration": calibration or {}, "config": config}
    paired = paired_against(trials, conditions, "base", main)
    if paired:
        summary["paired"] = paired
    levels = sorted({t["level"] for t in trials if t["steered"] and t.get("level") is not None})
    if len(levels) > 1:
        summary["sweep"] = {
            "levels": levels,
            "unit": config.get("sweep_unit"),
            "conditions": {name: [summarize_trials([t for t in trials if t["condition"] == name and t["steered"]
                                                    and t.get("level") == lev]) for lev in levels]
                           for name in conditions},
        }
    return summary
