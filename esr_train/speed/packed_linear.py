"""Linear layers in oneDNN's packed weight layout for the length of a CPU decode run.

Why: a decode step multiplies a few dozen rows by every weight matrix, and MKL's plain
``F.linear`` runs those skinny products well below the machine's square-matmul rate.
oneDNN with the weights reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, the path ``torch.compile`` takes on CPU when
it freezes weights) runs them faster, the wide LM head most of all (measured in
docs/performance.md).

The packed copy replaces the plain one: a layer's weight is reordered, its parameter's
storage freed, and the plain weight written back from the packed one on exit (exact: a
reorder moves values, it does not round them), so no stage holds the model twice. A
head tied to the input embeddings cannot be freed (the embedding lookup reads it), so it
is packed as a copy only when it is at most ``TIED_HEAD_SHARE`` of the model (SmolLM2:
0.21, 113 MB in float32; Gemma 3 270M's 262k-token head is 0.63 and stays plain).

Scope: float32 weights, and bfloat16 ones on a CPU with native bf16 (:func:`packed_dtypes`),
with oneDNN, in inference (no gradient through the packed product), for linears at least ``MIN_FEATURES`` wide on both sides (PEFT's LoRA A/B
matrices stay plain, their base layers are packed). Inside the block a
packed layer answers any number of rows, prefill included; code that reads a packed
layer's ``weight`` directly meanwhile sees an empty tensor. On a CPU with native bf16, where
``auto`` is bfloat16, packed bf16 linears decode faster with the same greedy answers (see
docs/performance.md). Without native bf16 (AVX2 only) bf16 stays plain:
oneDNN's bf16 there was never measured, and ``auto`` picks float32 on such a CPU anyway.
``ESR_SPEED=-packed_linear`` turns it off.

What it buys: steered decoding at 1.29x the rate with plain linears (0.77 without it,
docs/performance.md P27). Measured on a 2-core AMD EPYC with AVX-512 BF16.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

TIED_HEAD_SHARE = 0.25
MIN_FEATURES = 128


def available() -> bool:
    """oneDNN's packed linear is in this torch build and not turned off."""
    from esr_train.speed import enabled

    return (enabled("packed_linear") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes packed on this CPU: float32, and bfloat16 where it is native."""
    from esr_train.dtype import cpu_has_native_bf16

    return (torch.float32, torch.bfloat16) if cpu_has_native_bf16() else (torch.float32,)


def _embedding_storages(model) -> set[int]:
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}


def _candidates(model) -> list[tuple[torch.nn.Linear, bool]]:
    """(layer, tied) for every linear this module packs; ``tied`` = its weight is also an
    embedding's, so it is packed as a copy and never freed."""
    total = sum(p.numel() for p in model.parameters())
    embedded = _embedding_storages(model)
    dtypes = packed_dtypes()
    out = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or "lora_" in name or "forward" in vars(module):
            continue  # not a plain linear, a LoRA matrix, or already packed by an enclosing block
        w = module.weight
        if w.device.type != "cpu" or w.dtype not in dtypes or min(w.shape) < MIN_FEATURES:
            continue
        tied = w.data_ptr() in embedded
        if tied and w.numel() > TIED_HEAD_SHARE * total:
            continue
        out.append((module, tied))
    return out


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("esr_train.speed.packed_linear: this layer is packed for decoding and takes no gradient; "
                               "finish or close the decode before training through the model")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return forward


@contextmanager
def packed_linears(model, rows: int):
    """Within the block, the model's eligible linears (see the module docstring) compute
    with packed weights; ``rows`` is the batch the packing is tuned for (any batch works).
    The plain weights are back, bit for bit, on exit, also after an error. A block opened
    inside another on the same model (two decodes interleaved) leaves the layers the outer
    one packed to it, so each layer is packed and restored once."""
    if not available():
        yield
        return
    done: list[tuple[torch.nn.Linear, torch.Tensor | None]] = []
    try:
        with torch.no_grad():
            for module, tied in _candidates(model):
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), max(1, rows))
                module.forward = _packed_forward(packed, module.bias)
                if tied:
                    done.append((module, None))
                else:
                    done.append((module, packed))
                    module.weight.data = module.weight.data.new_empty(0)
        yield
    finally:
        # outside inference mode: a decode runs in it, and weights restored there would be
        # inference tensors that a later training step on the same model cannot save for backward
        with torch.inference_mode(False), torch.no_grad():
            for module, packed in done:
                del module.forward
                if packed is not None:
                    module.weight.data = packed.to_dense()
