"""The package layers import one way only.

* core: ``esr_train`` except its stages and its top (models, dtype, steering, directions,
  decoding, caches, text and restart utilities, banks, the row schema, negatives);
* stages: ``data_gen``, ``esr_train.training`` and ``eval``; each imports the core and
  itself, never another stage;
* top: ``esr_train.cli``, ``esr_train.pipeline`` and ``esr_train.settings`` (recipe to
  settings), which may import anything.

Every ``import`` statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("esr_train", "data_gen", "eval")
TOP = ("esr_train.cli", "esr_train.pipeline", "esr_train.settings")
STAGES = ("data_gen", "esr_train.training", "eval")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str | None:
    """'top', a stage's name, 'core', or None for modules outside the project."""
    if any(_within(module, t) for t in TOP):
        return "top"
    for stage in STAGES:
        if _within(module, stage):
            return stage
    return "core" if _within(module, "esr_train") else None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # ``from esr_train import negatives`` imports the submodule esr_train.negatives
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def violations(root: Path) -> list[str]:
    """Every import in the packages under ``root`` that goes against the layers."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root)
            here = layer(module)
            if here == "top":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            seen = set()
            for lineno, name in _imported(tree, module, path.name == "__init__.py"):
                there = layer(name)
                if there is None or there == here or there == "core":
                    continue
                if name in PACKAGES or lineno in seen:  # the package itself; one report a line
                    continue
                seen.add(lineno)
                bad.append(f"{path.relative_to(root)}:{lineno}: {here} imports {name} ({there})")
    return bad


def test_packages_import_one_way() -> None:
    assert violations(ROOT) == []


def test_layer_check_fails_on_a_sideways_or_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a stage importing another stage, the core importing a
    stage, and the core importing the top are each reported."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "esr_train" / "training").mkdir()
    (tmp_path / "esr_train" / "training" / "__init__.py").write_text("")
    (tmp_path / "data_gen" / "x.py").write_text("def f():\n    from eval.metrics import wilson_interval\n")
    (tmp_path / "esr_train" / "steering.py").write_text("import esr_train.training.trainer\n")
    (tmp_path / "esr_train" / "zoo.py").write_text("from esr_train import cli\n")
    (tmp_path / "eval" / "ok.py").write_text("from esr_train.text import sentences\nfrom . import metrics\n")
    (tmp_path / "esr_train" / "training" / "ok.py").write_text("from ..rows import COLUMNS\nfrom .trainer import train\n")
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert any("data_gen/x.py:2" in v and "eval.metrics" in v for v in found)
    assert any("esr_train/steering.py:1" in v for v in found)
    assert any("esr_train/zoo.py:1" in v and "esr_train.cli" in v for v in found)
