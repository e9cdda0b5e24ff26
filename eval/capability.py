"""The capability cost of an adapter: how well each model still predicts on-topic
reference answers (the base model's own unsteered answers to the evaluation prompts).

A self-correction adapter that learned to restart everywhere, or forgot how to answer,
shows up here as higher perplexity on plain answers, before any steering is involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LOGITS_BUDGET = 256 * 2**20
"""Most logits (elements, in the model's dtype) one forward pass may hold: rows x width x vocabulary. Gemma 3's
262k vocabulary at the eval batch of 64 and ~200 tokens is 3.4 G floats (13 GB), enough to
set an evaluation's peak memory (see docs/performance.md); rows beyond the budget
go in further passes. The logits stay in the model's dtype; only one row's answer positions
are taken to float32 at a time."""


def _rows_per_pass(width: int, vocab: int, batch_size: int, budget: int = LOGITS_BUDGET) -> int:
    return max(1, min(batch_size, budget // max(1, width * vocab)))


@torch.inference_mode()
def answer_perplexity(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 8,
                      logits_budget: int = LOGITS_BUDGET) -> float | None:
    """exp(mean negative log-likelihood per answer token), answers scored after the chat-
    formatted prompt; the prompt tokens are context only. Each pass holds at most
    ``logits_budget`` logits (fewer rows than ``batch_size`` for long rows or a big
    vocabulary); the result does not depend on how rows are grouped."""
    from esr_train.generation import render_prompt

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    total_nll, total_tokens = 0.0, 0
    pairs = [(render_prompt(tokenizer, p), a) for p, a in zip(prompts, answers) if a.strip()]
    # (prompt tokens, prompt + answer tokens) of every row, tokenized once
    rows = [(tokenizer(h, add_special_tokens=False)["input_ids"], tokenizer(h + a, add_special_tokens=False)["input_ids"])
            for h, a in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    i = 0
    while i < len(rows):
        longest = max(len(f) for _, f in rows[i:i + batch_size])
        chunk = rows[i:i + _rows_per_pass(longest, vocab, batch_size, logits_budget)]
        i += len(chunk)
        width = max(len(f) for _, f in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (h, f) in enumerate(chunk):
            ids[row, :len(f)] = torch.tensor(f)
            mask[row, :len(f)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # one row's answer positions at a time in float32: a float copy of the whole pass, and
        # cross_entropy's log-softmax of it, would be a large share of the evaluation's memory. Position
        # t - 1 predicts token t; the answer is tokens [len(h), len(f)) of each row.
        nll = torch.zeros((), dtype=torch.float32, device=logits.device)
        for row, (h, f) in enumerate(chunk):
            first = max(len(h), 1)
            if len(f) > first:
                nll += torch.nn.functional.cross_entropy(logits[row, first - 1:len(f) - 1].float(),
                                                         ids[row, first:len(f)].to(logits.device), reduction="sum")
                total_tokens += len(f) - first
        total_nll += float(nll)
    return math.exp(total_nll / total_tokens) if total_tokens else None
