"""Every ``esr`` command line in the README, the guide and the recipe runbooks parses under
today's command line: known subcommand, known flags, recipe overrides in the
``--SECTION.KEY VALUE`` grammar for the sections the command reads. (The history in
docs/results.md and docs/performance.md keeps the commands as they were run.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md", *sorted((ROOT / "recipes").glob("*.md"))]


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each line of a fenced code block that runs ``esr``;
    backslash continuations joined, comments dropped."""
    found, block, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith("```"):
            block, pending = not block, ""
            continue
        if not block:
            continue
        text = re.split(r"\s#\s", line)[0].rstrip()
        if not pending:
            text = text.strip()
            if not re.match(r"^(\S+=\S+ )*(\.venv/bin/)?esr ", text):
                continue
            start = n
        pending += " " + text.rstrip("\\").strip()
        if not text.endswith("\\"):
            found.append((start, pending.strip()))
            pending = ""
    return found


CASES = [(f"{p.relative_to(ROOT)}:{n}", cmd) for p in DOCS if p.exists() for n, cmd in _commands(p)]


def test_the_docs_hold_commands():
    assert len(CASES) >= 20


@pytest.mark.parametrize("where,command", CASES, ids=[c[0] for c in CASES])
def test_documented_command_parses(where, command):
    from esr_train.cli import build_parser
    from esr_train.settings import collect_overrides

    words = shlex.split(command)
    while "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words.pop(0)
    argv = words[1:]
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: does not parse: {command}")
    if hasattr(args, "override_sections"):
        collect_overrides(args, extra)
    else:
        assert not extra, f"{where}: unknown arguments {extra}: {command}"
