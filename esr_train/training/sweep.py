"""``esr sweep``: one adapter per self-correction share, from one dataset (the study
trained on mixes of 10%-90% self-correction rows).

Every mix gets the *same number* of training rows (the largest size every mix can be
drawn at from the dataset's self-correction and normal rows), chosen by a seeded shuffle,
so adapters differ in the mix alone. The test split is kept whole for eval loss.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import math
import random
from pathlib import Path
from typing import Sequence

from esr_train.cache import atomic_write_json, read_json


class SweepError(EsrError, ValueError):
    """A sweep that cannot be drawn from the dataset; one line."""


def common_size(n_self: int, n_normal: int, mixes: Sequence[float]) -> int:
    """The largest row count at which every mix can be drawn."""
    sizes = []
    for m in mixes:
        if not 0.0 <= m <= 1.0:
            raise SweepError(f"mix {m} is outside 0..1")
        cap_self = math.inf if m == 0 else n_self / m
        cap_normal = math.inf if m == 1 else n_normal / (1 - m)
        sizes.append(math.floor(min(cap_self, cap_normal) + 1e-9))
    size = min(sizes)
    if size < 1:
        raise SweepError(f"cannot draw mixes {list(mixes)} from {n_self} self-correction and {n_normal} normal rows")
    return size


def mix_indices(kinds: Sequence[str], mix: float, size: int, seed: int) -> list[int]:
    """Row indices for one mix: round(size * mix) self-correction rows, the rest normal."""
    rng = random.Random(seed)
    sc = [i for i, k in enumerate(kinds) if k == "self_correction"]
    normal = [i for i, k in enumerate(kinds) if k == "normal"]
    rng.shuffle(sc)
    rng.shuffle(normal)
    k = round(size * mix)
    if k > len(sc) or size - k > len(normal):
        raise SweepError(f"mix {mix} at {size} rows needs {k} self-correction and {size - k} normal rows")
    return sorted(sc[:k] + normal[: size - k])


def sweep(recipe: dict, dataset_dir: str | Path, output_dir: str | Path, mixes: Sequence[float],
          seed: int = 0, where: str = "recipe") -> dict:
    """Train one adapter per mix under ``output_dir/mix-<m>/``; returns the sweep summary."""
    from datasets import DatasetDict, load_from_disk

    from esr_train.training.trainer import train

    ds = load_from_disk(str(dataset_dir))
    kinds = ds["train"]["kind"]
    size = common_size(kinds.count("self_correction"), kinds.count("normal"), mixes)
    out = Path(output_dir)
    runs = {}
    for m in mixes:
        run = out / f"mix-{m:g}"
        data_dir = run / "data"
        if not (data_dir / "dataset_dict.json").exists():
            subset = DatasetDict({"train": ds["train"].select(mix_indices(kinds, m, size, seed)),
                                  **{k: v for k, v in ds.items() if k != "train"}})
            subset.save_to_disk(str(data_dir))
        summary_path = run / "adapter" / "esr_train_summary.json"
        resume = (run / "adapter").exists() and not summary_path.exists()
        if summary_path.exists():
            runs[f"{m:g}"] = read_json(summary_path)
            continue
        runs[f"{m:g}"] = train(recipe, run / "adapter", dataset_dir=data_dir, resume=resume,
                               where=where)
    result = {"dataset": str(dataset_dir), "rows_per_mix": size, "mixes": list(mixes),
              "adapters": {m: str(out / f"mix-{m}" / "adapter") for m in runs},
              "final_eval_loss": {m: r.get("final_eval_loss") for m, r in runs.items()}}
    atomic_write_json(out / "sweep_summary.json", result)
    return result
