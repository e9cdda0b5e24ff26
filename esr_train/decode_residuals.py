"""Write answers and read a layer's residuals over them in the same decode.

A self-written concept direction needs the model's answers to a few requests and the
mean layer-L residual over those answers' tokens. Reading them afterwards means a second
forward pass over every answer up to the layer (a sizeable share of a cold directions
stage; measured in docs/performance.md); the decode loop already computes each generated token's
residual when it feeds that token back, so a hook on the layer keeps them as they pass.

Which residuals count: those of the tokens the loop feeds back, i.e. every generated
token but the last (an EOS, or the token that reached ``max_new_tokens``, is never fed).
Prompt passes and the padding fed to rows that already finished are left out.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from esr_train.layers import decoder_layers, resolve_layer


class _LayerReader:
    """A forward hook on one decoder layer that keeps each pass's first-column output with
    the prompt index and offset of each row, as ``stream_decode`` reports them through
    ``update`` before each pass. In a decode step that column is the fed token and the
    offset its index among the generated ones; a prompt pass's offsets are negative, so
    :meth:`sums` leaves it out."""

    def __init__(self, model, layer: int) -> None:
        self.layer = decoder_layers(model)[resolve_layer(model, layer)]
        self.owner: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, owner, offset) -> None:
        self.owner, self.offset = owner, offset

    def _read(self, module, args, out) -> None:
        hidden = out[0] if isinstance(out, tuple) else out
        if self.owner is not None:
            self.steps.append((self.owner.cpu(), self.offset.cpu(), hidden[:, 0].detach().float().cpu()))

    def __enter__(self) -> "_LayerReader":
        self.handle = self.layer.register_forward_hook(self._read)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def sums(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt: the sum of its fed tokens' residuals [n, d] and their count [n]
        (``lengths``: tokens generated per prompt, the last one never fed)."""
        d = self.steps[0][2].shape[-1] if self.steps else 0
        total, count = torch.zeros(len(lengths), d), torch.zeros(len(lengths))
        if self.steps:
            owner, offset, hidden = (torch.cat(parts) for parts in zip(*self.steps))
            keep = (offset >= 0) & (offset < lengths[owner] - 1)
            total.index_add_(0, owner[keep], hidden[keep])
            count.index_add_(0, owner[keep], torch.ones(int(keep.sum())))
        return total, count


@torch.inference_mode()
def write_and_read(
    model,
    tokenizer,
    prompts: Sequence[str],
    layer: int,
    *,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    batch_size: int = 16,
    progress: "bool | str" = False,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Greedy answers to chat ``prompts`` (as ``generation.generate`` writes them) and,
    per prompt, the sum [n, d] and count [n] of the layer-``layer`` residuals over its
    answer's tokens, read while the answers were written."""
    from esr_train.decoding import Sampling, stream_decode
    from esr_train.generation import _label, render_prompt

    if not prompts:
        return [], torch.zeros(0, model.config.get_text_config().hidden_size), torch.zeros(0)
    ids = tokenizer([render_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # as iter_generate admits them
    texts, lengths = [""] * len(prompts), torch.zeros(len(prompts), dtype=torch.long)
    with _LayerReader(model, layer) as reader, tqdm(total=len(prompts), desc=_label(progress), disable=not progress,
                                                     unit="prompt") as bar:
        for k, tokens in stream_decode(model, [ids[i] for i in order], max_new_tokens=max_new_tokens,
                                       sampling=Sampling(repetition_penalty=repetition_penalty),
                                       batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, observer=reader):
            texts[order[k]] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            lengths[k] = len(tokens)
            bar.update(1)
    total, count = reader.sums(lengths)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # stream index of each prompt
    return texts, total[back], count[back]
