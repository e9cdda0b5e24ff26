"""Check a private library function before patching it.

The speed wing replaces a few private TRL and transformers functions for the length of a
``with`` block. A library release can rename their parameters or change what they take;
patching such a function with a replacement written for the old one would crash mid-run
or, worse, compute something else. :func:`signature_matches` compares the parameter names
with those the patch was written for; on a mismatch the caller keeps the library's code,
and one warning per function says so.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Sequence

log = logging.getLogger(__name__)
_warned: set[str] = set()


def parameters(func: Callable) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None


def signature_matches(func: Callable | None, expected: Sequence[str], where: str) -> bool:
    """Whether ``func`` takes exactly the parameters ``expected`` (by name, in order).
    On a mismatch (or a missing function) log one warning naming ``where`` and return False."""
    got = parameters(func) if func is not None else None
    if got == tuple(expected):
        return True
    if where not in _warned:
        _warned.add(where)
        found = "is missing" if func is None else f"takes ({', '.join(got or ('?',))})"
        log.warning("%s %s, not (%s) as the speed patch expects; the library's own code is kept", where, found,
                    ", ".join(expected))
    return False
