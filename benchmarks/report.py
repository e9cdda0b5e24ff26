"""Shared output of the benchmarks: the machine they ran on, then one row per measure,
printed and optionally written as JSON, so every figure names its CPU and dtype."""

from __future__ import annotations

import json
from pathlib import Path


def machine_meta(dtype: str | None = None) -> dict:
    """CPU, ISA level, native bf16 and the dtype used (default: what ``auto`` chose)."""
    from esr_train.dtype import cpu_dtype_verdict

    verdict = cpu_dtype_verdict()
    meta = {k: verdict[k] for k in ("cpu", "capability", "native_bf16", "dtype")}
    if dtype is not None:
        meta["dtype"] = dtype
    return meta


def emit(meta: dict, rows: list[dict], json_path: str | None) -> list[dict]:
    print(f"machine: {meta}")
    for row in rows:
        print(row)
    if json_path:
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows
