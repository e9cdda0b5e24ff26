"""The writer's own false restarts (esr_train.negatives, ``restart_probes``): what is
mined from a sampled answer, how a bad file is reported, how the trainer turns the rows
into unlikelihood negatives, and the probes on the real model."""

from __future__ import annotations

import json

import pytest

from esr_train import negatives
from data_gen.builder import GenerateConfig, GenerateError, build_dataset
from esr_train.training.recipe import TrainExtras
from esr_train.restart_text import has_restart

TIC = ("Giving feedback is essential for growth. Let me start from the beginning: what is the purpose "
       "of this conversation? Start with empathy.")


def test_mine_keeps_the_opener_and_the_restart_span():
    rows, bare = negatives.mine("How do you give feedback?", [
        TIC,
        "Start with empathy. Be specific about the behaviour.",  # no restart: nothing mined
        "Wait, no. Start with empathy.",  # a restart with no opener is counted, not kept
    ], model="m", seed=3)
    assert bare == 1 and len(rows) == 1
    row = rows[0]
    assert row["opener"] == "Giving feedback is essential for growth."
    assert row["restart"].startswith("Let me start") and TIC.index(row["restart"]) > len(row["opener"])
    assert row["prompt"] == "How do you give feedback?" and row["model"] == "m" and row["seed"] == 3


@pytest.mark.parametrize("line, match", [
    ("{not json", r"false_restarts.jsonl:2: not valid JSON"),
    (json.dumps({"prompt": "p", "opener": ""}), r"false_restarts.jsonl:2: missing opener, restart"),
])
def test_bad_mined_file_names_file_and_line(tmp_path, line, match):
    good = json.dumps({"prompt": "p", "opener": "o.", "restart": "Wait, no."})
    (tmp_path / negatives.FILE).write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        negatives.read_mined(tmp_path)
    assert negatives.read_mined(tmp_path / "elsewhere") == []


def test_restart_probes_need_the_self_backend_and_stay_out_of_old_fingerprints():
    with pytest.raises(GenerateError, match="restart_probes"):
        GenerateConfig(backend="template", template_file="x.jsonl", restart_probes=2)
    with pytest.raises(GenerateError, match="restart_probes"):
        GenerateConfig(restart_probes=-1)
    assert "restart_probes" not in GenerateConfig().fingerprint()  # datasets written before the key still resume
    assert GenerateConfig(restart_probes=2).fingerprint()["restart_probes"] == 2


def test_mined_rows_become_negatives_whose_restart_tokens_are_unlikely(tmp_path):
    """The trainer's ``with_false_restarts`` adds each mined row beside the synthetic
    negatives; tokenized, the opener is context and exactly the restart is marked."""
    from datasets import load_from_disk

    from esr_train.training.tokenize import IGNORE, tokenize_row
    from esr_train.negatives import with_false_restarts
    from esr_train.zoo import load_tokenizer

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How do you cook rice?", "answer": "Rinse the rice. Boil it for fifteen minutes.", "split": "train"},
        {"prompt": "How do you boil an egg?", "answer": "Boil water first.", "distraction": "Owls hunt at night.",
         "subject": "owls", "split": "train"},
    ]), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src), test_size=0.0), tmp_path / "ds")
    mined, _ = negatives.mine("How do you give feedback?", [TIC], model="m")
    split = load_from_disk(str(tmp_path / "ds"))["train"]
    rows, n, twins = with_false_restarts(split, seed=0, max_sentences=3, mined=mined)
    assert n == 2 and twins == 0 and len(rows) == len(split) + 2
    row = [r for r in rows if r["prompt"] == "How do you give feedback?"][0]
    assert row["kind"] == "false_restart" and row["distraction"] == mined[0]["opener"] and row["answer"] == ""
    tok = load_tokenizer("smollm2-135m")
    enc = tokenize_row(row, tok, max_length=256)
    marked = [t for t in enc["unlikely"] if t != IGNORE]
    assert tok.decode(marked).strip() == mined[0]["restart"]
    assert all(label == IGNORE for label, u in zip(enc["labels"], enc["unlikely"]) if u == IGNORE)


def _write_two_drifts_and_a_normal_row(tmp_path) -> None:
    """A template dataset at ``tmp_path / "ds"``: one normal row that can be cut and two
    self-correction rows (owls, mars), all in the train split."""
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How do you cook rice?", "answer": "Rinse the rice. Boil it for fifteen minutes.", "split": "train"},
        {"prompt": "How do you boil an egg?", "answer": "Boil water first.", "distraction": "Owls hunt at night.",
         "subject": "owls", "split": "train"},
        {"prompt": "How do you give feedback?", "answer": "Be specific.", "distraction": "Mars is red.",
         "subject": "mars", "split": "train"},
    ]), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src), test_size=0.0), tmp_path / "ds")


def test_mined_positives_twin_each_mined_restart_with_a_drift_that_restarts_the_same_way(tmp_path):
    """``mined_positives``: every mined negative gets a self-correction twin with the mined
    phrase as its restart, copied from a row of the same prompt when there is one; the twin
    trains the phrase as likely after the drift, the negative marks it unlikely after the
    opener."""
    from datasets import load_from_disk

    from esr_train.training.tokenize import IGNORE, tokenize_row
    from esr_train.negatives import with_false_restarts
    from esr_train.zoo import load_tokenizer

    _write_two_drifts_and_a_normal_row(tmp_path)
    mined = [{"prompt": "How do you give feedback?", "opener": "Feedback matters.", "restart": "Let me start over"},
             {"prompt": "How do you iron a shirt?", "opener": "Irons get hot.", "restart": "Let me try again"}]
    split = load_from_disk(str(tmp_path / "ds"))["train"]
    rows, n, twins = with_false_restarts(split, seed=0, max_sentences=3, mined=mined, mined_positives=True)
    assert (n, twins) == (3, 2) and len(rows) == len(split) + 5
    pairs = [r for r in rows if r["id"].startswith("mined-pair-")]
    assert [r["restart"] for r in pairs] == ["Let me start over", "Let me try again"]
    assert all(r["kind"] == "self_correction" and r["distraction"] and r["answer"] for r in pairs)
    assert pairs[0]["prompt"] == "How do you give feedback?" and pairs[0]["distraction"] == "Mars is red."
    tok = load_tokenizer("smollm2-135m")
    enc = tokenize_row(pairs[0], tok, max_length=256)
    trained = tok.decode([t for t in enc["labels"] if t != IGNORE])
    assert trained.strip().startswith("Let me start over Be specific.") and set(enc["unlikely"]) == {IGNORE}
    with pytest.raises(Exception, match="mined_positives"):
        TrainExtras(mined_positives=True)
    # the other keys that shape unlikelihood refuse it off too, not pass silently
    for key, value in (("unlikely_tokens", 2), ("unlikely_floor", 1e-3)):
        with pytest.raises(Exception, match=f"train.{key} .*unlikelihood_weight > 0"):
            TrainExtras(**{key: value})
        assert getattr(TrainExtras(unlikelihood_weight=1.0, **{key: value}), key) == value


def test_unpushed_negatives_repeat_each_drift_without_the_push_and_mark_its_restart_unlikely(tmp_path):
    """``unpushed_negatives``: each self-correction row comes back as a negative with the
    same drift and restart, no direction (so the trainer does not push it), the restart's
    tokens marked unlikely and nothing of the answer trained; normal rows get none."""
    from datasets import load_from_disk

    from esr_train.training.steered import row_steer_ids, steer_subjects
    from esr_train.training.tokenize import IGNORE, tokenize_row
    from esr_train.negatives import with_false_restarts
    from esr_train.zoo import load_tokenizer

    _write_two_drifts_and_a_normal_row(tmp_path)
    split = load_from_disk(str(tmp_path / "ds"))["train"]
    plain, n_plain, _ = with_false_restarts(split, seed=0, max_sentences=3)
    rows, n, _ = with_false_restarts(split, seed=0, max_sentences=3, unpushed=True)
    assert n == n_plain + 2 and len(rows) == len(plain) + 2
    unpushed = [r for r in rows if r["id"].endswith("-unpushed")]
    positives = {r["prompt"]: r for r in split if r["kind"] == "self_correction"}
    assert sorted(r["prompt"] for r in unpushed) == sorted(positives)
    for r in unpushed:
        twin = positives[r["prompt"]]
        assert r["kind"] == "false_restart" and (r["distraction"], r["restart"]) == (twin["distraction"], twin["restart"])
    assert row_steer_ids(unpushed, steer_subjects(rows)) == [-1, -1]
    tok = load_tokenizer("smollm2-135m")
    enc = tokenize_row(unpushed[0], tok, max_length=256)
    assert tok.decode([t for t in enc["unlikely"] if t != IGNORE]).strip() == unpushed[0]["restart"]
    assert enc["n_loss_tokens"] == 0
    with pytest.raises(Exception, match="unpushed_negatives"):
        TrainExtras(unpushed_negatives=True, unlikelihood_weight=1.0)
    TrainExtras(unpushed_negatives=True, unlikelihood_weight=1.0, steer_strength=0.1)


def test_unlikely_tokens_mark_only_the_start_of_a_false_restart_and_end_the_row_there():
    """``unlikely_tokens=M``: a negative row keeps its opener as context and marks only the
    restart's first M tokens (nothing after them is in the row, so no later restart token is
    trained as likely); other row kinds are untouched."""
    from esr_train.training.tokenize import IGNORE, tokenize_row
    from esr_train.zoo import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    row = {"prompt": "How do you give feedback?", "kind": "false_restart", "distraction": "Be specific and kind.",
           "restart": "Let me start from the beginning", "answer": ""}
    whole = tokenize_row(row, tok, max_length=256)
    first2 = tokenize_row(row, tok, max_length=256, unlikely_tokens=2)
    marked = [t for t in first2["unlikely"] if t != IGNORE]
    assert len(marked) == 2 and tok.decode(marked).strip() == "Let me"
    assert len(first2["input_ids"]) == len(whole["input_ids"]) - (len(tok.encode(" " + row["restart"])) - 2)
    assert first2["input_ids"] == whole["input_ids"][:len(first2["input_ids"])]
    assert [t for t in first2["labels"] if t != IGNORE] == marked
    sc = {**row, "kind": "self_correction", "distraction": "Owls hunt at night.", "answer": "Ask first."}
    assert tokenize_row(sc, tok, max_length=256, unlikely_tokens=1) == tokenize_row(sc, tok, max_length=256)


@pytest.mark.slow
def test_restart_probes_sample_the_writer_and_write_what_restarts(smollm, tmp_path):
    """On the real model: ``restart_probes`` samples k unsteered answers per training
    prompt, writes the ones with restart language to false_restarts.jsonl, counts them in
    the summary, and a re-run draws nothing new (the probes are cached)."""
    from data_gen.backends.self_backend import SelfBackend, SelfConfig

    model, tok = smollm
    tasks = ["cook rice", "boil an egg", "iron a shirt", "tie a tie", "plant a tree", "clean a window",
             "write a thank-you note", "apologise sincerely", "give constructive feedback", "save money"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do you {t}?", "split": "test" if i >= 8 else "train"}) + "\n"
                               for i, t in enumerate(tasks)), encoding="utf-8")
    cfg = GenerateConfig(n=4, mix=0.5, test_size=0.25, seed=0, batch_size=8, answer_tokens=32, distraction_tokens=32,
                         prompts=str(prompts), restart_probes=2)
    backend = SelfBackend(model, tok, "smollm2-135m", SelfConfig(answer_tokens=32, distraction_tokens=32, batch_size=8),
                          tmp_path / "ds" / ".work")
    summary = build_dataset(cfg, tmp_path / "ds", backend_impl=backend)
    probes = summary["restart_probes"]
    assert probes["samples"] == 2 * 8 and len(backend.probes) == 16  # the 8 training prompts, twice each
    mined = negatives.read_mined(tmp_path / "ds")
    assert (tmp_path / "ds" / negatives.FILE).exists() and len(mined) == probes["rows"] <= probes["restarted"]
    assert all(has_restart(r["restart"]) and r["prompt"] != "How do you save money?" for r in mined)
    drawn = backend.probe(["How do you cook rice?"], 2)["How do you cook rice?"]
    assert len(drawn) == 2 and drawn[0] != drawn[1]  # two draws, not one answer twice
    (tmp_path / "ds" / "summary.json").unlink()
    again = build_dataset(cfg, tmp_path / "ds", backend_impl=backend)
    assert len(backend.probes) == 16 and again["restart_probes"] == probes
