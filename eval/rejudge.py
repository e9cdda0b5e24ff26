"""``esr rejudge RUN --out NEW``: judge a finished evaluation's trials again with today's
judge, without generating anything.

Every rate is counted by the judge, so a run judged before the judge changed has to be
counted again to be compared with a new one. The new run directory holds the re-judged
``trials.jsonl`` (each trial with its old ``attempts`` kept as ``previous_attempts`` and
the old judge's name as ``previous_judge``), a ``summary.json`` built the same way as
``esr eval``'s, and ``rejudge.json``: the headline rates of both judges side by side.

The offline judge is calibrated exactly as in the original run: its anchors are
re-measured on the run's own reference answers (``references.jsonl``) and direction
labels. Trials the old judge failed on are judged again like any other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from esr_train.cache import atomic_write_json, read_json
from esr_train.records import RecordFile, json_objects
from eval.config import EvalConfig, EvalConfigError
from eval.judging import JudgeItem

__all__ = ["format_rejudge", "rejudge_run"]

HEADLINE = ("multi_attempt_rate", "esr_rate", "drift_restart_rate", "mean_first_score")


def _load(run: Path) -> tuple[dict, dict, list[dict], dict[str, str]]:
    """The run's resolved config, its summary, its trials and its reference answers."""
    config = read_json(run / "eval_config.json")
    summary = read_json(run / "summary.json")
    if not isinstance(config, dict) or not (run / "trials.jsonl").is_file():
        raise EvalConfigError(f"{run}: not an evaluation run (needs eval_config.json and trials.jsonl)")
    if not isinstance(summary, dict):
        raise EvalConfigError(f"{run}/summary.json: missing or unreadable; finish the run with esr eval first")
    trials = [row for _, row in json_objects(run / "trials.jsonl", EvalConfigError)]
    references = {}
    if (run / "references.jsonl").is_file():
        for _, row in json_objects(run / "references.jsonl", EvalConfigError):
            references[row.get("key")] = row.get("value")
    # eval_config.json holds the settings as given (judge "offline"), summary.json's config
    # what the run resolved (the judge's full name, conditions, directions used)
    return {**summary.get("config", {}), "judge": config.get("judge")}, summary, trials, references


def _headline(summary: dict) -> dict[str, Any]:
    out = {}
    for name, cond in summary["conditions"].items():
        out[name] = {part: {k: cond[part].get(k) for k in HEADLINE + ("n",)} for part in ("steered", "unsteered")}
    return out


def rejudge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, judge=None, batch_size: int = 64,
                progress: bool = True) -> dict[str, Any]:
    """Re-judge ``run_dir``'s trials into ``out_dir`` (resumable) and return
    ``{"previous": ..., "current": ...}`` headline rates per condition."""
    from eval.harness import make_judge
    from eval.summary import build_summary

    run, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run.resolve():
        raise EvalConfigError(f"--out {out}: must differ from the run it re-judges")
    if out.exists() and not out.is_dir():
        raise EvalConfigError(f"--out {out}: exists and is not a directory")
    config, previous, trials, references = _load(run)
    fields = {f for f in EvalConfig.__dataclass_fields__}
    cfg = EvalConfig(**{k: v for k, v in config.items() if k in fields})
    judge = judge or make_judge(cfg)
    if hasattr(judge, "calibrated"):
        # as esr eval did: every prompt of the run in its order (references.jsonl keeps it),
        # direction labels in the run's order
        labels = config.get("directions_used") or sorted({t["direction"] for t in trials})
        judge = judge.calibrated(list(references), [r or "" for r in references.values()], labels)

    out.mkdir(parents=True, exist_ok=True)
    store = RecordFile(out / "trials.jsonl")
    todo = [t for t in trials if t["key"] not in store]
    bar = tqdm(total=len(trials), initial=len(trials) - len(todo), desc=f"rejudge {judge.name}", unit="trial",
               disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        items = [JudgeItem(t["prompt"], t["response"], t["direction"] if t["steered"] else "",
                           references.get(t["prompt"])) for t in chunk]
        results = judge.judge(items)
        store.extend([{**t, **res.to_record(), "judge": judge.name, "previous_attempts": t.get("attempts"),
                       "previous_judge": t.get("judge")} for t, res in zip(chunk, results)])
        bar.update(len(chunk))
    bar.close()

    keys = {t["key"] for t in trials}
    rejudged = [r for r in store.records() if r["key"] in keys]
    names = config.get("conditions") or list(dict.fromkeys(t["condition"] for t in trials))
    summary = build_summary(rejudged, names, config={**config, "judge": judge.name, "rejudged_from": str(run)},
                            calibration=previous.get("calibration"), capability=previous.get("capability"))
    atomic_write_json(out / "summary.json", summary)
    old = build_summary(trials, names, config=config)
    result = {"run": str(run), "previous_judge": trials[0].get("judge") if trials else None, "judge": judge.name,
              "previous": _headline(old), "current": _headline(summary)}
    atomic_write_json(out / "rejudge.json", result)
    return result


def format_rejudge(result: dict[str, Any]) -> str:
    """One line per condition and part: each headline rate, previous -> current."""
    lines = [f"{result['run']}: {result['previous_judge']} -> {result['judge']}"]
    for name, parts in result["current"].items():
        for part, now in parts.items():
            before = result["previous"][name][part]
            cells = []
            for k in HEADLINE:
                a, b = before.get(k), now.get(k)
                if k.endswith("_rate"):
                    fmt = (lambda x: "-" if x is None else f"{100 * x:.1f}%")
                else:
                    fmt = (lambda x: "-" if x is None else f"{x:.1f}")
                cells.append(f"{k.replace('_rate', '')} {fmt(a)} -> {fmt(b)}")
            lines.append(f"  {name:<28} {part:<9} n={now.get('n')}  " + "  ".join(cells))
    return "\n".join(lines)

