"""Project only the labelled positions through TRL's fused LM head, on every device.

TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, which ``SFTTrainer`` puts on
every model it trains) scores only the positions whose label is not -100 where Triton runs
(CUDA, XPU). Elsewhere it scores every position, so that tile shapes stay fixed for
compilers that would recompile on each new shape (Neuron). On CPU nothing recompiles, and
esr-train's rows mask the prompt and the distraction from the loss: in a batch of the
SmolLM2 recipe most positions are masked, and the head (49,152 x 576, run in fp32 chunks by
TRL on CPU) is a large share of a training step (measured in docs/performance.md). The masked
positions' log-probs are zeroed either way, so the loss, its gradients and TRL's metrics are
the same; only the wasted projections go.

TRL decides through one module-level function, ``_use_triton(device)``, read in
``trl.trainer.utils`` only to choose that compaction (its kernels read their own copy).
``labelled_positions_only`` answers yes there for the length of a ``with`` block and puts
the original back after; with a TRL where that function is missing or takes other
parameters it changes nothing, and says so once.

What it buys: LoRA training at 1.24x the rate with every position projected (0.81 without it,
docs/performance.md P27). Measured on a 2-core AMD EPYC with AVX-512 BF16.
"""

from __future__ import annotations

from contextlib import contextmanager

_TRL_MODULE = "trl.trainer.utils"
_SWITCH = "_use_triton"


@contextmanager
def labelled_positions_only():
    """Inside the block, TRL's fused head projects only labelled positions on any device."""
    import importlib

    from esr_train.speed import enabled
    from esr_train.speed.guard import signature_matches

    module = importlib.import_module(_TRL_MODULE)
    original = getattr(module, _SWITCH, None)
    if not enabled("labelled_head") or not signature_matches(original, ("device",), f"{_TRL_MODULE}.{_SWITCH}"):
        yield False
        return
    setattr(module, _SWITCH, lambda device: True)
    try:
        yield True
    finally:
        setattr(module, _SWITCH, original)
