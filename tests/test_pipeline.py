"""``esr pipeline`` end to end on a tiny random-init Llama (mechanics tier, no mocks):
generate (template backend) -> train (2 LoRA steps) -> eval (1 direction, 3 trials per
condition, 8 new tokens) -> report, its per-stage timings, and a second run on the same
directory that reuses every stage's output instead of redoing it.

The conftest models have no tokenizer, so this one gets a byte-level tokenizer (256
bytes + a few special tokens, lossless for any text) with a small chat template, saved
beside the weights: a local directory is a model name the zoo accepts."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from esr_train.config import RecipeError
from esr_train.pipeline import STAGES, final_adapter, round_data, run_pipeline
from tests.conftest import tiny_llama
from tests.test_data_gen import write_jsonl
from tests.test_training import ROWS

SPECIALS = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]  # pad/bos/eos ids as tiny_llama's
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

TRAIN = {"r": 4, "lora_alpha": 8, "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 512,
         "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no", "report_to": "none"}
EVAL = {"n_prompts": 2, "n_directions": 1, "trials": 2, "unsteered_trials": 1, "max_new_tokens": 8,
        "calibration_probes": 1, "calibration_prompts": 1, "batch_size": 8, "conditions": ["base", "adapter"]}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "esr_train_summary.json")


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|end|>",
                                  additional_special_tokens=SPECIALS[3:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model_dir(path: Path) -> Path:
    tok = byte_level_tokenizer()
    tiny_llama(vocab_size=len(tok), max_position_embeddings=1024).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def mtimes(paths) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


@contextmanager
def one_thread_and_private_cache(cache_dir: Path):
    """One intra-op thread and a private esr cache (calibration) while the pipeline runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ESR_CACHE_DIR", str(cache_dir))
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(recipe path, run dir, first result, pipeline.json after the first run), with a
    private esr cache (calibration) and one intra-op thread for the whole module: a 64-wide
    model gains nothing from threads, and where another process holds a core, OpenMP's
    spinning barriers make each of its tiny matmuls orders of magnitude slower (minutes, not seconds)."""
    root = tmp_path_factory.mktemp("pipeline")
    recipe = {"model": {"name": str(tiny_model_dir(root / "tiny-llama")), "dtype": "float32"},
              "data": {"backend": "template", "template_file": str(write_jsonl(root / "rows.jsonl", ROWS))},
              "train": TRAIN, "eval": EVAL}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = root / "run"
    with one_thread_and_private_cache(root / "esr-cache"):
        result = run_pipeline(str(path), run)
        yield path, run, result, json.loads((run / "pipeline.json").read_text(encoding="utf-8"))


def test_all_stages_run_and_are_timed(pipeline) -> None:
    path, run, result, on_disk = pipeline
    assert list(result["stages"]) == list(STAGES) and on_disk["stages"] == result["stages"]  # in stage order
    assert on_disk["recipe"] == str(path)
    peaks = [result["stages"][s]["peak_rss_mib"] for s in STAGES]
    assert all(result["stages"][s]["seconds"] >= 0 for s in STAGES)
    assert all(p > 0 for p in peaks) and peaks == sorted(peaks)  # a high-water mark never falls
    own = [result["stages"][s]["stage_peak_rss_mib"] for s in STAGES]
    if own[0] is not None:  # each stage's own peak: the run's peak is the largest of them
        assert all(0 < o <= p for o, p in zip(own, peaks)) and max(own) == pytest.approx(peaks[-1], abs=0.2)

    data = json.loads((run / "data" / "summary.json").read_text(encoding="utf-8"))
    assert data["total"] == len(ROWS) and (run / "data" / "dataset_dict.json").exists()
    trained = json.loads((run / "adapter" / "esr_train_summary.json").read_text(encoding="utf-8"))
    model = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["name"]
    assert trained["steps"] == 2 and trained["model"] == model
    assert all((run / "adapter" / name).exists() for name in ADAPTER_FILES)

    summary = result["summary"]
    assert summary == json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert summary["config"]["conditions"] == ["base", "adapter"]
    assert summary["config"]["adapters"] == [str(run / "adapter")]
    trials = (run / "eval" / "trials.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(trials) == 2 * (EVAL["trials"] + EVAL["unsteered_trials"])
    assert (run / "eval" / "report.html").is_file() and (run / "eval" / "report.md").is_file()
    assert result["report"]["html"] == str(run / "eval" / "report.html")


def test_second_run_reuses_every_stage(pipeline) -> None:
    path, run, result, first = pipeline
    adapter = [run / "adapter" / name for name in ADAPTER_FILES]
    untouched = [run / "data" / "summary.json", *adapter,
                 *(run / "eval" / name for name in ("trials.jsonl", "references.jsonl", "summary.json",
                                                    "calibration.json", "eval_config.json", "pipeline_stamp.json"))]
    same = untouched
    before_times, before_bytes = mtimes(untouched), {str(p): p.read_bytes() for p in same}

    again = run_pipeline(str(path), run)

    assert mtimes(untouched) == before_times and {str(p): p.read_bytes() for p in same} == before_bytes
    assert again["summary"] == json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
    # the same trials, so the same metrics and strengths
    assert (again["summary"]["conditions"], again["summary"]["calibration"]) == \
        (result["summary"]["conditions"], result["summary"]["calibration"])
    on_disk = json.loads((run / "pipeline.json").read_text(encoding="utf-8"))
    assert set(on_disk["stages"]) == set(STAGES)
    peaks = [on_disk["stages"][s]["peak_rss_mib"] for s in STAGES]
    assert peaks == sorted(peaks)
    # the skipped stages are quick: no training, no new trials
    assert on_disk["stages"]["train"]["seconds"] <= first["stages"]["train"]["seconds"]


def test_unknown_stage_is_named(pipeline, tmp_path) -> None:
    path = pipeline[0]
    with pytest.raises(RecipeError, match=r"--stages: unknown stage\(s\) bogus; valid: generate, train, generate2, "
                                          r"train2, eval, report"):
        run_pipeline(str(path), tmp_path / "run", stages=("generate", "bogus"))
    assert not (tmp_path / "run").exists()


def test_bad_override_is_refused_before_the_run_folder_exists(pipeline, tmp_path) -> None:
    path = pipeline[0]
    with pytest.raises(RecipeError, match=r"train.learning_rate: expected a number, got 'fast'"):
        run_pipeline(str(path), tmp_path / "run", overrides={"train": {"learning_rate": "fast"}})
    assert not (tmp_path / "run").exists()


def test_later_rounds_train_the_final_adapter_on_every_round(pipeline, tmp_path) -> None:
    """A recipe with round2 and round3 sections: each round's data is written with its own
    keys, round three inherits round two's train keys (max_steps 3), each round's adapter is
    trained on every round so far, the eval measures round three's, and a second run redoes
    nothing."""
    path = pipeline[0]
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    second = [{**r, "answer": r["answer"] + " That is all."} for r in ROWS]
    third = [{**r, "answer": r["answer"] + " Done."} for r in ROWS[:3]]
    recipe["round2"] = {"data": {"template_file": str(write_jsonl(tmp_path / "round2.jsonl", second))},
                        "train": {"max_steps": 3}}
    recipe["round3"] = {"data": {"template_file": str(write_jsonl(tmp_path / "round3.jsonl", third))}}
    rounds = tmp_path / "rounds.yaml"
    rounds.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = tmp_path / "run"
    with one_thread_and_private_cache(tmp_path / "esr-cache"):
        result = run_pipeline(str(rounds), run)
        assert list(result["stages"]) == ["generate", "train", "generate2", "train2", "generate3", "train3",
                                          "eval", "report"]
        rows = {k: json.loads((run / f"round{k}" / "data" / "summary.json").read_text(encoding="utf-8"))["total"]
                for k in (2, 3)}
        assert rows == {2: len(second), 3: len(third)}

        def trained(adapter: Path) -> dict:
            return json.loads((adapter / "esr_train_summary.json").read_text(encoding="utf-8"))

        first, two, three = (trained(run / "adapter"), trained(run / "round2" / "adapter"),
                             trained(run / "round3" / "adapter"))
        assert (first["steps"], two["steps"], three["steps"]) == (2, 3, 3)
        assert [len(a["dataset"]["parts"]) for a in (two, three)] == [2, 3]
        assert result["summary"]["config"]["adapters"] == [str(run / "round3" / "adapter")]
        kept = [run / "round3" / "adapter" / name for name in ADAPTER_FILES] + [run / "eval" / "trials.jsonl"]
        before = mtimes(kept)
        run_pipeline(str(rounds), run)
        assert mtimes(kept) == before


def test_each_round_is_written_by_the_adapter_of_the_round_before(tmp_path) -> None:
    """With the self backend round k's writer is round k-1's adapter, and its data keys are
    data's, then round2's, ..., then round k's."""
    recipe = {"data": {"backend": "self", "n": 160, "seed": 0},
              "round2": {"data": {"seed": 1, "restart_probes": 4}}, "round3": {"data": {"seed": 2, "n": 16}}}
    run = tmp_path / "run"
    assert round_data(recipe, run, 2) == {"backend": "self", "n": 160, "seed": 1, "restart_probes": 4,
                                          "adapter": str(run / "adapter")}
    assert round_data(recipe, run, 3) == {"backend": "self", "n": 16, "seed": 2, "restart_probes": 4,
                                          "adapter": str(run / "round2" / "adapter")}
    assert "adapter" not in round_data({**recipe, "data": {"backend": "template"}}, run, 3)
    assert final_adapter(recipe, run) == run / "round3" / "adapter"
    assert final_adapter({"data": {}}, run) == run / "adapter"


def test_new_adapter_weights_set_the_old_eval_aside(pipeline) -> None:
    """Runs last (module order): the train stage's output changes under an existing eval."""
    from safetensors.torch import load_file, save_file

    path, run, _, _ = pipeline
    weights = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v + 0.5 for k, v in load_file(weights).items()}, weights)
    old_trials = (run / "eval" / "trials.jsonl").read_bytes()
    with one_thread_and_private_cache(path.parent / "esr-cache"):
        run_pipeline(str(path), run, stages=("eval",))
    assert (run / "eval.stale-1" / "trials.jsonl").read_bytes() == old_trials  # kept, not mixed in
    new = [json.loads(line) for line in (run / "eval" / "trials.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(new) == 2 * (EVAL["trials"] + EVAL["unsteered_trials"])


def test_peak_rss_is_the_pipeline_process_own_not_its_parent_s():
    """A pipeline started from a large process (``python -m benchmarks`` after its
    in-process benchmarks) must not report the parent's resident set as its own: exec keeps
    the forking process's ``ru_maxrss``; ``peak_rss_mib`` reads this image's VmHWM."""
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc: peak_rss_mib falls back to ru_maxrss")
    ballast = b"\x01" * (1536 * 2**20)  # written, so resident (zero pages would only be reserved)
    code = ("import resource; from esr_train.pipeline import peak_rss_mib; "
            "print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    del ballast  # held until the child had run
    own, inherited = float(out[0]), float(out[1])
    assert inherited >= 1536 > own + 500, (own, inherited)


def test_between_stages_freed_heap_goes_back_and_the_peak_restarts():
    """Between stages freed memory goes back and the high-water mark restarts, so a stage's
    ``stage_peak_rss_mib`` is not the peak of a stage before it (the eval stage must not
    report the training stage's peak)."""
    from esr_train.pipeline import peak_rss_mib, release_freed_memory, restart_peak_rss

    if not restart_peak_rss():
        pytest.skip("the high-water mark cannot be restarted here (no /proc/self/clear_refs)")
    # an earlier stage's small tensors (64 KB: from the heap, not mmap), a few still alive, so the
    # freed ones sit below live blocks where only malloc_trim hands them back
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]
    survivors = blocks[::50]
    high = peak_rss_mib()
    del blocks
    release_freed_memory()
    assert restart_peak_rss()
    assert peak_rss_mib() < high - 150, (peak_rss_mib(), high)
    assert len(survivors) == 80
