"""What produced a result: code version, library versions, machine and dtype.

Every summary esr-train writes (a dataset's ``summary.json``, an adapter's
``esr_train_summary.json``, an eval run's ``summary.json`` and ``pipeline.json``) carries
``provenance()`` under the key ``provenance``, so a number can be traced to the code and
the machine that made it.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "sae-lens")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any] | None:
    """The commit of the source tree esr-train runs from, and whether it has uncommitted
    changes; None for an installed copy outside a git checkout (or without git)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def machine() -> dict[str, Any]:
    """The GPU's name where CUDA is in use, else the CPU's model and ISA capability."""
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    from esr_train.dtype import cpu_model_name

    return {"device": "cpu", "cpu": cpu_model_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def provenance(dtype: Any = None) -> dict[str, Any]:
    """esr-train's version and git commit, the library versions, Python, the machine and
    ``dtype`` (a torch dtype or its name) when given."""
    from esr_train import __version__

    return {"esr_train": __version__, "git": git_commit(), "python": platform.python_version(),
            "platform": sys.platform, "libraries": {name: _version(name) for name in LIBRARIES},
            "machine": machine(), "dtype": None if dtype is None else str(dtype).replace("torch.", "")}
