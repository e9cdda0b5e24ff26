"""What each path of the speed wing buys end to end, measured in one run.

    python -m benchmarks.speed_paths [--prompts 48] [--tokens 96] [--steps 6] [--repeat 1]
        [--workloads decode,train] [--settings on,-token_choice] [--json out.json]

Two workloads, each run in a fresh process per setting of ``ESR_SPEED`` (so no kernel or
patch leaks from one setting into the next):

* steered decoding, the eval's path: ``--prompts`` bundled test prompts, each steered at
  strength 0.3 toward one of two directions, sampled (temperature 0.6, repetition penalty
  1.1) up to ``--tokens`` new tokens at batch 64; generated tokens per second;
* LoRA training on a template dataset (``benchmarks.train_bench``): the steady tokens per
  second over ``--steps`` optimizer steps.

Each workload runs with every path on, with each path that touches it switched off alone,
and with all paths off. A row's ratio is the setting's rate over the all-on rate of the same
workload in the same run (below 1: switching the path off costs that share; with ``--repeat``
the settings alternate and the middle rate counts, the upper of an even count); the ceiling is
the dtype's matmul rate measured in the same process, divided by the workload's FLOPs per
token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import GFLOP_PER_TOKEN, emit, machine_meta, make_row

DECODE_PATHS = ("decode_attention", "token_choice", "elementwise", "packed_linear")
TRAIN_PATHS = ("logprob_tiles", "labelled_head", "adapter_casts", "elementwise")
LORA_FACTOR = 2.0  # a LoRA step's FLOPs per token against a forward's (benchmarks.train_bench)


def _decode_job(prompts: int, tokens: int) -> dict:
    import time

    import torch

    from esr_train.banks import load_prompts
    from esr_train.concepts import with_reference_norm
    from esr_train.directions import SteeringDirection
    from esr_train.dtype import matmul_gflops
    from esr_train.generation import generate
    from esr_train.zoo import load_model, steer_layer

    model, tok = load_model("smollm2-135m")
    layer = steer_layer("smollm2-135m", model)
    g = torch.Generator().manual_seed(0)
    dirs = [with_reference_norm(SteeringDirection(torch.randn(model.config.hidden_size, generator=g), layer=layer,
                                                  label=f"d{i}"), model, tok) for i in range(2)]
    texts = [r["prompt"] for r in load_prompts("test")][:prompts]
    kw = dict(max_new_tokens=tokens, do_sample=True, temperature=0.6, repetition_penalty=1.1, batch_size=64,
              row_steering=[dirs[i % 2] for i in range(len(texts))], strength=0.3, seeds=list(range(len(texts))))
    generate(model, tok, texts[:8], **{**kw, "max_new_tokens": 8, "row_steering": kw["row_steering"][:8],
                                       "seeds": kw["seeds"][:8]})  # warm-up: kernels loaded, caches made
    t0 = time.perf_counter()
    out = generate(model, tok, texts, **kw)
    wall = time.perf_counter() - t0
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in out)
    return {"tok_s": round(n / wall, 1), "gflops": matmul_gflops(model.dtype, n=1024),
            "dtype": str(model.dtype).replace("torch.", "")}


def _train_job(steps: int) -> dict:
    import torch

    from benchmarks.train_bench import template_dataset
    from esr_train.config import load_recipe
    from esr_train.dtype import matmul_gflops, resolve_dtype
    from esr_train.settings import with_overrides
    from esr_train.training.trainer import train

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m.yaml")
    recipe = with_overrides(recipe, {"train": {"max_steps": steps, "save_steps": 10_000, "logging_steps": 1,
                                               "eval_split": None}})
    with tempfile.TemporaryDirectory(prefix="esr-speed-paths-") as tmp:
        summary = train(recipe, Path(tmp) / "out", dataset_dir=template_dataset(Path(tmp)))
    dtype = resolve_dtype("auto", "cpu")
    return {"tok_s": summary.get("steady_tokens_per_s") or summary["tokens_per_s"],
            "gflops": matmul_gflops(getattr(torch, str(dtype).replace("torch.", "")), n=1024),
            "dtype": summary["dtype"]}


def _child(job: str, switch: str, args) -> dict:
    """Run one job in a fresh process with ``ESR_SPEED=switch``; its result as a dict."""
    code = (f"import json, benchmarks.speed_paths as s; "
            f"print('RESULT ' + json.dumps(s._{job}_job({args})))")
    env = {**os.environ, "ESR_SPEED": switch}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"speed_paths: {job} with ESR_SPEED={switch} failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measure(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over the settings, in alternating order; the middle rate counts (the upper of an even count)")
    parser.add_argument("--workloads", default="decode,train", help="decode, train or both")
    parser.add_argument("--settings", help="comma-separated ESR_SPEED values (default: on, each path off, off)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for job, paths, job_args, per_token in (
            ("decode", DECODE_PATHS, f"{args.prompts}, {args.tokens}", GFLOP_PER_TOKEN),
            ("train", TRAIN_PATHS, f"{args.steps}", GFLOP_PER_TOKEN * LORA_FACTOR)):
        if job not in args.workloads.split(","):
            continue
        settings = args.settings.split(",") if args.settings else ["on", *(f"-{p}" for p in paths), "off"]
        runs: dict[str, list[dict]] = {s: [] for s in settings}
        for k in range(args.repeat):
            for setting in (settings if k % 2 == 0 else settings[::-1]):
                runs[setting].append(_child(job, setting, job_args))
        results = {s: sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2] for s, rs in runs.items()}
        base = results[settings[0]]["tok_s"]
        for setting, r in results.items():
            spread = ", ".join(f"{x['tok_s']:.0f}" for x in runs[setting])
            rows.append(make_row(f"{job}_tok_s[ESR_SPEED={setting}]", r["tok_s"], "tok/s", meta=machine_meta(r["dtype"]),
                                 baseline=base, ceiling=round(r["gflops"] / per_token, 1),
                                 note=f"middle of {len(runs[setting])}, the upper for an even count ({spread}); matmul {r['gflops']:.1f} GFLOP/s "
                                      "in the same process"))
    return rows


def main(argv=None) -> list[dict]:
    rows = measure(argv)
    json_path = next((argv[i + 1] for i, a in enumerate(argv or []) if a == "--json"), None)
    emit(rows, json_path)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
