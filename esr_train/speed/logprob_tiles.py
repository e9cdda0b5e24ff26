"""TRL's chunked LM head on CPU: its two per-tile folds in one compiled pass each.

``SFTTrainer`` computes every trained token's log-probability (and entropy, and whether the
label is the top token) through ``trl.kernels.ChunkedLogProbFunction``: the head's product is
taken in [tokens x 32,768] tiles and each tile is folded into online log-sum-exp statistics by
a Triton kernel on CUDA. Elsewhere TRL folds a tile with torch ops (``_forward_tile``,
``_backward_tile``): about a dozen float32 passes over the tile each way (the cast, the
logit scale and temperature even at 1.0, the max, exp, the entropy and top-1 terms). With a
large vocabulary those folds, not the head's products, take most of the head's time on a CPU
(measured in docs/performance.md).

``compiled_logprob_tiles`` puts ``csrc/logprob_tiles.cpp`` in their place for the length of
a ``with`` block: the same statistics and gradients, one task per token, two passes over the
row forward (the max, then the exps) and one backward, the exps 8 lanes at a time. The products,
the chunking and the gradient GEMMs stay TRL's. Results agree with TRL's torch folds to float32
rounding (``tests/test_logprob_tiles.py``), not bit for bit. Tiles the kernel does not take
(not on CPU, float16, a final-logit softcap, views it cannot read) go to TRL's own fold, as
does everything where the kernel cannot be built or ``ESR_SPEED=-logprob_tiles`` is set, or TRL's folds no longer take the
parameters the replacements were written for (:mod:`esr_train.speed.guard`).

What it buys: LoRA training at 1.32x the rate with TRL's torch folds (0.76 without it,
docs/performance.md P27). Measured on a 2-core AMD EPYC with AVX-512 BF16.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from functools import lru_cache

import torch

from esr_train.speed.guard import signature_matches

TRL_MODULE = "trl.kernels.chunked_logprob"
FORWARD_TILE = ("tile", "tile_stride", "targets", "running_max", "sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum",
                "max_before_target", "target_logit", "vocab_start", "n_cols", "logit_scale", "softcap", "inv_t",
                "HAS_SOFTCAP", "HAS_ENTROPY", "HAS_LOG_SUM_SQ_PROBS", "HAS_MEAN_LOGITS", "HAS_IS_TOP1", "BLOCK_SIZE")
"""The parameters of TRL's ``_forward_tile`` that :func:`_folds` replaces."""
BACKWARD_TILE = ("tile", "tile_stride", "targets", "log_z", "entropy", "grad_logprobs", "grad_entropy", "vocab_start",
                 "n_cols", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP", "HAS_LOGPROB_GRAD", "HAS_ENTROPY_GRAD",
                 "BLOCK_SIZE")
"""The parameters of TRL's ``_backward_tile``."""


@lru_cache(maxsize=2)
def load_kernel(cache_root: str | None = None):
    """The compiled folds (built once per machine into ``<cache>/kernels``), or None."""
    from esr_train.speed import enabled
    from esr_train.speed.build import build

    if not enabled("logprob_tiles"):
        return None

    return build("esr_logprob_tiles", "logprob_tiles.cpp", "the CPU log-prob head folds", cache_root)


def _takes(tile: torch.Tensor, n_cols: int, targets: torch.Tensor, softcap: bool, *stats: torch.Tensor) -> bool:
    """Whether the compiled folds read this call's tensors; anything else goes to TRL's fold."""
    return (tile.device.type == "cpu" and tile.dtype in (torch.float32, torch.bfloat16) and tile.dim() == 2
            and tile.stride(1) == 1 and tile.shape[1] == n_cols and targets.dtype == torch.long and not softcap
            and all(s.dtype == torch.float32 and s.is_contiguous() for s in stats))


def _folds(kernel, forward, backward):
    """Replacements with the signatures of TRL's ``_forward_tile`` / ``_backward_tile``."""

    def forward_tile(tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
                     max_before_target, target_logit, vocab_start, n_cols, logit_scale, softcap, inv_t,
                     HAS_SOFTCAP, HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS, HAS_MEAN_LOGITS, HAS_IS_TOP1, BLOCK_SIZE):
        stats = (running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum, max_before_target, target_logit)
        if not _takes(tile, n_cols, targets, HAS_SOFTCAP, *stats):
            return forward(tile, tile_stride, targets, *stats, vocab_start, n_cols, logit_scale, softcap, inv_t,
                           HAS_SOFTCAP=HAS_SOFTCAP, HAS_ENTROPY=HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS=HAS_LOG_SUM_SQ_PROBS,
                           HAS_MEAN_LOGITS=HAS_MEAN_LOGITS, HAS_IS_TOP1=HAS_IS_TOP1, BLOCK_SIZE=BLOCK_SIZE)
        kernel.forward_tile(tile, targets.contiguous(), *stats, int(vocab_start), float(logit_scale), float(inv_t),
                            bool(HAS_ENTROPY), bool(HAS_LOG_SUM_SQ_PROBS), bool(HAS_MEAN_LOGITS), bool(HAS_IS_TOP1))

    def backward_tile(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols,
                      logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD, BLOCK_SIZE):
        if not _takes(tile, n_cols, targets, HAS_SOFTCAP, log_z, entropy, grad_logprobs, grad_entropy):
            return backward(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start,
                            n_cols, logit_scale, softcap, inv_t, HAS_SOFTCAP=HAS_SOFTCAP,
                            HAS_LOGPROB_GRAD=HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD=HAS_ENTROPY_GRAD,
                            BLOCK_SIZE=BLOCK_SIZE)
        kernel.backward_tile(tile, targets.contiguous(), log_z, entropy, grad_logprobs, grad_entropy,
                             int(vocab_start), float(logit_scale), float(inv_t), bool(HAS_LOGPROB_GRAD),
                             bool(HAS_ENTROPY_GRAD))

    return forward_tile, backward_tile


@contextmanager
def compiled_logprob_tiles():
    """Inside the block, TRL's CPU tile folds are the compiled ones (see the module
    docstring). Yields whether they are; with a TRL whose folds are not where this module
    looks, or no kernel, nothing changes."""
    try:
        module = importlib.import_module(TRL_MODULE)
    except ImportError:
        yield False
        return
    forward, backward = getattr(module, "_forward_tile", None), getattr(module, "_backward_tile", None)
    fits = (signature_matches(forward, FORWARD_TILE, f"{TRL_MODULE}._forward_tile")
            and signature_matches(backward, BACKWARD_TILE, f"{TRL_MODULE}._backward_tile"))
    kernel = load_kernel() if fits else None
    if kernel is None:
        yield False
        return
    module._forward_tile, module._backward_tile = _folds(kernel, forward, backward)
    try:
        yield True
    finally:
        module._forward_tile, module._backward_tile = forward, backward
