"""LoRA training throughput for smollm2-135m next to the compute ceiling, in one run.

    python -m benchmarks.train_bench [--steps 6] [--json out.json]

Rows: ``train_tok_s`` for the dtype ``auto`` picks here and ``train_fp32_tok_s``, each the steady
rate from the end of the first optimizer step to the end of the last (the first step also pays for
the trainer's warm-up); the note gives the rate over the whole ``trainer.train()`` wall beside it. When
auto is fp32 both rows come from the same run (it is not trained twice); otherwise fp32
is trained too and is the baseline of ``train_tok_s`` (ratio = speed-up of auto).

The ceiling is the matmul FLOP/s of the dtype measured here, divided by the model's LoRA
training FLOPs per token: about 2 x the forward FLOPs (2 x 0.27 GFLOP), i.e. the forward
pass plus a backward pass through the activations that costs about one forward more (the
frozen base gets no weight gradients; the LoRA weights' own are negligible; no
activation checkpointing, which would add another forward).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.report import GFLOP_PER_TOKEN, emit, machine_meta, make_row

LORA_FACTOR = 2.0


ANSWER = ("Start by gathering what you need and reading the steps once. " * 4 +
          "Work slowly, check each step, and clean up when you are done. " * 4).strip()  # ~150 tokens
DISTRACTION = "Volcanoes form where magma rises through the crust. Lava cools into new rock."


def template_dataset(root: Path, n: int = 64, answer: str = ANSWER, distraction: str = DISTRACTION) -> Path:
    """A template dataset of ``n`` bundled training prompts (every second one opening with
    ``distraction``) all answered with ``answer`` (no model needed)."""
    from esr_train.banks import load_prompts
    from data_gen.builder import GenerateConfig, build_dataset

    prompts = load_prompts("train")
    if n > len(prompts):
        raise SystemExit(f"template_dataset: {n} rows asked, the bundled bank has {len(prompts)} training prompts")
    rows = []
    for i, p in enumerate(prompts[:n]):
        row = {"prompt": p["prompt"], "answer": answer, "split": "train"}
        if i % 2:
            row.update(distraction=distraction, subject="volcanoes")
        rows.append(row)
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src), test_size=0.0, n=len(rows)), root / "ds")
    return root / "ds"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json")
    return parser.parse_args(argv)


def measure(argv=None) -> list[dict]:
    """The rows (nothing printed)."""
    args = parse(argv)

    import torch

    from esr_train.config import load_recipe
    from esr_train.dtype import matmul_gflops, resolve_dtype
    from esr_train.settings import with_overrides
    from esr_train.training.trainer import train

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m.yaml")
    auto = str(resolve_dtype("auto", "cpu")).replace("torch.", "")
    dtypes = [auto] + (["float32"] if auto != "float32" else [])
    runs = {}
    with tempfile.TemporaryDirectory(prefix="esr-train-bench-") as tmp:
        data = template_dataset(Path(tmp))
        for dtype in dtypes:
            gflops = matmul_gflops(getattr(torch, dtype), n=1024)
            staged = with_overrides(recipe, {"model": {"dtype": dtype}, "train": {
                "max_steps": args.steps, "save_steps": 10_000, "logging_steps": 1, "eval_split": None}})
            summary = train(staged, Path(tmp) / f"out-{dtype}", dataset_dir=data)
            steady = summary.get("steady_tokens_per_s")
            runs[dtype] = {"value": steady or summary["tokens_per_s"], "gflops": gflops,
                           "ceiling": round(gflops / (GFLOP_PER_TOKEN * LORA_FACTOR), 1),
                           "what": (f"steps 2-{summary['steps']} of {summary['steps']}" if steady
                                    else f"{summary['steps']} steps (whole wall)")
                                   + f", {summary['tokens']} tok; whole wall {summary['tokens_per_s']} tok/s; "
                                   f"matmul {gflops:.1f} GFLOP/s"}
    a, f = runs[auto], runs["float32"]
    same = auto == "float32"
    return [
        make_row("train_tok_s", a["value"], "tok/s", meta=machine_meta(auto), ceiling=a["ceiling"],
                 baseline=None if same else f["value"],
                 note=f"dtype {auto} (auto); {a['what']}" + ("" if same else "; baseline: the fp32 run")),
        make_row("train_fp32_tok_s", f["value"], "tok/s", meta=machine_meta("float32"), ceiling=f["ceiling"],
                 note=("same run as train_tok_s (auto is float32); " if same else "") + f["what"]),
    ]


def main(argv=None) -> list[dict]:
    return emit(measure(argv), parse(argv).json)


if __name__ == "__main__":
    main()
