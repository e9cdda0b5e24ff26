"""Steered generation throughput for smollm2-135m, in one run: batched per-row steering
(the eval harness's path) against naive one-prompt-at-a-time steered ``generate``, the
steering overhead (the same batches unsteered), and the compute ceiling.

    python -m benchmarks.steer_bench [--n 48] [--tokens 64] [--json out.json]

Tokens are generated tokens up to each row's end (padding after EOS is not counted). The
ceiling is the measured matmul FLOP/s of the dtype divided by the forward FLOPs per token
(about 2 x the parameter count, 0.27 GFLOP); decode at small batch is bound by memory and
Python overhead, so a share of that ceiling is the honest measure of headroom.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.report import emit, machine_meta

GFLOP_PER_TOKEN = 0.27


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _generated_tokens(tok, texts: list[str]) -> int:
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="prompts in the batched runs")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive", type=int, default=4, help="prompts timed one at a time")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from data_gen.banks import load_prompts, load_subjects
    from esr_train.concepts import concept_directions
    from esr_train.dtype import matmul_gflops
    from esr_train.generation import generate
    from esr_train.steering import steer
    from esr_train.zoo import load_model

    model, tok = load_model("smollm2-135m")
    prompts = [p["prompt"] for p in load_prompts("test")][: args.n]
    dirs = concept_directions(model, tok, [s["subject"] for s in load_subjects("test")][:4], 15)
    rows_dirs = [dirs[i % len(dirs)] for i in range(len(prompts))]
    gen = dict(max_new_tokens=args.tokens, do_sample=True, temperature=0.6, repetition_penalty=1.1, seed=0,
               batch_size=args.batch_size)
    generate(model, tok, prompts[:2], max_new_tokens=4)  # warm-up
    steered, t_steered = _timed(lambda: generate(model, tok, prompts, row_steering=rows_dirs, strength=0.3, **gen))
    plain, t_plain = _timed(lambda: generate(model, tok, prompts, **gen))
    naive_texts, t_naive = [], 0.0
    for p, d in zip(prompts[: args.naive], rows_dirs):
        with steer(model, d, 0.3):
            out, took = _timed(lambda: generate(model, tok, [p], **gen))
        naive_texts += out
        t_naive += took
    rate = _generated_tokens(tok, steered) / t_steered
    plain_rate = _generated_tokens(tok, plain) / t_plain
    naive_rate = _generated_tokens(tok, naive_texts) / t_naive
    dtype = next(model.parameters()).dtype
    ceiling = matmul_gflops(dtype, n=1024) / GFLOP_PER_TOKEN
    rows = [
        {"measure": "steered_generate_tok_per_s", "value": round(rate, 1), "unit": "tok/s", "batch": args.batch_size,
         "ceiling": round(ceiling, 1), "share_of_ceiling": round(rate / ceiling, 3)},
        {"measure": "steered_vs_naive", "value": round(rate / naive_rate, 2), "unit": "x",
         "naive_tok_per_s": round(naive_rate, 1)},
        {"measure": "steering_overhead", "value": round(plain_rate / rate - 1, 3), "unit": "fraction",
         "unsteered_tok_per_s": round(plain_rate, 1)},
    ]
    return emit(machine_meta(str(dtype).replace("torch.", "")), rows, args.json)


if __name__ == "__main__":
    main()
