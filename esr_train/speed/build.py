"""Build and load esr-train's small C++ CPU kernels (``esr_train/csrc``) once per machine.

Each kernel is compiled with ``torch.utils.cpp_extension`` into ``<cache>/kernels/<name>_<key>``,
where the key covers everything the build depends on (:func:`build_key`): a later process, or
another clone on the same machine with the same torch, loads the built library; a changed
source, CPU or torch build builds anew, beside the others.
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
    CPU has it (the decode attention's register-blocked path)."""
    from esr_train.dtype import cpu_flags

    flags = cpu_flags()
    if platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= flags:
        return ["-O3", "-fopenmp", "-mavx2", "-mfma"] + (["-mavx512f"] if "avx512f" in flags else [])
    return ["-O3", "-fopenmp"]


def build_key(path: Path, flags: list[str]) -> str:
    """What a build depends on, hashed: the source, the shared headers (``csrc/*.h``), the
    compiler flags, the Python ABI and the torch build it links against (version and
    install path, whose headers it includes). Two virtual environments on one machine get
    two keys, so neither rebuilds the other's library."""
    import sys
    import sysconfig

    headers = b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))
    parts = [path.read_bytes(), headers, " ".join(flags).encode(), torch.__version__.encode(),
             str(Path(torch.__file__).resolve().parent).encode(), sys.version.encode(),
             str(sysconfig.get_config_var("EXT_SUFFIX")).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def _import_library(name: str, library: Path):
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def build(stem: str, source: str, what: str, cache_root: str | None = None):
    """The compiled extension for ``csrc/<source>``, or None where it cannot be built;
    ``what`` names it in the one warning.

    A finished library lives in ``<cache>/kernels/<stem>_<key>/<stem>_<key>.so``
    (:func:`build_key`) and is imported from there without running the build tools. A
    missing one is built in a private temporary folder and moved into place with one
    rename, so a concurrent build of the same key, or a killed one, never leaves a torn
    library where another process would load it."""
    import os
    import shutil
    import tempfile

    from esr_train.cache import cache_dir

    path = SOURCES / source
    flags = compiler_flags()
    name = f"{stem}_{build_key(path, flags)}"
    try:
        kernels = cache_dir(cache_root) / "kernels"
        final = kernels / name
        library = final / f"{name}.so"
        if library.exists():
            return _import_library(name, library)
        from torch.utils.cpp_extension import load

        kernels.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=kernels))
        try:
            module = load(name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                          build_directory=str(scratch), verbose=False)
            os.chmod(scratch, 0o755)  # mkdtemp's 0700 would hide the library from other users of a shared cache
            try:
                os.rename(scratch, final)
            except OSError:  # another process moved the same library into place first
                pass
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return module
    except Exception as exc:  # no compiler, no ninja, an unwritable cache, a failed build: torch's path stays
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("%s could not be built (%s); using torch's path", what, reason)
        return None
