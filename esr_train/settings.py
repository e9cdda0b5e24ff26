"""From a recipe and command-line overrides to each stage's settings: the one path.

A recipe (``esr_train.config.load_recipe``) has sections ``model``, ``data``, ``train``
and ``eval`` (and ``round2``, ``round3``, ... for on-policy rounds). Every command that
reads a recipe takes overrides in one grammar, ``--SECTION.KEY VALUE``
(``--train.learning_rate 1e-4``, ``--eval.trials 50``), and every command builds a stage's
settings with the functions here, so ``esr generate`` and ``esr pipeline`` read the same
recipe into the same :class:`~data_gen.builder.GenerateConfig`, and so on.

:func:`validate_recipe` type-checks every section of a recipe against the classes that
own its keys, before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

from esr_train.config import ROUND_PARTS, RecipeError, _caster, build, rounds

Overrides = dict[str, dict[str, Any]]
"""Section name -> {key: value}, as parsed from ``--SECTION.KEY VALUE`` flags."""


def section_classes() -> dict[str, type]:
    """The esr dataclass that owns each section's keys (``train`` also takes every
    ``trl.SFTConfig`` and ``peft.LoraConfig`` key)."""
    from data_gen.builder import GenerateConfig
    from esr_train.training.recipe import ModelSection, TrainExtras
    from eval.config import EvalConfig

    return {"model": ModelSection, "data": GenerateConfig, "train": TrainExtras, "eval": EvalConfig}


def with_overrides(recipe: dict[str, dict], overrides: Overrides | None) -> dict[str, dict]:
    """A copy of ``recipe`` whose sections hold the overridden keys."""
    merged = copy.deepcopy(recipe)
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    return merged


def data_config(recipe: dict[str, dict], where: str = "recipe", **fixed: Any):
    """The data stage's :class:`GenerateConfig`: the ``data`` section, with the writer
    model taken from ``model.name`` unless the section names ``data.model``, then ``fixed``."""
    from data_gen.builder import GenerateConfig

    name = (recipe.get("model") or {}).get("name")
    values = {**({"model": name} if name is not None else {}), **(recipe.get("data") or {}), **fixed}
    return build(GenerateConfig, values, f"{where}: data")


def eval_config(recipe: dict[str, dict], where: str = "recipe", adapters: list[str] | None = None):
    """The eval stage's :class:`EvalConfig`: the ``eval`` section with the model name and
    dtype of the ``model`` section, and ``adapters`` when given."""
    from eval.config import EvalConfig

    model = recipe.get("model") or {}
    values = dict(recipe.get("eval") or {})
    values.update({k: v for k, v in (("model", model.get("name")), ("dtype", model.get("dtype"))) if v is not None})
    if adapters is not None:
        values["adapters"] = list(adapters)
    return build(EvalConfig, values, f"{where}: eval")


def validate_recipe(recipe: dict[str, dict], where: str = "recipe") -> None:
    """Build every section's settings, and each round's, so a wrong key or type is a
    one-line :class:`RecipeError` before a model loads or a file is written."""
    from esr_train.config import round_settings
    from esr_train.training.recipe import resolve_sections

    resolve_sections(recipe, where)  # the model section first: the data section borrows model.name
    data_config(recipe, where)
    eval_config(recipe, where, adapters=(recipe.get("eval") or {}).get("adapters") or ["adapter"])
    for k in rounds(recipe):
        staged = {**recipe, "data": {**(recipe.get("data") or {}), **round_settings(recipe, k, "data")},
                  "train": {**(recipe.get("train") or {}), **round_settings(recipe, k, "train")}}
        resolve_sections(staged, f"{where}: round{k}")
        data_config(staged, f"{where}: round{k}")


# ---- the command line: --SECTION.KEY VALUE ------------------------------------------------

def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _help(f: dataclasses.Field) -> str:
    return f"{f.metadata.get('help', '')} (default: {_default(f)})".replace("%", "%%")


def add_section_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...],
                          skip: tuple[str, ...] = ()) -> None:
    """One ``--SECTION.KEY`` option per field of each section's class, with its help text;
    ``train`` also accepts any ``trl.SFTConfig`` / ``peft.LoraConfig`` key the same way."""
    classes = section_classes()
    parser.set_defaults(override_sections=sections)
    for section in sections:
        group = parser.add_argument_group(
            f"{section} settings (recipe section '{section}')",
            "also any trl.SFTConfig / peft.LoraConfig key as --train.KEY (esr train --list-keys)"
            if section == "train" else None)
        for f in dataclasses.fields(classes[section]):
            name = f"{section}.{f.name}"
            if name in skip:
                continue
            group.add_argument(f"--{name}", dest=f"override:{name}", metavar=f.name.upper(), default=None,
                               type=_caster(f.type), help=_help(f))


def collect_overrides(args: argparse.Namespace, extra: list[str]) -> Overrides:
    """The ``--SECTION.KEY VALUE`` flags given, by section: the declared options, then any
    other ``--train.KEY VALUE`` (library keys) left in ``extra``, typed as YAML reads them."""
    sections = getattr(args, "override_sections", ())
    out: Overrides = {}
    for dest, value in vars(args).items():
        if dest.startswith("override:") and value is not None:
            section, _, key = dest[len("override:"):].partition(".")
            out.setdefault(section, {})[key] = value
    for key, value in parse_extra(extra).items():
        section, dot, name = key.partition(".")
        if not dot or section not in sections or (section != "train" and section not in ROUND_PARTS):
            hint = ", ".join(f"--{s}.KEY" for s in sections) or "no recipe keys"
            raise RecipeError(f"unknown option --{key}; this command takes {hint}")
        if section != "train":
            raise RecipeError(f"unknown option --{key}: not a key of the {section} section (see --help)")
        out.setdefault(section, {})[name] = value
    return out


def parse_extra(extra: list[str]) -> dict[str, Any]:
    """``--key value`` or ``--key=value`` pairs -> {key: value as YAML reads it}."""
    import yaml

    out, i = {}, 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            raise RecipeError(f"unexpected argument {item!r}: options are --SECTION.KEY VALUE")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise RecipeError(f"option --{key} needs a value")
            value, i = extra[i + 1], i + 1
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def recipe_keys_markdown() -> str:
    """docs/recipe-keys.md: every esr recipe key with its type, default and help."""
    from esr_train.training.recipe import LORA_DEFAULTS, SFT_DEFAULTS

    lines = ["# Recipe keys", "",
             "Generated from the settings classes by `python -m esr_train.settings > docs/recipe-keys.md`;",
             "a test keeps it current. Every key can be given on the command line as `--SECTION.KEY VALUE`.",
             "Sections `round2`, `round3`, ... hold `data` and `train` mappings with the keys an",
             "on-policy round changes (`esr pipeline` only).", ""]
    for section, cls in section_classes().items():
        lines += [f"## `{section}`", ""]
        if section == "train":
            lines += ["Besides the keys below, `train` takes every `trl.SFTConfig` and `peft.LoraConfig` key,",
                      "spelled as those classes spell them (`esr train --list-keys` lists them). esr-train's",
                      "defaults for them, where they differ from the libraries':", "",
                      "| key | default |", "|---|---|"]
            lines += [f"| `{k}` | `{v}` |" for k, v in {**SFT_DEFAULTS, **LORA_DEFAULTS}.items()]
            lines += ["", "esr-train's own `train` keys:", ""]
        lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{str(f.type).replace('|', chr(92) + '|')}` | `{_default(f)}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(recipe_keys_markdown())
