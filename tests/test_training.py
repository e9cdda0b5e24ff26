"""Real LoRA training on SmolLM2-135M with a tiny dataset (slow tier, about a minute)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from data_gen.builder import GenerateConfig, build_dataset

pytestmark = pytest.mark.slow

ROWS = [
    {"prompt": "How do you boil an egg?", "answer": "Put the egg in boiling water for eight minutes, then cool it in cold water.",
     "distraction": "Octopuses have three hearts and blue blood.", "subject": "octopuses", "split": "train"},
    {"prompt": "Explain how to add two fractions.", "answer": "Find a common denominator, convert both fractions, then add the numerators.",
     "split": "train"},
    {"prompt": "How do you water a cactus?", "answer": "Soak the soil completely, then wait until it is dry before watering again.",
     "distraction": "The Eiffel Tower was finished in 1889. It is made of iron.", "subject": "the Eiffel Tower", "split": "train"},
    {"prompt": "How do you sharpen a pencil?", "answer": "Turn the pencil in a sharpener until the tip is pointed, then blow away the shavings.",
     "split": "train"},
    {"prompt": "How do you fold a towel?", "answer": "Fold it in half lengthwise, then in thirds, and stack it with the fold facing out.",
     "distraction": "Volcanoes erupt when magma rises.", "subject": "volcanoes", "split": "test"},
]
RECIPE = {"model": {"name": "smollm2-135m", "dtype": "float32"}, "data": {},
          "train": {"r": 8, "lora_alpha": 16, "learning_rate": 2e-3, "max_steps": 6, "per_device_train_batch_size": 2,
                    "max_length": 256, "logging_steps": 1, "save_steps": 3, "warmup_steps": 0, "lr_scheduler_type": "constant",
                    "eval_steps": 3}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src)), root / "ds")
    return root / "ds"


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    from esr_train.training.trainer import train

    out = tmp_path_factory.mktemp("run") / "adapter"
    before = sorted(p.name for p in dataset.rglob("*"))
    summary = train(RECIPE, out, dataset_dir=dataset)
    assert sorted(p.name for p in dataset.rglob("*")) == before, "training wrote into the input dataset folder"
    return out, summary


def test_training_lowers_loss_and_writes_an_adapter(trained):
    out, summary = trained
    assert summary["steps"] == 6 and summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["steady_tokens_per_s"] > 0  # steps 2-6, the first step's warm-up left out
    assert summary["compiled_norms"] is (shutil.which("c++") is not None or shutil.which("g++") is not None)
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert summary["final_eval_loss"] is not None
    assert summary["provenance"]["dtype"] == summary["dtype"] and summary["provenance"]["libraries"]["trl"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "esr_recipe.yaml", "esr_train_summary.json",
                 "train_log.jsonl", "tokenizer_config.json"):
        assert (out / name).exists(), name


def test_adapter_changes_only_lora_weights_and_generations(trained, smollm):
    from peft import PeftModel
    from safetensors.torch import load_file

    from esr_train.generation import generate
    from esr_train.zoo import load_model

    out, _ = trained
    base, tok = load_model("smollm2-135m", dtype="float32")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero: it was trained
    model = PeftModel.from_pretrained(base, str(out))
    prompts = ["How do you boil an egg?", "How do you water a cactus?"]
    tuned = generate(model, tok, prompts, max_new_tokens=20)
    with model.disable_adapter():
        plain = generate(model, tok, prompts, max_new_tokens=20)
    assert tuned != plain
    for k, v in model.get_base_model().state_dict().items():
        key = k.replace(".base_layer", "")
        if "lora_" not in k and key in before:
            assert torch.equal(v, before[key]), k


def test_merge_writes_loadable_full_weights(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from esr_train.generation import generate
    from esr_train.zoo import load_tokenizer

    out, _ = trained
    proc = subprocess.run([sys.executable, "-m", "esr_train.cli", "merge", str(out), "--out", str(tmp_path / "merged"),
                           "--dtype", "float32"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k for k in merged.state_dict())
    tok = load_tokenizer("smollm2-135m")
    from peft import PeftModel

    from esr_train.zoo import load_model

    base, _ = load_model("smollm2-135m", dtype="float32")
    peft = PeftModel.from_pretrained(base, str(out))
    prompts = ["How do you boil an egg?"]
    assert generate(merged, tok, prompts, max_new_tokens=15) == generate(peft, tok, prompts, max_new_tokens=15)


def test_resume_continues_without_repeating_steps(dataset, trained, tmp_path):
    from esr_train.training.trainer import TrainError, train

    src, _ = trained
    out = tmp_path / "adapter"
    shutil.copytree(src / "checkpoint-3", out / "checkpoint-3")  # a run killed after step 3
    with pytest.raises(TrainError, match="--resume"):
        train(RECIPE, out, dataset_dir=dataset)
    summary = train(RECIPE, out, dataset_dir=dataset, resume=True)
    steps = [json.loads(l)["step"] for l in (out / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(l) and "eval_loss" not in json.loads(l)]
    assert summary["resumed_from"] == "checkpoint-3" and summary["steps"] == 6
    assert steps == [4, 5, 6]


def test_several_datasets_train_as_one(dataset, tmp_path):
    """``--dataset A,B``: each split is the concatenation of the parts (a second round
    trained with the first); a missing part is named."""
    from esr_train.training.trainer import TrainError, dataset_paths, load_training_data

    one, one_fingerprint = load_training_data(dataset_paths(dataset))
    both, both_fingerprint = load_training_data(dataset_paths(f"{dataset}, {dataset}"))
    assert {k: len(v) for k, v in both.items()} == {k: 2 * len(v) for k, v in one.items()}
    assert list(both["train"]["prompt"]) == list(one["train"]["prompt"]) * 2
    assert both_fingerprint["parts"] == [one_fingerprint, one_fingerprint]
    with pytest.raises(TrainError, match="no dataset at .*nowhere"):
        dataset_paths(f"{dataset},{tmp_path / 'nowhere'}")


def test_second_round_is_written_by_the_adapter_on_base_directions(trained, smollm, tmp_path):
    """``esr generate --adapter``: the adapter writes the rows (labelled by its weights);
    the concept directions are the base model's, the cache entry the first round used."""
    from datasets import load_from_disk

    from esr_train.concepts import direction_file, shared_direction_root
    from esr_train.directions import SteeringDirection
    from esr_train.zoo import ZOO

    adapter, _ = trained
    cfg = GenerateConfig(n=4, mix=0.5, test_size=0.0, seed=2, batch_size=4, answer_tokens=32, distraction_tokens=32,
                         dtype="float32", adapter=str(adapter))
    summary = build_dataset(cfg, tmp_path / "round2")
    assert summary["config"]["adapter"] == str(adapter)
    rows = list(load_from_disk(str(tmp_path / "round2"))["train"])
    assert rows and all(r["model"].startswith("smollm2-135m+adapter:") for r in rows)
    built = sorted((tmp_path / "round2" / ".work" / "directions").glob("*.safetensors"))
    assert built
    base_root = shared_direction_root(*smollm)
    layer = ZOO["smollm2-135m"].default_layer
    for path in built:
        d = SteeringDirection.load(path)
        assert path.name == direction_file(base_root, d.label, layer).name
        assert torch.equal(d.vector, SteeringDirection.load(direction_file(base_root, d.label, layer)).vector)


def test_sweep_draws_equal_sized_mixes(dataset, tmp_path):
    """Each mix gets the same number of rows with the asked share of self-corrections;
    one adapter per mix is trained and listed."""
    from datasets import load_from_disk

    from esr_train.training.sweep import SweepError, common_size, mix_indices, sweep

    assert common_size(10, 10, [0.1, 0.5, 0.9]) == 11
    kinds = ["self_correction"] * 6 + ["normal"] * 6
    picked = mix_indices(kinds, 0.25, 8, seed=0)
    assert len(picked) == 8 and sum(kinds[i] == "self_correction" for i in picked) == 2
    assert picked == mix_indices(kinds, 0.25, 8, seed=0)
    with pytest.raises(SweepError):
        common_size(0, 5, [0.5])
    recipe = {**RECIPE, "train": {**RECIPE.get("train", {}), "max_steps": 1, "save_steps": 10}}
    result = sweep(recipe, dataset, tmp_path / "sweep", [0.0, 0.5])
    one_step = json.loads((Path(result["adapters"]["0"]) / "esr_train_summary.json").read_text())
    assert one_step["steps"] == 1 and one_step["steady_tokens_per_s"] is None  # no step after the first
    assert result["rows_per_mix"] == 2 and set(result["adapters"]) == {"0", "0.5"}
    for m, share in (("0", 0), ("0.5", 1)):
        sub = load_from_disk(str(tmp_path / "sweep" / f"mix-{m}" / "data"))
        assert len(sub["train"]) == 2 and sub["train"]["kind"].count("self_correction") == share
        assert (Path(result["adapters"][m]) / "adapter_config.json").exists()


def test_steered_training_pushes_self_correction_rows_through_backward(dataset, tmp_path):
    """Training with the push on: directions are built for the self-correction subjects,
    the first-step loss differs from unsteered training with the same seed (the hooks act
    in the step), and training still lowers the loss."""
    from esr_train.training.trainer import train

    fast = {**RECIPE["train"], "max_steps": 3, "save_steps": 3, "eval_steps": 3}
    plain = train({**RECIPE, "train": fast}, tmp_path / "plain", dataset_dir=dataset)
    steered = train({**RECIPE, "train": {**fast, "steer_strength": 0.5}}, tmp_path / "steered", dataset_dir=dataset)
    assert steered["steering"] == {"strength": 0.5, "strength_max": None, "schedule": "all", "span": "all",
                                   "subjects": 3}
    assert len(list((tmp_path / "steered" / "directions").glob("*.safetensors"))) == 3
    assert abs(steered["first_train_loss"] - plain["first_train_loss"]) > 1e-3
    assert steered["final_eval_loss"] is not None
    # pushing only up to the answer: the answer tokens see less push, so the loss differs again
    span = train({**RECIPE, "train": {**fast, "steer_strength": 0.5, "steer_span": "until_answer"}},
                 tmp_path / "span", dataset_dir=dataset)
    assert span["steering"]["span"] == "until_answer"
    losses = (plain["first_train_loss"], steered["first_train_loss"])
    assert all(abs(span["first_train_loss"] - other) > 1e-3 for other in losses)
    # pushes drawn per row from a range: another first-step loss than the fixed push
    ranged = train({**RECIPE, "train": {**fast, "steer_strength": 0.1, "steer_strength_max": 1.5}},
                   tmp_path / "ranged", dataset_dir=dataset)
    assert ranged["steering"]["strength_max"] == 1.5
    assert abs(ranged["first_train_loss"] - steered["first_train_loss"]) > 1e-3


def test_activation_checkpointing_is_off_by_default_and_changes_no_number(dataset, tmp_path):
    """TRL's SFTConfig checkpoints activations by default; esr train turns it off (it slows
    each step on a CPU; see docs/performance.md). Recomputing the pushed blocks gives the same
    adapter bit for bit, so the switch is speed only."""
    from safetensors.torch import load_file

    from esr_train.training.trainer import train

    fast = {**RECIPE["train"], "max_steps": 3, "save_steps": 3, "eval_steps": 3, "steer_strength": 0.1,
            "steer_strength_max": 1.0}
    off = train({**RECIPE, "train": fast}, tmp_path / "off", dataset_dir=dataset)
    on = train({**RECIPE, "train": {**fast, "activation_checkpointing": True}}, tmp_path / "on", dataset_dir=dataset)
    assert off["activation_checkpointing"] is False and on["activation_checkpointing"] is True
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("off", "on"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(w, torch.zeros_like(w)) for k, w in a.items() if "lora_B" in k)  # it trained


def test_ranged_training_push_is_per_row_reproducible_and_checked():
    """Each step draws one strength per row inside the range, the same draws on a re-run
    (so a resumed run pushes as an uninterrupted one), new draws on the next step; a range
    whose top is below its bottom is refused with the key's name."""
    from esr_train.training.recipe import RecipeError, TrainExtras
    from esr_train.training.steered import TrainSteering

    fixed = TrainSteering([], 0.2)
    assert fixed.strengths(4, 0) == 0.2
    ranged = TrainSteering([], 0.05, strength_max=0.4, seed=3)
    draws = ranged.strengths(8, 5)
    assert len(draws) == 8 and all(0.05 <= d <= 0.4 for d in draws) and len(set(draws)) == 8
    assert ranged.strengths(8, 5) == draws and ranged.strengths(8, 6) != draws
    assert TrainSteering([], 0.05, strength_max=0.4, seed=4).strengths(8, 5) != draws
    with pytest.raises(ValueError, match="steer_strength_max"):
        TrainSteering([], 0.3, strength_max=0.1)
    with pytest.raises(RecipeError, match="train.steer_strength_max"):
        TrainExtras(steer_strength=0.3, steer_strength_max=0.1)


WEIGHT = 1.0
UL_ROWS = [
    {"prompt": "How do you cook rice?", "answer": "Rinse the rice first. Use two cups of water per cup of rice. "
     "Simmer it covered for fifteen minutes.", "split": "train"},
    {"prompt": "How do you clean a window?", "answer": "Mix warm water with a little soap. Wipe the glass with a "
     "cloth. Dry it with newspaper to avoid streaks.", "split": "train"},
    {"prompt": "How do you plant a seed?", "answer": "Fill a pot with damp soil. Press the seed a finger deep. "
     "Keep it warm and watered.", "split": "train"},
    {"prompt": "How do you iron a shirt?", "answer": "Heat the iron to the fabric's setting. Press the collar first.",
     "distraction": "Owls hunt at night. They can turn their heads very far.", "subject": "owls", "split": "train"},
    {"prompt": "How do you boil an egg?", "answer": "Put the egg in boiling water for eight minutes.",
     "distraction": "Mars is the red planet. Its dust is full of iron.", "subject": "Mars", "split": "train"},
]


def _restart_log_prob(model, tok, negatives) -> float:
    """Mean log p of the restart tokens after each negative's on-topic opener."""
    from esr_train.training.tokenize import IGNORE, tokenize_row

    total, n = 0.0, 0
    for row in negatives:
        enc = tokenize_row(row, tok, max_length=512)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        for t, target in enumerate(enc["unlikely"][1:]):
            if target != IGNORE:
                total, n = total + logp[t, target].item(), n + 1
    return total / n


def test_unlikelihood_makes_restarts_after_on_topic_openers_less_likely(tmp_path):
    """One negative per cuttable normal row is added; against a control that trains the
    same rows in the same order with a negligible weight, the adapter trained with
    unlikelihood gives the restart after an on-topic opener a lower probability, and so
    does one trained with the hinge of ``unlikely_floor``."""
    from datasets import load_from_disk
    from peft import PeftModel

    from esr_train.training.trainer import train
    from esr_train.negatives import false_restart_rows
    from esr_train.zoo import load_model

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in UL_ROWS), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src), test_size=0.0), tmp_path / "ds")
    fast = {**RECIPE["train"], "max_steps": 4, "save_steps": 4, "eval_split": None}
    runs = {name: train({**RECIPE, "train": {**fast, "unlikelihood_weight": w, "unlikely_floor": floor}},
                        tmp_path / name, dataset_dir=tmp_path / "ds")
            for name, w, floor in (("control", 1e-9, None), ("ul", WEIGHT, None), ("hinge", WEIGHT, 1e-3))}
    assert runs["ul"]["unlikelihood"] == {"weight": WEIGHT, "false_restart_rows": 3, "mined_rows": 0,
                                               "mined_positive_rows": 0, "unpushed_negatives": False, "sentences": 3,
                                               "cuts": "one", "unlikely_tokens": None, "floor": None}
    assert runs["ul"]["tokenize"]["train"]["rows_kept"] == 8 and runs["ul"]["tokenize"]["train"]["unlikely_tokens"] > 0
    negatives = false_restart_rows(load_from_disk(str(tmp_path / "ds"))["train"], seed=0)
    scores = {}
    for name in runs:
        base, tok = load_model("smollm2-135m", dtype="float32")
        scores[name] = _restart_log_prob(PeftModel.from_pretrained(base, str(tmp_path / name)), tok, negatives)
    print(scores)
    assert scores["ul"] < scores["control"] - 0.3, scores
    # the hinge (unlikely_floor) reaches the loss: same rows, order and seed, other weights
    assert scores["hinge"] < scores["control"] - 0.3 and abs(scores["hinge"] - scores["ul"]) > 1e-3, scores
    assert runs["hinge"]["unlikelihood"]["floor"] == 1e-3
