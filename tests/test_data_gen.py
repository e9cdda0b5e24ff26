"""data_gen: schema, text cutting, the template backend end to end, the CLI, bad input,
and (slow tier) the on-policy self backend on the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_gen.builder import GenerateConfig, GenerateError, build_dataset
from esr_train.rows import Transcript, TranscriptError
from esr_train.text import complete_part, first_sentences, repetitive, sentences

ROWS = [
    {"prompt": "How do you boil an egg?", "answer": "Put the egg in boiling water for eight minutes, then cool it in cold water.",
     "distraction": "Octopuses have three hearts and blue blood. They can squeeze through tiny gaps. Unfinished bit",
     "subject": "octopuses"},
    {"prompt": "Explain how to add two fractions.", "answer": "Find a common denominator, convert both fractions, then add the numerators."},
    {"prompt": "How do you water a cactus?", "answer": "Soak the soil completely, then wait until it is fully dry before watering again.",
     "distraction": "The Eiffel Tower was finished in 1889.", "subject": "the Eiffel Tower", "restart": "Wait, that's not right.",
     "split": "test"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_cutting():
    assert sentences("One. Two is 3.5 m, e.g. here! Three? frag") == ["One.", "Two is 3.5 m, e.g. here!", "Three?"]
    assert first_sentences("A b. C d. E f.", 2) == "A b. C d."
    assert complete_part("Step 1. Boil water.\n2. Add tea and") == "Step 1. Boil water."
    assert complete_part("no sentence end") == ""
    assert repetitive("a planet of a planet of a planet of a planet of a planet of a planet")
    assert not repetitive("Boil the water, pour it over the tea bag and wait three minutes before removing it.")


def test_transcript_contract():
    t = Transcript("Q?", "A.", "self_correction", "Off topic.", "Wait, no.", "ocean").validate()
    row = t.to_row()
    assert row["messages"][1]["content"] == "Off topic. Wait, no. A." and row["messages"][0] == {"role": "user", "content": "Q?"}
    with pytest.raises(TranscriptError, match="sentence boundary"):
        Transcript("Q?", "A.", "self_correction", "Off topic and cut", "Wait, no.", "ocean").validate()
    with pytest.raises(TranscriptError, match="restart"):
        Transcript("Q?", "A.", "self_correction", "Off topic.", "", "ocean").validate()
    with pytest.raises(TranscriptError, match="normal row"):
        Transcript("Q?", "A.", "normal", "Off topic.").validate()


def test_template_backend_writes_a_loadable_dataset(tmp_path):
    from datasets import load_dataset, load_from_disk

    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = GenerateConfig(backend="template", template_file=str(src), n=10, seed=3)
    summary = build_dataset(cfg, tmp_path / "ds")
    ds = load_from_disk(str(tmp_path / "ds"))
    assert set(ds) == {"train", "test"} and len(ds["train"]) + len(ds["test"]) == 3
    row = [r for r in ds["test"] if r["subject"] == "the Eiffel Tower"][0]
    assert row["kind"] == "self_correction" and row["restart"] == "Wait, that's not right."
    octo = [r for s in ds.values() for r in s if r["subject"] == "octopuses"][0]
    assert octo["distraction"].endswith("tiny gaps.") and octo["restart"]  # cut + restart drawn from the bank
    assert summary["total"] == 3 and summary["rows"]["test"]["self_correction"] == 1
    assert len(load_dataset("json", data_files=str(tmp_path / "ds" / "train.jsonl"))["train"]) == len(ds["train"])
    # same arguments -> byte-identical JSONL
    build_dataset(cfg, tmp_path / "ds2")
    for split in ("train", "test"):
        assert (tmp_path / "ds" / f"{split}.jsonl").read_bytes() == (tmp_path / "ds2" / f"{split}.jsonl").read_bytes()


class ScriptedWriter:
    """Stands in for the model behind the self backend's interface (``answer``,
    ``directions``, ``distract``) with fixed texts, and counts what the builder asks it to
    write. Every third job (plan index 0, 3, 6, ...) gets no complete sentence."""

    label = "scripted"

    def __init__(self):
        self.asked: dict[str, int] = {"answers": 0, "distractions": 0}

    def answer(self, prompts):
        self.asked["answers"] += len(prompts)
        return {p: f"{p} Start with the first step, check each part as you go, and finish with the last step."
                for p in prompts}

    def directions(self, subjects):
        return {}

    def distract(self, jobs):
        self.asked["distractions"] += len(jobs)
        return {j["id"]: "" if int(j["id"].rsplit("-", 1)[1]) % 3 == 0 else
                f"{j['subject']} is a fascinating thing. People study {j['subject']} for years." for j in jobs}


def test_self_backend_runs_only_the_jobs_the_filters_need(tmp_path):
    """The plan is drawn in full, but jobs run in waves: the first sized by the expected
    pass share, a second topping up what the filters rejected. The rows kept are the
    first passing jobs in plan order (as if the whole plan had run), exactly ``n`` rows,
    and surplus jobs of a full split are neither kept nor counted as rejected."""
    writer = ScriptedWriter()
    cfg = GenerateConfig(n=60, mix=0.5, test_size=0.2, seed=0, overgenerate=3)
    summary = build_dataset(cfg, tmp_path / "ds", backend_impl=writer)
    assert summary["rows"] == {"train": {"normal": 24, "self_correction": 24},
                               "test": {"normal": 6, "self_correction": 6}}
    rows = [json.loads(line) for line in (tmp_path / "ds" / "train.jsonl").read_text().splitlines()]
    # the first 24 passing train jobs are plan indices 1, 2, 4, 5, ..., 34, 35 (seed 0: row seed = index)
    assert [r["seed"] for r in rows if r["kind"] == "self_correction"] == [i for i in range(36) if i % 3]
    # wave 1 runs ceil(24 / 0.8) = 30 train and 8 test jobs, 25 of the 38 pass; wave 2 tops up
    # ceil(2 x short / (25 / 38)): 13 train, 4 test; 55 of the 90 planned
    assert writer.asked["distractions"] == 30 + 8 + 13 + 4
    assert summary["rejected"] == {"answer_for_self_correction": 0, "no_complete_sentence": 12 + 3}


def test_empty_split_still_loads(tmp_path):
    from datasets import load_from_disk

    src = write_jsonl(tmp_path / "rows.jsonl", [dict(r, split="train") for r in ROWS])
    build_dataset(GenerateConfig(backend="template", template_file=str(src), test_size=0.0), tmp_path / "ds")
    ds = load_from_disk(str(tmp_path / "ds"))
    assert len(ds["train"]) == 3 and len(ds["test"]) == 0


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "Q?", "answer": "A."}\n{"prompt": "Q2?"\n', r"rows.jsonl:2: not valid JSON"),
    ('{"prompt": "Q?"}\n', r"rows.jsonl:1: missing or empty 'answer'"),
    ('{"prompt": "Q?", "answer": "A.", "distraction": "Off topic."}\n', r"rows.jsonl:1: .*needs its 'subject'"),
    ("\n", r"rows.jsonl: has no rows"),
])
def test_template_bad_input_names_file_and_line(tmp_path, content, match):
    from esr_train.banks import BankError

    (tmp_path / "rows.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(BankError, match=match):
        build_dataset(GenerateConfig(backend="template", template_file=str(tmp_path / "rows.jsonl")), tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_config_errors():
    with pytest.raises(GenerateError, match="valid: self, template, llm"):
        GenerateConfig(backend="magic")
    with pytest.raises(GenerateError, match="mix"):
        GenerateConfig(mix=1.5)
    with pytest.raises(GenerateError, match="template_file"):
        GenerateConfig(backend="template")


def test_adapter_option_is_checked(tmp_path):
    with pytest.raises(GenerateError, match="adapter_config.json"):
        GenerateConfig(adapter=str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(GenerateError, match="no adapter_model.safetensors"):  # a save cut short
        GenerateConfig(adapter=str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(GenerateError, match="self backend"):
        GenerateConfig(backend="template", template_file="x.jsonl", adapter=str(tmp_path))


def test_parts_with_restart_language_are_rejected():
    """A part that already restarts is not clean: the restart belongs only in ``restart``
    (and a fine-tuned model writing its own second round restarts by itself)."""
    from data_gen.filters import FilterConfig, answer_problems, distraction_problems

    prompt = "How do you boil an egg?"
    clean = "Put the egg in boiling water for eight minutes, then cool it in cold water and peel it."
    restarted = ("Put the egg in a pan. Wait, that's not right. Let me start over. Boil the water first, "
                 "then add the egg for eight minutes.")
    assert answer_problems([prompt] * 2, [clean, restarted], ["", ""], FilterConfig()) == [None, "restarted"]
    drift = "Octopuses have three hearts and blue blood. They squeeze through tiny gaps."
    drift_restarted = "Octopuses have three hearts and blue blood. Wait, no. Octopuses squeeze through tiny gaps."
    assert distraction_problems([prompt] * 2, [drift, drift_restarted], ["octopuses"] * 2,
                                FilterConfig()) == [None, "restarted"]


def test_cli_generate_template_and_unknown_recipe_key(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = subprocess.run([sys.executable, "-m", "esr_train.cli", "generate", "--data.backend", "template",
                          "--data.template_file", str(src), "--out", str(tmp_path / "ds")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "self_correction" in out.stdout and (tmp_path / "ds" / "dataset_dict.json").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: smollm2-135m\ndata:\n  n: 10\n  mixx: 0.5\n", encoding="utf-8")
    bad = subprocess.run([sys.executable, "-m", "esr_train.cli", "generate", str(recipe), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "unknown key(s) mixx; valid:" in bad.stderr and "r.yaml: data" in bad.stderr


@pytest.mark.slow
def test_self_backend_on_smollm_resumes_and_is_on_policy(smollm, tmp_path):
    """The on-policy backend on the real model: steered drift toward the subject, a restart,
    the model's own answer; a second run with the same arguments reuses every cached text."""
    from datasets import load_from_disk

    from data_gen.backends.self_backend import SelfBackend, SelfConfig
    from data_gen.filters import keyword_hit, subject_keywords
    from esr_train.embeddings import cosine

    model, tok = smollm
    cfg = GenerateConfig(n=12, mix=0.5, test_size=0.25, seed=1, batch_size=8, answer_tokens=64, distraction_tokens=48)
    backend = SelfBackend(model, tok, "smollm2-135m", SelfConfig(answer_tokens=64, distraction_tokens=48, batch_size=8),
                          tmp_path / "ds" / ".work")
    summary = build_dataset(cfg, tmp_path / "ds", backend_impl=backend)
    ds = load_from_disk(str(tmp_path / "ds"))
    rows = [r for s in ds.values() for r in s]
    sc = [r for r in rows if r["kind"] == "self_correction"]
    assert len(sc) >= 3, summary
    for r in sc:
        assert r["distraction"] and r["restart"] and r["answer"] and r["backend"] == "self"
        assert r["messages"][1]["content"].startswith(r["distraction"])
    drift = cosine([r["distraction"] for r in sc], [r["subject"] for r in sc])
    task = cosine([r["distraction"] for r in sc], [r["prompt"] for r in sc])
    assert sum(bool(keyword_hit(r["distraction"], subject_keywords(r["subject"]))) or d > t
               for r, d, t in zip(sc, drift.tolist(), task.tolist())) == len(sc)
    test_prompts = {r["prompt"] for r in ds["test"]}
    assert not test_prompts & {r["prompt"] for r in ds["train"]}
    n_cached = len(backend.distractions)
    (tmp_path / "ds" / "summary.json").unlink()
    again = build_dataset(cfg, tmp_path / "ds", backend_impl=backend)
    assert len(backend.distractions) == n_cached and again["total"] == summary["total"]
    # the time of each stage is recorded; the re-run, all from caches, spends less on generation
    assert {"answers", "directions", "distractions", "filters"} <= set(summary["stage_s"])
    assert again["stage_s"]["distractions"] < summary["stage_s"]["distractions"]
    # a killed run that lost some texts writes them again as the first run wrote them: each
    # sampled row draws from a seed fixed by its cache key, not by its place in the batch
    lost = list(backend.distractions._data)[1::2]
    lines = (tmp_path / "ds" / ".work" / "distractions.jsonl")
    kept = [line for line in lines.read_text(encoding="utf-8").splitlines() if json.loads(line)["key"] not in lost]
    lines.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    resumed = SelfBackend(model, tok, "smollm2-135m", SelfConfig(answer_tokens=64, distraction_tokens=48, batch_size=8),
                          tmp_path / "ds" / ".work")
    (tmp_path / "ds" / "summary.json").unlink()
    build_dataset(cfg, tmp_path / "ds", backend_impl=resumed)
    assert {k: resumed.distractions[k] for k in lost} == {k: backend.distractions[k] for k in lost}


@pytest.mark.slow
def test_self_backend_samples_answers_at_answer_temperature(smollm, tmp_path):
    """``answer_temperature`` draws the answers instead of taking the greedy ones: other
    texts for the same prompts, cached under their own keys (a greedy run beside it keeps
    its answers), and the same draws again from the cache."""
    from data_gen.backends.self_backend import SelfBackend, SelfConfig
    from esr_train.banks import load_prompts

    model, tok = smollm
    prompts = [p["prompt"] for p in load_prompts("train")[:4]]
    greedy = SelfBackend(model, tok, "smollm2-135m", SelfConfig(answer_tokens=24, batch_size=4), tmp_path / "w")
    # the same repetition penalty as the greedy run, so only the sampling can tell them apart
    sampled = SelfBackend(model, tok, "smollm2-135m", SelfConfig(answer_tokens=24, batch_size=4,
                                                                 answer_temperature=1.0), tmp_path / "w")
    first, drawn = greedy.answer(prompts), sampled.answer(prompts)
    assert sum(first[p] != drawn[p] for p in prompts) >= 3
    again = SelfBackend(model, tok, "smollm2-135m", SelfConfig(answer_tokens=24, batch_size=4), tmp_path / "w")
    assert len(again.answers) == 2 * len(prompts)  # one store, separate keys
    assert again.answer(prompts) == first and sampled.answer(prompts) == drawn


@pytest.mark.slow
def test_answer_model_writes_the_answers_and_the_writer_keeps_the_drifts(smollm, tmp_path):
    """With an answerer (``--answer_model``) the answers are the answerer's own generations,
    cached under its label, while the steered distractions still come from the writer; the
    option is refused outside the self backend."""
    import torch

    from data_gen.backends.self_backend import SelfBackend, SelfConfig
    from esr_train.directions import SteeringDirection
    from esr_train.generation import generate
    from tests.conftest import tiny_llama

    answerer, tok = smollm
    writer = tiny_llama(vocab_size=len(tok))  # random weights: never ends a sentence
    cfg = SelfConfig(layer=2, answer_tokens=40, distraction_tokens=8, batch_size=2)
    prompts = ["How do you boil an egg?", "Explain how to tie a knot.", "How do you fold a shirt?"]
    backend = SelfBackend(writer, tok, "writer", cfg, tmp_path / "w", answerer=(answerer, tok, "answerer"))
    got = backend.answer(prompts)
    theirs = generate(answerer, tok, prompts, max_new_tokens=40, repetition_penalty=cfg.answer_repetition_penalty)
    assert [got[p] for p in prompts] == [complete_part(t) for t in theirs] and all(got.values())
    assert not any(SelfBackend(writer, tok, "writer", cfg, tmp_path / "own").answer(prompts).values())
    # cached under the answerer's label: a backend whose writer is the answerer reuses them
    again = SelfBackend(answerer, tok, "answerer", cfg, tmp_path / "w")
    assert len(again.answers) == len(prompts) and again.answer(prompts) == got
    # the drifts are the writer's: the same job through a writer-only backend gives the same text
    d = SteeringDirection(torch.randn(writer.config.hidden_size), layer=2, label="x", reference_norm=1.0)
    alone = SelfBackend(writer, tok, "writer", cfg, tmp_path / "alone")
    backend._directions["x"] = alone._directions["x"] = d
    job = [{"id": "0", "prompt": prompts[0], "subject": "x", "sentences": 5, "seed": 3}]
    backend.distract(job)
    alone.distract(job)
    assert list(dict(backend.distractions.items()).values()) == list(dict(alone.distractions.items()).values())
    with pytest.raises(GenerateError, match="answer_model is for the self backend"):
        GenerateConfig(backend="template", template_file="x.jsonl", answer_model="smollm2-135m")
