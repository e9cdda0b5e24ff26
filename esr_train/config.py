"""Settings from dataclasses, recipes and the command line, in one way for every subcommand.

A recipe is one YAML file with sections ``model``, ``data``, ``train`` and ``eval``
(alignment-handbook style: keys are the dataclass field names unchanged). This module
reads and checks recipes (:func:`load_recipe`, :func:`build`, :func:`checked_values`);
``esr_train.settings`` turns a recipe and its ``--SECTION.KEY VALUE`` overrides into each
stage's settings. An unknown key is an error that names the file, the section and the
valid keys.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

SECTIONS = ("model", "data", "train", "eval", "round2")
ROUND_PARTS = ("data", "train")
"""``round2`` (``esr pipeline`` only) holds data/train keys for an on-policy second round;
``round3``, ``round4``, ... hold the same for further rounds, each written by the adapter of
the round before (:func:`rounds`)."""
ROUND_SECTION = re.compile(r"round([2-9])")


class RecipeError(EsrError, ValueError):
    """A recipe that does not parse or holds unknown keys; one line."""


def _caster(type_str: str):
    """argparse type for a dataclass field: scalars cast, ``list[X]`` from comma-separated
    text, ``dict[...]`` from JSON."""
    t = str(type_str).replace(" ", "")
    base = t.split("|")[0] if "|" in t else t
    if base.startswith("list["):
        inner = _caster(base[5:-1])
        return lambda text: [inner(x.strip()) for x in str(text).split(",") if x.strip()]
    if base.startswith("dict["):
        return _json_mapping
    return {"int": int, "float": float, "str": str, "bool": _bool}.get(base, str)


def _json_mapping(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as YAML or the command line gives it) fits the annotation ``tp``;
    classes this check does not know are left to the library that owns the field."""
    import collections.abc
    import enum
    import types
    import typing

    if tp is Any or tp is object:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set, collections.abc.Sequence) or tp in (list, tuple, set):
        inner = args[0] if args and args[0] is not Ellipsis else Any
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}
    return True


def _type_name(tp: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if tp is type(None):
        return "null"
    if origin in (list, tuple, set):
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "text"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _is_number_text(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def checked_values(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked against the annotations of dataclass ``cls`` before anything uses
    them: a wrong type is a :class:`RecipeError` naming ``where``, the key, the expected
    type and the value. Number text such as ``1e-4`` (which YAML reads as a string) becomes
    the number a float field expects."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: leave those to the class
        hints = {}
    out = dict(values)
    for key, value in values.items():
        tp = hints.get(key)
        if tp is None or _type_ok(value, tp):
            continue
        if _is_number_text(value) and _type_ok(float(value), tp):
            out[key] = float(value)
            continue
        raise RecipeError(f"{where}.{key}: expected {_type_name(tp)}, got {value!r}")
    return out


def build(cls, values: dict[str, Any], where: str):
    """``cls(**values)`` after :func:`checked_values`; an unknown key is an error naming
    ``where`` and the valid keys, and a value the class refuses one naming ``where``."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    values = checked_values(cls, values, where)
    try:
        return cls(**values)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:
        if isinstance(exc, EsrError):
            raise
        raise RecipeError(f"{where}: {exc}") from None


def load_recipe(path: str | Path) -> dict[str, dict]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections {', '.join(SECTIONS)}")
    round_names = sorted((n for n in data if ROUND_SECTION.fullmatch(str(n))), key=lambda n: int(n[5:]))
    unknown = sorted(set(data) - set(SECTIONS) - set(round_names), key=str)
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {', '.join(map(str, unknown))}; valid: "
                          f"{', '.join(SECTIONS)}, round3 ... round9")
    for name, body in data.items():
        if body is not None and not isinstance(body, dict):
            raise RecipeError(f"{path}: section {name!r} must be a mapping")
    for k, name in enumerate(round_names, start=2):
        if name != f"round{k}":
            raise RecipeError(f"{path}: {name} needs round{k} before it (rounds are numbered from 2 without gaps)")
        if not data.get(name) and len(round_names) > 1:
            raise RecipeError(f"{path}: {name} is empty; a round names the keys it changes (at least data.seed)")
        for key, body in (data.get(name) or {}).items():
            if key not in ROUND_PARTS or (body is not None and not isinstance(body, dict)):
                raise RecipeError(f"{path}: {name}.{key}: {name} holds the mappings {', '.join(ROUND_PARTS)}")
    return {name: dict(data.get(name) or {}) for name in (*SECTIONS, *round_names)}


def rounds(recipe: dict[str, dict]) -> list[int]:
    """The on-policy rounds after the first that ``recipe`` configures: [2, 3] for a recipe
    with non-empty ``round2`` and ``round3`` sections, [] for a one-round recipe."""
    found = []
    for k in range(2, 10):
        if not recipe.get(f"round{k}"):
            break
        found.append(k)
    return found


def round_settings(recipe: dict[str, dict], k: int, part: str) -> dict[str, Any]:
    """The ``part`` (data or train) keys round ``k`` changes: round2's, then round3's, ...,
    then round k's, each replacing the one before, so a later round names only what differs."""
    values: dict[str, Any] = {}
    for j in range(2, k + 1):
        values.update((recipe.get(f"round{j}") or {}).get(part) or {})
    return values
