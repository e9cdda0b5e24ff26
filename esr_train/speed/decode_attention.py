"""A CPU attention for decode steps: one new token per row against the key/value cache.

Why: in a decode step SDPA's CPU flash kernel handles each row's grouped query heads as
tiny products and runs far below the machine's matmul rate; at the batches data
generation and evaluation use, it is a large share of a step (measured in
docs/performance.md). Written with ``torch`` ops (batched matmuls, elementwise
products, ``torch.compile``) it was no faster. The kernel here (``csrc/decode_attention.cpp``,
built once per machine with ``torch.utils.cpp_extension``) reads each cached key and value
row once for all the query heads that share it, with the mask and the softmax in the same
pass (each a torch op of its own cost as much as the products at these sizes). Scores and
sums are float32 whatever the cache's dtype (float32 or
bfloat16), as SDPA's CPU kernel keeps them. Where the CPU has AVX-512, a task whose query
heads fit in registers (SmolLM2: 3 heads of 64) keeps them and its output rows there; the
AVX2 loops leave a bf16 cache no faster than a float32 one.

Only CPU decode steps in inference take it (one query token, a float32 or bfloat16 cache,
a boolean mask or none); prefill, training, GPUs and anything else go to transformers'
SDPA function unchanged. ``stream_decode`` switches a model to it for the length of a run
(:func:`decode_attention`); ``model.generate`` stays on SDPA, which is what the tests
compare it against. ``ESR_SPEED=-decode_attention`` turns it off; where no compiler can
build it, decoding keeps SDPA and says so once.

What it buys: steered decoding at 1.25x the rate with SDPA in its place (0.80 of the all-on rate
without it, docs/performance.md P27). Measured on a 2-core AMD EPYC with AVX-512 BF16.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

NAME = "esr_cpu_decode"
SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"


@lru_cache(maxsize=2)
def load_kernel(cache_root: str | None = None):
    """The compiled extension (built into ``<cache>/kernels`` on first use, which takes
    seconds, or by ``esr models --prepare``; later processes load it), or None where
    it cannot be built or is turned off."""
    from esr_train.speed import enabled
    from esr_train.speed.build import build

    if not enabled("decode_attention"):
        return None

    return build("esr_decode_attention", SOURCE.name, "the CPU decode attention", cache_root)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: the kernel for a CPU decode step in
    inference, SDPA for everything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = load_kernel()
    batch, heads, q_len, dim = query.shape
    groups, width = key.shape[1], key.shape[2]
    if (kernel is None or q_len != 1 or query.device.type != "cpu" or torch.is_grad_enabled() or dropout
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
            or key.dtype not in (torch.float32, torch.bfloat16) or value.dtype != key.dtype
            or dim % 8 or heads % groups or heads // groups > 64 or key.stride(-1) != 1 or value.stride(-1) != 1
            or (attention_mask is not None and (attention_mask.dtype != torch.bool
                                                or attention_mask.numel() != attention_mask.shape[0] * width
                                                or attention_mask.shape[0] not in (1, batch)))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(batch, groups, heads // groups, dim).float().contiguous()
    mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], width)
    out = kernel.attend(q, key, value, mask, dim ** -0.5 if scaling is None else scaling)
    return out.to(query.dtype).reshape(batch, 1, heads, dim), None


@lru_cache(maxsize=1)
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def decode_attention(model):
    """Within the block, a CPU model on SDPA decodes with the kernel (when it builds);
    any other model is left as it is. The model's setting is restored on exit."""
    config = getattr(model, "config", None)
    device = next(model.parameters()).device
    if (config is None or device.type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa"
            or load_kernel() is None):
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
