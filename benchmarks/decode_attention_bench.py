"""Where a decode step of the eval's batch goes: attention over the key/value cache against
the step's linear layers, at a bundled model's shapes (read from its config; SmolLM2-135M: 9
query heads on 3 key/value heads of 64, 30 layers, 211 linears), in the dtype ``auto`` picks on
this machine, timed alone (results in docs/performance.md).

    python -m benchmarks.decode_attention_bench [--model smollm2-135m] [--batch 128] [--widths 100 200 300]

Attention is timed as transformers runs it in a decode step (one query per row, grouped
heads packed as 3 queries per key/value head, a padding mask) with SDPA, as two batched
matmuls and with the decode loop's kernel (``esr_train.speed.decode_attention``); the linears cycle through 211 distinct weights, so none stays in cache. Printed:
milliseconds per step for each, the attention's GFLOP/s, and the matmul rate of a square
1024 product (``esr_train.dtype.matmul_gflops``, the benchmarks' ceiling) in the same run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shapes:
    """What a decode step's cost depends on, from the model's config."""

    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    hidden: int
    mlp: int
    vocab: int

    @classmethod
    def of(cls, model: str) -> "Shapes":
        from transformers import AutoConfig

        from esr_train.zoo import resolve_model_path

        c = AutoConfig.from_pretrained(resolve_model_path(model))
        c = getattr(c, "text_config", c)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_attention_heads, c.num_key_value_heads, head_dim, c.num_hidden_layers, c.hidden_size,
                   c.intermediate_size, c.vocab_size)


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


def attention_ms(m: Shapes, batch: int, width: int, dtype: torch.dtype) -> tuple[float, float, float | None, float]:
    """(SDPA ms, two-matmul ms, kernel ms or None where it does not build, GFLOP/s of the
    fastest) for one layer's decode attention."""
    from types import SimpleNamespace

    from esr_train.speed.decode_attention import attention_forward, load_kernel

    q = torch.randn(batch, m.kv_heads, m.heads // m.kv_heads, m.head_dim, dtype=dtype)
    k = torch.randn(batch, m.kv_heads, width, m.head_dim, dtype=dtype)
    v = torch.randn(batch, m.kv_heads, width, m.head_dim, dtype=dtype)
    mask = torch.ones(batch, 1, 1, width, dtype=torch.bool)
    mask[: batch // 2, ..., : width // 4] = False  # half the rows joined later (left padding)

    def two_matmuls():
        scores = torch.matmul(q, k.transpose(-1, -2)) * m.head_dim ** -0.5
        return torch.matmul(torch.softmax(scores.masked_fill(~mask, float("-inf")), -1), v)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    module = SimpleNamespace(num_key_value_groups=m.heads // m.kv_heads, is_causal=True)
    query = q.reshape(batch, m.heads, 1, m.head_dim)

    def kernel():  # as a decode step calls it: the model's query heads, output [batch, 1, heads, dim]
        return attention_forward(module, query, k, v, mask, scaling=m.head_dim ** -0.5)[0]

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(two_matmuls(), sdpa(), atol=tol, rtol=tol)
    t_sdpa, t_mm = best_of(sdpa, 20), best_of(two_matmuls, 20)
    t_kernel = None
    if load_kernel() is not None:
        want = sdpa().reshape(batch, m.heads, m.head_dim)
        torch.testing.assert_close(kernel().reshape(batch, m.heads, m.head_dim), want, atol=tol, rtol=tol)
        t_kernel = best_of(kernel, 20)
    flops = 4 * batch * m.heads * width * m.head_dim
    best = min(t for t in (t_sdpa, t_mm, t_kernel) if t is not None)
    return t_sdpa * 1e3, t_mm * 1e3, None if t_kernel is None else t_kernel * 1e3, flops / best / 1e9


def linears_ms(m: Shapes, batch: int, dtype: torch.dtype) -> tuple[float, float]:
    """(ms, GFLOP/s) of one decode step's linear layers (q, k, v, o, gate, up, down per layer,
    then the head), weights cycling."""
    q_out, kv_out = m.heads * m.head_dim, m.kv_heads * m.head_dim
    per_layer = [(q_out, m.hidden), (kv_out, m.hidden), (kv_out, m.hidden), (m.hidden, q_out),
                 (m.mlp, m.hidden), (m.mlp, m.hidden), (m.hidden, m.mlp)]
    shapes = per_layer * m.layers + [(m.vocab, m.hidden)]
    weights = [torch.randn(n, k, dtype=dtype) for n, k in shapes]
    inputs = {k: torch.randn(batch, k, dtype=dtype) for _, k in shapes}
    t = best_of(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], 3)
    return t * 1e3, sum(2 * batch * n * k for n, k in shapes) / t / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a bundled model (its config gives the shapes)")
    parser.add_argument("--batch", type=int, default=128, help="rows per step (the eval runs 256)")
    parser.add_argument("--widths", type=int, nargs="+", default=[100, 200, 300], help="cache columns")
    args = parser.parse_args(argv)

    from benchmarks.report import machine_meta
    from esr_train.dtype import matmul_gflops, resolve_dtype

    dtype, shapes = resolve_dtype("auto"), Shapes.of(args.model)
    meta = machine_meta(str(dtype))
    ceiling = matmul_gflops(dtype, n=1024)
    lin_ms, lin_rate = linears_ms(shapes, args.batch, dtype)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, {meta['cpu']} ({meta['capability']}), "
          f"{meta['dtype']}; square 1024 matmul {ceiling:.0f} GFLOP/s")
    print(f"linears of one step: {lin_ms:.0f} ms ({lin_rate:.0f} GFLOP/s, {lin_rate / ceiling:.2f} of the square)")
    for width in args.widths:
        with torch.inference_mode():  # as the decode loop runs (the kernel is for inference only)
            sdpa, mm, kern, rate = attention_ms(shapes, args.batch, width, dtype)
        step = shapes.layers * (kern if kern is not None else min(sdpa, mm))
        kern_text = f"{kern:.2f} ms (kernel, {sdpa / kern:.2f}x SDPA)" if kern is not None else "no kernel"
        print(f"cache width {width}: attention {sdpa:.2f} ms (SDPA) / {mm:.2f} ms (matmuls) / {kern_text} a layer; "
              f"decoding's {step:.0f} ms a step = {step / (step + lin_ms):.0%} of attention + linears; "
              f"{rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
