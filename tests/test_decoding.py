"""The decode loop that drops finished rows and refills the batch, checked token for
token against ``model.generate`` on tiny random-init Llama and Gemma 3 models (Gemma's
sliding window of 8 is shorter than prompt + answer, so joins and trims cross it)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from esr_train.decoding import Sampling, decode
from esr_train.directions import SteeringDirection
from esr_train.generation import generate, iter_generate
from esr_train.layers import decoder_layers, decoder_module
from esr_train.steering import steer_rows

PROMPTS = [[5, 17, 33, 9, 41, 7, 12, 3, 4], [8, 3, 22], [40, 41, 42, 43, 44], [9, 9, 9, 10],
           [11, 12, 13, 14, 15, 16, 17], [20, 21]]
N = 12
NEVER = [10_000]  # an EOS id outside the vocabulary: full-length answers
# (batch_size, refill): one batch with pruning only, refills one and two slots at a time
LAYOUTS = [(6, False), (2, True), (4, True), (3, False)]


def direction(model, seed, layer=1):
    """A random direction whose unit push is the size of the residual stream at ``layer``
    (tiny Llama's is ~0.2, tiny Gemma's ~15): strong enough to change answers, not so
    strong that every row repeats one token."""
    seen = []
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([PROMPTS[0]]))
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(seed)
    return SteeringDirection(torch.randn(model.config.hidden_size, generator=g), layer=layer, label=f"d{seed}",
                             reference_norm=float(seen[0].norm(dim=-1).mean()))


def cut(row: list[int], eos: list[int]) -> list[int]:
    """A ``generate`` row up to and including its first EOS (the pads after it dropped)."""
    for i, token in enumerate(row):
        if token in eos:
            return row[:i + 1]
    return row


def hf(model, prompts, eos, n=N, pad=0, **kw) -> list[list[int]]:
    """The reference: one left-padded ``model.generate`` batch, greedy unless told."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=pad,
                             eos_token_id=eos, **kw)
    return [cut(row, eos) for row in out[:, width:].tolist()]


def stopper(full: list[list[int]]) -> list[int]:
    """An EOS id that makes rows finish at different steps, picked from full-length
    answers: the token giving the most distinct answer lengths while one row still runs
    to N. Asserted, so the tests below really have rows leaving at different steps."""
    def lengths(token):
        return [len(cut(row, [token])) for row in full]

    token = max(sorted({t for row in full for t in row}),
                key=lambda t: (max(lengths(t)) == N, len(set(lengths(t))), -sum(lengths(t))))
    assert len(set(lengths(token))) > 2 and max(lengths(token)) == N, lengths(token)
    return [token]


@pytest.mark.parametrize("batch_size,refill", LAYOUTS)
def test_greedy_equals_generate_while_rows_leave_and_join(tiny_model, batch_size, refill):
    eos = stopper(hf(tiny_model, PROMPTS, NEVER))
    expected = hf(tiny_model, PROMPTS, eos)
    got = decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=batch_size, refill=refill, eos_token_id=eos,
                 pad_token_id=0)
    assert got == expected


def test_eos_list_and_model_default(tiny_model):
    """A list of EOS ids stops at any of them; without one the generation_config's is used."""
    full = hf(tiny_model, PROMPTS, NEVER)
    eos = [stopper(full)[0], Counter(t for row in full for t in row[1:]).most_common(2)[1][0]]
    assert decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=2, eos_token_id=eos) == hf(tiny_model, PROMPTS, eos)
    default = tiny_model.generation_config.eos_token_id
    assert decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=2) == hf(tiny_model, PROMPTS, [default])


@pytest.mark.parametrize("schedule", ["all", "generated", "prompt+first:3"])
def test_per_row_steering_follows_the_rows(tiny_model, schedule):
    """Each row keeps its own push (and its own prompt end for the schedule) while rows
    leave and later prompts take their slots: equal to one generate batch under the
    same steer_rows table."""
    rows = [direction(tiny_model, 1), None, direction(tiny_model, 2), direction(tiny_model, 3), None,
            direction(tiny_model, 1)]
    strengths = [1.0, 1.0, 0.5, 2.0, 1.0, -1.0]
    with steer_rows(tiny_model, rows, strengths, schedule=schedule):
        eos = stopper(hf(tiny_model, PROMPTS, NEVER))
        expected = hf(tiny_model, PROMPTS, eos)
    assert expected != hf(tiny_model, PROMPTS, eos)  # the push changes the answers
    for batch_size, refill in LAYOUTS[:3]:
        with steer_rows(tiny_model, rows, strengths, schedule=schedule) as selection:
            got = decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=batch_size, refill=refill,
                         eos_token_id=eos, pad_token_id=0, steering=selection)
        assert got == expected, (batch_size, refill)
    assert all(not layer._forward_hooks for layer in decoder_layers(tiny_model))


def test_repetition_penalty_equals_generate(tiny_model):
    """The penalty counts prompt and answer but not the left padding; the pad id is a
    token the model likes, so counting the pads would change the answers."""
    full = hf(tiny_model, PROMPTS, NEVER, repetition_penalty=1.5)
    eos = stopper(full)
    pad = Counter(row[0] for row in full).most_common(1)[0][0]
    expected = hf(tiny_model, PROMPTS, eos, pad=pad, repetition_penalty=1.5)
    assert expected != hf(tiny_model, PROMPTS, eos)
    for batch_size, refill in LAYOUTS[:2]:
        got = decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=batch_size, refill=refill, eos_token_id=eos,
                     pad_token_id=pad, sampling=Sampling(repetition_penalty=1.5))
        assert got == expected


def test_sampling_with_a_seed_is_repeatable(tiny_model):
    sampling = Sampling(do_sample=True, temperature=1.5, top_p=0.9, repetition_penalty=1.1)

    def run(seed):
        return decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=2, eos_token_id=[3],
                      sampling=sampling, generator=torch.Generator().manual_seed(seed))

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert first != decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=2, eos_token_id=[3])


@pytest.mark.parametrize("kernel", ["compiled", "torch"])
def test_row_seeds_make_each_answer_independent_of_its_batch(tiny_model, kernel, monkeypatch):
    """With one seed per prompt, a prompt's sampled answer is the same whichever prompts
    share its batch, in whatever order and batch size it runs (the resume guarantee of
    ``esr eval``), on the compiled token choice and on transformers' processors."""
    if kernel == "torch":
        monkeypatch.setenv("ESR_SPEED", "-token_choice")
    from esr_train.speed import token_choice

    token_choice.load_kernel.cache_clear()
    try:
        sampling = Sampling(do_sample=True, temperature=1.5, repetition_penalty=1.1)
        seeds = [101 + i for i in range(len(PROMPTS))]
        together = decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=4, eos_token_id=[3], sampling=sampling,
                          row_seeds=seeds)
        picked = [5, 0, 2]
        alone = decode(tiny_model, [PROMPTS[i] for i in picked], max_new_tokens=N, batch_size=1, eos_token_id=[3],
                       sampling=sampling, row_seeds=[seeds[i] for i in picked])
        assert alone == [together[i] for i in picked]
        other = decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=4, eos_token_id=[3], sampling=sampling,
                       row_seeds=[s + 1 for s in seeds])
        assert other != together  # the seeds, not the batch, decide the draws
    finally:
        token_choice.load_kernel.cache_clear()


def _passes(model, **kw) -> list[tuple[int, int, int]]:
    """(batch rows, tokens fed, attention-mask width) of every forward pass of a decode."""
    seen = []

    def probe(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.append((ids.shape[0], ids.shape[1], mask.shape[1]))

    handle = decoder_module(model).register_forward_pre_hook(probe, with_kwargs=True)
    try:
        decode(model, PROMPTS, max_new_tokens=N, pad_token_id=0, **kw)
    finally:
        handle.remove()
    return seen


def test_finished_rows_leave_and_free_slots_refill(tiny_model):
    eos = stopper(hf(tiny_model, PROMPTS, NEVER))
    pruned = _passes(tiny_model, batch_size=6, refill=False, eos_token_id=eos)
    sizes = [rows for rows, _, _ in pruned]
    assert sizes[0] == 6 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 6
    assert sum(sizes) < 6 * len(sizes)  # fewer row-steps than a batch that runs to the end
    refilled = _passes(tiny_model, batch_size=2, refill=True, eos_token_id=eos)
    prefills = [rows for rows, fed, _ in refilled if fed > 1]
    assert sum(prefills) == len(PROMPTS) and len(prefills) > 1  # later prompts joined a running batch
    assert max(rows for rows, _, _ in refilled) <= 2
    # columns no live row needs are cut: the cache never outgrows the longest prompt + N
    assert max(width for _, _, width in refilled) <= max(map(len, PROMPTS)) + N
    # a prompt joins rows still running: the pass after its prefill holds more rows than it
    joins = [i for i, (rows, fed, _) in enumerate(refilled[:-1]) if i > 0 and fed > 1 and refilled[i + 1][0] > rows]
    assert joins
    groups = _passes(tiny_model, batch_size=2, refill=False, eos_token_id=eos)
    assert not [i for i, (rows, fed, _) in enumerate(groups[:-1]) if fed > 1 and groups[i + 1][0] > rows]


class CharTokenizer:
    """Just enough tokenizer for ``generate(rendered=True)`` on the tiny models: one id per
    character (ids 3..102), pad 0; decode drops 0..2 (pad, BOS, EOS of both configs)."""

    pad_token_id = 0
    padding_side = "right"

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        ids = [[3 + ord(c) % 100 for c in t] for t in texts]
        if return_tensors is None:
            return {"input_ids": ids}
        width = max(map(len, ids))

        def pad(row, value):
            fill = [value] * (width - len(row))
            return fill + row if self.padding_side == "left" else row + fill

        return {"input_ids": torch.tensor([pad(r, 0) for r in ids]),
                "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in ids])}

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(int(t)) for t in tokens if not (skip_special_tokens and int(t) < 3))


TEXTS = ["hello there", "hi", "a longer prompt here", "xyz", "steer me", "ok then!"]


def test_generate_default_engine_equals_hf_engine(tiny_model):
    """generate() wiring: input order, per-prompt steering and schedule, pads and EOS from
    the model's generation_config; the decode engine agrees with model.generate."""
    tok = CharTokenizer()
    rows = [direction(tiny_model, 1), None, direction(tiny_model, 2), None, direction(tiny_model, 3), None]
    kw = dict(rendered=True, max_new_tokens=N, batch_size=2, row_steering=rows, strength=[1.0, 0, 0.5, 0, 2.0, 0],
              schedule="prompt+first:3")
    full = generate(tiny_model, tok, TEXTS, engine="hf", **kw)
    counts = Counter(t for text in full for t in text.split()[1:])
    tiny_model.generation_config.eos_token_id = int(counts.most_common(1)[0][0])
    expected = generate(tiny_model, tok, TEXTS, engine="hf", **kw)
    assert expected != full  # some answers now end early
    assert generate(tiny_model, tok, TEXTS, **kw) == expected
    sampled = dict(kw, do_sample=True, temperature=1.2, seed=3)
    assert generate(tiny_model, tok, TEXTS, **sampled) == generate(tiny_model, tok, TEXTS, **sampled)
    with pytest.raises(ValueError, match="engine"):
        generate(tiny_model, tok, TEXTS, engine="vllm", **kw)


def test_iter_generate_streams_each_answer_once_and_cleans_up_when_stopped_early(tiny_model):
    """iter_generate (what the on-policy backend stores row by row) yields every prompt
    once with generate()'s text; the caller's code between yields runs outside inference
    mode; a caller that stops early leaves no steering hook on the model."""
    tok = CharTokenizer()
    rows = [direction(tiny_model, 1), None, direction(tiny_model, 2), None, direction(tiny_model, 3), None]
    kw = dict(rendered=True, max_new_tokens=N, batch_size=2, row_steering=rows, strength=1.0)
    expected = generate(tiny_model, tok, TEXTS, **kw)
    seen = {}
    for i, text in iter_generate(tiny_model, tok, TEXTS, **kw):
        assert not torch.is_inference_mode_enabled()
        assert i not in seen
        seen[i] = text
    assert [seen[i] for i in range(len(TEXTS))] == expected
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny_model.modules())  # noqa: E731
    before = hooks()
    stream = iter_generate(tiny_model, tok, TEXTS, **kw)
    next(stream)
    assert hooks() > before  # steered while the stream is open
    stream.close()
    assert hooks() == before


def test_sample_rows_draws_the_given_distribution_and_never_a_zeroed_token():
    from esr_train.decoding import sample_rows

    probs = torch.tensor([[0.0, 0.1, 0.6, 0.3, 0.0]]).repeat(40000, 1)
    draws = sample_rows(probs, torch.Generator().manual_seed(0))
    share = torch.bincount(draws, minlength=5).double() / len(draws)
    assert share[0] == 0 and share[4] == 0  # zero-probability ends (as after top-k) never drawn
    assert torch.allclose(share[1:4], torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.01)
    again = sample_rows(probs[:50], torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[:50])
    # unnormalised rows (a warper's output before softmax is not passed, but sums may drift)
    assert set(sample_rows(torch.tensor([[0.0, 2.0, 0.0]]).repeat(100, 1)).tolist()) == {1}


def test_in_place_layer_equals_concatenation_and_writes_in_place():
    from transformers.cache_utils import DynamicLayer

    from esr_train.decoding import _InPlaceLayer

    torch.manual_seed(0)
    fast, ref = _InPlaceLayer(), DynamicLayer()
    pointers = set()
    for step in range(40):
        k, v = torch.randn(3, 2, 5 if step == 0 else 1, 4), torch.randn(3, 2, 5 if step == 0 else 1, 4)
        fk, fv = fast.update(k, v)
        rk, rv = ref.update(k, v)
        assert torch.equal(fk, rk) and torch.equal(fv, rv)
        pointers.add(fk.data_ptr())
    assert len(pointers) == 1  # 44 columns fit the first buffer (5 + SPARE): no copy after step 0
    fast.batch_select_indices(torch.tensor([2, 0]))  # surgery replaces the views ...
    ref.batch_select_indices(torch.tensor([2, 0]))
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    fk, fv = fast.update(k, v)  # ... and the next update rebuilds the buffer from them
    rk, rv = ref.update(k, v)
    assert torch.equal(fk, rk) and torch.equal(fv, rv)


def test_finished_rows_wait_to_leave_until_they_are_a_share_of_the_batch(tiny_model, monkeypatch):
    """Dropping rows copies the whole cache, so finished rows stay (fed padding) until they
    are 1/DROP_SHARE of the batch; the live rows' tokens do not change."""
    from esr_train import decoding

    monkeypatch.setattr(decoding, "DROP_SHARE", 2)
    eos = stopper(hf(tiny_model, PROMPTS, NEVER))
    expected = hf(tiny_model, PROMPTS, eos)
    for batch_size, refill in ((6, False), (4, True), (2, True)):
        assert decode(tiny_model, PROMPTS, max_new_tokens=N, batch_size=batch_size, refill=refill,
                      eos_token_id=eos, pad_token_id=0) == expected
    sizes = [rows for rows, _, _ in _passes(tiny_model, batch_size=6, refill=False, eos_token_id=eos)]
    drops = [a - b for a, b in zip(sizes, sizes[1:]) if a > b]
    assert drops[0] >= 3, sizes  # the first rows to finish waited for half the batch


def test_head_runs_one_matmul_when_the_model_is_frozen(tiny_model):
    """A loaded adapter freezes the base; the prefill's last-position logits must still be one
    mm over the rows, never the head's weight broadcast to every row (a [rows, hidden, vocab]
    copy: gigabytes at an eval batch of SmolLM2 rows)."""
    from torch.profiler import ProfilerActivity, profile

    tiny_model.requires_grad_(False)
    cfg = tiny_model.config
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decode(tiny_model, PROMPTS, max_new_tokens=2, eos_token_id=NEVER)
    broadcast = [e.input_shapes for e in prof.events() if e.name == "aten::bmm"
                 and [len(PROMPTS), cfg.hidden_size, cfg.vocab_size] in e.input_shapes]
    assert not broadcast


def test_repetition_penalty_equals_transformers_processor():
    """The copy-free penalty gives transformers' scores exactly: left padding ignored
    (pad ids that are real vocabulary entries too), repeats, negative and positive scores,
    and ids beyond the head's vocabulary (an embedding larger than the head)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from esr_train.decoding import RepetitionPenalty

    g = torch.Generator().manual_seed(0)
    vocab = 50
    ids = torch.randint(0, vocab, (6, 12), generator=g)
    ids[1, 3] = vocab + 4  # an embedding-only id, never penalised
    pad = torch.tensor([0, 3, 11, 5, 0, 7])
    ids[torch.arange(12)[None, :] < pad[:, None]] = 7  # pad id 7: penalised only where it is real
    scores = torch.randn(6, vocab, generator=g) * 3
    want = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=pad)(ids, scores.clone())
    got = RepetitionPenalty(1.3, pad)(ids, scores.clone())
    assert torch.equal(got, want)
    assert not torch.equal(got, scores)
