"""The capability cost of an adapter: how well each model still predicts on-topic
reference answers (the base model's own unsteered answers to the evaluation prompts).

A self-correction adapter that learned to restart everywhere, or forgot how to answer,
shows up here as higher perplexity on plain answers, before any steering is involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


@torch.inference_mode()
def answer_perplexity(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 8) -> float | None:
    """exp(mean negative log-likelihood per answer token), answers scored after the chat-
    formatted prompt; the prompt tokens are context only."""
    from esr_train.generation import render_prompt

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    pairs = [(render_prompt(tokenizer, p), a) for p, a in zip(prompts, answers) if a.strip()]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        heads = [tokenizer(h, add_special_tokens=False)["input_ids"] for h, _ in chunk]
        full = [tokenizer(h + a, add_special_tokens=False)["input_ids"] for h, a in chunk]
        width = max(len(f) for f in full)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (h, f) in enumerate(zip(heads, full)):
            ids[row, :len(f)] = torch.tensor(f)
            mask[row, :len(f)] = 1
            labels[row, len(h):len(f)] = torch.tensor(f[len(h):])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((shift_labels != -100).sum())
    return math.exp(total_nll / total_tokens) if total_tokens else None
