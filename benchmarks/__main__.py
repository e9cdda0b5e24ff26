"""All benchmarks in one run, one table: ``python -m benchmarks [--json out.json] [--quick]``.

Columns: measure, value, unit, baseline, ratio (value / baseline), ceiling, share of the
ceiling, note; then the machine (CPU, ISA capability, dtype). ``--json PATH`` writes the
same rows as a JSON list of objects (keys in ``benchmarks.report.ROW_KEYS``; ratios and
shares as fractions). Baselines and ceilings are measured in the same run (the machine is
noisy; ratios travel, absolute numbers do not), except the pipeline's 600 s target.

Full run: steered generation (the 98 test prompts x 4 concepts, 392 trials, at batch 256, <= 256 new tokens), LoRA training (6 steps, the rate over steps 2-6),
on-policy data generation (48 rows) and ``esr pipeline recipes/quick.yaml`` (about 10
minutes; skip it with ``--no-pipeline``). ``--quick``: 16 prompts at batch 8, <= 48
tokens, naive baselines on 2 prompts / 2 transcripts, 3 train steps, 8 rows with answers
of <= 96 tokens, no pipeline unless ``--pipeline`` (meant for under 3 minutes; the README
gives the time measured).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import generate_bench, pipeline_bench, steer_bench, train_bench
from benchmarks.report import emit


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here (a JSON list of row objects)")
    parser.add_argument("--quick", action="store_true", help="a reduced run (no pipeline)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--pipeline", action="store_true", help="time the quick pipeline even with --quick")
    which.add_argument("--no-pipeline", action="store_true", help="skip the quick pipeline (about 10 minutes)")
    args = parser.parse_args(argv)
    with_pipeline = not args.no_pipeline and (args.pipeline or not args.quick)
    rows = []
    started = time.perf_counter()

    def took(name: str) -> None:  # where the wall time of a run goes (stderr: the table stays clean)
        nonlocal started
        print(f"benchmarks: {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        started = time.perf_counter()

    # quick: batch 8 < 16 prompts, so refill still has freed slots to fill; tok/s is a rate, so
    # the naive baseline on 2 prompts is the same measure as on 4, only noisier
    rows += steer_bench.measure(["--n", "16", "--grid", "2", "--tokens", "48", "--batch-size", "8", "--naive", "2"] if args.quick
                                else [])  # steer_bench's defaults: 392 trials at the SmolLM2 recipe's eval batch of 256
    took("steer_bench")
    rows += train_bench.measure(["--steps", "3" if args.quick else "6"])
    took("train_bench")
    rows += generate_bench.measure(["--n", "8", "--naive", "2", "--answer-tokens", "96"] if args.quick else ["--n", "48"])
    took("generate_bench")
    if with_pipeline:
        try:
            rows += pipeline_bench.measure([])
        except BaseException:
            emit(rows, args.json)  # keep what was measured, then fail
            raise
    return emit(rows, args.json)


if __name__ == "__main__":
    main()
