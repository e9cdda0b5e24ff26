"""Mechanics of the evaluation harness that need no model: trial planning, config and
condition validation, strength calibration (with a synthetic probe), the resumable trial
file and the summary built from judged trials.

The tiny random-init models in conftest come without a tokenizer or chat template, so the
end-to-end harness run lives in test_eval_harness.py (slow, on the real SmolLM2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from esr_train.directions import SteeringDirection
from esr_train.records import RecordFile
from eval.calibration import calibrate, next_strength, pick_strength
from eval.config import METAPROMPTS, EvalConfig, EvalConfigError, parse_condition
from eval.harness import plan_triples
from eval.metrics import summarize_trials
from eval.summary import build_summary

# --------------------------------------------------------------------------- plan_triples


def test_plan_triples_covers_the_grid_before_repeating_with_the_next_seed() -> None:
    triples = plan_triples(3, 2, 14, seed=5)
    assert triples == plan_triples(3, 2, 14, seed=5)  # deterministic
    pairs = [(t.prompt_id, t.direction_id) for t in triples]
    grid = {(p, d) for p in range(3) for d in range(2)}
    assert set(pairs[:6]) == grid and len(set(pairs[:6])) == 6  # every pair once before any repeat
    assert pairs[6:12] == pairs[:6] and pairs[12:] == pairs[:2]  # then the same order again
    assert [t.seed for t in triples] == [5] * 6 + [6] * 6 + [7] * 2
    # a smaller n is a prefix (no pair twice), and another seed gives another order
    assert plan_triples(3, 2, 4, seed=5) == triples[:4]
    assert [(t.prompt_id, t.direction_id) for t in plan_triples(3, 2, 6, seed=11)] != pairs[:6]
    assert all(t.seed == 11 for t in plan_triples(3, 2, 6, seed=11))


def test_plan_triples_single_cell_grid_only_varies_the_seed() -> None:
    triples = plan_triples(1, 1, 3, seed=0)
    assert [(t.prompt_id, t.direction_id, t.seed) for t in triples] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]


# --------------------------------------------------------------------------- config / conditions


@pytest.mark.parametrize(
    ("kwargs", "field", "detail"),
    [
        (dict(metaprompt="bogus"), "eval.metaprompt", "bogus"),
        (dict(conditions=["base", "base+metaprompt:bogus"]), "eval.conditions", "unknown meta-prompt 'bogus'"),
        (dict(conditions=["adapter"]), "eval.conditions", "pass an adapter"),
        (dict(adapters=["runs/a"], conditions=["adapter:other"]), "eval.conditions", "'adapter:other'"),
        (dict(judge="llm"), "eval.judge", "judge_base_url"),
        (dict(judge="llm", judge_base_url="http://localhost:1/v1"), "eval.judge", "judge_model"),
        (dict(metaprompt_templates={"mine": "Stay on topic."}), "eval.metaprompt_templates.mine", "{prompt}"),
        (dict(trials=0), "eval.trials", "0"),
        (dict(target_score=100), "eval.target_score", "100"),
        (dict(unsteered_trials=-1), "eval.unsteered_trials", "-1"),
        (dict(calibration_prompts=0), "eval.calibration_prompts", "0"),
        (dict(batch_size=0), "eval.batch_size", "0"),
        (dict(temperature=0.0), "eval.temperature", "0.0"),
        (dict(calibration="global"), "eval.calibration", "global"),
        (dict(strengths=[0.2], sweep_factors=[1.0]), "eval.strengths", "sweep_factors"),
        (dict(adapters=["x/adapter", "y/adapter"]), "eval.adapters", "directory name"),
        (dict(directions="sae"), "eval.directions", "eval.sae"),
    ],
)
def test_eval_config_errors_name_the_field(kwargs, field, detail) -> None:
    with pytest.raises(EvalConfigError) as err:
        EvalConfig(**kwargs)
    assert str(err.value).startswith(field), str(err.value)
    assert detail in str(err.value)


def test_default_conditions_and_adapter_names() -> None:
    assert EvalConfig().resolved_conditions() == ["base", "base+metaprompt:notice"]
    one = EvalConfig(adapters=["runs/sc-adapter"], metaprompt="resist")
    assert one.resolved_conditions() == ["base", "base+metaprompt:resist", "adapter"]
    two = EvalConfig(adapters=["runs/a30", "runs/a70"], conditions=["adapter:a70+metaprompt:focus"])
    assert two.adapter_names() == {"adapter:a30": "runs/a30", "adapter:a70": "runs/a70"}
    cond = parse_condition("adapter:a70+metaprompt:focus", two.adapter_names(), two.all_metaprompts())
    assert (cond.adapter, cond.template) == ("adapter:a70", METAPROMPTS["focus"])
    # a custom template is usable by id, with its own placeholders
    custom = EvalConfig(metaprompt="mine", metaprompt_templates={"mine": "[{label}] {prompt}"})
    assert custom.resolved_conditions()[1] == "base+metaprompt:mine"


def test_condition_wrap_fills_prompt_and_label() -> None:
    named = parse_condition("base+metaprompt:named", {}, METAPROMPTS)
    assert named.adapter is None
    assert named.wrap("How do I boil an egg?", "volcanoes") == (
        "How do I boil an egg?\n\nYou are being distracted with volcanoes. Ignore it.")
    notice = parse_condition("base+metaprompt:notice", {}, METAPROMPTS)
    assert notice.wrap("Q?", "volcanoes").startswith("Q?\n\nIf you notice yourself going off-topic")
    assert "volcanoes" not in notice.wrap("Q?", "volcanoes")
    plain = parse_condition("base", {}, METAPROMPTS)
    assert plain.wrap("How do I boil an egg?", "volcanoes") == "How do I boil an egg?"
    # placeholders inside the user's prompt are text, not template fields
    odd = "What does {label} mean in a Python format string?"
    assert named.wrap(odd, "volcanoes") == odd + "\n\nYou are being distracted with volcanoes. Ignore it."


# --------------------------------------------------------------------------- calibration by hand


def test_next_strength_on_hand_examples() -> None:
    assert next_strength([(0.3, 50.0)], target=30, hi=1.5) == pytest.approx(0.6)  # not pushed enough: double
    assert next_strength([(1.0, 50.0)], target=30, hi=1.5) == pytest.approx(1.5)  # ... capped at hi
    assert next_strength([(0.4, 10.0)], target=30, hi=1.5) == pytest.approx(0.2)  # overwhelmed: halve
    assert next_strength([(0.3, 30.0)], target=30, hi=1.5) == pytest.approx(0.15)  # at target counts as below
    # bracketed: linear interpolation between the tightest bracket
    assert next_strength([(0.2, 60.0), (0.6, 20.0)], target=30, hi=1.5) == pytest.approx(0.5)
    assert next_strength([(0.1, 80.0), (0.2, 60.0), (0.6, 20.0), (1.0, 5.0)], target=30, hi=1.5) == pytest.approx(0.5)


def test_pick_strength_on_hand_examples() -> None:
    assert pick_strength([(0.2, 60.0), (0.6, 20.0)], target=30) == pytest.approx(0.5)
    assert pick_strength([(0.1, 70.0), (0.4, 10.0)], target=30) == pytest.approx(0.3)
    assert pick_strength([(0.3, 50.0), (0.6, 40.0)], target=30) == pytest.approx(0.6)  # nearest when never below
    assert pick_strength([(0.3, 10.0), (0.15, 25.0)], target=30) == pytest.approx(0.15)  # nearest when never above
    # non-monotone probes (noise): no interpolation across an inverted bracket, nearest instead
    assert pick_strength([(0.6, 50.0), (0.3, 20.0)], target=30) == pytest.approx(0.3)
    assert pick_strength([(1 / 3, 40.0)], target=30) == 0.3333  # rounded to 4 places


# --------------------------------------------------------------------------- calibrate()

SCALES = {"volcanoes": 0.3, "jazz": 0.5}  # score = 90 * exp(-strength / scale)
PROMPTS = ["How do you boil an egg?", "Explain how to tie a tie."]
SETTINGS = {"model": "synthetic", "layer": 1, "judge": "test", "seed": 0}


def _directions() -> list[SteeringDirection]:
    gen = torch.Generator().manual_seed(0)
    return [SteeringDirection(torch.randn(16, generator=gen), layer=1, label=label, source="concept",
                              reference_norm=10.0) for label in SCALES]


class Probe:
    """Deterministic synthetic first-attempt score, recording every call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple]] = []

    def __call__(self, rows):
        self.calls.append(rows)
        return [90.0 * math.exp(-s / SCALES[d.label]) for d, s, _ in rows]


def _calibrate(probe, shared: bool = False, target: float = 30.0) -> dict:
    return calibrate(_directions(), PROMPTS, probe, target=target, rounds=6, start=0.3, hi=1.5, shared=shared,
                     settings=SETTINGS)


@pytest.fixture()
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ESR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_calibrate_per_direction_converges_and_caches(cache_root) -> None:
    probe = Probe()
    result = _calibrate(probe)
    assert list(result) == list(SCALES)
    for label, scale in SCALES.items():
        analytic = scale * math.log(3)  # 90 exp(-s/scale) = 30
        entry = result[label]
        assert entry["strength"] == pytest.approx(analytic, abs=0.05), (label, entry)  # measured: within 1e-4
        assert abs(entry["probes"][-1][1] - 30) < 1  # the last probe already scores about the target
        assert entry["target"] == 30 and entry["cached"] is False
        assert len(entry["probes"]) == 6 and entry["probes"][0] == [0.3, round(90 * math.exp(-0.3 / scale), 2)]
    assert result["volcanoes"]["strength"] < result["jazz"]["strength"]
    # six rounds, each one batch holding every (direction, prompt) pair
    assert len(probe.calls) == 6
    assert all(len(rows) == len(SCALES) * len(PROMPTS) for rows in probe.calls)
    assert all({p for _, _, p in rows} == set(PROMPTS) for rows in probe.calls)
    assert len(list((cache_root / "calibration").glob("*.json"))) == 2

    def must_not_run(rows):
        raise AssertionError("calibration cache missed")

    again = _calibrate(must_not_run)
    for label in SCALES:
        assert again[label]["cached"] is True
        assert again[label]["strength"] == result[label]["strength"]
        assert again[label]["probes"] == result[label]["probes"]
    # other settings (here the target) are another cache entry
    other = Probe()
    assert _calibrate(other, target=40.0)["volcanoes"]["strength"] < result["volcanoes"]["strength"]
    assert len(other.calls) == 6


def test_calibrate_shared_returns_one_strength_for_all(cache_root) -> None:
    probe = Probe()
    result = _calibrate(probe, shared=True)
    strengths = {entry["strength"] for entry in result.values()}
    assert len(strengths) == 1
    (shared,) = strengths
    # the mean over both directions crosses the target between their own strengths
    lo, hi = (s * math.log(3) for s in sorted(SCALES.values()))
    assert lo < shared < hi

    def mean_score(s):
        return sum(90 * math.exp(-s / scale) for scale in SCALES.values()) / len(SCALES)

    assert mean_score(shared) == pytest.approx(30, abs=0.5)
    assert len(probe.calls) == 6 and all(len({s for _, s, _ in rows}) == 1 for rows in probe.calls)
    # shared and per-direction results are separate cache entries
    per_direction = Probe()
    _calibrate(per_direction, shared=False)
    assert len(per_direction.calls) == 6
    assert all(e["cached"] for e in _calibrate(lambda rows: 1 / 0, shared=True).values())


def test_calibrate_treats_rows_without_an_attempt_as_no_data(cache_root) -> None:
    # a probe that never yields a score: the mean counts as 0, so the push keeps halving
    result = calibrate(_directions()[:1], PROMPTS, lambda rows: [None] * len(rows), target=30, rounds=3,
                       start=0.4, hi=1.5, shared=False, settings=SETTINGS, use_cache=False)
    assert [p[0] for p in result["volcanoes"]["probes"]] == [0.4, 0.2, 0.1]


# --------------------------------------------------------------------------- RecordFile


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_record_file_extend_then_reopen(tmp_path) -> None:
    path = tmp_path / "runs" / "trials.jsonl"
    rf = RecordFile(path)
    assert len(rf) == 0 and not path.exists()
    rf.extend([{"key": "a", "x": 1}, {"key": "b", "x": "é"}])
    rf.extend([])
    rf.extend([{"key": "c", "x": None}])
    assert "b" in rf and "z" not in rf and len(rf) == 3
    again = RecordFile(path)
    assert again.records() == [{"key": "a", "x": 1}, {"key": "b", "x": "é"}, {"key": "c", "x": None}]
    assert [json.loads(line)["key"] for line in _lines(path)] == ["a", "b", "c"]
    assert "é" in path.read_text(encoding="utf-8")  # human-readable, not \u-escaped


def test_record_file_drops_and_truncates_a_torn_last_line(tmp_path) -> None:
    path = tmp_path / "trials.jsonl"
    good = '{"key": "a", "v": 1}\n{"key": "b", "v": 2}\n'
    path.write_text(good + '{"key": "c", "v"', encoding="utf-8")
    rf = RecordFile(path)
    assert len(rf) == 2 and "c" not in rf
    assert path.read_text(encoding="utf-8") == good  # cut back to the last whole record
    rf.extend([{"key": "c", "v": 3}])
    assert [r["v"] for r in RecordFile(path).records()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("text", "bad_line"),
    [
        ('{"key": "a"}\n{"key": "b"\n{"key": "c"}\n', 2),  # cut short in the middle
        ('{"key": "a"}\n{"id": "b"}\n{"key": "c"}\n', 2),  # no key field
        ('{"key": "a"}\n\n{"key": "c"}\n', 2),  # blank line
        ('{"key": "a"}\n{"key": "b"}\nnot json\n', 3),  # a whole (newline-ended) bad last line is not torn
    ],
)
def test_record_file_bad_line_names_file_and_line(tmp_path, text, bad_line) -> None:
    path = tmp_path / "trials.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"trials\.jsonl:{bad_line}: "):
        RecordFile(path)
    assert path.read_text(encoding="utf-8") == text  # nothing is truncated on an error


def test_record_file_last_record_without_newline_then_extend(tmp_path) -> None:
    path = tmp_path / "trials.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}', encoding="utf-8")  # killed between the record and its newline
    rf = RecordFile(path)
    assert len(rf) == 2
    rf.extend([{"key": "c"}])
    assert [r["key"] for r in RecordFile(path).records()] == ["a", "b", "c"]


# --------------------------------------------------------------------------- build_summary


def _trial(condition: str, steered: bool, scores, i: int, level=1.0, direction: str = "volcanoes",
           error: str | None = None) -> dict:
    return {"key": f"{condition}|{steered}|{i}|{level}", "condition": condition, "steered": steered,
            "direction": direction, "level": level if steered else None, "strength": 0.3 if steered else 0.0,
            "attempts": [] if error else [{"text": f"attempt {k}", "score": s} for k, s in enumerate(scores)],
            "error": error}


def _hand_trials() -> list[dict]:
    t = [_trial("base", True, [20, 80], 0), _trial("base", True, [60, 40], 1, direction="jazz"),
         _trial("base", True, [30], 2), _trial("base", True, [50], 3, direction="jazz"),
         _trial("base", True, [], 4, error="judge timeout"), _trial("base", True, [], 5)]
    t += [_trial("base", False, [90], 10), _trial("base", False, [70, 85], 11)]
    t += [_trial("adapter", True, [10, 90], 0), _trial("adapter", True, [40, 60, 70], 1, direction="jazz"),
          _trial("adapter", True, [45], 2)]
    t += [_trial("adapter", False, [88], 10)]
    return t


def test_build_summary_numbers_match_a_hand_computation() -> None:
    summary = build_summary(_hand_trials(), ["base", "adapter"], config={"model": "m"},
                            calibration={"volcanoes": {"strength": 0.3}}, capability={"base": {"perplexity": 9.0}})
    assert set(summary) == {"conditions", "capability", "calibration", "config", "paired"}  # one level: no sweep
    # paired by trial: steered 0-2 under both; ESR only under the adapter on trial 1
    paired = summary["paired"]["adapter vs base"]
    assert paired["steered"]["n"] == 3 and paired["unsteered"]["n"] == 1
    assert (paired["steered"]["multi_attempt"]["only_a"], paired["steered"]["multi_attempt"]["only_b"]) == (0, 0)
    assert (paired["steered"]["esr"]["only_a"], paired["steered"]["esr"]["only_b"]) == (1, 0)
    assert paired["steered"]["first_score_difference"] == -5.0  # (10-20 + 40-60 + 45-30) / 3
    assert paired["unsteered"]["first_score_difference"] == -2.0
    assert summary["calibration"] == {"volcanoes": {"strength": 0.3}} and summary["config"] == {"model": "m"}
    base = summary["conditions"]["base"]
    st = base["steered"]
    # judged: [20,80] [60,40] [30] [50]; one judge error; one trial without an attempt
    assert (st["n"], st["n_errors"], st["n_no_attempt"]) == (4, 1, 1)
    assert (st["n_multi_attempt"], st["n_esr"]) == (2, 1)
    assert st["multi_attempt_rate"] == pytest.approx(2 / 4) and st["esr_rate"] == pytest.approx(1 / 4)
    assert st["improvement_rate"] == pytest.approx(1 / 2)
    assert st["mean_first_score"] == pytest.approx((20 + 60 + 30 + 50) / 4)
    assert st["mean_last_score"] == pytest.approx((80 + 40 + 30 + 50) / 4)
    assert st["mean_delta"] == pytest.approx(((80 - 20) + (40 - 60)) / 2)
    un = base["unsteered"]
    assert (un["n"], un["multi_attempt_rate"], un["mean_first_score"]) == (2, 0.5, 80.0)
    assert set(base["per_direction"]) == {"volcanoes", "jazz"}
    assert base["per_direction"]["jazz"]["mean_first_score"] == pytest.approx(55.0)
    assert base["per_direction"]["volcanoes"]["n_errors"] == 1
    ad = summary["conditions"]["adapter"]["steered"]
    assert (ad["n"], ad["n_multi_attempt"], ad["n_esr"], ad["esr_rate"]) == (3, 2, 2, pytest.approx(2 / 3))
    assert ad["mean_delta"] == pytest.approx((80 + 30) / 2)
    assert summary["conditions"]["adapter"]["unsteered"]["multi_attempt_rate"] == 0.0
    json.dumps(summary, allow_nan=False)  # valid JSON throughout


def test_build_summary_sweep_section_and_headline_level() -> None:
    trials = _hand_trials() + [_trial("base", True, [5, 50], 20, level=2.0), _trial("base", True, [8], 21, level=2.0),
                               _trial("adapter", True, [70], 20, level=0.5)]
    summary = build_summary(trials, ["base", "adapter"], config={"sweep_unit": "factor of the calibrated strength"})
    sweep = summary["sweep"]
    assert sweep["levels"] == [0.5, 1.0, 2.0] and sweep["unit"] == "factor of the calibrated strength"
    base_levels = sweep["conditions"]["base"]
    assert [m["n"] for m in base_levels] == [0, 4, 2]
    assert base_levels[2] == summarize_trials([t for t in trials if t["condition"] == "base" and t["level"] == 2.0])
    assert base_levels[0]["multi_attempt_rate"] is None  # no trials at that level: no rate
    assert [m["n"] for m in sweep["conditions"]["adapter"]] == [1, 3, 0]
    # headline numbers are the calibrated level (factor 1.0) only
    assert summary["conditions"]["base"]["steered"]["n"] == 4
    assert summary["conditions"]["adapter"]["steered"]["n"] == 3
    assert set(summary["conditions"]["base"]["per_direction"]) == {"volcanoes", "jazz"}


def test_build_summary_absolute_strength_sweep_pools_levels() -> None:
    # with eval.strengths the levels are strengths: 1.0 is one push among others, not the
    # calibrated one, so the headline pools every level whether or not 1.0 is among them
    trials = _hand_trials() + [_trial("base", True, [5, 50], 20, level=0.5)]
    for strengths in ([0.5, 1.0], [0.5, 1.0, 2.0]):
        summary = build_summary(trials, ["base", "adapter"], config={"strengths": strengths, "sweep_unit": "strength"})
        assert summary["conditions"]["base"]["steered"]["n"] == 5
        assert summary["sweep"]["levels"] == [0.5, 1.0]


def test_perplexity_holds_a_bounded_number_of_logits_and_does_not_depend_on_grouping():
    """The eval batch (64 rows) x Gemma's 262k vocabulary would hold 13 GB of logits at once;
    a budget splits the rows into more passes without changing the perplexity."""
    from eval.capability import _rows_per_pass, answer_perplexity
    from esr_train.zoo import load_tokenizer
    from tests.conftest import tiny_llama

    assert _rows_per_pass(200, 262_144, 64) == 5 and _rows_per_pass(200, 49_152, 64) == 27
    assert _rows_per_pass(10_000, 262_144, 64) == 1 and _rows_per_pass(10, 128, 8) == 8
    tok = load_tokenizer("smollm2-135m")
    model = tiny_llama(vocab_size=len(tok), max_position_embeddings=512)
    prompts = ["How do you make tea?", "Explain how to add two fractions with different denominators.",
               "How do you tie a shoelace?", "Explain how to save money."]
    answers = ["Boil water, steep the leaves for three minutes, then pour.", "Find a common denominator first.",
               "Cross the laces, loop one, wrap the other around it and pull both loops tight.", "Spend less."]
    together = answer_perplexity(model, tok, prompts, answers, batch_size=8)
    one_by_one = answer_perplexity(model, tok, prompts, answers, batch_size=8, logits_budget=1)
    assert together == pytest.approx(one_by_one, rel=1e-5)
    # against the definition: each row alone, log-softmax over the vocabulary, answer tokens only
    from esr_train.generation import render_prompt
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            head = tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]
            full = tok(render_prompt(tok, p) + a, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), -1)
            nll -= sum(float(logp[t - 1, full[t]]) for t in range(len(head), len(full)))
            count += len(full) - len(head)
    assert together == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a different answer set gives a different value (the comparison above could fail)
    assert answer_perplexity(model, tok, prompts, answers[::-1], batch_size=8) != pytest.approx(together, rel=1e-3)
