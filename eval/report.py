"""Turn eval run directories into a report a person can read: ``report.md``,
``report.html`` and ``plots/*.png``.

Why: a run directory holds the numbers (``summary.json``) and the evidence
(``trials.jsonl``), but deciding whether an adapter resists steering needs both
side by side: the rates with their intervals, the plots that show where the
scores move, and a few transcripts that show what a restart actually looks like.
Several run directories (e.g. before / after training) render as one comparison.

The report is built once as a list of small blocks (heading, paragraph, table,
image, example) and rendered twice, to Markdown and to HTML, so the two never
drift apart. Plots use matplotlib's Agg canvas directly (no pyplot, no global
backend switch), so this works headless and next to other matplotlib users.
Everything missing (a None metric, no multi-attempt trial, no calibration, no
sweep) is shown as "–" or as a one-line note rather than raising: only a run
directory without ``summary.json`` is an error, because then there is nothing
to report.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esr_train.cache import atomic_write_text
from esr_train.errors import EsrError


class ReportError(EsrError, ValueError):
    """A run directory the report cannot read."""

__all__ = ["format_table", "write_report"]

DASH = "–"
# Attempt texts longer than this are cut in the transcripts; a runaway steered response
# can be thousands of characters of repetition and would bury the report.
MAX_ATTEMPT_CHARS = 1200


# --------------------------------------------------------------------------- loading


@dataclass
class _Run:
    """One run directory: its label (the directory name), summary and judged trials."""

    label: str
    path: Path
    summary: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def conditions(self) -> dict[str, Any]:
        return ordered_conditions(self.summary)


def ordered_conditions(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary's conditions in the run's own order (``config.conditions``: base,
    meta-prompt, adapter), which JSON written with sorted keys does not keep."""
    conditions = summary.get("conditions") or {}
    order = [c for c in (summary.get("config") or {}).get("conditions") or [] if c in conditions]
    return {name: conditions[name] for name in order + [c for c in conditions if c not in order]}


def _load_run(run_dir: Path) -> _Run:
    """Read ``summary.json`` (required) and ``trials.jsonl`` (optional: without it the
    report just has no transcripts and no first-vs-last scatter)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ReportError(f"{run_dir}: no summary.json; give an eval run directory (esr eval --out)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable summary.json at {summary_path}: {exc}") from None
    return _Run(run_dir.name, run_dir, summary, _read_trials(run_dir / "trials.jsonl"))


def _read_trials(path: Path) -> list[dict[str, Any]]:
    """Judged trials, one JSON object a line. A torn last line (a run still being written
    or killed mid-write) is skipped rather than failing the whole report."""
    if not path.is_file():
        return []
    trials = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            trials.append(obj)
    return trials


def _unique_labels(runs: list[_Run]) -> None:
    """Two runs named alike (``a/run`` and ``b/run``) would be indistinguishable in a
    side-by-side table, so fall back to ``parent/name`` for those."""
    names = [r.label for r in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.path.parent.name}/{run.path.name}"


# --------------------------------------------------------------------------- formatting


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def _pct(rate: float | None) -> str:
    return DASH if _missing(rate) else f"{100 * rate:.1f}%"


def _pct_ci(rate: float | None, ci: Sequence[float] | None) -> str:
    """``12.5% [5.5, 26.1]``: a rate with its (Wilson) interval, in percent."""
    if _missing(rate):
        return DASH
    if not ci or any(_missing(c) for c in ci):
        return _pct(rate)
    return f"{_pct(rate)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, digits: int = 1) -> str:
    return DASH if _missing(x) else f"{x:.{digits}f}"


def _num_ci(x: float | None, ci: Sequence[float] | None, digits: int = 1) -> str:
    if _missing(x):
        return DASH
    if not ci or any(_missing(c) for c in ci):
        return _num(x, digits)
    return f"{_num(x, digits)} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _score(s: float | None) -> str:
    """Judge scores are mostly integers; don't print ``85.0``."""
    if _missing(s):
        return DASH
    return f"{s:.0f}" if float(s).is_integer() else f"{s:.1f}"


def _value(v: Any) -> str:
    """A config value as one table cell."""
    if v is None:
        return DASH
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _m(metrics: Mapping[str, Any] | None, key: str) -> Any:
    return (metrics or {}).get(key)


def _n_cell(metrics: Mapping[str, Any] | None) -> str:
    """Trial count, with judge errors called out: they are excluded from every rate."""
    n, err = _m(metrics, "n"), _m(metrics, "n_errors")
    if n is None:
        return DASH
    return f"{n} (+{err} err)" if err else str(n)


def format_table(summary: Mapping[str, Any]) -> str:
    """The plain-text table the CLI prints at the end of an eval or pipeline run:
    one row per condition with the steered multi-attempt and ESR rates, the mean
    first-attempt score and the unsteered false-restart rate, each with its interval.
    Plain aligned columns, so it reads the same in a terminal and in a log file."""
    headers = ["condition", "n", "multi-attempt", "ESR", "drift, then restart", "first score",
               "false restart (unsteered)"]
    rows = [headers]
    for name, cond in ordered_conditions(summary).items():
        st, un = cond.get("steered"), cond.get("unsteered")
        rows.append([
            name,
            _n_cell(st),
            _pct_ci(_m(st, "multi_attempt_rate"), _m(st, "multi_attempt_ci")),
            _pct_ci(_m(st, "esr_rate"), _m(st, "esr_ci")),
            _pct_ci(_m(st, "drift_restart_rate"), _m(st, "drift_restart_ci")),
            _num_ci(_m(st, "mean_first_score"), _m(st, "mean_first_score_ci")),
            _pct_ci(_m(un, "multi_attempt_rate"), _m(un, "multi_attempt_ci")),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- blocks


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Para:
    text: str


@dataclass
class _Table:
    """``groups`` (label, column span) is an extra header row; HTML draws it with
    colspan, Markdown (which has no column groups) prefixes it to each header."""

    headers: list[str]
    rows: list[list[str]]
    groups: list[tuple[str, int]] | None = None


@dataclass
class _Image:
    rel_path: str
    caption: str


@dataclass
class _Example:
    index: int
    trial: dict[str, Any]


# --------------------------------------------------------------------------- tables


def _main_table(run: _Run) -> _Table:
    """Condition x every headline metric of one run."""
    headers = ["condition", "n", "multi-attempt", "ESR", "improvement", "mean first score", "mean delta",
               "unsteered false restart", "unsteered mean score", "perplexity"]
    capability = run.summary.get("capability") or {}
    rows = []
    for name, cond in run.conditions.items():
        st, un, cap = cond.get("steered"), cond.get("unsteered"), capability.get(name) or {}
        rows.append([
            name,
            _n_cell(st),
            _pct_ci(_m(st, "multi_attempt_rate"), _m(st, "multi_attempt_ci")),
            _pct_ci(_m(st, "esr_rate"), _m(st, "esr_ci")),
            _pct(_m(st, "improvement_rate")),
            _num_ci(_m(st, "mean_first_score"), _m(st, "mean_first_score_ci")),
            _num(_m(st, "mean_delta")),
            _pct_ci(_m(un, "multi_attempt_rate"), _m(un, "multi_attempt_ci")),
            _num(cap.get("unsteered_mean_score")),
            _num(cap.get("perplexity"), 2),
        ])
    return _Table(headers, rows)


def _pct_diff(d: Mapping[str, Any] | None) -> str:
    """``+12.0 pts [6.5, 17.5] (b 30 / c 6, p 0.0001)`` for one paired rate difference."""
    if not d or d.get("difference") is None:
        return DASH
    lo, hi = d.get("difference_ci") or (None, None)
    ci = "" if _missing(lo) or _missing(hi) else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{100 * d['difference']:+.1f} pts{ci} ({d['only_a']} vs {d['only_b']}, p {d['mcnemar_p']:.2g})"


def _paired_table(run: _Run) -> _Table | None:
    """Each condition against the base over the trials both ran (same prompt, direction,
    strength and seed, so the same draws): paired differences with McNemar's p."""
    paired = run.summary.get("paired") or {}
    if not paired:
        return None
    rows = []
    for name, both in paired.items():
        st, un = both.get("steered") or {}, both.get("unsteered") or {}
        first = st.get("first_score_difference")
        rows.append([name, str(st.get("n", 0)), _pct_diff(st.get("multi_attempt")), _pct_diff(st.get("esr")),
                     _num_ci(first, st.get("first_score_difference_ci")),
                     f"{_pct_diff(un.get('multi_attempt'))} (n={un.get('n', 0)})"])
    return _Table(["comparison", "shared steered trials", "multi-attempt difference", "ESR difference",
                   "first score difference", "unsteered false restart difference"], rows)


def _comparison_table(runs: list[_Run]) -> _Table:
    """Before/after: one row per condition (union over runs, first-seen order) and a
    column group per run, so the same metric of two runs sits a few columns apart."""
    metrics = ["n", "multi-attempt", "ESR", "mean first score", "unsteered false restart"]
    conditions = _condition_order(runs)
    rows = []
    for name in conditions:
        row = [name]
        for run in runs:
            cond = run.conditions.get(name) or {}
            st, un = cond.get("steered"), cond.get("unsteered")
            row += [
                _n_cell(st),
                _pct_ci(_m(st, "multi_attempt_rate"), _m(st, "multi_attempt_ci")),
                _pct_ci(_m(st, "esr_rate"), _m(st, "esr_ci")),
                _num_ci(_m(st, "mean_first_score"), _m(st, "mean_first_score_ci")),
                _pct_ci(_m(un, "multi_attempt_rate"), _m(un, "multi_attempt_ci")),
            ]
        rows.append(row)
    groups = [("", 1)] + [(run.label, len(metrics)) for run in runs]
    return _Table(["condition"] + metrics * len(runs), rows, groups)


def _config_table(runs: list[_Run]) -> _Table:
    """Config keys x runs; the keys that identify a run first, the rest alphabetically."""
    first = ["model", "adapter", "judge", "layer", "schedule", "max_new_tokens", "n_prompts", "n_directions",
             "trials_per_cell"]
    configs = [run.summary.get("config") or {} for run in runs]
    keys = [k for k in first if any(k in c for c in configs)]
    keys += sorted({k for c in configs for k in c} - set(keys))
    headers = ["setting"] + ([runs[0].label] if len(runs) == 1 else [run.label for run in runs])
    rows = [[k] + [_value(c.get(k)) for c in configs] for k in keys]
    return _Table(headers, rows)


def _direction_table(run: _Run) -> _Table | None:
    """Direction x condition, cell ``multi-attempt / ESR (n)``: compact enough for a
    dozen directions, and shows which concepts the model resists at all."""
    calibration = run.summary.get("calibration") or {}
    conditions = list(run.conditions)
    labels: list[str] = []
    for cond in run.conditions.values():
        labels += [d for d in (cond.get("per_direction") or {}) if d not in labels]
    if not labels:
        return None
    rows = []
    for label in labels:
        row = [label, _num((calibration.get(label) or {}).get("strength"), 2)]
        for name in conditions:
            m = (run.conditions[name].get("per_direction") or {}).get(label)
            row.append(DASH if not m else
                       f"{_pct(m.get('multi_attempt_rate'))} / {_pct(m.get('esr_rate'))} (n={m.get('n', 0)})")
        rows.append(row)
    return _Table(["direction", "strength"] + conditions, rows)


def _condition_order(runs: list[_Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [c for c in run.conditions if c not in names]
    return names


# --------------------------------------------------------------------------- examples


def _scores_of(trial: Mapping[str, Any]) -> list[float] | None:
    """Attempt scores, or None for a judge error / missing score / no attempt."""
    attempts = trial.get("attempts")
    if trial.get("error") or not isinstance(attempts, list) or not attempts:
        return None
    scores = [a.get("score") if isinstance(a, Mapping) else None for a in attempts]
    if any(s is None or isinstance(s, bool) for s in scores):
        return None
    return [float(s) for s in scores]


def _pick_examples(run: _Run, n_examples: int) -> list[dict[str, Any]]:
    """Up to ``n_examples`` steered transcripts: mostly multi-attempt ones (restarts are
    what the report is about; ESR successes and big improvements first) plus a few
    single-attempt ones for contrast, taken round-robin over conditions so one
    condition does not fill the whole section."""
    if n_examples <= 0:
        return []
    order = {name: i for i, name in enumerate(run.conditions)}
    multi, single = [], []
    for t in run.trials:
        scores = _scores_of(t)
        if not t.get("steered") or scores is None:
            continue
        (multi if len(scores) >= 2 else single).append((t, scores))
    multi.sort(key=lambda ts: (ts[1][-1] <= ts[1][0], -(ts[1][-1] - ts[1][0]), str(ts[0].get("key", ""))))
    single.sort(key=lambda ts: str(ts[0].get("key", "")))
    n_contrast = min(len(single), max(1, n_examples // 3)) if n_examples > 1 else 0
    n_multi = min(len(multi), n_examples - n_contrast)
    picked_multi = _round_robin([t for t, _ in multi], order)[:n_multi]
    return picked_multi + _round_robin([t for t, _ in single], order)[:n_examples - n_multi]


def _round_robin(trials: list[dict[str, Any]], order: Mapping[str, int]) -> list[dict[str, Any]]:
    """Interleave trials by condition (in report order), keeping each condition's order."""
    buckets: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        buckets.setdefault(str(t.get("condition", "")), []).append(t)
    queues = [buckets[c] for c in sorted(buckets, key=lambda c: (order.get(c, len(order)), c))]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _example_title(index: int, t: Mapping[str, Any]) -> str:
    bits = [f"{index}. {t.get('condition', '?')}"]
    if t.get("direction"):
        bits.append(f"steered toward “{t['direction']}” at strength {_num(t.get('strength'), 2)}")
    if t.get("prompt_id"):
        bits.append(f"prompt {t['prompt_id']}")
    return " · ".join(bits)


def _clip(text: str) -> str:
    text = str(text or "").strip()
    return text if len(text) <= MAX_ATTEMPT_CHARS else text[:MAX_ATTEMPT_CHARS].rstrip() + " […]"


# --------------------------------------------------------------------------- plots


def _figure(n_panels: int, width: float = 5.5, height: float = 4.0):
    """A standalone Agg figure with ``n_panels`` side by side (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, width * n_panels), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, n_panels, squeeze=False)[0])


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """Stable colour per name (a condition keeps its colour in every plot)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _grouped_bars(ax, groups: Sequence[str], series: Sequence[tuple[str, list[tuple[Any, Any]]]],
                  scale: float, ylabel: str, title: str) -> None:
    """Bars per group (x) and series (colour), with interval error bars. ``series`` is
    ``[(label, [(value, [lo, hi]) per group])]``; missing values leave a gap marked "n/a"."""
    width = 0.8 / max(1, len(series))
    for i, (label, points) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [math.nan if _missing(v) else v * scale for v, _ in points]
        err = [[0.0, 0.0] if _missing(v) or not ci else [max(0.0, (v - ci[0]) * scale), max(0.0, (ci[1] - v) * scale)]
               for v, ci in points]
        ax.bar(xs, [0 if math.isnan(h) else h for h in heights], width, label=label,
               yerr=list(zip(*err)) if err else None, capsize=3)
        for x, h in zip(xs, heights):
            if math.isnan(h):
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    crowded = len(groups) > 3 or max((len(g) for g in groups), default=0) > 12
    ax.set_xticks(range(len(groups)), groups, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _plot_rates(runs: list[_Run], path: Path) -> Path:
    """(a) steered multi-attempt and ESR rates and the unsteered false-restart rate, per
    condition, with Wilson intervals. One run: one panel, three bar series. Several
    runs: one panel per metric with a bar per run, so before/after sit side by side."""
    conditions = _condition_order(runs)
    metrics = [("steered", "multi_attempt", "multi-attempt (steered)"), ("steered", "esr", "ESR (steered)"),
               ("unsteered", "multi_attempt", "false restart (unsteered)")]

    def points(run: _Run, part: str, key: str) -> list[tuple[Any, Any]]:
        return [(_m((run.conditions.get(c) or {}).get(part), f"{key}_rate"),
                 _m((run.conditions.get(c) or {}).get(part), f"{key}_ci")) for c in conditions]

    if len(runs) == 1:
        fig, (ax,) = _figure(1, width=max(6.0, 1.6 * len(conditions)))
        _grouped_bars(ax, conditions, [(label, points(runs[0], p, k)) for p, k, label in metrics], 100,
                      "% of trials", "Restart rates (95% Wilson CI)")
    else:
        fig, axes = _figure(len(metrics))
        for ax, (p, k, label) in zip(axes, metrics):
            _grouped_bars(ax, conditions, [(run.label, points(run, p, k)) for run in runs], 100, "% of trials", label)
    return _save(fig, path)


def _plot_first_score(runs: list[_Run], path: Path) -> Path:
    """(b2) mean first-attempt score per condition, steered vs unsteered, with bootstrap
    CIs: how far steering knocks the first answer off, and whether training costs
    unsteered quality."""
    conditions = _condition_order(runs)

    def points(run: _Run, part: str) -> list[tuple[Any, Any]]:
        return [(_m((run.conditions.get(c) or {}).get(part), "mean_first_score"),
                 _m((run.conditions.get(c) or {}).get(part), "mean_first_score_ci")) for c in conditions]

    if len(runs) == 1:
        fig, (ax,) = _figure(1, width=max(6.0, 1.4 * len(conditions)))
        _grouped_bars(ax, conditions, [(part, points(runs[0], part)) for part in ("steered", "unsteered")], 1,
                      "mean first-attempt score", "First-attempt score (95% bootstrap CI)")
    else:
        fig, axes = _figure(2)
        for ax, part in zip(axes, ("steered", "unsteered")):
            _grouped_bars(ax, conditions, [(run.label, points(run, part)) for run in runs], 1,
                          "mean first-attempt score", f"First-attempt score, {part}")
    for ax in fig.axes:
        ax.set_ylim(0, 100)
    return _save(fig, path)


def _plot_first_last(runs: list[_Run], path: Path) -> Path:
    """(b1) first vs last attempt score of every steered multi-attempt trial, one panel
    per run: points above the diagonal are restarts that helped (ESR)."""
    colors = _colors(_condition_order(runs))
    fig, axes = _figure(len(runs), width=4.5, height=4.5)
    for ax, run in zip(axes, runs):
        by_cond: dict[str, list[list[float]]] = {}
        for t in run.trials:
            scores = _scores_of(t)
            if t.get("steered") and scores and len(scores) >= 2:
                by_cond.setdefault(str(t.get("condition", "")), []).append([scores[0], scores[-1]])
        ax.plot([0, 100], [0, 100], color="grey", lw=1, ls="--")
        for cond, pts in by_cond.items():
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.6, color=colors.get(cond),
                       label=f"{cond} (n={len(pts)})")
        if by_cond:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(50, 50, "no steered multi-attempt trials", ha="center", va="center")
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_aspect("equal")
        ax.set_xlabel("first attempt score")
        ax.set_ylabel("last attempt score")
        ax.set_title(run.label if len(runs) > 1 else "First vs last attempt (steered)")
    return _save(fig, path)


def _plot_calibration(runs: list[_Run], path: Path) -> Path | None:
    """(c) steering strength vs the base model's mean first score per direction, with
    the target score: shows that each direction's chosen strength really lands the
    base model where the protocol wants it."""
    runs = [r for r in runs if r.summary.get("calibration")]
    if not runs:
        return None
    fig, axes = _figure(len(runs))
    for ax, run in zip(axes, runs):
        calibration = run.summary["calibration"]
        colors = _colors(list(calibration))
        for label, cal in calibration.items():
            probes = sorted((float(s), float(v)) for s, v in cal.get("probes") or [] if not _missing(v))
            color = colors[label]
            if probes:
                ax.plot([p[0] for p in probes], [p[1] for p in probes], marker="o", ms=3, color=color, label=label)
            if not _missing(cal.get("strength")) and not _missing(cal.get("target")):
                ax.plot([cal["strength"]], [cal["target"]], marker="*", ms=11, color=color, mec="black", mew=0.5)
        for target in sorted({c.get("target") for c in calibration.values() if not _missing(c.get("target"))}):
            ax.axhline(target, color="black", ls="--", lw=1)
            ax.text(ax.get_xlim()[1], target, f" target {target:g}", va="bottom", ha="right", fontsize=8)
        ax.set_xlabel("steering strength")
        ax.set_ylabel("base mean first-attempt score")
        ax.set_ylim(0, 100)
        ax.set_title(f"Calibration{' — ' + run.label if len(runs) > 1 else ''} (★ chosen)")
        ax.legend(fontsize=7, ncol=2 if len(calibration) > 6 else 1)
    return _save(fig, path)


def _plot_sweep(runs: list[_Run], path: Path) -> Path | None:
    """(d) multi-attempt (solid) and ESR (dashed) rate vs strength level, per condition:
    whether resistance holds up as steering gets stronger."""
    runs = [r for r in runs if (r.summary.get("sweep") or {}).get("levels")]
    if not runs:
        return None
    colors = _colors(_condition_order(runs))
    fig, axes = _figure(len(runs))
    for ax, run in zip(axes, runs):
        sweep = run.summary["sweep"]
        levels = sweep["levels"]
        for cond, per_level in (sweep.get("conditions") or {}).items():
            for key, style, marker, label in (("multi_attempt", "-", "o", cond), ("esr", "--", "s", None)):
                ys = [math.nan if _missing(_m(m, f"{key}_rate")) else 100 * m[f"{key}_rate"] for m in per_level]
                ax.plot(levels[:len(ys)], ys, ls=style, marker=marker, ms=3, color=colors.get(cond), label=label)
        ax.set_xlabel("steering strength level")
        ax.set_ylabel("% of steered trials")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Strength sweep{' — ' + run.label if len(runs) > 1 else ''} (solid multi-attempt, dashed ESR)",
                     fontsize=10)
        ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: _Table) -> str:
    headers = list(t.headers)
    if t.groups:
        i = 0
        for label, span in t.groups:
            for j in range(i, i + span):
                headers[j] = f"{label}: {headers[j]}" if label else headers[j]
            i += span
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _md_literal(text: str) -> str:
    """Model text may contain HTML (``<script>``, ``<b>``); escape it so Markdown
    viewers show it literally instead of rendering or running it."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;")


def _md_example(ex: _Example) -> str:
    t = ex.trial
    parts = [f"#### {_md_literal(_example_title(ex.index, t))}",
             f"**Prompt:** {_md_literal(_md_cell(t.get('prompt', '')))}"]
    for k, attempt in enumerate(t.get("attempts") or [], 1):
        text = _md_literal(_clip(attempt.get("text", "")))
        quoted = "\n".join(f"> {line}" if line else ">" for line in text.splitlines())
        parts.append(f"> **attempt {k} (score {_score(attempt.get('score'))})**\n>\n{quoted}")
    return "\n\n".join(parts)


def _to_markdown(title: str, blocks: list[Any]) -> str:
    out = [f"# {title}"]
    for b in blocks:
        if isinstance(b, _Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, _Para):
            out.append(b.text)
        elif isinstance(b, _Table):
            out.append(_md_table(b))
        elif isinstance(b, _Image):
            out.append(f"![{Path(b.rel_path).stem}]({b.rel_path})\n\n*{b.caption}*")
        elif isinstance(b, _Example):
            out.append(_md_example(b))
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; margin: 1em 0; }
.prompt { margin: 0.4em 0 0.8em; }
.attempt { padding: 0.5em 0.7em; border-radius: 4px; margin: 0.3em 0; }
.attempt:nth-of-type(odd) { background: #eef4ff; } .attempt:nth-of-type(even) { background: #fff4e6; }
.attempt .text { white-space: pre-wrap; margin-top: 0.3em; }
.badge { display: inline-block; color: #fff; border-radius: 10px; padding: 0 0.6em; font-size: 0.85em; font-weight: 600; }
"""


def _badge_color(score: Any) -> str:
    """Red (0) through amber to green (100), so a restart that helped jumps out."""
    if _missing(score):
        return "#888"
    return f"hsl({1.2 * max(0.0, min(100.0, float(score))):.0f}, 65%, 38%)"


def _html_table(t: _Table) -> str:
    esc = html.escape
    head = ""
    if t.groups:
        head += "<tr>" + "".join(f'<th colspan="{span}">{esc(label)}</th>' for label, span in t.groups) + "</tr>"
    head += "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.headers) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def _html_example(ex: _Example) -> str:
    esc = html.escape
    t = ex.trial
    attempts = "".join(
        f'<div class="attempt"><span class="badge" style="background:{_badge_color(a.get("score"))}">'
        f'attempt {k} · score {esc(_score(a.get("score")))}</span>'
        f'<div class="text">{esc(_clip(a.get("text", "")))}</div></div>'
        for k, a in enumerate(t.get("attempts") or [], 1))
    return (f'<div class="example"><h4>{esc(_example_title(ex.index, t))}</h4>'
            f'<div class="prompt"><b>Prompt:</b> {esc(str(t.get("prompt", "")))}</div>'
            f'<div class="attempts">{attempts}</div></div>')


def _to_html(title: str, blocks: list[Any]) -> str:
    esc = html.escape
    out = []
    for b in blocks:
        if isinstance(b, _Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, _Para):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, _Table):
            out.append(_html_table(b))
        elif isinstance(b, _Image):
            out.append(f'<figure><img src="{esc(b.rel_path)}" alt="{esc(b.caption)}">'
                       f"<figcaption>{esc(b.caption)}</figcaption></figure>")
        elif isinstance(b, _Example):
            out.append(_html_example(b))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n" + "\n".join(out) + "\n</body></html>\n")


# --------------------------------------------------------------------------- assembly


_PLOTS = [
    ("rates.png", _plot_rates, "Steered multi-attempt and ESR rates and unsteered false-restart rate per condition "
                               "(95% Wilson intervals)."),
    ("first_score.png", _plot_first_score, "Mean first-attempt score per condition, steered vs unsteered "
                                           "(95% bootstrap intervals)."),
    ("first_vs_last.png", _plot_first_last, "First vs last attempt score of steered multi-attempt trials; "
                                            "points above the diagonal improved after restarting."),
    ("calibration.png", _plot_calibration, "Calibration: base model's mean first-attempt score vs steering "
                                           "strength per direction; ★ marks the chosen strength, dashed the target."),
    ("sweep.png", _plot_sweep, "Multi-attempt (solid) and ESR (dashed) rate vs steering strength per condition."),
]


def _plots(runs: list[_Run], plot_dir: Path) -> tuple[list[Path], list[Any]]:
    """Draw every plot that has data; return the files and their image blocks."""
    paths, blocks = [], []
    for name, draw, caption in _PLOTS:
        path = draw(runs, plot_dir / name)
        if path is not None:
            paths.append(path)
            blocks.append(_Image(f"{plot_dir.name}/{name}", caption))
    return paths, blocks


def _run_details(run: _Run, n_examples: int, level: int) -> list[Any]:
    """Per-direction table and transcripts of one run."""
    blocks: list[Any] = [_Heading(level, "Per direction (steered: multi-attempt / ESR)")]
    table = _direction_table(run)
    blocks.append(table if table else _Para("No per-direction metrics in this run."))
    blocks.append(_Heading(level, "Example transcripts (steered)"))
    examples = _pick_examples(run, n_examples)
    if not run.trials:
        blocks.append(_Para("No trials.jsonl in this run directory."))
    elif not examples:
        blocks.append(_Para("No judged steered trials to show."))
    blocks += [_Example(i, t) for i, t in enumerate(examples, 1)]
    return blocks


def _default_out_dir(paths: list[Path]) -> Path:
    """One run: the report lives in the run directory itself. Several: in a ``report``
    directory beside the first run (``<first run's parent>/report``), since no single
    run owns a comparison."""
    return paths[0] if len(paths) == 1 else paths[0].parent / "report"


def write_report(run_dirs: Sequence[Path | str], out_dir: Path | str | None = None,
                 n_examples: int = 6) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for one run directory,
    or a side-by-side comparison of several (labelled by directory name).

    ``out_dir`` defaults to the run directory for a single run and to
    ``<first run's parent>/report`` for several. ``n_examples`` transcripts are shown
    per run. The HTML references the PNGs relatively (``plots/...``), so keep the
    folder together when moving it. Raises ValueError naming the path when a run
    directory has no ``summary.json``. Returns ``{"markdown": Path, "html": Path,
    "plots": [Path, ...]}``.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("write_report needs at least one run directory")
    runs = [_load_run(p) for p in paths]
    _unique_labels(runs)
    out = Path(out_dir) if out_dir is not None else _default_out_dir(paths)
    out.mkdir(parents=True, exist_ok=True)

    single = len(runs) == 1
    title = f"ESR evaluation: {runs[0].label}" if single else "ESR evaluation: " + " vs ".join(r.label for r in runs)
    blocks: list[Any] = [_Heading(2, "Configuration"), _config_table(runs), _Heading(2, "Results")]
    blocks.append(_main_table(runs[0]) if single else _comparison_table(runs))
    blocks.append(_Para("Rates are over judged trials (judge errors excluded); [..] are 95% intervals (Wilson for "
                        "rates, bootstrap for means). ESR = at least two attempts and the last scores higher than the "
                        "first; improvement = ESR among multi-attempt trials; false restart = multi-attempt rate "
                        "without steering."))
    paired = _paired_table(runs[0]) if single else None
    if paired is not None:
        blocks += [_Heading(3, "Paired against the base"), paired,
                   _Para("Over the trials both conditions ran with the same prompt, direction, strength and seed "
                         "(and so the same random draws): the difference in points with a bootstrap interval, the "
                         "discordant trials (only this condition vs only the base) and McNemar's exact p.")]
    plot_paths, images = _plots(runs, out / "plots")
    blocks += [_Heading(2, "Plots")] + images
    if single:
        blocks += _run_details(runs[0], n_examples, 2)
    else:
        for run in runs:
            blocks += [_Heading(2, f"Run {run.label}"), _main_table(run)] + _run_details(run, n_examples, 3)

    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, _to_markdown(title, blocks))
    atomic_write_text(html_path, _to_html(title, blocks))
    return {"markdown": md_path, "html": html_path, "plots": plot_paths}
