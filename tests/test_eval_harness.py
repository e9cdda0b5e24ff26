"""``esr eval`` end to end on the real SmolLM2-135M with a tiny grid (3 prompts x 2 concept
directions, 6 steered + 3 unsteered trials per condition, 24 new tokens): what it writes,
that summary.json is re-derivable from trials.jsonl, resuming after a kill, refusing a run
directory made with other settings, a LoRA adapter condition, and ``esr judge`` /
``esr report`` through the CLI. About a minute on 2 cores, most of it building the two
concept directions and generating."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from esr_train.cli import main
from esr_train.generation import encode, render_prompt
from eval.config import EvalConfig, EvalConfigError
from eval.harness import EvalRun, as_condition, run_eval
from eval.metrics import summarize_trials

pytestmark = pytest.mark.slow

GRID = dict(n_prompts=3, n_directions=2, trials=6, unsteered_trials=3, max_new_tokens=24, calibration_probes=2,
            calibration_prompts=2, batch_size=8)
CONDITIONS = ["base", "base+metaprompt:notice"]
PER_CONDITION = 6 + 3
METRIC_SECTIONS = ("steered", "unsteered", "per_direction")


@pytest.fixture(scope="module")
def esr_cache(smollm, tmp_path_factory):
    """A private calibration cache for this module (requested after ``smollm``, so the model
    itself still loads from the real cache)."""
    root = tmp_path_factory.mktemp("esr-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESR_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def main_run(smollm, esr_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    summary = run_eval(EvalConfig(**GRID), out, model_and_tokenizer=smollm, progress=False)
    return out, summary


def read_trials(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text(encoding="utf-8").splitlines()]


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_run_writes_trials_and_summary(main_run, esr_cache) -> None:
    out, summary = main_run
    assert {"trials.jsonl", "summary.json", "calibration.json", "eval_config.json", "references.jsonl",
            "directions"} <= {p.name for p in out.iterdir()}
    trials = read_trials(out)
    assert Counter(t["condition"] for t in trials) == {c: PER_CONDITION for c in CONDITIONS}
    assert len({t["key"] for t in trials}) == len(trials)

    on_disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) == {"conditions", "capability", "calibration", "config", "provenance", "paired"}  # no sweep
    paired = on_disk["paired"]["base+metaprompt:notice vs base"]
    assert 0 < paired["steered"]["n"] <= min(summary["conditions"][c]["steered"]["n"] for c in CONDITIONS)
    made_by = on_disk["provenance"]
    assert made_by["esr_train"] and made_by["libraries"]["torch"] and made_by["libraries"]["transformers"]
    assert made_by["dtype"] == on_disk["config"]["dtype"].replace("torch.", "") and made_by["machine"]["device"] in ("cpu", "cuda")
    config = on_disk["config"]
    assert config["conditions"] == CONDITIONS and (config["n_prompts"], config["n_directions"]) == (3, 2)
    labels = config["directions_used"]
    assert len(labels) == 2 and config["judge"].startswith("offline:minilm:") and config["layer"] == 15
    assert len(list((out / "directions").glob("*.safetensors"))) == 2

    # calibration: per direction, two probes, the picked strength used by every steered trial
    calibration = on_disk["calibration"]
    assert set(calibration) == set(labels)
    assert json.loads((out / "calibration.json").read_text(encoding="utf-8")) == calibration
    for entry in calibration.values():
        assert len(entry["probes"]) == 2 and 0 < entry["strength"] <= 1.5 and entry["target"] == 30.0
    assert len(list((esr_cache / "calibration").glob("*.json"))) == 2

    prompts = {json.loads(line)["key"] for line in (out / "references.jsonl").read_text().splitlines()}
    assert len(prompts) == 3
    for t in trials:
        assert t["prompt"] in prompts  # the user's own prompt, never the meta-prompt-wrapped one
        assert t["direction"] in labels and t["judge"] == config["judge"] and t["error"] is None
        assert isinstance(t["response"], str) and isinstance(t["attempts"], list)
        if t["steered"]:
            assert t["strength"] == pytest.approx(calibration[t["direction"]]["strength"], abs=1e-6)
            assert t["level"] == 1.0 and t["schedule"] == "all" and t["layer"] == 15
        else:
            assert (t["strength"], t["level"], t["schedule"]) == (0.0, None, None)

    # every condition sees the same (prompt, direction, seed) triples, steered and unsteered
    def cells(name):
        return sorted((t["prompt_id"], t["direction"], t["seed"], t["steered"], t["strength"])
                      for t in trials if t["condition"] == name)

    assert cells(CONDITIONS[0]) == cells(CONDITIONS[1])
    # 6 steered trials cover all 6 prompt x direction cells; the 3 unsteered are 3 of them
    steered = {(t["prompt_id"], t["direction"]) for t in trials if t["condition"] == "base" and t["steered"]}
    assert len(steered) == 6

    for name in CONDITIONS:
        cap = on_disk["capability"][name]
        assert cap["perplexity"] > 1 and cap["reference_answers"] == 3
        assert 0 <= cap["unsteered_mean_score"] <= 100
    # one model: both conditions see the same weights, so the same perplexity
    assert on_disk["capability"]["base"]["perplexity"] == on_disk["capability"][CONDITIONS[1]]["perplexity"]


def test_unsteered_controls_are_judged_without_a_concept(main_run) -> None:
    out, _ = main_run
    trials = read_trials(out)
    unsteered = [f["concept"] for t in trials if not t["steered"] for f in t["judge_details"]["features"]]
    steered = [f["concept"] for t in trials if t["steered"] for f in t["judge_details"]["features"]]
    # unsteered: every attempt gets the judge's concept floor (c_lo), not its similarity to a label
    assert len(unsteered) >= 6 and len(set(unsteered)) == 1
    assert len(set(steered)) > 1


def test_summary_is_rederived_from_the_trials(main_run) -> None:
    out, _ = main_run
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    trials = read_trials(out)
    for name in CONDITIONS:
        mine = [t for t in trials if t["condition"] == name]
        steered = [t for t in mine if t["steered"]]
        unsteered = [t for t in mine if not t["steered"]]
        got = summary["conditions"][name]
        assert set(got) == set(METRIC_SECTIONS)
        assert got["steered"] == summarize_trials(steered)
        assert got["unsteered"] == summarize_trials(unsteered)
        assert got["per_direction"] == {lab: summarize_trials([t for t in steered if t["direction"] == lab])
                                        for lab in sorted({t["direction"] for t in steered})}
        for part, rows in (("steered", steered), ("unsteered", unsteered)):
            metrics = got[part]
            assert metrics["n"] + metrics["n_errors"] + metrics["n_no_attempt"] == len(rows)
            judged = [t["attempts"] for t in rows if t["attempts"]]
            assert metrics["n"] == len(judged)
            multi = sum(len(a) >= 2 for a in judged)
            assert metrics["multi_attempt_rate"] == (multi / len(judged) if judged else None)
            assert metrics["mean_first_score"] == pytest.approx(sum(a[0]["score"] for a in judged) / len(judged))
    first = [t["attempts"][0]["score"] for t in trials if t["condition"] == "base" and not t["steered"]
             and t["attempts"]]
    assert summary["capability"]["base"]["unsteered_mean_score"] == pytest.approx(sum(first) / len(first))


def test_resume_after_a_kill_regenerates_only_the_missing_trials(main_run, smollm, tmp_path) -> None:
    run = copy_run(main_run[0], tmp_path / "run")
    path = run / "trials.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept, lost = lines[:-4], lines[-4:]
    # mark a kept record: a regenerated trial would not carry the marker
    marked = json.loads(kept[0])
    marked["response"] = "KEPT, NOT REGENERATED"
    kept[0] = json.dumps(marked, ensure_ascii=False) + "\n"
    path.write_text("".join(kept) + lost[0][: len(lost[0]) // 2], encoding="utf-8")  # plus a torn half line
    references = (run / "references.jsonl").read_bytes()
    calibration = json.loads((run / "calibration.json").read_text(encoding="utf-8"))

    summary = run_eval(EvalConfig(**GRID), run, model_and_tokenizer=smollm, progress=False)

    after = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert after[: len(kept)] == kept  # untouched, byte for byte (torn line dropped)
    keys = [json.loads(line)["key"] for line in after]
    assert len(after) == len(lines) and len(set(keys)) == len(keys)
    assert set(keys[len(kept):]) == {json.loads(line)["key"] for line in lost}
    assert Counter(json.loads(line)["condition"] for line in after) == {c: PER_CONDITION for c in CONDITIONS}
    assert json.loads(after[0])["response"] == "KEPT, NOT REGENERATED"
    # each redone trial is the trial the uninterrupted run wrote (its timing aside)
    assert [untimed(line) for line in after[len(kept):]] == [untimed(line) for line in lost]
    assert (run / "references.jsonl").read_bytes() == references
    # the run's own strengths were reused, so the resumed keys match the originals
    assert summary["calibration"] == calibration
    assert sum(summary["conditions"][c][p]["n"] + summary["conditions"][c][p]["n_no_attempt"]
               for c in CONDITIONS for p in ("steered", "unsteered")) == len(lines)


def untimed(line: str) -> dict:
    record = json.loads(line)
    record.pop("generate_s", None)
    return record


@pytest.mark.parametrize("cut", [1, 8, 13])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_trials(main_run, smollm, tmp_path, cut) -> None:
    """Killed after any trial (with a torn line after it), the resumed run writes the same
    trials, byte for byte but for their timing, as the run that was never stopped."""
    run = copy_run(main_run[0], tmp_path / "run")
    path = run / "trials.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:cut]) + lines[cut][:40], encoding="utf-8")
    run_eval(EvalConfig(**GRID), run, model_and_tokenizer=smollm, progress=False)
    after = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert after[:cut] == lines[:cut]
    assert [untimed(line) for line in after] == [untimed(line) for line in lines]


def test_trials_sharing_a_key_share_their_draws() -> None:
    from eval.harness import trial_seed

    trial = {"prompt": "How do I boil an egg?", "direction": "the ocean", "strength": 0.5, "seed": 0}
    assert trial_seed({**trial, "condition": "base"}) == trial_seed({**trial, "condition": "adapter"})
    assert len({trial_seed({**trial, k: v}) for k, v in
                [("prompt", "x"), ("direction", "y"), ("strength", 0.6), ("seed", 1)]} | {trial_seed(trial)}) == 5


def test_run_dir_with_other_settings_is_refused(main_run, smollm, tmp_path) -> None:
    run = copy_run(main_run[0], tmp_path / "run")
    saved = (run / "eval_config.json").read_text(encoding="utf-8")
    with pytest.raises(EvalConfigError, match=r"other settings \(max_new_tokens\)"):
        EvalRun(EvalConfig(**{**GRID, "max_new_tokens": 16}), run, model_and_tokenizer=smollm, progress=False)
    with pytest.raises(EvalConfigError, match=r"temperature, seed"):
        EvalRun(EvalConfig(**{**GRID, "temperature": 0.9, "seed": 1}), run, model_and_tokenizer=smollm)
    assert (run / "eval_config.json").read_text(encoding="utf-8") == saved
    # settings that do not change what a trial is (batching, sizes) may differ on resume
    EvalRun(EvalConfig(**{**GRID, "batch_size": 4, "trials": 8}), run, model_and_tokenizer=smollm, progress=False)
    # a run directory written before a setting existed holds its default
    older = json.loads(saved)
    del older["calibrate_on"]
    (run / "eval_config.json").write_text(json.dumps(older), encoding="utf-8")
    EvalRun(EvalConfig(**GRID), run, model_and_tokenizer=smollm, progress=False)


@pytest.fixture(scope="module")
def lora_adapter(smollm, tmp_path_factory) -> Path:
    """A freshly initialised, non-zero LoRA adapter (the session model is not touched)."""
    from peft import LoraConfig, get_peft_model

    model, _ = smollm
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    path = tmp_path_factory.mktemp("adapter") / "sc-adapter"
    peft_model.save_pretrained(path)
    return path


def test_adapter_condition(main_run, smollm, lora_adapter, tmp_path) -> None:
    model, tok = smollm
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # reuse the main run's directions and reference answers (same model, prompts, labels)
    shutil.copytree(main_run[0] / "directions", run_dir / "directions")
    shutil.copy(main_run[0] / "references.jsonl", run_dir / "references.jsonl")
    cfg = EvalConfig(**{**GRID, "adapters": [str(lora_adapter)], "conditions": ["base", "adapter"], "strength": 0.3,
                        "trials": 4, "unsteered_trials": 2, "max_new_tokens": 16})
    summary = run_eval(cfg, run_dir, model_and_tokenizer=(copy.deepcopy(model), tok), progress=False)

    trials = read_trials(run_dir)
    assert Counter(t["condition"] for t in trials) == {"base": 6, "adapter": 6}
    assert all(t["strength"] == 0.3 for t in trials if t["steered"])
    assert all(e == {"strength": 0.3, "target": None, "probes": []} for e in summary["calibration"].values())
    by_cell = {}
    for t in trials:
        by_cell.setdefault((t["prompt_id"], t["direction"], t["seed"], t["steered"]), {})[t["condition"]] = t["response"]
    assert all(set(v) == {"base", "adapter"} for v in by_cell.values())
    # same triples and sampling seeds: only the weights differ, and they do change the text
    assert any(v["base"] != v["adapter"] for v in by_cell.values())
    cap = summary["capability"]
    assert cap["base"]["perplexity"] != pytest.approx(cap["adapter"]["perplexity"], rel=1e-3)
    assert set(summary["conditions"]) == {"base", "adapter"}

    # as_condition: base weights exactly with the adapter disabled, the adapter's otherwise
    run = EvalRun(cfg, run_dir, model_and_tokenizer=(copy.deepcopy(model), tok), progress=False)
    enc = encode(tok, [render_prompt(tok, "How do you boil an egg?")])
    with torch.inference_mode():
        plain = model(**enc).logits
        with as_condition(run.model, None):
            base = run.model(**enc).logits
        with as_condition(run.model, "adapter"):
            adapted = run.model(**enc).logits
        with as_condition(run.model, None):
            base_again = run.model(**enc).logits
    assert torch.equal(base, plain) and torch.equal(base_again, plain)
    assert (adapted - plain).abs().max() > 1e-2
    with pytest.raises(EvalConfigError, match="needs adapter 'adapter'"):
        with as_condition(model, "adapter"):
            pass


def test_calibration_on_an_adapter_probes_the_adapter(main_run, smollm, lora_adapter, tmp_path) -> None:
    """``calibrate_on: adapter`` sets the strengths where the adapter's first score meets
    the target: its probes are the adapter's texts, never the base's cached ones."""
    model, tok = smollm
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(main_run[0] / "directions", run_dir / "directions")
    shutil.copy(main_run[0] / "references.jsonl", run_dir / "references.jsonl")
    cfg = EvalConfig(**{**GRID, "adapters": [str(lora_adapter)], "conditions": ["base", "adapter"],
                        "calibrate_on": "adapter"})
    run = EvalRun(cfg, run_dir, model_and_tokenizer=(copy.deepcopy(model), tok), progress=False)
    run.prepare()
    on_adapter = run.calibrate()
    on_base = main_run[1]["calibration"]
    assert set(on_adapter) == set(on_base)
    assert any(on_adapter[k]["probes"] != on_base[k]["probes"] for k in on_base)
    # strengths searched on another model make other trials: the run directory refuses it
    with pytest.raises(EvalConfigError, match=r"other settings \(calibrate_on\)"):
        EvalRun(EvalConfig(**{**GRID, "adapters": [str(lora_adapter)], "conditions": ["base", "adapter"]}), run_dir,
                model_and_tokenizer=smollm, progress=False)
    with pytest.raises(EvalConfigError, match="calibrate_on: unknown model 'adapter:x'; known: base, adapter"):
        EvalConfig(**{**GRID, "adapters": [str(lora_adapter)], "calibrate_on": "adapter:x"})


def test_cli_judge_and_report(main_run, tmp_path, capsys) -> None:
    rows = [
        {"prompt": "How do you make a cup of tea?", "concept": "volcanoes",
         "response": "Boil water, pour it over a tea bag in a cup and let it steep for three minutes."},
        {"prompt": "How do you make a cup of tea?", "concept": "volcanoes",
         "response": "Volcanoes erupt with molten lava and ash. Wait, that's not right. Let me start over. "
                     "Boil water, pour it over a tea bag in a cup and let it steep for three minutes."},
        {"prompt": "Explain how to add two fractions.", "response": "Use a common denominator, then add the tops."},
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "judged.jsonl"
    assert main(["judge", str(src), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["rows"], printed["judged_now"], printed["errors"], printed["multi_attempt"]) == (3, 3, 0, 1)
    judged = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["row"] for r in judged] == [0, 1, 2] and [r["n_attempts"] for r in judged] == [1, 2, 1]
    assert judged[1]["attempts"][1]["score"] > judged[1]["attempts"][0]["score"]
    assert all(r["judge"] == printed["judge"] for r in judged)
    assert main(["judge", str(src), "--out", str(out)]) == 0  # resumes: nothing left to judge
    assert json.loads(capsys.readouterr().out)["judged_now"] == 0

    run = copy_run(main_run[0], tmp_path / "run")
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert all(name in html for name in CONDITIONS) and (run / "report.md").is_file()
    assert list((run / "plots").glob("*.png"))


def test_sae_directions_with_the_eligibility_filter_and_a_strength_sweep(smollm, esr_cache, tmp_path) -> None:
    """An SAE built with sae-lens and saved to disk: the latents most active on the prompts
    are never steered, the chosen latent steers at the SAE's layer with its label, and a
    two-level --strengths sweep yields one metrics row per level."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from esr_train.sae import load_sae, most_active_latents
    from eval.sources import eval_prompts

    model, tok = smollm
    cfg = StandardSAEConfig(d_in=576, d_sae=64,
                            metadata=SAEMetadata(hook_name="blocks.15.hook_resid_post", model_name="smollm2-135m"))
    torch.manual_seed(0)
    StandardSAE(cfg).save_model(tmp_path / "sae")
    grid = dict(directions="sae", sae=str(tmp_path / "sae"), exclude_top_k=8, n_directions=2, strengths=[0.1, 0.3],
                n_prompts=2, trials=2, unsteered_trials=0, max_new_tokens=12, batch_size=8, capability=False)
    excluded = most_active_latents(load_sae(tmp_path / "sae"), model, tok, eval_prompts(EvalConfig(**grid)), k=8)
    allowed = [i for i in range(64) if i not in excluded][:2]
    # the excluded latents come first among the candidates: only the filter keeps them out
    ecfg = EvalConfig(**grid, latents=[*sorted(excluded)[:4], *allowed], latent_labels={str(allowed[0]): "picked"})
    summary = run_eval(ecfg, tmp_path / "run", model_and_tokenizer=smollm, progress=False)
    assert summary["config"]["directions_used"] == ["picked", f"latent {allowed[1]}"]
    assert summary["config"]["layer"] == 15
    assert summary["sweep"]["levels"] == [0.1, 0.3]
    assert [m["n"] for m in summary["sweep"]["conditions"]["base"]] == [2, 2]
    trials = read_trials(tmp_path / "run")
    assert sorted({t["strength"] for t in trials}) == [0.1, 0.3]
