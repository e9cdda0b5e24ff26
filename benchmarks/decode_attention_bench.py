"""Where a decode step of the eval's batch goes: attention over the key/value cache against
the step's linear layers, at SmolLM2-135M's shapes (9 query heads on 3 key/value heads of 64,
30 layers, 211 linears), timed alone on this machine (docs/performance.md P16).

    python -m benchmarks.decode_attention_bench [--batch 128] [--widths 100 200 300]

Attention is timed as transformers runs it in a decode step (one query per row, grouped
heads packed as 3 queries per key/value head, a padding mask) with SDPA and as two batched
matmuls; the linears cycle through 211 distinct weights, so none stays in cache. Printed:
milliseconds per step for each, the attention's GFLOP/s, and the matmul rate of a square
1024 product (the benchmarks' ceiling) in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, LAYERS, HIDDEN, MLP, VOCAB = 9, 3, 64, 30, 576, 1536, 49152


def best_of(fn, reps: int, tries: int = 3) -> float:
    """Seconds per call, the best of ``tries`` timings of ``reps`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return min(times)


def attention_ms(batch: int, width: int) -> tuple[float, float, float]:
    """(SDPA ms, two-matmul ms, GFLOP/s of the faster) for one layer's decode attention."""
    rep = HEADS // KV_HEADS
    q = torch.randn(batch, KV_HEADS, rep, HEAD_DIM)
    k, v = torch.randn(batch, KV_HEADS, width, HEAD_DIM), torch.randn(batch, KV_HEADS, width, HEAD_DIM)
    mask = torch.ones(batch, 1, 1, width, dtype=torch.bool)
    mask[: batch // 2, ..., : width // 4] = False  # half the rows joined later (left padding)

    def two_matmuls():
        scores = torch.matmul(q, k.transpose(-1, -2)) * HEAD_DIM ** -0.5
        return torch.matmul(torch.softmax(scores.masked_fill(~mask, float("-inf")), -1), v)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.testing.assert_close(two_matmuls(), sdpa(), atol=1e-4, rtol=1e-4)
    t_sdpa, t_mm = best_of(sdpa, 20), best_of(two_matmuls, 20)
    flops = 4 * batch * HEADS * width * HEAD_DIM
    return t_sdpa * 1e3, t_mm * 1e3, flops / min(t_sdpa, t_mm) / 1e9


def linears_ms(batch: int) -> tuple[float, float]:
    """(ms, GFLOP/s) of one decode step's linear layers, weights cycling."""
    per_layer = [(HIDDEN, HIDDEN), (KV_HEADS * HEAD_DIM, HIDDEN), (KV_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HIDDEN),
                 (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]
    shapes = per_layer * LAYERS + [(VOCAB, HIDDEN)]
    weights = [torch.randn(n, k) for n, k in shapes]
    inputs = {HIDDEN: torch.randn(batch, HIDDEN), MLP: torch.randn(batch, MLP)}
    t = best_of(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], 3)
    return t * 1e3, sum(2 * batch * n * k for n, k in shapes) / t / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="rows per step (recipes/smollm2-135m.yaml's eval)")
    parser.add_argument("--widths", type=int, nargs="+", default=[100, 200, 300], help="cache columns")
    args = parser.parse_args(argv)
    square = torch.randn(1024, 1024)
    ceiling = 2 * 1024 ** 3 / best_of(lambda: square @ square, 20) / 1e9
    lin_ms, lin_rate = linears_ms(args.batch)
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, fp32; square 1024 matmul {ceiling:.0f} GFLOP/s")
    print(f"linears of one step: {lin_ms:.0f} ms ({lin_rate:.0f} GFLOP/s, {lin_rate / ceiling:.2f} of the square)")
    for width in args.widths:
        sdpa, mm, rate = attention_ms(args.batch, width)
        step = LAYERS * min(sdpa, mm)
        print(f"cache width {width}: attention {sdpa:.2f} ms (SDPA) / {mm:.2f} ms (matmuls) a layer, "
              f"{step:.0f} ms a step = {step / (step + lin_ms):.0%} of attention + linears; {rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
