"""``esr probe`` (data_gen.probe): a trained writer's own negatives for an existing dataset.
What is cut from an answer that did not restart, what the copied dataset holds, that the
source is never touched and a finished run is not redone, and the command on the real model."""

from __future__ import annotations

import json
import random

import pytest

from esr_train import negatives
from data_gen.builder import GenerateConfig, GenerateError, build_dataset
from data_gen.probe import probe_dataset

CLEAN = "Rinse the rice well. Boil it for fifteen minutes. Let it rest before serving."
TIC = "Rice is a staple food. Let me start from the beginning: rinse the rice well."


def test_cut_openers_cut_only_answers_that_did_not_restart():
    restarts = ["Wait, that is off topic.", "Let me start over."]
    one = negatives.cut_openers("How do you cook rice?", [CLEAN, TIC, "Boil it."], restarts,
                                     random.Random(0), model="m", seed=2)
    assert len(one) == 1  # TIC restarted (that is mine's row), "Boil it." has nothing after its only sentence
    row = one[0]
    assert row["opener"] in ("Rinse the rice well.", "Rinse the rice well. Boil it for fifteen minutes.")
    assert row["restart"] in restarts and (row["model"], row["seed"], row["source"]) == ("m", 2, "opener")
    every = negatives.cut_openers("How do you cook rice?", [CLEAN], restarts, random.Random(0), model="m",
                                       every_cut=True)
    assert [r["opener"] for r in every] == ["Rinse the rice well.", "Rinse the rice well. Boil it for fifteen minutes."]
    first = negatives.cut_openers("q", [CLEAN], restarts, random.Random(0), model="m", max_sentences=1,
                                       every_cut=True)
    assert [r["opener"] for r in first] == ["Rinse the rice well."]
    with pytest.raises(ValueError, match="restart phrases"):
        negatives.cut_openers("q", [CLEAN], [], random.Random(0), model="m")


class ScriptedProbe:
    """A writer whose unpushed answers are fixed: one clean, one with the tic, alternating by prompt."""

    label = "scripted"

    def __init__(self):
        self.asked = 0

    def probe(self, prompts, samples):
        self.asked += len(prompts) * samples
        return {p: [TIC if i % 2 else CLEAN] * samples for i, p in enumerate(prompts)}


def _dataset(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How do you cook rice?", "answer": CLEAN, "split": "train"},
        {"prompt": "How do you boil an egg?", "answer": "Boil water first.", "distraction": "Owls hunt at night.",
         "subject": "owls", "split": "train"},
        {"prompt": "How do you iron a shirt?", "answer": "Heat the iron.", "split": "test"},
    ]), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src), test_size=0.0), tmp_path / "ds")
    old = {"prompt": "How do you cook rice?", "opener": "Rice matters.", "restart": "Let me try again"}
    (tmp_path / "ds" / negatives.FILE).write_text(json.dumps(old) + "\n", encoding="utf-8")
    return tmp_path / "ds", old


def test_probe_copies_the_dataset_with_the_writers_negatives_and_leaves_the_source_alone(tmp_path):
    from datasets import load_from_disk

    src, old = _dataset(tmp_path)
    before = {p.name: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    writer = ScriptedProbe()
    cfg = GenerateConfig(restart_probes=2, seed=0)
    summary = probe_dataset(cfg, src, tmp_path / "out", backend_impl=writer)

    assert {p.name: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    out = load_from_disk(str(tmp_path / "out"))
    assert out["train"]["id"] == load_from_disk(str(src))["train"]["id"] and len(out["test"]) == 1
    rows = negatives.read_mined(tmp_path / "out")
    # the source's mined row, then the 2 samples of the tic (prompt 2), then one cut per clean sample (prompt 1)
    assert rows[0] == old
    assert [r["source"] for r in rows[1:]] == ["restart", "restart", "opener", "opener"]
    assert {r["prompt"] for r in rows[1:3]} == {"How do you boil an egg?"}
    phrase = [r["restart"] for r in load_from_disk(str(src))["train"] if r["kind"] == "self_correction"]
    assert [r["restart"] for r in rows[3:]] == phrase * 2  # the data's only restart phrase
    assert all(CLEAN.startswith(r["opener"]) and r["opener"] != CLEAN for r in rows[3:])
    p = summary["probe"]
    assert (p["prompts"], p["samples"], p["restarted"], p["restart_rows"], p["opener_rows"], p["rows_in_file"]) == \
        (2, 4, 2, 2, 2, 5)
    assert writer.asked == 4
    again = probe_dataset(cfg, src, tmp_path / "out", backend_impl=writer)
    assert again == summary and writer.asked == 4  # finished: nothing probed again
    none = probe_dataset(cfg, src, tmp_path / "none", openers="none", backend_impl=ScriptedProbe())
    assert none["probe"]["opener_rows"] == 0 and len(negatives.read_mined(tmp_path / "none")) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"out": "ds"}, "must be a new directory"),
    ({"dataset": "nowhere"}, "nowhere: not a dataset directory"),
    ({"openers": "all"}, "openers must be one of"),
    ({"restart_probes": 0}, "restart_probes >= 1"),
])
def test_probe_refuses_bad_input_before_writing(tmp_path, kwargs, match):
    src, _ = _dataset(tmp_path)
    cfg = GenerateConfig(restart_probes=kwargs.get("restart_probes", 1))
    with pytest.raises(GenerateError, match=match):
        probe_dataset(cfg, tmp_path / kwargs.get("dataset", "ds"), tmp_path / kwargs.get("out", "out"),
                      kwargs.get("openers", "one"), backend_impl=ScriptedProbe())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_esr_probe_on_the_real_model_writes_a_trainable_dataset(tmp_path):
    """The command end to end on SmolLM2 (no adapter: the base model as the writer): every
    training prompt is sampled, each sample gives a mined or an opener negative or is too
    short to cut, and the trainer's negatives builder reads the file back."""
    from datasets import load_from_disk

    from esr_train.cli import main
    from esr_train.negatives import with_false_restarts

    src, _ = _dataset(tmp_path)
    assert main(["probe", "--dataset", str(src), "--out", str(tmp_path / "out"), "--data.distraction_tokens", "48",
                 "--data.batch_size", "4", "--data.dtype", "float32", "--openers", "every"]) == 0
    p = json.loads((tmp_path / "out" / "summary.json").read_text())["probe"]
    assert p["samples"] == 2 and p["writer"] == "smollm2-135m"
    rows = negatives.read_mined(tmp_path / "out")
    assert len(rows) == 1 + p["restart_rows"] + p["opener_rows"] and p["restart_rows"] + p["opener_rows"] >= 1
    assert all(r["opener"] and r["restart"] for r in rows)
    split = load_from_disk(str(tmp_path / "out"))["train"]
    _, n, _ = with_false_restarts(split, seed=0, max_sentences=3, mined=rows)
    assert n == len(rows) + 1  # + the synthetic twin of the normal row
