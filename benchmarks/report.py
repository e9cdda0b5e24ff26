"""Shared output of the benchmarks: one row per measure, printed as one aligned table and
optionally written as a JSON list of row objects.

Every row has the same keys (``ROW_KEYS``; ``None`` where a field does not apply):
``measure, value, unit, baseline, ratio, ceiling, share_of_ceiling`` (ratio = value /
baseline, share_of_ceiling = value / ceiling, both as fractions: a 3% overhead is 0.03),
the machine it ran on (``cpu, capability``) and the ``dtype`` used, and a free-text
``note`` (batch size, engine, what the baseline is)."""

from __future__ import annotations

import json
from pathlib import Path

ROW_KEYS = ("measure", "value", "unit", "baseline", "ratio", "ceiling", "share_of_ceiling",
            "cpu", "capability", "dtype", "note")
COLUMNS = (("measure", "measure"), ("value", "value"), ("unit", "unit"), ("baseline", "baseline"),
           ("ratio", "ratio"), ("ceiling", "ceiling"), ("share_of_ceiling", "share"), ("note", "note"))
NOTE_WIDTH = 72
GFLOP_PER_TOKEN = 0.27
"""Forward FLOPs per token of smollm2-135m (about 2 x its parameter count): the ceilings'
denominator in every benchmark."""


def machine_meta(dtype: str | None = None) -> dict:
    """CPU, ISA level, native bf16 and the dtype used (default: what ``auto`` chose)."""
    from esr_train.dtype import cpu_dtype_verdict

    verdict = cpu_dtype_verdict()
    meta = {k: verdict[k] for k in ("cpu", "capability", "native_bf16", "dtype")}
    if dtype is not None:
        meta["dtype"] = str(dtype).replace("torch.", "")
    return meta


def _fraction(num, den) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 4)


def make_row(measure: str, value, unit: str, *, meta: dict, baseline=None, ceiling=None,
             note: str | None = None) -> dict:
    """One row with exactly ``ROW_KEYS``; ratio and share are computed here."""
    return {
        "measure": measure, "value": value, "unit": unit,
        "baseline": baseline, "ratio": _fraction(value, baseline),
        "ceiling": ceiling, "share_of_ceiling": _fraction(value, ceiling),
        "cpu": meta.get("cpu"), "capability": meta.get("capability"),
        "dtype": None if meta.get("dtype") is None else str(meta["dtype"]).replace("torch.", ""),
        "note": note,
    }


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"
    return str(x)


def _machines(rows: list[dict]) -> str:
    seen: list[str] = []
    for key in ("cpu", "capability", "dtype"):
        values = list(dict.fromkeys(str(r.get(key)) for r in rows if r.get(key) is not None))
        seen.append(f"{key}={'/'.join(values) if values else '?'}")
    return "machine: " + ", ".join(seen)


def _short(cell: str, width: int = NOTE_WIDTH) -> str:
    return cell if len(cell) <= width else cell[: width - 3] + "..."


def format_table(rows: list[dict]) -> str:
    """One header, one line per row, then the machine (cpu, capability, dtypes used).
    Notes are cut to ``NOTE_WIDTH`` characters here; the JSON keeps them whole."""
    table = [[title for _, title in COLUMNS]] + [
        [_short(_cell(r.get(key))) if key == "note" else _cell(r.get(key)) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {"value", "baseline", "ratio", "ceiling", "share_of_ceiling"}
    lines = []
    for line in table:
        cells = [c.rjust(w) if key in numeric else c.ljust(w)
                 for (key, _), c, w in zip(COLUMNS, line, widths)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [_machines(rows)])


def write_json(rows: list[dict], path: str | Path) -> None:
    """The rows as a plain JSON list of objects with exactly ``ROW_KEYS``."""
    clean = [{k: r.get(k) for k in ROW_KEYS} for r in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean, indent=2) + "\n")


def emit(rows: list[dict], json_path: str | None = None) -> list[dict]:
    """Print the table and, when asked, write the JSON."""
    print(format_table(rows), flush=True)
    if json_path:
        write_json(rows, json_path)
    return rows
