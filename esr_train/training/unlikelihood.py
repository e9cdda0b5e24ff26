"""Unlikelihood on false restarts: teach the adapter when *not* to restart.

Adapters trained on self-correction rows pick up a tic: unpushed, they restart after an
on-topic opener ("Resolving a disagreement can be delicate. ... Let me start again: ...").
Normal rows only teach what to say, never what not to say, and adding more of them does
not lower the tic (see docs/results.md). This module adds the missing negative:
each normal row gets a twin cut after one of its first sentences and followed by a restart
phrase drawn from the dataset's own self-correction rows, and the restart's tokens get the
unlikelihood loss -log(1 - p(token)) (Welleck et al. 2019, "Neural text generation with
unlikelihood training"). Together with the self-correction rows the adapter sees the
contrast it has to learn: restart after off-topic text, never after on-topic text.

The loss rides on TRL's fused LM head: the restart tokens are put in ``labels`` so the
head scores them, and the ``unlikely`` column marks which label positions are negatives;
``compute_loss`` swaps their likelihood term for the unlikelihood term. Both terms are
summed over tokens and divided by TRL's token count, so a weight of 1 makes a negative
token count as much as a trained one.
"""

from __future__ import annotations


from esr_train.rows import UNLIKELY_COLUMN
from esr_train.training.row_columns import require_right_padding, with_columns

def unlikelihood_loss(log_probs, unlikely_mask, floor: float | None = None):
    """Sum over marked positions of -log(1 - p), from log p (clamped so a token the model
    is sure of gives a large finite loss instead of inf).

    With ``floor`` t, the hinge max(0, log p - log t) instead. Why: the gradient of
    -log(1 - p) with respect to the logits is about p, so once a false restart is down to a
    few percent per sentence end the negatives hardly push, and a tic at that level stays
    put (see docs/results.md); the hinge pushes with a gradient near 1 until p is below t,
    then not at all, so it cannot drive a token to -inf."""
    import math

    import torch

    lp = log_probs[unlikely_mask]
    if floor is not None:
        return torch.relu(lp - math.log(floor)).sum()
    return -torch.log((-torch.expm1(lp)).clamp(min=1e-6)).sum()


class _UnlikelyCollator:
    """Pads the ``unlikely`` column with -100 beside the wrapped collator's batch (right
    padding, so the positions line up with ``labels``)."""

    def __init__(self, base) -> None:
        self.base = base

    def __call__(self, examples):
        import torch

        marks = [list(e.get(UNLIKELY_COLUMN) or []) for e in examples]
        batch = self.base([{k: v for k, v in e.items() if k != UNLIKELY_COLUMN} for e in examples])
        require_right_padding(batch, "unlikelihood")
        width = batch["input_ids"].shape[1]
        batch[UNLIKELY_COLUMN] = torch.tensor([(m + [-100] * width)[:width] for m in marks])
        return batch


class UnlikelihoodMixin:
    """Put before an SFTTrainer class: ``class T(UnlikelihoodMixin, SFTTrainer)``."""

    def __init__(self, *args, unlikelihood_weight: float, unlikely_floor: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unlikelihood_weight = unlikelihood_weight
        self.unlikely_floor = unlikely_floor
        self.data_collator = _UnlikelyCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = with_columns(self._signature_columns, (UNLIKELY_COLUMN,))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        unlikely = inputs.pop(UNLIKELY_COLUMN, None)
        if unlikely is None or not bool((unlikely != -100).any()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # TRL's outputs (fused log-probs, with gradients) are caught on their way out of the
        # model, so TRL's loss and metrics stay TRL's own
        caught = []
        handle = model.register_forward_hook(lambda _module, _args, out: caught.append(out))
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            handle.remove()
        loss = result[0] if return_outputs else result
        log_probs = getattr(caught[0], "log_probs", None) if caught else None
        if log_probs is None or (model.training and not log_probs.requires_grad):
            raise ValueError("unlikelihood_weight needs TRL's fused log-probs with gradients "
                             "(no compute_loss_func, no label smoothing)")
        mask = unlikely[:, 1:] != -100  # log_probs[:, t] scores the label at t + 1
        count = caught[0].label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        scale = 1.0
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
        # TRL's loss counted the marked tokens as -log p: take that back, add the unlikelihood
        swap = log_probs[mask].sum() + self.unlikelihood_weight * unlikelihood_loss(log_probs, mask,
                                                                                    self.unlikely_floor)
        loss = loss + scale * swap / torch.as_tensor(count).clamp(min=1)
        return (loss, result[1]) if return_outputs else loss


def trainer_class(base: type) -> type:
    """``base`` (SFTTrainer or SteeredSFTTrainer) with the unlikelihood loss."""
    return type(f"Unlikelihood{base.__name__}", (UnlikelihoodMixin, base), {})
