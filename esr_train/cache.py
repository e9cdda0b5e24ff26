"""Where esr-train keeps what it derives once and reuses (dequantised models, dtype
verdicts, residual norms), and how it writes there without ever leaving half a file.

The directory is ``$ESR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/esr-train``, else
``~/.cache/esr-train``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root, created if missing."""
    if override is not None:
        root = Path(override)
    elif os.environ.get("ESR_CACHE_DIR"):
        root = Path(os.environ["ESR_CACHE_DIR"])
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(xdg) / "esr-train"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader
    (or a crash) never sees a partial file. The file gets the permissions a plain
    ``open(path, "w")`` would give it (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Read JSON, returning ``default`` when the file is missing or unreadable (a cache
    entry that cannot be read is recomputed, never trusted)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it is renamed to
    ``final`` in one step, on failure it is deleted. A crash leaves ``final`` absent or
    whole, never half written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would make it, not mkdtemp's 0700
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
