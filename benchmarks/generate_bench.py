"""Times ``esr generate --backend self`` on smollm2-135m against a naive baseline
measured in the same run: the same kind of work (one steered distraction and one answer
per transcript) done one prompt at a time with plain HF ``generate`` (``engine="hf"``).
Rows: ``generate_rows_per_min`` (baseline: the naive rate) and ``generate_total_s``.

    python -m benchmarks.generate_bench [--n 300] [--out DIR] [--json out.json]

The naive baseline is timed on a sample of transcripts and scaled, so the comparison
costs minutes, not an hour.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.report import emit, machine_meta, make_row


def naive_seconds_per_transcript(model, tok, cfg, samples: int = 4) -> float:
    """One steered distraction + one answer, one prompt at a time, HF generate."""
    import random

    from esr_train.banks import load_prompts, load_subjects
    from esr_train.concepts import saved_concept_directions
    from esr_train.generation import generate
    from esr_train.steering import steer

    rng = random.Random(0)
    prompts = [p["prompt"] for p in rng.sample(load_prompts("train"), samples)]
    subjects = [s["subject"] for s in rng.sample(load_subjects("train"), samples)]
    with tempfile.TemporaryDirectory(prefix="esr-generate-bench-") as tmp:  # untimed here (esr generate counts its own)
        dirs = saved_concept_directions(model, tok, subjects, cfg.layer, Path(tmp))  # (cross-run cache)
    t0 = time.perf_counter()
    for p, d in zip(prompts, dirs):
        with steer(model, d, cfg.strength):
            generate(model, tok, [p], do_sample=True, temperature=cfg.temperature, max_new_tokens=cfg.distraction_tokens,
                     repetition_penalty=1.1, seed=0, batch_size=1, engine="hf")
        generate(model, tok, [p], max_new_tokens=cfg.answer_tokens, repetition_penalty=cfg.answer_repetition_penalty,
                 batch_size=1, engine="hf")
    return (time.perf_counter() - t0) / samples


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per step (recipes/smollm2-135m.yaml's)")
    parser.add_argument("--naive", type=int, default=4, help="transcripts timed one prompt at a time (a rate)")
    parser.add_argument("--answer-tokens", type=int, default=None, help="answer length (default: esr generate's)")
    parser.add_argument("--out", help="keep the dataset here to read its rows (default: a temporary dir, removed)")
    parser.add_argument("--json", help="write the rows here")
    return parser.parse_args(argv)


def measure(argv=None) -> list[dict]:
    """The rows (nothing printed)."""
    args = parse(argv)

    from data_gen.backends.self_backend import SelfBackend, SelfConfig
    from data_gen.builder import GenerateConfig, build_dataset
    from esr_train.zoo import load_model

    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"--out {args.out}: not empty (a resumed dataset would not time generation)")
    cfg = GenerateConfig(n=args.n, mix=0.5, test_size=0.1, layer=15, seed=0, batch_size=args.batch_size,
                         **({"answer_tokens": args.answer_tokens} if args.answer_tokens else {}))
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="esr-bench-"))
    try:
        backend = SelfBackend(model, tok, cfg.model, SelfConfig(
            layer=cfg.layer, strength=cfg.strength, schedule=cfg.schedule, distraction_tokens=cfg.distraction_tokens,
            answer_tokens=cfg.answer_tokens, answer_repetition_penalty=cfg.answer_repetition_penalty,
            temperature=cfg.temperature, batch_size=cfg.batch_size), work / ".work")
        t0 = time.perf_counter()
        summary = build_dataset(cfg, work, backend_impl=backend)
        ours = time.perf_counter() - t0
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    naive = naive_seconds_per_transcript(model, tok, cfg, samples=args.naive)
    per_min = summary["total"] / ours * 60
    naive_per_min = 60 / naive
    meta = machine_meta(str(model.dtype))
    stages = ", ".join(f"{k} {v}s" for k, v in summary.get("stage_s", {}).items())
    what = (f"{summary['total']} rows ({summary['rejected']} rejected), batch {cfg.batch_size}, "
            f"answers <= {cfg.answer_tokens} tokens; {stages}")
    return [
        make_row("generate_rows_per_min", round(per_min, 2), "rows/min", meta=meta, baseline=round(naive_per_min, 2),
                 note=f"esr generate --backend self; {what}; baseline: naive HF generate, one prompt at a time "
                      f"(steered distraction + answer, {args.naive} sampled)"),
        make_row("generate_total_s", round(ours, 1), "s", meta=meta, note=what),
    ]


def main(argv=None) -> list[dict]:
    return emit(measure(argv), parse(argv).json)


if __name__ == "__main__":
    main()
