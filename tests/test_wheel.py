"""A built wheel carries what an installed esr-train needs: the kernels' sources and
headers (they are compiled on the user's machine), the banks and the judge's resources.

The wheel is installed with ``--no-deps`` into a fresh virtual environment that borrows
this environment's libraries through a ``.pth`` file, then run from outside the checkout,
so nothing can come from the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import esr_train, pathlib, sys
from esr_train.speed import PATHS, load_kernel
from esr_train.banks import load_prompts
assert "site-packages" in esr_train.__file__, esr_train.__file__
built = {p.name: load_kernel(p.name) is not None for p in PATHS.values() if p.compiled and p.name in sys.argv[1:]}
print(built)
assert all(built.values()), built
assert load_prompts()
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("esr_train-*.whl"))


def test_wheel_holds_the_kernel_sources_and_resources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    csrc = sorted((ROOT / "esr_train" / "speed" / "csrc").iterdir())
    assert csrc and {f"esr_train/speed/csrc/{p.name}" for p in csrc} <= names
    for resource in ("esr_train/resources/prompts.jsonl", "esr_train/resources/subjects.jsonl",
                     "esr_train/resources/restart_phrases.jsonl", "eval/resources/restart_prototypes.txt"):
        assert resource in names


def test_kernels_build_and_load_from_an_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # this environment's libraries (torch, transformers, ...) after the new one's own
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "ESR_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": ""}
    # the two kernels that include both shared headers
    run = subprocess.run([str(python), "-c", CHECK, "token_choice", "decode_attention"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "could not be built" not in run.stderr
