"""Tests for eval.report on hand-built run directories (no models, no torch)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from eval.metrics import summarize_trials, wilson_interval
from eval.report import format_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIRECTIONS = ["cats", "weather"]


def trial(condition: str, steered: bool, *scores: float | None, i: int = 0, error: str | None = None,
          texts: list[str] | None = None) -> dict[str, Any]:
    texts = texts or [f"{condition} answer {k}" + (" Wait, that's not right." if k < len(scores) - 1 else "")
                      for k in range(len(scores))]
    direction = DIRECTIONS[i % 2] if steered else ""
    return {
        "key": f"{condition}/{'s' if steered else 'u'}/{i}", "condition": condition, "steered": steered,
        "prompt_id": f"p{i}", "prompt": f"How do I bake bread? ({i})", "direction": direction,
        "strength": 8.0 if steered else 0.0, "layer": 6, "seed": i, "schedule": "constant",
        "response": " ".join(texts), "attempts": [] if error else [{"text": t, "score": s} for t, s in zip(texts, scores)],
        "error": error, "judge": "fake",
    }


def trials_run_a() -> list[dict[str, Any]]:
    """base: 9 judged steered (2 multi, 1 ESR) + 1 judge error; adapter: 8 steered (4 multi, all ESR);
    adapter+metaprompt:resist: 5 steered (1 multi ESR). Unsteered: base 0/4, adapter 1/4 false restarts."""
    t = [trial("base", True, 20, 80, i=0), trial("base", True, 60, 40, i=1)]
    t += [trial("base", True, 30 + i, i=i) for i in range(2, 9)]
    t += [trial("base", True, None, i=9, error="judge timeout")]
    t += [trial("base", False, 90, i=i) for i in range(4)]
    script = ["Cats are <script>alert('x')</script> great.", "Wait, that's not right. Knead the dough."]
    t += [trial("adapter", True, 10, 95, i=0, texts=script)]
    t += [trial("adapter", True, 30, 60 + i, i=i) for i in range(1, 4)]
    t += [trial("adapter", True, 50, i=i) for i in range(4, 8)]
    t += [trial("adapter", False, 70, 85, i=0)] + [trial("adapter", False, 88, i=i) for i in range(1, 4)]
    t += [trial("adapter+metaprompt:resist", True, 40, 70, i=0)]
    t += [trial("adapter+metaprompt:resist", True, 45, i=i) for i in range(1, 5)]
    t += [trial("adapter+metaprompt:resist", False, 92, i=i) for i in range(2)]
    return t


def make_summary(trials: list[dict[str, Any]], sweep: bool = False, calibration: bool = True) -> dict[str, Any]:
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    per_dir: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        groups[t["condition"]]["steered" if t["steered"] else "unsteered"].append(t)
        if t["steered"]:
            per_dir[t["condition"]][t["direction"]].append(t)
    conditions = {
        name: {"steered": summarize_trials(g["steered"]), "unsteered": summarize_trials(g["unsteered"]),
               "per_direction": {d: summarize_trials(ts) for d, ts in per_dir[name].items()}}
        for name, g in groups.items()
    }
    summary: dict[str, Any] = {
        "conditions": conditions,
        "capability": {name: {"unsteered_mean_score": conditions[name]["unsteered"]["mean_first_score"],
                              "perplexity": 12.345 if name == "base" else None} for name in conditions},
        "calibration": {d: {"strength": 8.0, "target": 30.0, "probes": [[2.0, 85.0], [4.0, 60.0], [8.0, 31.0],
                                                                         [16.0, None]]} for d in DIRECTIONS}
        if calibration else {},
        "config": {"model": "smollm2-135m", "adapter": None, "judge": "fake", "layer": 6, "schedule": "constant",
                   "max_new_tokens": 128, "n_prompts": 10, "n_directions": 2, "trials_per_cell": 1},
    }
    if sweep:
        summary["sweep"] = {"levels": [4.0, 8.0], "conditions": {
            name: [summarize_trials(g["steered"][: len(g["steered"]) // 2]), summarize_trials(g["steered"])]
            for name, g in groups.items()}}
    return summary


def write_run(path: Path, trials: list[dict[str, Any]], **kw: Any) -> Path:
    path.mkdir(parents=True)
    (path / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials), encoding="utf-8")
    (path / "summary.json").write_text(json.dumps(make_summary(trials, **kw)), encoding="utf-8")
    return path


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024, path


def ci_text(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


@pytest.fixture
def run_a(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run_before", trials_run_a(), sweep=True)


def test_single_run_writes_markdown_html_and_plots(run_a: Path) -> None:
    result = write_report([run_a])
    assert result["markdown"] == run_a / "report.md" and result["html"] == run_a / "report.html"
    names = {p.name for p in result["plots"]}
    assert names == {"rates.png", "first_score.png", "first_vs_last.png", "calibration.png", "sweep.png"}
    for p in result["plots"]:
        assert p.parent == run_a / "plots"
        assert_png(p)
    import matplotlib.image as mpimg

    assert mpimg.imread(run_a / "plots" / "rates.png").ndim == 3

    md = result["markdown"].read_text(encoding="utf-8")
    # base steered: 9 judged (1 judge error excluded), 2 multi-attempt, 1 ESR, improvement 1/2.
    assert "| base | 9 (+1 err) | 22.2% " + ci_text(2, 9) + " | 11.1% " + ci_text(1, 9) + " | 50.0% |" in md
    assert "50.0% " + ci_text(4, 8) in md  # adapter multi-attempt = ESR = 4/8
    assert "20.0% " + ci_text(1, 5) in md  # adapter+metaprompt:resist
    assert "25.0% " + ci_text(1, 4) in md  # adapter unsteered false restart 1/4
    assert "0.0% " + ci_text(0, 4) in md  # base unsteered false restart 0/4
    assert "12.35" in md and "| smollm2-135m |" in md  # perplexity, config
    assert "| adapter | – |" in md  # config value None
    assert "| cats | 8.00 |" in md  # per-direction table with calibrated strength
    assert "> **attempt 2 (score 95)**" in md and "&lt;script>" in md
    for p in result["plots"]:
        assert f"](plots/{p.name})" in md

    page = result["html"].read_text(encoding="utf-8")
    assert '<img src="plots/rates.png"' in page and 'class="badge"' in page
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_examples_prefer_multi_attempt_then_a_few_single(run_a: Path) -> None:
    md = write_report([run_a], n_examples=3)["markdown"].read_text(encoding="utf-8")
    examples = md.split("## Example transcripts")[1].split("\n#### ")[1:]
    assert len(examples) == 3
    assert ["attempt 2 (" in e for e in examples] == [True, True, False]
    # Round-robin over conditions, each condition's biggest improvement first.
    assert examples[0].startswith("1. base · steered toward") and "(score 80)" in examples[0]
    assert examples[1].startswith("2. adapter · ") and "(score 95)" in examples[1]


def test_two_runs_side_by_side(tmp_path: Path, run_a: Path) -> None:
    after = [t for t in trials_run_a() if t["condition"] != "base"]
    run_b = write_run(tmp_path / "run_after", after, calibration=False)
    result = write_report([run_a, run_b])
    assert result["markdown"].parent == tmp_path / "report"
    for p in result["plots"]:
        assert_png(p)
    md = result["markdown"].read_text(encoding="utf-8")
    assert "run_before vs run_after" in md
    assert "run_before: multi-attempt" in md and "run_after: multi-attempt" in md
    base_row = next(line for line in md.splitlines() if line.startswith("| base | 9 (+1 err) |"))
    assert base_row.endswith("| – | – | – | – | – |")  # base absent from the second run
    page = result["html"].read_text(encoding="utf-8")
    assert '<th colspan="5">run_before</th>' in page and '<th colspan="5">run_after</th>' in page
    assert "## Run run_after" in md


def test_missing_pieces_degrade_gracefully(tmp_path: Path) -> None:
    trials = [trial("base", True, 40, i=i) for i in range(3)] + [trial("base", True, None, i=3, error="boom")]
    run = write_run(tmp_path / "flat", trials, calibration=False)
    (run / "trials.jsonl").write_text((run / "trials.jsonl").read_text() + '{"torn', encoding="utf-8")
    result = write_report([run], out_dir=tmp_path / "out")
    assert {p.name for p in result["plots"]} == {"rates.png", "first_score.png", "first_vs_last.png"}
    md = result["markdown"].read_text(encoding="utf-8")
    assert "| base | 3 (+1 err) | 0.0% " in md and "| – | – | – |" in md  # no unsteered trials, no perplexity
    assert md.count("\n#### ") == 3  # single-attempt trials fill in when there is no multi-attempt one


def test_missing_summary_names_path(tmp_path: Path) -> None:
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        write_report([empty])


def test_format_table(run_a: Path) -> None:
    summary = json.loads((run_a / "summary.json").read_text())
    table = format_table(summary)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and "false restart" in lines[0]
    for name in ("base", "adapter", "adapter+metaprompt:resist"):
        assert any(line.startswith(name + " ") for line in lines[2:])
    base = next(line for line in lines if line.startswith("base "))
    assert "22.2% " + ci_text(2, 9) in base and "11.1% " + ci_text(1, 9) in base and "0.0% " + ci_text(0, 4) in base
    assert "50.0% " + ci_text(4, 8) in table and "25.0% " + ci_text(1, 4) in table
