"""transformers' RMSNorm modules and rotary embedding as compiled passes, for the length of a CPU decode
or CPU training.

Why: ``LlamaRMSNorm`` is seven torch ops (a cast, the square, the mean, the epsilon, the rsqrt, the
product, a cast back and the weight's product), each a pass over the rows and a dispatch of its own,
and a SmolLM2 decode step runs 61 of them; ``apply_rotary_pos_emb`` is eleven more (two halves, a
negation, a concatenation, four products and two sums) for each of 30 layers; together they are a
noticeable share of a decode step (measured in docs/performance.md). ``csrc/elementwise.cpp`` does each in one pass per row
with transformers' roundings (its header lists them). The rotary embedding is the same bit for bit;
the norm agrees to float32 rounding, and in bfloat16 a rounding moves now and then by one unit, as any
change of summation order does.

Scope: the CPU, float32 or bfloat16, for the code whose arithmetic the kernels copy: ``LlamaRMSNorm``
(SmolLM2), ``Gemma3RMSNorm`` (Gemma 3's (1 + w) scaling in float32), and the ``apply_rotary_pos_emb``
of the Llama and Gemma 3 modelling modules. Any other input goes to transformers' own code.
``stream_decode`` switches a model to them in inference for the length of a run
(:func:`compiled_elementwise`); ``esr train`` switches them on ``with_grad`` around
``trainer.train()``, where a frozen norm and the rotary embedding also run a compiled backward
(:class:`_RMSNorm`, :class:`_Rotary`; the summary key ``compiled_norms``). ``model.generate`` and
perplexity passes keep transformers' code. ``ESR_SPEED=-elementwise`` turns both off.

Training: a norm's backward computes the input's gradient in one pass per row as autograd through
the module's ops does (the weight's product rounded to the dtype first for Llama, kept in float32 for
Gemma 3), to float32 rounding, so losses match transformers' code up to rounding. The rotary
embedding's backward is the forward kernel with sin's halves swapped and negated, autograd's bit for
bit. Training speed-ups are measured in docs/performance.md.

What it buys: 1.08x in steered decoding and 1.09x in LoRA training (0.93 and 0.92 without it,
docs/performance.md P27). Measured on a 2-core AMD EPYC with AVX-512 BF16.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import lru_cache

import torch

from esr_train.speed.guard import signature_matches

NORMS = {"LlamaRMSNorm": False, "Gemma3RMSNorm": True}  # class name -> Gemma's (1 + w) scaling
NORM_FORWARD = {"LlamaRMSNorm": ("self", "hidden_states"), "Gemma3RMSNorm": ("self", "x")}
"""The forward signatures the compiled norm replaces; another is left to transformers."""
ATTENTIONS = ("LlamaAttention", "Gemma3Attention")  # their modules' apply_rotary_pos_emb is the one copied


@lru_cache(maxsize=2)
def load_kernel(cache_root: str | None = None):
    """The compiled kernels (built once per machine into ``<cache>/kernels``), or None."""
    from esr_train.speed import enabled
    from esr_train.speed.build import build

    if not enabled("elementwise"):
        return None

    return build("esr_elementwise", "elementwise.cpp", "the CPU RMSNorm and RoPE kernels", cache_root)


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and weight.device == x.device and weight.dim() == 1
            and x.shape[-1] == weight.shape[0])


class _RMSNorm(torch.autograd.Function):
    """A frozen-weight RMSNorm with its backward: the forward keeps one float per row (1 / rms), the
    backward gives the input's gradient in one pass per row."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, gemma: bool, kernel):
        y, inv = kernel.rms_norm_keep(x, weight, eps, gemma)
        ctx.save_for_backward(x, weight, inv)
        ctx.gemma, ctx.kernel = gemma, kernel
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv = ctx.saved_tensors
        return ctx.kernel.rms_norm_backward(grad.contiguous(), x, weight, inv, ctx.gemma), None, None, None, None


def _norm_forward(module, kernel, gemma: bool, with_grad: bool = False):
    """The module's forward on the kernel where it applies: in inference only, or (``with_grad``) with
    the backward of :class:`_RMSNorm` when its weight is frozen; its own forward for anything else."""
    plain = type(module).forward
    eps = float(module.eps if gemma else module.variance_epsilon)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        grad = torch.is_grad_enabled()
        if not _takes(x, w) or (grad and (not with_grad or w.requires_grad)):
            return plain(module, x)
        if grad:
            return _RMSNorm.apply(x.contiguous(), w, eps, gemma, kernel)
        return kernel.rms_norm(x.contiguous(), w, eps, gemma)

    return forward


class _Rotary(torch.autograd.Function):
    """The rotary embedding of one tensor with its backward: the gradient of y = x cos + rotate_half(x) sin
    is the same rotation of the gradient with sin's halves swapped and negated, so the backward is the
    forward kernel again, with autograd's roundings (each product rounded, then their sum)."""

    @staticmethod
    def forward(ctx, x, cos, sin, swapped_sin, kernel):
        ctx.save_for_backward(cos, swapped_sin)
        ctx.kernel = kernel
        return kernel.rope(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, swapped_sin = ctx.saved_tensors
        return ctx.kernel.rope(grad.contiguous(), cos, swapped_sin), None, None, None, None


def _rope_function(plain, kernel, with_grad: bool = False):
    """``apply_rotary_pos_emb`` on the kernel where it applies: in inference only, or (``with_grad``)
    with the backward of :class:`_Rotary` as well; ``plain`` for anything else."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        grad = torch.is_grad_enabled()
        if (unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape
                or (grad and (not with_grad or cos.requires_grad or sin.requires_grad)) or q.device.type != "cpu"
                or any(t.dtype != q.dtype or t.device != q.device for t in (k, cos, sin))
                or q.dtype not in (torch.float32, torch.bfloat16) or q.stride(-1) != 1 or k.stride(-1) != 1
                or cos.shape[0] not in (1, q.shape[0]) or cos.shape[1:] != q.shape[2:] or k.shape[2:] != q.shape[2:]
                or k.shape[0] != q.shape[0] or q.shape[-1] % 2):
            return plain(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.contiguous(), sin.contiguous()
        if grad:  # sin for the backward, once for q and k
            half = sin.shape[-1] // 2
            swapped = torch.cat([-sin[..., half:], -sin[..., :half]], dim=-1)
            return _Rotary.apply(q, cos, sin, swapped, kernel), _Rotary.apply(k, cos, sin, swapped, kernel)
        return kernel.rope(q, cos, sin), kernel.rope(k, cos, sin)

    return apply_rotary_pos_emb


def _rope_modules(model) -> list:
    """The modelling modules whose ``apply_rotary_pos_emb`` this model's attention layers call."""
    found = {type(m).__module__ for m in model.modules() if type(m).__name__ in ATTENTIONS}
    return [sys.modules[name] for name in sorted(found) if callable(getattr(sys.modules.get(name), "apply_rotary_pos_emb", None))]


@contextmanager
def compiled_elementwise(model, with_grad: bool = False):
    """Within the block, a CPU model's Llama and Gemma 3 RMSNorms and rotary embeddings run the compiled
    passes (when the kernels build): in inference only, or also with their backward (``with_grad``,
    training). Yields whether any was switched; transformers' code is restored on exit."""
    device = next(model.parameters()).device
    kernel = load_kernel() if device.type == "cpu" else None
    norms = [m for m in model.modules() if type(m).__name__ in NORMS and "forward" not in vars(m)
             and isinstance(getattr(m, "weight", None), torch.Tensor)
             and signature_matches(type(m).forward, NORM_FORWARD[type(m).__name__],
                                   f"{type(m).__module__}.{type(m).__name__}.forward")] if kernel is not None else []
    ropes = [(module, module.apply_rotary_pos_emb) for module in _rope_modules(model)] if kernel is not None else []
    for module in norms:
        module.forward = _norm_forward(module, kernel, NORMS[type(module).__name__], with_grad)
    for module, plain in ropes:
        module.apply_rotary_pos_emb = _rope_function(plain, kernel, with_grad)
    try:
        yield bool(norms or ropes)
    finally:
        for module, plain in ropes:
            module.apply_rotary_pos_emb = plain
        for module in norms:
            vars(module).pop("forward", None)
