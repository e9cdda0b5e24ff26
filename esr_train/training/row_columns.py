"""Per-row columns that ride past TRL beside the model inputs (the push's direction and
span, the unlikelihood marks).

The Trainer drops every dataset column its model's forward does not take, so each esr
trainer adds its own to the signature columns; and the columns that hold positions line up
with ``labels`` only when the collator padded on the right.
"""

from __future__ import annotations

from typing import Sequence


def with_columns(signature_columns: Sequence[str], names: Sequence[str]) -> list[str]:
    """``signature_columns`` plus those of ``names`` not already in it, in order."""
    return [*signature_columns, *(n for n in names if n not in signature_columns)]


def require_right_padding(batch, feature: str) -> None:
    """Refuse a batch padded on the left: ``feature`` reads absolute token positions."""
    if "attention_mask" in batch and not bool(batch["attention_mask"][:, 0].all()):
        raise ValueError(f"{feature} needs right-padded batches (the collator padded on the left)")
