"""Training with the steering push switched on: each self-correction row is trained while
its subject's direction is added at one layer, as at evaluation time.

Why: without it the model only ever learns the restart from clean activations, and at
evaluation the continuous push suppresses it (first probe: 0-3% restarts). With it, the
model learns to produce the restart and the answer *while pushed*. The push must stay on
through the backward pass: with activation checkpointing the forward of each block is
recomputed during backward, so the hooks wrap the whole training step, not just the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTTrainer

from esr_train.training.recipe import STEER_SPANS
from esr_train.training.row_columns import require_right_padding, with_columns

STEER_COLUMN = "esr_steer"
"""Dataset column: index of the row's direction, -1 for rows trained without a push."""
SPAN_COLUMN = "answer_start"
"""Dataset column (from ``tokenize_row``): where the answer begins, after the restart."""


@dataclass
class TrainSteering:
    directions: list  # SteeringDirection per index
    strength: float
    schedule: str = "all"
    span: str = "all"
    """``all``: the whole row is pushed. ``until_answer``: the prompt, the distraction and the
    restart are pushed, the answer is not, so the adapter is paid to *restart* under the
    push but not to cancel it while answering (pushing the answer too teaches immunity
    instead; see docs/results.md)."""
    strength_max: float | None = None
    """When set, each pushed row of each step draws its strength uniformly from
    [strength, strength_max], so no single push is the one the adapter can learn to cancel
    (in practice no better than a fixed push; see docs/results.md)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.span not in STEER_SPANS:
            raise ValueError(f"steer_span must be one of {', '.join(STEER_SPANS)}, got {self.span!r}")
        if self.strength_max is not None and self.strength_max < self.strength:
            raise ValueError(f"steer_strength_max ({self.strength_max}) is below steer_strength ({self.strength})")

    def rows(self, ids) -> list:
        return [self.directions[i] if i >= 0 else None for i in ids.tolist()]

    def strengths(self, n: int, step: int) -> "float | list[float]":
        """The push of each of ``n`` rows at training step ``step``: the fixed strength, or
        draws from [strength, strength_max] that depend only on (seed, step), so a resumed
        run pushes the same rows as an uninterrupted one."""
        if self.strength_max is None:
            return self.strength
        import random

        rng = random.Random(self.seed * 1_000_003 + step)
        return [rng.uniform(self.strength, self.strength_max) for _ in range(n)]

    def positions(self, answer_start, length: int):
        """[B, T] mask of pushed positions for ``until_answer`` (None for ``all``)."""
        import torch

        if self.span == "all" or answer_start is None:
            return None
        return (torch.arange(length)[None, :] < answer_start[:, None]).float()


def steer_subjects(rows) -> list[str]:
    """Subjects of the self-correction rows, in first-seen order (direction indices)."""
    return list(dict.fromkeys(r["subject"] for r in rows if r.get("kind") == "self_correction" and r.get("subject")))


def row_steer_ids(rows, subjects: list[str]) -> list[int]:
    """Direction index per row: self-correction rows point at their subject, others -1."""
    index = {s: i for i, s in enumerate(subjects)}
    return [index.get(r.get("subject"), -1) if r.get("kind") == "self_correction" else -1 for r in rows]


class _SteerCollator:
    """Pads with the trainer's own collator (right padding, so positions stay absolute) and
    carries the direction index and the answer start along."""

    def __init__(self, base) -> None:
        self.base = base

    def __call__(self, examples):
        import torch

        ids = [int(e.get(STEER_COLUMN, -1)) for e in examples]
        starts = [int(e[SPAN_COLUMN]) for e in examples if SPAN_COLUMN in e]
        batch = self.base([{k: v for k, v in e.items() if k not in (STEER_COLUMN, SPAN_COLUMN)} for e in examples])
        batch[STEER_COLUMN] = torch.tensor(ids)
        if len(starts) == len(examples):
            require_right_padding(batch, "steer_span")
            batch[SPAN_COLUMN] = torch.tensor(starts)
        return batch


class SteeredSFTTrainer(SFTTrainer):
    def __init__(self, *args, steering: TrainSteering, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steering = steering
        self.data_collator = _SteerCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = with_columns(self._signature_columns, (STEER_COLUMN, SPAN_COLUMN))

    def _pushed(self, model, inputs):
        from contextlib import nullcontext

        from esr_train.steering import steer_rows

        ids = inputs.pop(STEER_COLUMN, None)
        starts = inputs.pop(SPAN_COLUMN, None)
        if ids is None or not (ids >= 0).any():
            return nullcontext()
        positions = self.steering.positions(starts, inputs["input_ids"].shape[1])
        strengths = self.steering.strengths(len(ids), self.state.global_step)
        return steer_rows(model, self.steering.rows(ids), strengths, schedule=self.steering.schedule,
                          positions=positions)

    def training_step(self, model, inputs, *args, **kwargs):
        with self._pushed(model, inputs):
            return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        with self._pushed(model, inputs):
            return super().prediction_step(model, inputs, *args, **kwargs)
