"""Every shipped recipe parses and validates (recipes rot when the trainer renames keys),
and recipe errors name the file and the valid keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_gen.builder import GenerateConfig
from esr_train.config import RecipeError, build, load_recipe, round_settings, rounds
from esr_train.training.trainer import resolve_sections

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"quick.yaml", "smollm2-135m.yaml", "gemma3-270m.yaml", "llama-3.1-8b-instruct.yaml",
            "gemma-2-9b-it-qlora.yaml", "gemma-2-2b-it.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(path):
    from peft import LoraConfig
    from trl import SFTConfig

    recipe = load_recipe(path)
    build(GenerateConfig, {**recipe["data"], "model": recipe["model"]["name"]}, f"{path}: data")
    section, sft, lora, extras = resolve_sections(recipe, {}, str(path))
    LoraConfig(**lora)
    ds = sft.get("deepspeed")
    if ds:
        assert (path.parents[1] / ds).exists(), ds
        sft = {k: v for k, v in sft.items() if k != "deepspeed"}  # accepted by transformers' DeepSpeed test
    sft.pop("optim", None)  # 8-bit optimizers need bitsandbytes' CUDA build
    SFTConfig(output_dir="/tmp/esr-recipe-check", use_cpu=True, **{k: v for k, v in sft.items() if k not in ("bf16", "fp16")})
    assert section.name
    for k in rounds(recipe):  # esr pipeline's later rounds: their keys replace the rounds' before
        build(GenerateConfig, {**recipe["data"], **round_settings(recipe, k, "data"), "model": recipe["model"]["name"]},
              f"{path}: round{k}: data")
        resolve_sections(recipe, round_settings(recipe, k, "train"), f"{path}: round{k}")


def test_unknown_and_renamed_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: smollm2-135m}\ntrain: {learning_rat: 0.1}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"bad.yaml: train: unknown key 'learning_rat'"):
        resolve_sections(load_recipe(bad), {}, str(bad))
    old = tmp_path / "old.yaml"
    old.write_text("train: {max_seq_length: 512}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="spelled 'max_length'"):
        resolve_sections(load_recipe(old), {}, str(old))
    sec = tmp_path / "sec.yaml"
    sec.write_text("trainer: {}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="unknown section.*valid: model, data, train, eval"):
        load_recipe(sec)
    rounds = tmp_path / "rounds.yaml"
    rounds.write_text("round2: {eval: {trials: 3}}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"rounds.yaml: round2.eval: round2 holds the mappings data, train"):
        load_recipe(rounds)
    rounds.write_text("round2: {data: {seed: 1}}\nround4: {data: {seed: 3}}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"rounds.yaml: round4 needs round3 before it"):
        load_recipe(rounds)
    rounds.write_text("round2: {data: {seed: 1}}\nround3: {}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"rounds.yaml: round3 is empty"):
        load_recipe(rounds)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  r: [1,\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: not valid YAML"):
        load_recipe(broken)


def test_overrides_route_to_their_owner():
    recipe = load_recipe(RECIPES[0].parent / "quick.yaml")
    section, sft, lora, extras = resolve_sections(recipe, {"learning_rate": 1e-4, "r": 4, "dtype": "float32",
                                                           "max_steps": 3}, "quick")
    assert sft["learning_rate"] == 1e-4 and sft["max_steps"] == 3 and lora["r"] == 4 and section.dtype == "float32"


def test_qlora_on_cpu_is_a_clear_error():
    import torch

    from esr_train.training.recipe import ModelSection
    from esr_train.training.trainer import TrainError, quantization_config

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainError, match="needs a CUDA GPU"):
        quantization_config(ModelSection(quantization="4bit"), torch.bfloat16)
