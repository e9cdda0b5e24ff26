"""The CPU speed wing: compiled kernels and patches that make CPU runs faster without
changing what they compute (beyond float rounding, where a module says so).

Everything here sits behind one registry (:data:`PATHS`) and one switch, the environment
variable ``ESR_SPEED``:

* unset or ``on``: every path is used where it applies;
* ``off``: none is (the libraries' own code everywhere);
* a comma-separated list such as ``-decode_attention,-token_choice``: those paths are off.

A compiled kernel is built once per machine (:mod:`esr_train.speed.build`); where it cannot
be built the caller keeps the library's path and one warning says so. A patch of a private
TRL or transformers function first checks that function's signature against the one it
was written for (:mod:`esr_train.speed.guard`) and, on a mismatch, warns and leaves the
library alone. What each path buys is measured in docs/performance.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SWITCH = "ESR_SPEED"


@dataclass(frozen=True)
class SpeedPath:
    name: str
    module: str
    what: str
    fallback: str
    compiled: bool  # a C++ kernel built by esr_train.speed.build (load_kernel in its module)


PATHS: dict[str, SpeedPath] = {p.name: p for p in (
    SpeedPath("decode_attention", "esr_train.speed.decode_attention", "CPU decode-step attention kernel",
              "decoding uses SDPA", True),
    SpeedPath("elementwise", "esr_train.speed.elementwise", "CPU RMSNorm and RoPE (decoding; the norm in training)",
              "transformers' code stays", True),
    SpeedPath("token_choice", "esr_train.speed.token_choice", "CPU next-token choice",
              "decoding uses transformers' processors", True),
    SpeedPath("logprob_tiles", "esr_train.speed.logprob_tiles", "CPU folds of TRL's log-prob head",
              "training uses TRL's torch folds", True),
    SpeedPath("packed_linear", "esr_train.speed.packed_linear", "oneDNN-packed linear layers in CPU decoding",
              "decoding uses plain linear layers", False),
    SpeedPath("labelled_head", "esr_train.speed.labelled_head", "TRL's LM head on labelled positions only",
              "TRL projects every position off CUDA", False),
    SpeedPath("adapter_casts", "esr_train.speed.adapter_casts", "no float32 round trip of LoRA inputs under autocast",
              "PEFT casts each LoRA input", False),
)}


def enabled(name: str) -> bool:
    """Whether the speed path ``name`` is switched on by ``ESR_SPEED`` (see the module
    docstring); an unknown name in the switch is ignored."""
    if name not in PATHS:
        raise KeyError(f"no speed path {name!r}; known: {', '.join(PATHS)}")
    value = os.environ.get(SWITCH, "on").strip().lower()
    if value in ("", "on", "1", "true"):
        return True
    if value in ("off", "0", "false"):
        return False
    off = {item.strip().lstrip("-") for item in value.split(",") if item.strip().startswith("-")}
    return name not in off


def load_kernel(name: str, cache_root: str | None = None):
    """The compiled kernel of speed path ``name`` (built on first use), or None where it is
    switched off or cannot be built."""
    import importlib

    path = PATHS[name]
    if not path.compiled:
        raise ValueError(f"{name} is not a compiled kernel")
    return importlib.import_module(path.module).load_kernel(cache_root)
