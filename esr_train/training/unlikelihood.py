"""Unlikelihood on false restarts: teach the adapter when *not* to restart.

Adapters trained on self-correction rows pick up a tic: unpushed, they restart after an
on-topic opener ("Resolving a disagreement can be delicate. ... Let me start again: ...";
13% of R18's greedy answers). Normal rows only teach what to say, never what not to say,
and adding more of them did not lower the tic (R18). This module adds the missing negative:
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

import random
import re
from typing import Any

from data_gen.text import sentence_ends
from esr_train.training.row_columns import require_right_padding, with_columns

UNLIKELY_COLUMN = "unlikely"
"""Tokenized column: the token id at positions trained by unlikelihood, -100 elsewhere."""
FALSE_RESTART = "false_restart"
"""Row kind of the negatives: ``distraction`` holds the on-topic opener (context only),
``restart`` the phrase whose tokens are made unlikely, ``answer`` is empty."""
_LIST_MARKER = re.compile(r"(?:^|\n)\s*(?:\d+[.)]|[-*•]+)$")


def opener_cuts(answer: str, max_sentences: int) -> list[int]:
    """Where an answer can be cut after one of its first ``max_sentences`` sentences with
    more of the answer still to come (the spot where the tic restarts); list numbers such
    as "1." are not sentence ends."""
    ends = [e for e in sentence_ends(answer) if not _LIST_MARKER.search(answer[:e])]
    return [e for e in ends[:max_sentences] if answer[e:].strip()]


def restart_phrases(rows) -> list[str]:
    """The distinct restart phrases of the self-correction rows among ``rows``, sorted: the
    phrases a false restart is given after an on-topic opener."""
    return sorted({r["restart"].strip() for r in rows if r.get("kind") == "self_correction" and r.get("restart")})


def false_restart_rows(rows, seed: int, max_sentences: int = 3, every_cut: bool = False) -> list[dict[str, Any]]:
    """One negative per normal row that has a place to cut: its answer up to a sentence
    end, then a restart phrase from the self-correction rows of the same data, both chosen
    by ``seed``. Rows too short to cut are skipped (counted by the caller).

    With ``every_cut`` a row gives one negative at each of its cuts instead of one at a
    random cut. It is the control of docs/results.md R37: negatives after the first
    sentence alone seemed to move the round-one tic to later sentences, yet one at every
    boundary left the rate unchanged too (16/200), so placement is not the lever."""
    rows = list(rows)
    restarts = restart_phrases(rows)
    if not restarts:
        raise ValueError("unlikelihood_weight needs self-correction rows: their restart phrases are the negatives")
    rng = random.Random(seed)
    out = []
    for row in rows:
        if row.get("kind") != "normal":
            continue
        answer = (row.get("answer") or "").strip()
        cuts = opener_cuts(answer, max_sentences)
        if not cuts:
            continue
        for cut in cuts if every_cut else [rng.choice(cuts)]:
            out.append({**row, "kind": FALSE_RESTART, "distraction": answer[:cut],
                        "restart": rng.choice(restarts), "answer": "", "subject": ""})
    return out


def mined_negative_rows(mined, columns) -> list[dict[str, Any]]:
    """The writer's own false restarts (``data_gen.false_restarts``, mined by
    ``restart_probes``) as negatives of the same shape as :func:`false_restart_rows`, with
    every other dataset column ``columns`` empty."""
    blank = {c: "" for c in columns}
    return [{**blank, "id": f"mined-{i}", "prompt": r["prompt"], "distraction": r["opener"], "restart": r["restart"],
             "kind": FALSE_RESTART, "model": r.get("model", ""), "seed": int(r.get("seed", 0)),
             **({"messages": []} if "messages" in blank else {})}
            for i, r in enumerate(mined)]


def unpushed_negative_rows(rows) -> list[dict[str, Any]]:
    """One negative per self-correction row: the same drift as context and the same restart
    made unlikely, but trained without the push (only self-correction rows are pushed); a
    row without a drift or restart is refused by ``tokenize_row`` as its positive is.

    Why: after the mined rounds, the adapters' remaining false restarts mostly follow drifts and
    errors of their own (Gemma R34 in docs/results.md), text much like the training
    distractions. Round one's follow on-topic openers instead, so there it changed nothing
    (R36). A positive and
    its unpushed twin share every token, so the only thing that can tell the adapter to
    restart in one and not the other is the push in its residual stream, which is what
    resisting *steering* means; the text alone stops being a cue."""
    return [{**row, "id": f"{row.get('id', i)}-unpushed", "kind": FALSE_RESTART, "answer": "", "subject": ""}
            for i, row in enumerate(rows) if row.get("kind") == "self_correction"]


def mined_positive_rows(mined, rows, seed: int) -> list[dict[str, Any]]:
    """One self-correction row per mined false restart, restarting with the mined phrase
    after off-topic text: a copy of a self-correction row of the same prompt (any one when
    the data has none for it) with its restart replaced. Each negative then has a twin that
    differs only in what came before the phrase, so the loss can only separate them by the
    context (on-topic opener: unlikely; drift: likely), not by the phrase."""
    rows = list(rows)
    corrections = [r for r in rows if r.get("kind") == "self_correction" and r.get("distraction") and r.get("answer")]
    if not corrections:
        raise ValueError("mined_positives needs self-correction rows to copy")
    by_prompt: dict[str, list[dict]] = {}
    for r in corrections:
        by_prompt.setdefault(r["prompt"], []).append(r)
    rng = random.Random(seed)
    return [{**rng.choice(by_prompt.get(m["prompt"], corrections)), "id": f"mined-pair-{i}", "restart": m["restart"],
             **({"messages": []} if "messages" in rows[0] else {})}
            for i, m in enumerate(mined)]


def unlikelihood_loss(log_probs, unlikely_mask, floor: float | None = None):
    """Sum over marked positions of -log(1 - p), from log p (clamped so a token the model
    is sure of gives a large finite loss instead of inf).

    With ``floor`` t, the hinge max(0, log p - log t) instead. Why: the gradient of
    -log(1 - p) with respect to the logits is about p, so once a false restart is down to a
    few percent per sentence end the negatives hardly push (R38 measured the round-one
    adapters' restart tokens at a mean p of 0.03 after on-topic openers, and their tic
    unmoved); the hinge pushes with a gradient near 1 until p is below t, then not at all,
    so it cannot drive a token to -inf."""
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
