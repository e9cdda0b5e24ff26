"""Tests for the bundled input banks and their loaders (esr_train.banks)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from esr_train.banks import (
    BankError,
    format_restart,
    load_prompts,
    load_restart_phrases,
    load_subjects,
)

PROMPT_FORMS = ("Explain how to ", "How do you ", "What is the best way to ")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, [json.dumps(r) for r in rows])


# --- bundled banks -----------------------------------------------------------


def test_counts() -> None:
    assert len(load_prompts(None)) >= 300
    assert len(load_subjects(None)) >= 120
    assert len(load_restart_phrases()) >= 40


def test_split_filter_partitions_bank() -> None:
    for load in (load_prompts, load_subjects):
        train, test, every = load("train"), load("test"), load(None)
        assert train and test
        assert len(train) + len(test) == len(every)
        assert load() == train  # default split is train
        assert 0.2 <= len(test) / len(every) <= 0.3


@pytest.mark.parametrize(
    ("load", "main", "group", "min_per_group"),
    [(load_prompts, "prompt", "domain", 25), (load_subjects, "subject", "category", 10)],
)
def test_splits_disjoint_and_stratified(load, main: str, group: str, min_per_group: int) -> None:
    train, test = load("train"), load("test")
    assert not {r[main] for r in train} & {r[main] for r in test}
    groups = Counter(r[group] for r in train + test)
    for name, n in groups.items():
        assert n >= min_per_group, name
        assert any(r[group] == name for r in train), name
        assert any(r[group] == name for r in test), name


def test_required_groups_present() -> None:
    domains = {r["domain"] for r in load_prompts(None)}
    assert {"home", "cooking", "money", "maths", "writing", "work", "health", "tech", "travel"} <= domains
    categories = Counter(r["category"] for r in load_subjects(None))
    for cat in ("animals", "history", "astronomy", "places", "arts", "science"):
        assert categories[cat] >= 10, cat


def test_no_duplicates() -> None:
    for rows, key in (
        (load_prompts(None), "prompt"),
        (load_subjects(None), "subject"),
        (load_restart_phrases(), "phrase"),
    ):
        values = [r[key].casefold() for r in rows]
        assert len(values) == len(set(values)), key


def test_prompt_forms() -> None:
    for row in load_prompts(None):
        text = row["prompt"]
        assert text.startswith(PROMPT_FORMS), text
        assert text.endswith("?" if not text.startswith("Explain") else "."), text


def test_subject_keywords() -> None:
    for row in load_subjects(None):
        kws = row["keywords"]
        assert 3 <= len(kws) <= 6, row["subject"]
        assert all(k and k == k.lower() and k.strip() == k for k in kws), row["subject"]
        assert len(set(kws)) == len(kws), row["subject"]


def test_restart_phrases_styles_and_placeholders() -> None:
    phrases = load_restart_phrases()
    styles = Counter(p["style"] for p in phrases)
    assert set(styles) == {"short", "names_subject", "names_prompt", "plain"}
    for p in phrases:
        assert ("{subject}" in p["phrase"]) == (p["style"] == "names_subject"), p["phrase"]


def test_restart_opening_diversity() -> None:
    phrases = load_restart_phrases()
    openings = Counter(re.match(r"[A-Za-z']+", p["phrase"]).group(0).lower() for p in phrases)
    word, n = openings.most_common(1)[0]
    assert n / len(phrases) <= 0.25, (word, n)


# --- user files ----------------------------------------------------------------


def test_user_text_file(tmp_path: Path) -> None:
    lines = ["# my prompts", "", "How do you boil an egg?", "  Explain how to tie a tie.  "]
    path = _write(tmp_path / "mine.txt", lines)
    rows = load_prompts("train", path=path)
    assert [r["prompt"] for r in rows] == ["How do you boil an egg?", "Explain how to tie a tie."]
    assert load_prompts("test", path=str(path)) == rows  # no split field: filter not applied
    assert [r["subject"] for r in load_subjects(path=_write(tmp_path / "s.txt", ["comets"]))] == ["comets"]


def test_user_jsonl_file(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "How do you boil an egg?", "split": "train", "domain": "cooking"},
            {"prompt": "Explain how to tie a tie.", "split": "test"},
            {"prompt": "How do you fold a shirt?"},
        ],
    )
    assert [r["prompt"] for r in load_prompts("train", path=path)] == [
        "How do you boil an egg?",
        "How do you fold a shirt?",
    ]
    assert len(load_prompts(None, path=path)) == 3
    phrases = load_restart_phrases(_jsonl(tmp_path / "r.jsonl", [{"phrase": "Wait, {subject}? Restarting."}]))
    assert format_restart(phrases[0], "comets") == "Wait, comets? Restarting."


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="train"):
        load_prompts("dev")
    with pytest.raises(ValueError, match="test"):
        load_subjects("validation")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="nope.txt"):
        load_prompts(path=tmp_path / "nope.txt")


@pytest.mark.parametrize("lines", [[], ["", "# only a comment", "   "]])
def test_empty_file(tmp_path: Path, lines: list[str]) -> None:
    path = _write(tmp_path / "empty.txt", lines)
    with pytest.raises(BankError, match=r"empty\.txt has no prompts"):
        load_prompts(path=path)


BAD_JSONL = [
    ("not json", ['{"prompt": "How do you boil an egg?"}', "{oops"], 2, "not valid JSON"),
    ("not an object", ['["How do you boil an egg?"]'], 1, "JSON object"),
    ("missing field", ['{"prompt": "How do you boil an egg?"}', '{"domain": "x"}'], 2, "missing field 'prompt'"),
    ("non-string", ['{"prompt": 42}'], 1, "must be a string"),
    ("non-string optional", ['{"prompt": "How do you boil an egg?", "domain": 3}'], 1, "'domain' must be a string"),
    ("bad split", ['{"prompt": "How do you boil an egg?", "split": "dev"}'], 1, "split"),
    ("empty", ['{"prompt": "   "}'], 1, "empty"),
]


@pytest.mark.parametrize(
    ("case", "lines", "lineno", "what"), BAD_JSONL, ids=[c[0] for c in BAD_JSONL]
)
def test_bad_jsonl_names_file_and_line(
    tmp_path: Path, case: str, lines: list[str], lineno: int, what: str
) -> None:
    path = _write(tmp_path / "prompts.jsonl", lines)
    with pytest.raises(BankError) as info:
        load_prompts(path=path)
    msg = str(info.value)
    assert f"prompts.jsonl:{lineno}:" in msg and what in msg
    assert "\n" not in msg


def test_duplicates_name_both_lines(tmp_path: Path) -> None:
    lines = ["How do you boil an egg?", "# x", "Explain how to tie a tie.", "how do you  boil an egg?"]
    path = _write(tmp_path / "p.txt", lines)
    with pytest.raises(BankError, match=r"p\.txt:4: duplicate prompt \(same as line 1\)"):
        load_prompts(path=path)
    path = _jsonl(tmp_path / "s.jsonl", [{"subject": "comets"}, {"subject": "Comets"}])
    with pytest.raises(BankError, match=r"s\.jsonl:2: .*line 1"):
        load_subjects(path=path)


def test_bad_keywords(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [{"subject": "comets", "keywords": "tail"}])
    with pytest.raises(BankError, match=r"s\.jsonl:1: .*keywords"):
        load_subjects(path=path)


@pytest.mark.parametrize(
    "phrase", ["Wait, back to {prompt}.", "Hold on, {} again.", "Oops {subject!r}.", "Sorry {subject"]
)
def test_bad_placeholder(tmp_path: Path, phrase: str) -> None:
    path = _write(tmp_path / "phrases.txt", ["Wait, no.", phrase])
    with pytest.raises(BankError, match=r"phrases\.txt:2: "):
        load_restart_phrases(path)
    with pytest.raises(BankError):
        format_restart(phrase, "comets")


# --- format_restart -----------------------------------------------------------------


def test_format_restart() -> None:
    template = {"phrase": "Wait, I drifted into {subject} there.", "style": "names_subject"}
    assert format_restart(template, "the Eiffel Tower") == "Wait, I drifted into the Eiffel Tower there."
    assert format_restart("Wait, no.", "volcanoes") == "Wait, no."
    assert format_restart("Hold on, {subject}.", "a {weird} subject") == "Hold on, a {weird} subject."
    for p in load_restart_phrases():
        out = format_restart(p, "octopuses")
        assert "{" not in out and ("octopuses" in out) == (p["style"] == "names_subject")
