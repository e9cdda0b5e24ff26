"""Keep PEFT from casting each LoRA layer's input to float32 when autocast recasts it anyway.

PEFT keeps LoRA weights in float32 on a bf16 base (``autocast_adapter_dtype``), so every
LoRA layer casts its input to float32 before ``lora_A``. Under the trainer's bf16 autocast
(accelerate wraps the model's forward in ``torch.autocast`` for ``bf16=True``, on CPU too)
``lora_A`` is an autocast op that casts that float32 input straight back to bf16 and the
weights to bf16, so the matmuls are bf16 either way: the float32 round trip of every LoRA
input (210 layers in SmolLM2 with ``all-linear``, forward and backward) only copies. A
bf16 -> float32 -> bf16 round trip is exact, so the products, the loss and every gradient are
the same without it (``tests/test_adapter_casts.py`` trains both ways and compares).

The switch is PEFT's own (``peft.helpers.disable_input_dtype_casting``); it is turned on only
while the trainer's accelerator autocasts in bf16 or fp16. Without autocast a bf16 input
would reach a float32 ``lora_A`` and fail, so everything else (fp32 training, DeepSpeed,
which casts the whole model itself, inference) keeps PEFT's casting.

What it buys: LoRA training at 1.07x the rate with PEFT's casts (0.93 without it,
docs/performance.md P27). Measured on a 2-core AMD EPYC with AVX-512 BF16.
"""

from __future__ import annotations

from contextlib import contextmanager


def autocasts(trainer) -> bool:
    """Whether the trainer's forward passes run under bf16/fp16 autocast."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None or not getattr(accelerator, "native_amp", False):
        return False
    handler = getattr(accelerator, "autocast_handler", None)
    if handler is not None and not getattr(handler, "enabled", True):
        return False
    return getattr(accelerator, "mixed_precision", None) in ("bf16", "fp16")


@contextmanager
def adapter_input_casts_off(trainer):
    """Inside the block, the trainer's LoRA layers take their input as autocast gives it,
    when the trainer autocasts (see the module docstring); otherwise nothing changes.
    Yields whether the casts are off."""
    from peft.helpers import disable_input_dtype_casting

    from esr_train.speed import enabled

    active = enabled("adapter_casts") and autocasts(trainer)
    with disable_input_dtype_casting(trainer.model, active=active):
        yield active
