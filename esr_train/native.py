"""Build and load esr-train's small C++ CPU kernels (``esr_train/csrc``) once per machine.

Each kernel is compiled with ``torch.utils.cpp_extension`` into ``<cache>/kernels/<name>_<hash>``,
where the hash covers the source, the shared headers (``csrc/*.h``), the compiler flags and the
torch version: a later process, or another clone on the same machine, loads the built library;
a changed source or CPU builds anew.
The flags follow the CPU at hand (AVX2 + FMA, and AVX-512 where the CPU lists it), never a fixed
target, so a library built on one machine is never loaded on a CPU that lacks its instructions.
Where nothing can be built (no compiler, no ninja) the caller gets None and keeps torch's path.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"


def compiler_flags() -> list[str]:
    """Optimisation flags for this CPU: AVX2/FMA where present, plus ``-mavx512f`` where the
    CPU has it (the decode attention's register-blocked path, docs/performance.md P22)."""
    from esr_train.dtype import cpu_flags

    flags = cpu_flags()
    if platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= flags:
        return ["-O3", "-fopenmp", "-mavx2", "-mfma"] + (["-mavx512f"] if "avx512f" in flags else [])
    return ["-O3", "-fopenmp"]


def build(stem: str, source: str, what: str, cache_root: str | None = None):
    """The compiled extension for ``csrc/<source>`` (built on first use, 10-12 s on two
    cores), or None where it cannot be built; ``what`` names it in the one warning."""
    from esr_train.cache import cache_dir

    path = SOURCES / source
    flags = compiler_flags()
    headers = b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))  # included by the sources
    digest = hashlib.sha256(path.read_bytes() + headers + " ".join(flags).encode() + torch.__version__.encode())
    name = f"{stem}_{digest.hexdigest()[:12]}"
    try:
        from torch.utils.cpp_extension import load

        directory = cache_dir(cache_root) / "kernels" / name
        directory.mkdir(parents=True, exist_ok=True)

        return load(name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    build_directory=str(directory), verbose=False)
    except Exception as exc:  # no compiler, no ninja, an unwritable cache, a failed build: torch's path stays
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("%s could not be built (%s); using torch's path", what, reason)
        return None
