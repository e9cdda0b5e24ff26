"""The one error base class of esr-train.

Every error that a user can fix (a bad path, a bad value, a recipe key, a file that does
not parse) is an :class:`EsrError` whose message is one line naming the file, line or field
and, where there is one, the fix. ``esr`` prints such an error as
``esr COMMAND: error: MESSAGE`` and exits 1; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class EsrError(Exception):
    """A user-fixable problem, reported in one line without a traceback."""

    exit_code = 1

    def __str__(self) -> str:
        text = super().__str__()
        return " ".join(text.split()) if "\n" in text else text
