"""A decode loop that keeps the batch full of unfinished rows.

``model.generate`` runs a left-padded batch until its longest answer ends: rows that
already emitted EOS keep paying for a forward pass every step. ``stream_decode`` runs its
own loop on the model's ``DynamicCache`` instead. After each step it drops the rows that
finished (``Cache.batch_select_indices``) and, with ``refill=True``, prefills the next
waiting prompts and joins them to the running batch, so the batch stays at
``batch_size`` rows until the queue is empty. Columns that are padding in every row are
cut off the front, so the cache does not grow with the number of refills.

What stays equal to ``model.generate`` (greedy runs give the same tokens): left padding,
the 2-D attention mask, position ids counted from each row's first real token (a row's
positions never change when others join or leave), transformers' own logits processors
(repetition penalty with the left padding ignored, temperature, top-k, top-p), EOS ids
from ``model.generation_config`` (one or a list), ``max_new_tokens`` per row. Sampling
draws from ``generator`` (or the global RNG) by inverse CDF (:func:`sample_rows`, the
same distribution as ``generate``'s ``torch.multinomial``, about ten times cheaper on a
CPU), so sampled text is repeatable, not identical to ``generate``'s.

The cache's full-attention layers are :class:`_InPlaceLayer`: a decode step writes its
key/value column into spare room instead of concatenating the whole cache anew.

Steering: pass the ``RowSelection`` that ``steering.steer_rows`` yields for a table with
one row per prompt (same order as ``prompts``); before every forward pass the loop tells
it which prompts the batch holds and where each row's prompt ended, so pushes and the
``generated`` / ``prompt+first:N`` schedules follow the rows.

Cache surgery for refill touches only the two layer types of ``DynamicCache`` used by
Llama and Gemma (full and sliding-window); other cache layouts fall back to dropping rows
without refill, which needs only ``batch_select_indices``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from esr_train.speed import token_choice
from esr_train.speed.decode_attention import decode_attention
from esr_train.speed.elementwise import compiled_elementwise
from esr_train.speed.packed_linear import packed_linears


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: the knobs ``generation.generate`` exposes, plus
    ``top_k`` so a model's own ``generation_config`` can be honoured as generate does."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0

    def processors(self, pad: torch.Tensor) -> LogitsProcessorList:
        """transformers' processors in the order ``model.generate`` builds them; ``pad``
        (left padding per row) keeps pad tokens out of the penalty, as generate does."""
        procs = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            procs.append(RepetitionPenalty(float(self.repetition_penalty), pad))
        if self.do_sample:
            if self.temperature is not None and self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


class RepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """transformers' repetition penalty with the left padding ignored, without its copy.

    transformers points ignored positions at an extra vocabulary column, so it pads the
    whole [rows, vocab] score matrix by one column every step (``F.pad``): 16.3 ms a
    batch-128 SmolLM2 step on a 2-core AVX2 CPU in fp32, against 5.6 ms here, about 1.5% of
    the step (measured in docs/performance.md). Here an ignored position is pointed at the row's last token instead, which is
    penalised anyway, so the set of penalised tokens and the scores are the same (tested
    against transformers' processor)."""

    def __init__(self, penalty: float, pad: torch.Tensor) -> None:
        super().__init__(penalty, prompt_ignore_length=pad)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        pad = self.prompt_ignore_length.to(input_ids.device)
        if scores.dim() != 2 or input_ids.shape[0] != pad.shape[0] or bool((input_ids[:, -1] >= vocab).any()):
            return super().__call__(input_ids, scores)  # shapes this shortcut does not cover
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        ignored = (positions[None, :] < pad[:, None]) | (input_ids >= vocab)
        ids = torch.where(ignored, input_ids[:, -1:], input_ids)
        score = scores.gather(1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, ids, score)


@dataclass
class _Rows:
    """The running batch: every per-row tensor that must be re-indexed together when rows
    leave or join. ``ids``/``mask`` hold exactly the tokens in ``cache`` (left-padded);
    ``logits`` predict each row's next token."""

    ids: torch.Tensor     # [B, T] tokens in the cache (the repetition penalty reads them)
    mask: torch.Tensor    # [B, T] 1 on real tokens
    pos: torch.Tensor     # [B] position id of the next token fed
    pad: torch.Tensor     # [B] left padding of each row
    owner: torch.Tensor   # [B] index of the row's prompt in the caller's list
    steps: torch.Tensor   # [B] tokens generated so far
    cache: DynamicCache
    logits: torch.Tensor  # [B, V] float32

    def __len__(self) -> int:
        return self.ids.shape[0]


class _Model:
    """The model plus what every forward pass needs: the steering selection to update and
    whether the head can skip the prompt's logits (``logits_to_keep``, as generate does)."""

    def __init__(self, model, steering=None, observer=None) -> None:
        self.model = model
        self.trackers = [t for t in (steering, observer) if t is not None]
        self.device = next(model.parameters()).device
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT hides the signature
        params = inspect.signature(inner.forward).parameters
        self.keep_one = "logits_to_keep" in params
        # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, ids, mask, positions, cache, owner, offset) -> torch.Tensor:
        """One pass; returns the float32 logits of the last position of every row."""
        for tracker in self.trackers:
            tracker.update(owner, offset)
        # The last position as an index tensor, not ``logits_to_keep=1``: the int form slices a
        # strided [rows, 1, hidden] view, which torch.matmul cannot fold into one mm when the head's
        # weight needs no grad (a loaded PEFT adapter freezes it); it then broadcasts the whole
        # head to every row (gigabytes at an eval batch of SmolLM2; see docs/performance.md). Indexing copies.
        extra = {"logits_to_keep": torch.tensor([ids.shape[1] - 1], device=ids.device)} if self.keep_one else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kw: cache}, **extra)
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)


def _prefill(m: _Model, prompts: Sequence[Sequence[int]], owners: Sequence[int], pad_id: int) -> _Rows:
    """Left-pad ``prompts`` into a fresh cache; positions count from each first real token
    (``cumsum - 1``, pads at 0), the ids ``generate`` derives from the attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=m.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=m.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _in_place_cache(m.model.config)
    owner = torch.tensor(list(owners), device=m.device)
    logits = m.forward(ids, mask, positions, cache, owner, torch.full_like(owner, -width))
    lengths = mask.sum(-1)
    return _Rows(ids=ids, mask=mask, pos=lengths, pad=width - lengths, owner=owner,
                 steps=torch.zeros_like(owner), cache=cache, logits=logits)


def _feed(m: _Model, rows: _Rows, tokens: torch.Tensor) -> None:
    """Append each row's chosen token and run it through the model (one decode step)."""
    rows.ids = torch.cat([rows.ids, tokens[:, None]], dim=-1)
    rows.mask = F.pad(rows.mask, (0, 1), value=1)
    # the token fed is the steps-th generated one: offset steps - 1 from the prompt end
    rows.logits = m.forward(tokens[:, None], rows.mask, rows.pos[:, None], rows.cache, rows.owner, rows.steps - 1)
    rows.pos = rows.pos + 1


def _select(rows: _Rows, keep: torch.Tensor) -> _Rows:
    """Only the rows in ``keep`` (indices), cache included."""
    rows.cache.batch_select_indices(keep)
    return _Rows(ids=rows.ids[keep], mask=rows.mask[keep], pos=rows.pos[keep], pad=rows.pad[keep],
                 owner=rows.owner[keep], steps=rows.steps[keep], cache=rows.cache, logits=rows.logits[keep])


# --------------------------------------------------------------------------- cache surgery
# DynamicLayer keeps [B, H, T, d]; DynamicSlidingWindowLayer keeps the last
# min(T, window - 1) columns and counts T in ``cumulative_length``. Padding and trimming
# move the front edge of every row by the same number of masked columns, so the masks,
# the sliding windows (index distances) and every row's positions stay valid.

class _InPlaceLayer(DynamicLayer):
    """A full-attention ``DynamicLayer`` whose keys and values are views of a buffer with
    spare columns: a decode step writes its column in place instead of ``torch.cat``-ing
    the whole cache into a new tensor (the cat was 24% of a steered decode run; see
    docs/performance.md). Anything that replaces ``keys``/``values`` (row selection,
    joins, front trims) simply makes the next update copy them into a fresh buffer."""

    SPARE = 64  # columns added beyond what is needed each time the buffer is rebuilt

    def __init__(self) -> None:
        super().__init__()
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None

    def _owns_views(self) -> bool:
        return (self._key_buf is not None and self.keys.data_ptr() == self._key_buf.data_ptr()
                and self.values.data_ptr() == self._value_buf.data_ptr()
                and self.keys.shape[:2] == self._key_buf.shape[:2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        need = held + key_states.shape[-2]
        if not (held and self._owns_views()) or need > self._key_buf.shape[-2]:
            b, h, _, d = key_states.shape
            key_buf = key_states.new_empty(b, h, need + self.SPARE, d)
            value_buf = value_states.new_empty(b, value_states.shape[1], need + self.SPARE, value_states.shape[-1])
            if held:
                key_buf[:, :, :held] = self.keys
                value_buf[:, :, :held] = self.values
            self._key_buf, self._value_buf = key_buf, value_buf
        self._key_buf[:, :, held:need] = key_states
        self._value_buf[:, :, held:need] = value_states
        self.keys, self.values = self._key_buf[:, :, :need], self._value_buf[:, :, :need]
        return self.keys, self.values


def _in_place_cache(config) -> DynamicCache:
    """``DynamicCache(config=...)`` with every full-attention layer made an
    :class:`_InPlaceLayer` (sliding-window layers keep their own bounded update)."""
    cache = DynamicCache(config=config)
    cache.layers = [_InPlaceLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _can_resize(cache: DynamicCache) -> bool:
    """Whether every layer is one whose columns this module knows how to add and cut."""
    return all(type(layer) in (DynamicLayer, _InPlaceLayer, DynamicSlidingWindowLayer) and layer.is_initialized
               for layer in cache.layers)


def _resize_front(cache: DynamicCache, change: int) -> None:
    """Add ``change`` empty columns in front of every row (negative: cut ``-change``)."""
    for layer in cache.layers:
        held = layer.keys.shape[-2]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length += change
            target = min(layer.cumulative_length, layer.sliding_window - 1)
        else:
            target = held + change
        if target > held:
            layer.keys = F.pad(layer.keys, (0, 0, target - held, 0))
            layer.values = F.pad(layer.values, (0, 0, target - held, 0))
        elif target < held:
            layer.keys = layer.keys[:, :, held - target:]
            layer.values = layer.values[:, :, held - target:]


def _widen(rows: _Rows, width: int, pad_id: int) -> None:
    """Left-pad the batch to ``width`` columns (a joining batch with longer prompts)."""
    extra = width - rows.ids.shape[1]
    if extra > 0:
        rows.ids = F.pad(rows.ids, (extra, 0), value=pad_id)
        rows.mask = F.pad(rows.mask, (extra, 0), value=0)
        rows.pad = rows.pad + extra
        _resize_front(rows.cache, extra)


def _join(a: _Rows, b: _Rows, pad_id: int) -> _Rows:
    """One batch holding the rows of ``a`` then ``b``: both padded to the same width, then
    the cache layers concatenated along the batch."""
    width = max(a.ids.shape[1], b.ids.shape[1])
    _widen(a, width, pad_id)
    _widen(b, width, pad_id)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([la.keys, lb.keys])
        la.values = torch.cat([la.values, lb.values])
    return _Rows(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in ("ids", "mask", "pos", "pad", "owner", "steps")),
                 cache=a.cache, logits=torch.cat([a.logits, b.logits]))


def _trim(rows: _Rows) -> None:
    """Cut the front columns that are padding in every row (left by rows that left), so
    attention and memory follow the live rows, not the batch's history."""
    cut = int(rows.pad.min())
    if cut > 0:
        rows.ids, rows.mask, rows.pad = rows.ids[:, cut:], rows.mask[:, cut:], rows.pad - cut
        _resize_front(rows.cache, -cut)


# --------------------------------------------------------------------------- the loop

def sample_rows(probs: torch.Tensor, generator=None, rand: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V], drawn by inverse CDF: one uniform number per
    row and a binary search in the cumulative sum. ``torch.multinomial`` draws one
    exponential number per vocabulary entry instead; on a CPU that was 34 ms of a 220 ms
    decode step at batch 32 (docs/performance.md), this takes about a tenth of it.
    ``u`` lies in (0, total], so the first index whose cumulative sum reaches it always
    has a positive probability (tokens a top-k/top-p warper zeroed are never drawn).
    ``rand`` [B, 1] gives the uniform numbers instead of drawing them from ``generator``."""
    cdf = probs.cumsum(dim=-1)
    rand = token_choice.uniforms(probs.shape[0], generator, probs.device, cdf.dtype) if rand is None else rand
    u = (1.0 - rand.to(cdf.dtype)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _torch_choice(ids: torch.Tensor, pad: torch.Tensor, logits: torch.Tensor, sampling: Sampling, generator,
                  rand: torch.Tensor | None = None) -> torch.Tensor:
    """``generate``'s greedy / multinomial step with transformers' processors."""
    scores = sampling.processors(pad)(ids, logits)
    if sampling.do_sample:
        return sample_rows(torch.softmax(scores, dim=-1), generator, rand)
    return scores.argmax(dim=-1)


def _row_uniforms(rows: _Rows, row_generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One uniform number per row [B, 1], each from the generator of the prompt the row
    holds: a row's draws depend on its own seed, never on its place in the batch."""
    draws = [token_choice.uniforms(1, row_generators[int(o)], "cpu") for o in rows.owner.tolist()]
    return torch.cat(draws).to(rows.logits.device)


def _choose(rows: _Rows, sampling: Sampling, generator, row_generators=None) -> torch.Tensor:
    """The next token of every row: the compiled choice where it applies
    (``esr_train.speed.token_choice``), transformers' processors otherwise and for any row it
    leaves to them. With ``row_generators`` (prompt index -> generator) each row draws from
    its own; otherwise all rows draw in order from ``generator``."""
    kernel = token_choice.load_kernel() if token_choice.takes(sampling, rows.logits) else None
    own = _row_uniforms(rows, row_generators) if sampling.do_sample and row_generators is not None else None
    if kernel is None:
        return _torch_choice(rows.ids, rows.pad, rows.logits, sampling, generator, own)
    rand = own if own is not None else (
        token_choice.uniforms(len(rows), generator, rows.logits.device) if sampling.do_sample else None)
    tokens = token_choice.compiled_choice(kernel, rows.ids, rows.pad, rows.logits, sampling, rand)
    left = (tokens < 0).nonzero().flatten()
    if len(left):  # NaN or +inf scores: torch's ops decide, from the same uniform numbers
        tokens[left] = _torch_choice(rows.ids[left], rows.pad[left], rows.logits[left], sampling, None,
                                     rand[left] if rand is not None else None)
    return tokens


def _special_ids(model, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    """EOS ids (the model's generation_config unless given; a list is allowed) and the pad
    id, falling back to the first EOS as ``generate`` does."""
    config = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos = [] if eos is None else [int(e) for e in ([eos] if isinstance(eos, int) else eos)]
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)


@torch.inference_mode()
def stream_decode(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = Sampling(),
    batch_size: int = 16,
    eos_token_id: "int | Sequence[int] | None" = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    steering=None,
    refill: bool = True,
    observer=None,
    row_seeds: Sequence[int] | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """Decode token-id ``prompts`` (no padding) at most ``batch_size`` at a time; yields
    ``(prompt index, new token ids)`` as each row finishes (EOS included when emitted).

    Prompts enter in the given order (longest first keeps the padding small: a joining
    row then never widens the batch). ``refill=False`` only drops finished rows and
    starts the next group when the batch is empty. ``steering`` is the ``RowSelection``
    from ``steer_rows`` over one row per prompt. ``observer``, when given, is told the same
    before every pass (``update(prompt index per row, offset per row)``; the offset of a
    decode step's token is its index among the generated ones, negative in a prompt pass),
    so a hook reading layer outputs knows whose token each row holds.

    ``row_seeds`` (one per prompt) gives every prompt its own random generator for
    sampling, so its tokens depend on its seed and not on which rows share its batch or
    when it joins (for a given batch composition of the model's arithmetic); without it
    all rows draw from ``generator`` in batch order.

    While the iterator runs, a CPU model decodes with the attention kernel
    (``decode_attention``), its linears packed for oneDNN (``packed_linears``) and its RMSNorms and
    rotary embeddings compiled (``compiled_elementwise``); all are undone when it ends or is closed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("stream_decode: every prompt needs at least one token")
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"row_seeds has {len(row_seeds)} entries for {len(prompts)} prompts")
    if max_new_tokens < 1:
        yield from ((i, []) for i in range(len(prompts)))
        return
    eos_ids, pad_id = _special_ids(model, eos_token_id, pad_token_id)
    m = _Model(model, steering, observer)
    try:
        with decode_attention(model), packed_linears(model, batch_size), compiled_elementwise(model):
            yield from _loop(m, prompts, max_new_tokens, sampling, batch_size, eos_ids, pad_id, generator, refill,
                             row_seeds)
    finally:
        for tracker in m.trackers:  # later passes in the same steer_rows block see the plain table again
            tracker.update(None, None)


DROP_SHARE = 8
"""Finished rows stay in the batch, fed padding, until they are 1/DROP_SHARE of it: dropping
rows (and joining new ones) copies every layer's whole key/value cache, about as costly as
a decode step, while a finished row costs 1/batch of one."""


def _loop(m: _Model, prompts, max_new_tokens: int, sampling: Sampling, batch_size: int, eos_ids: list[int],
          pad_id: int, generator, refill: bool, row_seeds=None) -> Iterator[tuple[int, list[int]]]:
    """The loop of ``stream_decode``: admit prompts into free slots, pick a token per row,
    hand back finished rows, drop them once enough have finished (``DROP_SHARE``), feed
    the rest."""
    eos = torch.tensor(eos_ids, dtype=torch.long, device=m.device)
    waiting = 0
    rows: _Rows | None = None
    resizable = True
    row_generators: dict[int, torch.Generator] | None = {} if row_seeds is not None else None
    while rows is not None or waiting < len(prompts):
        free = batch_size - (len(rows) if rows is not None else 0)
        if waiting < len(prompts) and free > 0 and (rows is None or (refill and resizable)):
            take = range(waiting, min(waiting + free, len(prompts)))
            if row_generators is not None:
                row_generators.update((i, torch.Generator().manual_seed(int(row_seeds[i]))) for i in take)
            new = _prefill(m, [prompts[i] for i in take], take, pad_id)
            resizable = resizable and _can_resize(new.cache)
            rows = new if rows is None else _join(rows, new, pad_id)  # free slots: no row is dead here
            waiting = take.stop
            if resizable:
                _trim(rows)
            dead = torch.zeros(len(rows), dtype=torch.bool, device=m.device)
        tokens = _choose(rows, sampling, generator, row_generators)
        rows.steps = rows.steps + 1
        done = (torch.isin(tokens, eos) | (rows.steps >= max_new_tokens)) & ~dead
        if bool(done.any()):
            for b in done.nonzero().flatten().tolist():
                fed = int(rows.steps[b]) - 1
                yield int(rows.owner[b]), rows.ids[b, rows.ids.shape[1] - fed:].tolist() + [int(tokens[b])]
            dead |= done
            n_dead = int(dead.sum())
            if n_dead == len(rows):
                rows = None
                continue
            if n_dead >= max(1, len(rows) // DROP_SHARE):
                keep = (~dead).nonzero().flatten()
                rows, tokens, dead = _select(rows, keep), tokens[keep], dead[keep]
                if resizable:
                    _trim(rows)
        _feed(m, rows, tokens.masked_fill(dead, pad_id))


def decode(model, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """``stream_decode`` collected in the order of ``prompts``."""
    out: list[list[int]] = [[] for _ in prompts]
    for index, tokens in stream_decode(model, prompts, **kwargs):
        out[index] = tokens
    return out
