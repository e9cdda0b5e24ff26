"""transformers' RMSNorm modules and rotary embedding as compiled passes forward and backward, for the
length of CPU training.

Why: in a LoRA step every RMSNorm is seven torch ops forward (a float32 copy of the rows, the square,
the mean, the epsilon, the rsqrt, two products, a cast back) and about as many again in autograd's
backward, each a pass over [batch x length, hidden] and a float32 tensor kept for the backward. Made
identities (not a valid model, only a bound) they were 11-12% of a bf16 SmolLM2 step
(docs/performance.md P25). Here each norm is an ``autograd.Function`` over the kernels of
``esr_train.elementwise`` (``csrc/elementwise.cpp``): the forward is the decode's norm (transformers'
roundings; the squares summed in another order), it keeps one float per row, and the backward
computes the gradient with respect to the input in one pass per row, as torch's autograd through the
module's ops does it (the weight's product rounded to the dtype first for Llama, kept in float32
for Gemma 3), to float32 rounding. On train_bench's data with the ``smollm2-135m`` recipe (8 steps,
alternated twice, P25): bf16 634.0 -> 669.8 tok/s, float32 298.5 -> 339.2 with the same final
loss to the last digit printed; in bf16 the first loss moved by 0.0013, as any change of rounding does.
The modelling modules' ``apply_rotary_pos_emb`` runs the same way (``esr_train.elementwise._Rotary``):
its backward is the forward kernel with sin's halves swapped and negated, so outputs, gradients and
losses are autograd's bit for bit; q and k of 8 x 137 tokens, forward and backward, 1.99 -> 1.28 ms
a layer in bf16, 2.89 -> 1.09 in float32 (about 1-2% of a step, inside the A/B's noise).

Scope: a norm whose weight is frozen (LoRA: ``all-linear`` never targets norms) on the CPU, float32
or bfloat16, of the classes ``esr_train.elementwise.NORMS`` names; a norm with a trainable weight,
another device or dtype keeps transformers' forward. ``esr train`` switches it on around
``trainer.train()`` (the summary key ``compiled_norms``); ``ESR_ELEMENTWISE=torch`` turns it off
with the decode's kernels.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from esr_train import elementwise


class _RMSNorm(torch.autograd.Function):
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


def _training_forward(module, kernel, gemma: bool):
    plain = type(module).forward
    eps = float(module.eps if gemma else module.variance_epsilon)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        if (w.requires_grad or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
                or w.dtype != x.dtype or w.device != x.device or w.dim() != 1 or x.shape[-1] != w.shape[0]):
            return plain(module, x)
        return _RMSNorm.apply(x.contiguous(), w, eps, gemma, kernel)

    return forward


@contextmanager
def compiled_norms(model):
    """Within the block, a CPU model's Llama and Gemma 3 RMSNorms with frozen weights and their modelling
    modules' rotary embedding run the compiled forward and backward (when the kernel builds); yields
    whether any did; transformers' code is restored on exit."""
    device = next(model.parameters()).device
    kernel = elementwise.load_kernel() if device.type == "cpu" else None
    norms = [m for m in model.modules() if type(m).__name__ in elementwise.NORMS and "forward" not in vars(m)
             and isinstance(getattr(m, "weight", None), torch.Tensor)] if kernel is not None else []
    ropes = [(m, m.apply_rotary_pos_emb) for m in elementwise._rope_modules(model)] if kernel is not None else []
    for module in norms:
        module.forward = _training_forward(module, kernel, elementwise.NORMS[type(module).__name__])
    for module, plain in ropes:
        module.apply_rotary_pos_emb = elementwise._rope_function(plain, kernel, with_grad=True)
    try:
        yield bool(norms or ropes)
    finally:
        for module, plain in ropes:
            module.apply_rotary_pos_emb = plain
        for module in norms:
            vars(module).pop("forward", None)
