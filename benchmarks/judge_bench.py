"""Times the offline judge on the labelled validation set's responses, against what the
same machine needs to embed each response once with the judge's MiniLM model (a floor
on any judge that reads the whole response with it, measured in the same run).

Rows: ``judge_responses_per_s`` (ceiling: the embed-once rate; target 100 responses/s)
and ``judge_embed_once_per_s``.

    python -m benchmarks.judge_bench [--n 600] [--json out.json]

The judge's one-off start (loading MiniLM, fitting its restart classifier) is timed
apart and left out of the rate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.report import emit, machine_meta, make_row

JUDGE_SET = Path(__file__).resolve().parents[1] / "eval" / "judge_set"


def measure(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="responses judged (the set, repeated)")
    parser.add_argument("--batch-size", type=int, default=64, help="responses per judge call")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from esr_train.embeddings import embed
    from eval.judging import JudgeItem
    from eval.labelled import read_labelled
    from eval.offline_judge import OfflineJudge

    rows = read_labelled([JUDGE_SET])
    items = [JudgeItem(r["prompt"], r["response"], r.get("concept", "")) for r in rows]
    items = (items * (args.n // len(items) + 1))[: args.n]

    t0 = time.perf_counter()
    judge = OfflineJudge()
    judge.judge(items[:2])
    start_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(0, len(items), args.batch_size):
        embed([it.response for it in items[i:i + args.batch_size]])
    embed_rate = len(items) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    n_multi = 0
    for i in range(0, len(items), args.batch_size):
        n_multi += sum(len(r.attempts) >= 2 for r in judge.judge(items[i:i + args.batch_size]))
    judge_rate = len(items) / (time.perf_counter() - t0)

    meta = machine_meta("float32")
    note = (f"{len(items)} responses of the labelled set, batch {args.batch_size}; one-off start "
            f"{start_s:.1f} s not counted; {n_multi} judged multi-attempt; target 100/s")
    out = [
        make_row("judge_responses_per_s", round(judge_rate, 1), "responses/s", meta=meta,
                 ceiling=round(embed_rate, 1), note=note),
        make_row("judge_embed_once_per_s", round(embed_rate, 1), "responses/s", meta=meta,
                 note="MiniLM over each response once, the same batches"),
    ]
    return emit(out, args.json)


if __name__ == "__main__":
    measure()
