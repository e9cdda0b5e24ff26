"""Fault injection: every command given bad input answers with one line and writes nothing.

Each case builds its inputs in a fresh folder, runs ``esr`` in-process, and checks that:

* the exit status is non-zero and stderr is exactly one line, ``esr CMD: error: ...``,
  holding the expected words (the file, line or field, and the fix), with no traceback;
* every file in the folder is byte for byte what it was, and no new file or folder
  appeared (a run folder is made only once a run can start).

The cases stop before a model loads, so the whole table runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esr_train.cli import main

GOOD_ROW = {"prompt": "How do I boil an egg?", "response": "Put it in boiling water.", "concept": "the ocean"}
RECIPE = "model:\n  name: smollm2-135m\ndata:\n  n: 4\ntrain:\n  max_steps: 1\neval:\n  trials: 2\n"


def _adapter(config: bool, weights: bool) -> dict[str, str]:
    files = {"ad/README.md": "an adapter folder"}
    if config:
        files["ad/adapter_config.json"] = json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"})
    if weights:
        files["ad/adapter_model.safetensors"] = "x"
    return files


def _messages_dataset(root: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(root / "msgs"))


# (id, argv with {d} for the case's folder, files to create, words the error must hold)
CASES = [
    # esr eval
    ("eval-empty-prompts", ["eval", "--out", "{d}/run", "--eval.prompts", "{d}/empty.txt"], {"empty.txt": ""},
     ["empty.txt", "no prompts"]),
    ("eval-missing-prompts", ["eval", "--out", "{d}/run", "--eval.prompts", "{d}/nope.jsonl"], {}, ["nope.jsonl"]),
    ("eval-layer-out-of-range", ["eval", "--out", "{d}/run", "--eval.layer", "999"], {}, ["eval.layer 999", "0-29"]),
    ("eval-vector-width", ["eval", "--out", "{d}/run", "--eval.directions", "vectors", "--eval.vectors", "{d}/v.npy"],
     {"v.npy": "NPY10"}, ["v.npy", "width 10", "576"]),
    ("eval-corrupt-pt", ["eval", "--out", "{d}/run", "--eval.directions", "vectors", "--eval.vectors", "{d}/v.pt"],
     {"v.pt": b"\x00garbage, not a tensor"}, ["v.pt", "not a readable tensor file"]),
    ("eval-adapter-no-config", ["eval", "--out", "{d}/run", "--adapter", "{d}/ad"], _adapter(False, False),
     ["--adapter", "no adapter_config.json"]),
    ("eval-adapter-no-weights", ["eval", "--out", "{d}/run", "--adapter", "{d}/ad"], _adapter(True, False),
     ["--adapter", "no adapter_model.safetensors"]),
    ("eval-adapter-missing", ["eval", "--out", "{d}/run", "--adapter", "{d}/gone"], {}, ["gone", "no such adapter"]),
    ("eval-out-is-a-file", ["eval", "--out", "{d}/taken"], {"taken": "a file"}, ["--out", "is a file"]),
    ("eval-negative-strength", ["eval", "--out", "{d}/run", "--eval.strength", "-1"], {},
     ["eval.strength", "above 0"]),
    ("eval-zero-trials", ["eval", "--out", "{d}/run", "--eval.trials", "0"], {}, ["eval.trials", "at least 1"]),
    ("eval-trials-not-a-number", ["eval", "--out", "{d}/run", "--eval.trials", "ten"], {}, ["--eval.trials", "'ten'"]),
    ("eval-unknown-recipe-key", ["eval", "{d}/r.yaml", "--out", "{d}/run"], {"r.yaml": "eval:\n  trails: 3\n"},
     ["r.yaml: eval", "unknown key(s) trails"]),
    ("eval-recipe-bad-yaml", ["eval", "{d}/r.yaml", "--out", "{d}/run"], {"r.yaml": "eval:\n  trials: [3,\n"},
     ["r.yaml:", "not valid YAML"]),
    ("eval-recipe-wrong-type", ["eval", "{d}/r.yaml", "--out", "{d}/run"], {"r.yaml": "eval:\n  trials: many\n"},
     ["r.yaml: eval.trials", "expected an integer"]),
    ("eval-llm-judge-without-url", ["eval", "--out", "{d}/run", "--eval.judge", "llm"], {},
     ["eval.judge", "judge_base_url"]),
    ("eval-judge-url-with-password", ["eval", "--out", "{d}/run", "--eval.judge", "llm", "--eval.judge_model", "m",
                                      "--eval.judge_base_url", "https://ann:secret@example.org/v1"], {},
     ["eval.judge_base_url"]),
    ("eval-unknown-condition", ["eval", "--out", "{d}/run", "--eval.conditions", "adapter"], {},
     ["eval.conditions", "'adapter'"]),
    ("eval-sae-of-another-width", ["eval", "--out", "{d}/run", "--eval.directions", "sae", "--eval.sae", "{d}/sae"],
     {"sae/cfg.json": json.dumps({"d_in": 2304, "d_sae": 16, "metadata": {"hook_name": "blocks.3.hook_resid_post"}})},
     ["eval.sae", "width 2304", "576"]),
    ("eval-sae-of-a-missing-layer", ["eval", "--out", "{d}/run", "--eval.directions", "sae", "--eval.sae", "{d}/sae"],
     {"sae/cfg.json": json.dumps({"d_in": 576, "d_sae": 16, "metadata": {"hook_name": "blocks.40.hook_resid_post"}})},
     ["the SAE's layer 40", "out of range"]),
    ("sae-train-layer-out-of-range", ["sae", "train", "--layer", "99", "--cache-dir", "{d}/cache"], {},
     ["--layer 99", "out of range"]),
    ("sae-train-k-above-width", ["sae", "train", "--layer", "3", "--latents", "8", "--k", "9"], {}, ["--k 9"]),
    ("eval-sae-without-sae", ["eval", "--out", "{d}/run", "--eval.directions", "sae"], {}, ["eval.sae"]),
    ("eval-run-with-other-settings", ["eval", "--out", "{d}/run"],
     {"run/eval_config.json": json.dumps({"model": "smollm2-135m", "trials": 100, "seed": 7})},
     ["holds a run made with other settings", "seed"]),
    ("eval-torn-trials-middle", ["eval", "--out", "{d}/run"],
     {"run/eval_config.json": "{}", "run/trials.jsonl": '{"key": "a"}\nnot json\n{"key": "b"}\n'},
     ["trials.jsonl:2", "not a JSON record"]),
    ("eval-unknown-model", ["eval", "--out", "{d}/run", "--model.name", "nope"], {}, ["unknown model 'nope'"]),
    ("eval-unknown-option", ["eval", "--out", "{d}/run", "--eval.trails", "3"], {}, ["--eval.trails"]),
    # esr generate
    ("generate-out-is-a-file", ["generate", "--out", "{d}/taken", "--data.backend", "template"],
     {"taken": "x"}, ["--out", "is a file"]),
    ("generate-missing-template", ["generate", "--out", "{d}/ds", "--data.backend", "template",
                                   "--data.template_file", "{d}/none.jsonl"], {}, ["none.jsonl"]),
    ("generate-mix-out-of-range", ["generate", "--out", "{d}/ds", "--data.mix", "2"], {}, ["mix"]),
    ("generate-unknown-backend", ["generate", "--out", "{d}/ds", "--data.backend", "magic"], {}, ["backend"]),
    ("generate-missing-recipe", ["generate", "{d}/nope.yaml", "--out", "{d}/ds"], {}, ["nope.yaml", "no such recipe"]),
    ("generate-n-not-a-number", ["generate", "--out", "{d}/ds", "--data.n", "many"], {}, ["--data.n", "'many'"]),
    ("generate-empty-prompts", ["generate", "--out", "{d}/ds", "--data.prompts", "{d}/p.jsonl"], {"p.jsonl": ""},
     ["p.jsonl"]),
    # esr train
    ("train-learning-rate-text", ["train", "{d}/r.yaml", "--dataset", "{d}/ds", "--out", "{d}/ad"],
     {"r.yaml": "train:\n  learning_rate: fast\n", "ds/dataset_dict.json": '{"splits": ["train"]}'},
     ["r.yaml: train.learning_rate", "expected a number", "'fast'"]),
    ("train-missing-dataset", ["train", "{d}/r.yaml", "--dataset", "{d}/nothing", "--out", "{d}/ad"],
     {"r.yaml": RECIPE}, ["no dataset at", "nothing"]),
    ("train-messages-dataset", ["train", "{d}/r.yaml", "--dataset", "{d}/msgs", "--out", "{d}/ad"],
     {"r.yaml": RECIPE, "msgs": _messages_dataset}, ["msgs", "lacks prompt, kind, distraction, restart, answer"]),
    ("train-out-is-a-file", ["train", "{d}/r.yaml", "--out", "{d}/taken"], {"r.yaml": RECIPE, "taken": "x"},
     ["--out", "is a file"]),
    ("train-no-recipe", ["train", "--out", "{d}/ad"], {}, ["a recipe is required"]),
    ("train-lora-rank-text", ["train", "{d}/r.yaml", "--dataset", "{d}/ds", "--out", "{d}/ad", "--train.r", "eight"],
     {"r.yaml": RECIPE, "ds/dataset_dict.json": '{"splits": ["train"]}'}, ["train.r", "expected an integer"]),
    ("train-option-of-another-section", ["train", "{d}/r.yaml", "--eval.trials", "3"], {"r.yaml": RECIPE},
     ["unknown option --eval.trials", "--train.KEY"]),
    # esr judge
    ("judge-binary-file", ["judge", "{d}/in.jsonl", "--out", "{d}/out.jsonl"], {"in.jsonl": b"\xff\xfe\x00\x01binary"},
     ["in.jsonl:1", "UTF-8"]),
    ("judge-empty-file", ["judge", "{d}/in.jsonl", "--out", "{d}/out.jsonl"], {"in.jsonl": ""},
     ["in.jsonl", "--allow-empty"]),
    ("judge-bad-json-line", ["judge", "{d}/in.jsonl", "--out", "{d}/out.jsonl"],
     {"in.jsonl": json.dumps(GOOD_ROW) + "\n{broken\n" + json.dumps(GOOD_ROW) + "\n"}, ["in.jsonl:2"]),
    ("judge-row-without-response", ["judge", "{d}/in.jsonl", "--out", "{d}/out.jsonl"],
     {"in.jsonl": json.dumps({"prompt": "p"}) + "\n"}, ["in.jsonl:1", "response"]),
    ("judge-missing-file", ["judge", "{d}/gone.jsonl", "--out", "{d}/out.jsonl"], {}, ["gone.jsonl"]),
    ("judge-llm-without-url", ["judge", "{d}/in.jsonl", "--out", "{d}/out.jsonl", "--judge", "llm"],
     {"in.jsonl": json.dumps(GOOD_ROW) + "\n"}, ["judge_base_url"]),
    # esr steer
    ("steer-corrupt-vector", ["steer", "--prompt", "hi", "--vector", "{d}/v.pt"], {"v.pt": b"nope"},
     ["v.pt", "not a readable tensor file"]),
    ("steer-layer-out-of-range", ["steer", "--prompt", "hi", "--concept", "the sea", "--layer", "999"], {},
     ["--layer 999", "out of range"]),
    ("steer-unknown-model", ["steer", "--prompt", "hi", "--concept", "x", "--model", "nope"], {},
     ["unknown model 'nope'"]),
    ("steer-sae-without-latent", ["steer", "--prompt", "hi", "--sae", "{d}/sae"], {}, ["--sae needs --latent"]),
    # esr probe, esr merge, esr sweep
    ("probe-missing-dataset", ["probe", "--dataset", "{d}/none", "--out", "{d}/new"], {},
     ["none", "not a dataset directory"]),
    ("probe-writer-without-weights", ["probe", "--dataset", "{d}/none", "--out", "{d}/new", "--data.adapter", "{d}/ad"],
     _adapter(True, False), ["data.adapter", "no adapter_model.safetensors"]),
    ("probe-out-is-a-file", ["probe", "--dataset", "{d}/none", "--out", "{d}/taken"], {"taken": "x"},
     ["--out", "is a file"]),
    ("merge-adapter-without-weights", ["merge", "{d}/ad", "--out", "{d}/merged"], _adapter(True, False),
     ["no adapter_model.safetensors"]),
    ("sweep-bad-mixes", ["sweep", "{d}/r.yaml", "--dataset", "{d}/ds", "--out", "{d}/sw", "--mixes", "half"],
     {"r.yaml": RECIPE}, ["--mixes", "'half'"]),
    ("judge-agreement-missing-labels", ["judge-agreement", "--labels", "{d}/nolabels.jsonl"], {}, ["nolabels.jsonl"]),
    # the other commands
    ("report-missing-run", ["report", "{d}/norun"], {}, ["norun"]),
    ("pool-bad-group", ["pool", "justaname"], {}, ["justaname"]),
    ("rejudge-not-a-run", ["rejudge", "{d}/norun", "--out", "{d}/new"], {}, ["norun", "not an evaluation run"]),
    ("pipeline-unknown-stage", ["pipeline", "{d}/r.yaml", "--out", "{d}/run", "--stages", "generate,bogus"],
     {"r.yaml": RECIPE}, ["--stages", "bogus"]),
    ("pipeline-bad-override", ["pipeline", "{d}/r.yaml", "--out", "{d}/run", "--train.learning_rate", "fast"],
     {"r.yaml": RECIPE}, ["train.learning_rate", "expected a number"]),
    ("pipeline-out-is-a-file", ["pipeline", "{d}/r.yaml", "--out", "{d}/taken"], {"r.yaml": RECIPE, "taken": "x"},
     ["--out", "is a file"]),
]


def _make(root: Path, files: dict) -> None:
    import numpy as np

    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(root)
        elif content == "NPY10":
            np.save(path, np.ones(10, dtype=np.float32))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv,files,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(argv, files, words, tmp_path, capsys):
    _make(tmp_path, files)
    capsys.readouterr()  # what making the inputs printed
    before = _snapshot(tmp_path)
    try:
        code = main([a.replace("{d}", str(tmp_path)) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO"))]
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith(f"esr {argv[0]}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(tmp_path) == before, "bad input changed or created files"


def test_the_table_covers_every_command_and_forty_cases():
    commands = {c[1][0] for c in CASES}
    assert len(CASES) >= 40
    assert {"eval", "generate", "train", "judge", "steer", "pipeline", "report", "pool", "rejudge"} <= commands
