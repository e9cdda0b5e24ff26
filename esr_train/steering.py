"""Applying steering directions to a model's residual stream during forward passes.

``steer(model, directions, strength)`` is a context manager: it registers forward hooks
on the chosen decoder layers (all hooks first, then ``try/finally``, so a failure never
leaves a hook behind or meets an unbound handle) and removes them on exit. Nothing in the
model is mutated. The hooks act on every forward pass, the prompt pass *and* each decode
step with the KV cache (a common bug elsewhere steers only the prompt), on plain and
PEFT-wrapped Llama and Gemma models, and on left-padded batches.

Schedules:
- ``all`` (the study's protocol, default): every position, prompt included.
- ``generated``: only positions after the prompt (needs the prompt pass to come first,
  as in ``generate``; the first generated token is predicted from an unsteered prompt).
- ``prompt+first:N``: the prompt and the first N generated tokens, then no push (a
  diagnostic: does the model recover once steering stops?).
For the last two the hooks need absolute positions: a pre-hook on the decoder reads them
from the 2-D attention mask (whose length is past + current tokens in ``generate``).

``steer_rows`` yields a ``RowSelection``: a decode loop that drops finished rows and
admits new ones (``esr_train.decoding``) tells it which table rows the batch holds and
where each row's prompt ends, so pushes and schedules follow the rows. Callers that
ignore it (``with steer_rows(...):``) get the behaviour above unchanged.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from esr_train.directions import SteeringDirection, check_direction
from esr_train.layers import decoder_layers, decoder_module, resolve_layer

_WINDOW_RE = re.compile(r"^prompt\+first:(\d+)$")


@dataclass(frozen=True)
class Schedule:
    """Which positions receive the push: ``mode`` in all / generated / window."""

    mode: str = "all"
    first_n: int = 0

    @classmethod
    def parse(cls, spec: "str | Schedule | None") -> "Schedule":
        if isinstance(spec, Schedule):
            return spec
        spec = (spec or "all").strip()
        if spec in ("all", "generated"):
            return cls(spec)
        match = _WINDOW_RE.match(spec)
        if match:
            return cls("window", int(match.group(1)))
        raise ValueError(f"unknown steering schedule {spec!r}; valid: all, generated, prompt+first:N")

    def __str__(self) -> str:
        return f"prompt+first:{self.first_n}" if self.mode == "window" else self.mode


class _PositionTracker:
    """Knows the absolute positions of the tokens in the current forward pass and where
    the prompt ended (the length of the first pass that started at position 0)."""

    def __init__(self) -> None:
        self.start = 0
        self.length = 0
        self.prompt_length: int | None = None

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        current = ids.shape[1] if ids is not None else embeds.shape[1]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it cache
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            start = mask.shape[1] - current
        elif cache is not None and hasattr(cache, "get_seq_length"):
            start = int(cache.get_seq_length())
        else:
            start = 0
        self.start, self.length = start, current
        if start == 0:
            self.prompt_length = current
        return None

    def mask(self, schedule: Schedule, device, dtype) -> torch.Tensor:
        pos = torch.arange(self.start, self.start + self.length, device=device)
        return _keep(schedule, pos, self.prompt_length or 0).to(dtype).view(1, -1, 1)


def _keep(schedule: Schedule, pos: torch.Tensor, prompt) -> torch.Tensor:
    """Whether each position gets the push under ``schedule``; one rule for the shared
    tracker and for per-row offsets, so both paths agree on every boundary."""
    if schedule.mode == "generated":
        return pos >= prompt
    return pos < prompt + schedule.first_n  # window: the prompt plus the first N generated tokens


class RowSelection:
    """The live link between a ``steer_rows`` table and a batch whose rows change.

    A decode loop that drops finished rows (and admits waiting ones) cannot keep the
    table's row order, so before each forward pass it calls ``update``: ``index`` ([B],
    which table row each batch row is) and ``offset`` ([B], where the pass's first token
    sits relative to that row's prompt end: negative inside the prompt, ``k - 1`` when it
    feeds the k-th generated token). With ``offset`` set, schedules are decided per row,
    so rows whose prompts ended at different steps are treated correctly. Both start as
    None: the table is used as is and positions come from the shared tracker."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None

    def update(self, index: "torch.Tensor | None", offset: "torch.Tensor | None" = None) -> None:
        """Point the hooks at the rows of the next forward pass."""
        if index is not None and offset is not None and len(index) != len(offset):
            raise ValueError(f"RowSelection: {len(index)} rows but {len(offset)} offsets")
        self.index, self.offset = index, offset

    def take(self, table: torch.Tensor) -> torch.Tensor:
        """The pushes ([B, 1, D]) of the batch's rows, in batch order."""
        if self.index is None or table.dim() != 3:
            return table
        return table.index_select(0, self.index.to(table.device))

    def mask(self, schedule: Schedule, length: int, device, dtype) -> torch.Tensor:
        """[B, T, 1]: 1 where a row's token gets the push under ``schedule``."""
        pos = self.offset.to(device)[:, None] + torch.arange(length, device=device)[None, :]
        return _keep(schedule, pos, 0).to(dtype)[..., None]


def _as_pairs(directions, strength) -> list[tuple[SteeringDirection, float]]:
    if isinstance(directions, SteeringDirection):
        if strength is None:
            raise ValueError("steer(model, direction, strength): strength is required")
        return [(directions, float(strength))]
    pairs = []
    for item in directions:
        if isinstance(item, SteeringDirection):
            if strength is None:
                raise ValueError("a list of directions without strengths needs strength=")
            pairs.append((item, float(strength)))
        else:
            direction, s = item
            pairs.append((direction, float(s)))
    return pairs


def layer_vectors(model, pairs: Sequence[tuple[SteeringDirection, float]], unit: str = "norm") -> dict[int, torch.Tensor]:
    """Sum the pushes per layer (one add per layer per step, however many directions)."""
    per_layer: dict[int, torch.Tensor] = {}
    for direction, strength in pairs:
        check_direction(model, direction)
        layer = resolve_layer(model, direction.layer)
        push = direction.vector * direction.coefficient(strength, unit)
        per_layer[layer] = per_layer.get(layer, 0) + push
    return per_layer


@contextmanager
def steer(
    model,
    directions: "SteeringDirection | Sequence[SteeringDirection | tuple[SteeringDirection, float]]",
    strength: float | None = None,
    *,
    unit: str = "norm",
    schedule: "str | Schedule" = "all",
) -> Iterator[None]:
    """Add ``strength x direction`` to the residual output of each direction's layer
    while the block runs. ``directions`` is one direction, a list (same ``strength``),
    or ``(direction, strength)`` pairs. ``unit="norm"`` scales by the direction's
    reference norm; ``unit="raw"`` takes the strength as given. Shapes and layers are
    checked before anything is registered."""
    with _installed(model, layer_vectors(model, _as_pairs(directions, strength), unit), schedule):
        yield


@contextmanager
def steer_rows(
    model,
    rows: "Sequence[SteeringDirection | None]",
    strength: "float | Sequence[float]",
    *,
    unit: str = "norm",
    schedule: "str | Schedule" = "all",
    positions: "torch.Tensor | None" = None,
) -> Iterator[RowSelection]:
    """Per-sequence steering for one batch: row ``i`` of every forward pass gets
    ``strength[i] x rows[i]`` (``None``: no push), so trials toward different concepts
    share one batched ``generate``. The batch must be in the same order as ``rows``,
    unless the caller re-indexes it through the yielded ``RowSelection`` (a decode loop
    that drops and adds rows; ``rows`` may then cover more prompts than one batch).

    ``positions`` ([B, T], 1 where the push applies) limits the push to some tokens of a
    full-sequence pass (training: push the context up to the restart, not the answer);
    every forward pass inside must then cover exactly those T positions."""
    strengths = [float(strength)] * len(rows) if isinstance(strength, (int, float)) else [float(s) for s in strength]
    if len(strengths) != len(rows):
        raise ValueError(f"steer_rows: {len(rows)} rows but {len(strengths)} strengths")
    per_layer: dict[int, torch.Tensor] = {}
    for i, (direction, s) in enumerate(zip(rows, strengths)):
        if direction is None:
            continue
        for layer, vec in layer_vectors(model, [(direction, s)], unit).items():
            if layer not in per_layer:
                per_layer[layer] = torch.zeros(len(rows), vec.numel())
            per_layer[layer][i] += vec
    selection = RowSelection()
    with _installed(model, {layer: m[:, None, :] for layer, m in per_layer.items()}, schedule, positions,
                    selection):
        yield selection


@contextmanager
def _installed(model, per_layer: dict[int, torch.Tensor], schedule: "str | Schedule",
               positions: "torch.Tensor | None" = None, selection: "RowSelection | None" = None) -> Iterator[None]:
    """Register the hooks that add ``per_layer[L]`` (shape [D], or [B, 1, D] per row) to
    layer L's output, times ``positions[..., None]`` when given; ``selection`` picks and
    places the per-row pushes when the batch is not the table. Registration completes
    before ``try``, removal is in ``finally``."""
    sched = Schedule.parse(schedule)
    layers = decoder_layers(model)
    param = next(model.parameters())
    tracker = _PositionTracker() if sched.mode != "all" and per_layer else None

    def make_hook(vec: torch.Tensor):
        cast: dict = {}

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            key = (hidden.device, hidden.dtype)
            if key not in cast:
                cast[key] = vec.to(device=hidden.device, dtype=hidden.dtype)
            push = cast[key] if selection is None else selection.take(cast[key])
            if push.dim() == 3 and push.shape[0] != hidden.shape[0]:
                raise ValueError(f"per-row steering for {push.shape[0]} rows met a batch of {hidden.shape[0]}")
            if selection is not None and selection.offset is not None and sched.mode != "all":
                push = push * selection.mask(sched, hidden.shape[1], hidden.device, hidden.dtype)
            elif tracker is not None:
                push = push * tracker.mask(sched, hidden.device, hidden.dtype)
            if positions is not None:
                if tuple(positions.shape) != tuple(hidden.shape[:2]):
                    raise ValueError(f"steering positions of shape {tuple(positions.shape)} met hidden states "
                                     f"of shape {tuple(hidden.shape[:2])}")
                push = push * positions.to(device=hidden.device, dtype=hidden.dtype)[..., None]
            hidden = hidden + push
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = []
    try:
        if tracker is not None:
            handles.append(decoder_module(model).register_forward_pre_hook(tracker, with_kwargs=True))
        for layer, vec in per_layer.items():
            handles.append(layers[layer].register_forward_hook(make_hook(vec.to(param.device))))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
