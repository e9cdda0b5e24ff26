"""Synthetic self-correction transcripts for esr-train.

The generator pairs an everyday task prompt with an unrelated subject the answer
drifts into, then an explicit restart phrase ("Wait, that's not right...") and a
fresh on-topic answer. This package ships the input banks for that and their
loaders; see :mod:`data_gen.banks`.
"""

from data_gen.banks import (
    BankError,
    format_restart,
    load_prompts,
    load_restart_phrases,
    load_subjects,
)

__all__ = [
    "BankError",
    "format_restart",
    "load_prompts",
    "load_restart_phrases",
    "load_subjects",
]
