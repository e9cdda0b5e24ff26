"""LoRA training throughput for smollm2-135m next to the compute ceiling, in one run.

    python -m benchmarks.train_bench [--steps 4] [--json out.json]

The ceiling is the matmul FLOP/s of the dtype measured here, divided by the model's
training FLOPs per token (about 2 x 0.27 GFLOP for LoRA: the forward pass plus the
backward pass through the activations; no weight gradients for the frozen base). fp32
is always measured; bf16 only where the CPU runs it natively (elsewhere it is 100x
slower and would take hours).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.report import emit, machine_meta

GFLOP_PER_TOKEN_GENERATE = 0.27
LORA_FACTOR = 2.0


def _dataset(root: Path) -> Path:
    """A template dataset of bundled prompts with ~150-token answers (no model needed)."""
    from data_gen.banks import load_prompts
    from data_gen.builder import GenerateConfig, build_dataset

    answer = ("Start by gathering what you need and reading the steps once. " * 4 +
              "Work slowly, check each step, and clean up when you are done. " * 4).strip()
    rows = []
    for i, p in enumerate(load_prompts("train")[:64]):
        row = {"prompt": p["prompt"], "answer": answer, "split": "train"}
        if i % 2:
            row.update(distraction="Volcanoes form where magma rises through the crust. Lava cools into new rock.",
                       subject="volcanoes")
        rows.append(row)
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src), test_size=0.0, n=len(rows)), root / "ds")
    return root / "ds"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    from esr_train.config import load_recipe
    from esr_train.dtype import cpu_has_native_bf16, matmul_gflops, resolve_dtype
    from esr_train.training.trainer import train

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m.yaml")
    auto = str(resolve_dtype("auto", "cpu")).replace("torch.", "")
    dtypes = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="esr-train-bench-") as tmp:
        data = _dataset(Path(tmp))
        for dtype in dtypes:
            gflops = matmul_gflops(getattr(torch, dtype), n=1024)
            ceiling = gflops / (GFLOP_PER_TOKEN_GENERATE * LORA_FACTOR)
            summary = train(recipe, Path(tmp) / f"out-{dtype}", dataset_dir=data,
                            overrides={"dtype": dtype, "max_steps": args.steps, "save_steps": 10_000,
                                       "logging_steps": 1, "eval_split": None})
            value = summary["tokens_per_s"]
            rows.append({"measure": "train_tok_s" if dtype == auto else f"train_{'fp32' if dtype == 'float32' else 'bf16'}_tok_s",
                         "value": value, "unit": "tok/s", "dtype": dtype, "ceiling": round(ceiling, 1),
                         "share_of_ceiling": round(value / ceiling, 3), "matmul_gflops": round(gflops, 1),
                         "steps": summary["steps"], "tokens": summary["tokens"]})
    return emit(machine_meta(), rows, args.json)


if __name__ == "__main__":
    main()
