"""The decode loop's next-token choice on CPU in one compiled pass per row.

Why: ``generate``'s sampling step is a chain of full passes over the [rows x vocabulary]
float32 scores. The repetition penalty's scatter copies the matrix, the temperature divides
it into another, softmax takes three passes, the cumulative sum one more, and each pass at
batch 128 against SmolLM2's 49,152 tokens moves 25 MB. The kernel (``csrc/token_choice.cpp``)
copies each row once into a scratch row that stays in the core's cache and does the rest
there: the penalty on the row's own tokens, the temperature, the max, the exps, one draw by
inverse CDF (or the argmax when greedy). Timings are in docs/performance.md.

It takes what the evaluation and data generation use: a repetition penalty, a temperature,
sampling or greedy. A ``top_k`` or ``top_p`` warper, scores not float32 on the CPU, a missing
compiler, or ``ESR_SPEED=-token_choice`` keep transformers' processors. A row whose scores hold
a NaN (or, sampled, +inf) is drawn with torch's ops from the same uniform number. The draw
uses the same uniform numbers as :func:`esr_train.decoding.sample_rows` (one
``torch.rand`` per row from the same generator), so a token differs from torch's only where
that number lies within float rounding of a boundary between two tokens
(``tests/test_token_choice.py``). torch's float32 cumulative sum drifts by a few millionths
over a large vocabulary, so a rare draw picks the neighbouring tail token (both of tiny
probability); in bf16 any such difference then changes the batch's later arithmetic, so
whole answers differ as with any change of summation order (see docs/performance.md).

What it buys: steered decoding at 1.09x the rate with transformers' processors (0.92 without it,
docs/performance.md P27). Measured on a 2-core AMD EPYC with AVX-512 BF16.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=2)
def load_kernel(cache_root: str | None = None):
    """The compiled token choice (built once per machine into ``<cache>/kernels``), or None."""
    from esr_train.speed import enabled
    from esr_train.speed.build import build

    if not enabled("token_choice"):
        return None

    return build("esr_token_choice", "token_choice.cpp", "the CPU token choice", cache_root)


def takes(sampling, logits: torch.Tensor) -> bool:
    """Whether the compiled choice covers these settings and scores."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and not sampling.top_k
            and (sampling.top_p is None or sampling.top_p >= 1.0)
            and (not sampling.do_sample or sampling.temperature is None or sampling.temperature > 0))


def uniforms(rows: int, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One uniform number per row [rows, 1]: the draw both paths share, so they read the same stream."""
    return torch.rand(rows, 1, generator=generator, device=device, dtype=dtype)


def compiled_choice(kernel, ids: torch.Tensor, pad: torch.Tensor, logits: torch.Tensor, sampling,
                    u: torch.Tensor | None) -> torch.Tensor:
    """The next token of every row (-1 where torch's ops must decide: a NaN or +inf score)."""
    penalty = float(sampling.repetition_penalty) if sampling.repetition_penalty is not None else 1.0
    temperature = float(sampling.temperature) if sampling.do_sample and sampling.temperature else 1.0
    empty = torch.empty(0, dtype=torch.float32)
    return kernel.choose(logits, ids.contiguous(), pad.to(torch.long).contiguous(), penalty, temperature,
                         u.reshape(-1).contiguous() if u is not None else empty, bool(sampling.do_sample))
