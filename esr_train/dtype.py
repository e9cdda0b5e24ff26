"""Choosing the compute dtype for the machine at hand.

The CPU differs between machines: on a core with native bf16 (AVX-512 BF16, AMX) a bf16
matmul runs several times faster than fp32, while on an AVX2-only core it emulates bf16 and
runs orders of magnitude *slower* (measured in docs/performance.md).
So ``auto`` never assumes: on a GPU it takes bf16 where the GPU supports it (else fp16);
on a CPU it reads the CPU's flags and ISA level and then times a small matmul in both
dtypes, keeping bf16 only when it is really faster. The verdict is cached per CPU model
and torch version, and printed once.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from functools import lru_cache

import torch

from esr_train.cache import atomic_write_json, cache_dir, read_json

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (AVX-512 BF16 or AMX)."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def matmul_gflops(dtype: torch.dtype, n: int = 512, repeats: int = 3, budget_s: float = 2.0) -> float:
    """Measured square-matmul throughput in GFLOP/s for ``dtype`` on the CPU (best of
    ``repeats``; stops early once ``budget_s`` is spent, so a very slow dtype costs
    about ``budget_s``, not minutes)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / best / 1e9


def _cpu_verdict() -> dict:
    key = f"{cpu_model_name()}|{torch.__version__}|{torch.get_num_threads()}"
    path = cache_dir() / "dtype_verdict.json"
    cached = read_json(path, default={}) or {}
    if cached.get("key") == key and cached.get("dtype") in DTYPES:
        return cached
    capability = torch.backends.cpu.get_cpu_capability()
    fp32 = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16) if cpu_has_native_bf16() else None
    choice = "bfloat16" if bf16 is not None and bf16 > 1.2 * fp32 else "float32"
    verdict = {
        "key": key,
        "cpu": cpu_model_name(),
        "capability": capability,
        "native_bf16": cpu_has_native_bf16(),
        "fp32_gflops": round(fp32, 1),
        "bf16_gflops": None if bf16 is None else round(bf16, 1),
        "dtype": choice,
    }
    try:
        atomic_write_json(path, verdict)
    except OSError:  # a read-only cache must not stop the run
        pass
    return verdict


@lru_cache(maxsize=None)
def cpu_dtype_verdict() -> dict:
    """The cached CPU verdict: capability, measured GFLOP/s and the chosen dtype."""
    verdict = _cpu_verdict()
    log.info(
        "dtype auto on CPU %s (%s, native bf16: %s): %s",
        verdict["cpu"], verdict["capability"], verdict["native_bf16"], verdict["dtype"],
    )
    return verdict


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """Turn a dtype name (or ``auto``) into a torch dtype for ``device``.

    ``$ESR_DTYPE`` overrides ``auto`` (handy to force fp32 on a machine whose bf16 is
    slow but falsely advertised).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    if name == "auto" and os.environ.get("ESR_DTYPE"):
        name = os.environ["ESR_DTYPE"].lower()
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_CHOICES)}")
        return DTYPES[name]
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return DTYPES[cpu_dtype_verdict()["dtype"]]
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
