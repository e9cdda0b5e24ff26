"""Every shipped recipe parses and validates (recipes rot when the trainer renames keys),
and recipe errors name the file and the valid keys."""

from __future__ import annotations

from pathlib import Path

import pytest

import re

from esr_train.config import RecipeError, load_recipe, round_settings, rounds
from esr_train.pipeline import staged_recipe
from esr_train.settings import validate_recipe
from esr_train.training.recipe import resolve_sections

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
    validate_recipe(recipe, str(path))  # every section and round, as esr pipeline checks it
    section, sft, lora, extras = resolve_sections(recipe, str(path))
    LoraConfig(**lora)
    ds = sft.get("deepspeed")
    if ds:
        assert (path.parents[1] / ds).exists(), ds
        sft = {k: v for k, v in sft.items() if k != "deepspeed"}  # accepted by transformers' DeepSpeed test
    sft.pop("optim", None)  # 8-bit optimizers need bitsandbytes' CUDA build
    SFTConfig(output_dir="/tmp/esr-recipe-check", use_cpu=True, **{k: v for k, v in sft.items() if k not in ("bf16", "fp16")})
    assert section.name
    for k in rounds(recipe):  # esr pipeline's later rounds: their keys replace the rounds' before
        staged = staged_recipe(recipe, {}, k)
        assert staged["data"] == {**recipe["data"], **round_settings(recipe, k, "data")}
        validate_recipe(staged, f"{path}: round{k}")


def test_unknown_and_renamed_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: smollm2-135m}\ntrain: {learning_rat: 0.1}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"bad.yaml: train: unknown key 'learning_rat'"):
        resolve_sections(load_recipe(bad), str(bad))
    old = tmp_path / "old.yaml"
    old.write_text("train: {max_seq_length: 512}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="spelled 'max_length'"):
        resolve_sections(load_recipe(old), str(old))
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
    """``--SECTION.KEY`` flags reach the section they name; library keys go to the class
    that owns them (SFTConfig, LoraConfig) and are type-checked like esr's own."""
    from esr_train.cli import build_parser
    from esr_train.settings import collect_overrides, with_overrides

    recipe = load_recipe(RECIPES[0].parent / "quick.yaml")
    args, extra = build_parser().parse_known_args(
        ["train", "r.yaml", "--train.learning_rate", "1e-4", "--train.r", "4", "--model.dtype", "float32",
         "--train.max_steps", "3", "--train.steer_strength", "0.5"])
    overrides = collect_overrides(args, extra)
    assert overrides == {"model": {"dtype": "float32"},
                         "train": {"steer_strength": 0.5, "learning_rate": "1e-4", "r": 4, "max_steps": 3}}
    # YAML reads 1e-4 as text, as it would in a recipe; the type check makes it the number
    section, sft, lora, extras = resolve_sections(with_overrides(recipe, overrides), "quick")
    assert sft["learning_rate"] == 1e-4 and sft["max_steps"] == 3 and lora["r"] == 4 and section.dtype == "float32"
    assert extras.steer_strength == 0.5


@pytest.mark.parametrize("argv,message", [
    (["train", "r.yaml", "--eval.trials", "3"], "unknown option --eval.trials; this command takes --model.KEY, --train.KEY"),
    (["train", "r.yaml", "--learning_rate", "1e-4"], "unknown option --learning_rate"),
    (["train", "r.yaml", "--train.r"], "option --train.r needs a value"),
])
def test_overrides_outside_the_grammar_are_refused(argv, message):
    from esr_train.cli import build_parser
    from esr_train.settings import collect_overrides

    args, extra = build_parser().parse_known_args(argv)
    with pytest.raises(RecipeError, match=re.escape(message)):
        collect_overrides(args, extra)


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "learning_rate", "fast", "train.learning_rate: expected a number, got 'fast'"),
    ("train", "r", "eight", "train.r: expected an integer, got 'eight'"),
    ("train", "steer_strength", [1], "train.steer_strength: expected a number or null, got [1]"),
    ("eval", "trials", "ten", "eval.trials: expected an integer, got 'ten'"),
    ("data", "mix", "half", "data.mix: expected a number, got 'half'"),
    ("model", "name", 3, "model.name: expected text, got 3"),
])
def test_recipe_values_are_type_checked_before_anything_loads(section, key, value, expected):
    from esr_train.settings import validate_recipe, with_overrides

    recipe = with_overrides(load_recipe(RECIPES[0].parent / "quick.yaml"), {section: {key: value}})
    with pytest.raises(RecipeError, match=re.escape(f"quick.yaml: {expected}")):
        validate_recipe(recipe, "quick.yaml")


def test_qlora_on_cpu_is_a_clear_error():
    import torch

    from esr_train.training.recipe import ModelSection
    from esr_train.training.trainer import TrainError, quantization_config

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainError, match="needs a CUDA GPU"):
        quantization_config(ModelSection(quantization="4bit"), torch.bfloat16)


def test_every_settings_field_has_help_and_the_keys_page_is_current():
    """Each key of every section says what it does in --help, and docs/recipe-keys.md is
    the page generated from that help (regenerate: python -m esr_train.settings)."""
    import dataclasses

    from esr_train.settings import recipe_keys_markdown, section_classes

    missing = [f"{section}.{f.name}" for section, cls in section_classes().items()
               for f in dataclasses.fields(cls) if not f.metadata.get("help")]
    assert missing == []
    page = Path(__file__).resolve().parents[1] / "docs" / "recipe-keys.md"
    assert page.read_text(encoding="utf-8") == recipe_keys_markdown() + "\n"


def test_help_shows_every_key_of_the_sections_a_command_reads():
    import dataclasses

    from esr_train.cli import build_parser
    from esr_train.settings import section_classes

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    text = sub.choices["eval"].format_help()
    for f in dataclasses.fields(section_classes()["eval"]):
        if f.name != "adapters":
            assert f"--eval.{f.name}" in text
    assert "--train.steer_strength" in sub.choices["pipeline"].format_help()
    assert "--data.backend" in sub.choices["generate"].format_help()
