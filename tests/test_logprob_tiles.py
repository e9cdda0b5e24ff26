"""The compiled CPU folds of TRL's chunked log-prob head against TRL's own torch folds: the
same log-probabilities, entropies, top-1 flags and gradients, and a training step that goes
through them."""

from __future__ import annotations

import importlib

import pytest
import torch

from esr_train.speed import logprob_tiles as lt
from tests.conftest import built_kernel

trl_tiles = importlib.import_module(lt.TRL_MODULE)
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # the order TRL returns them


@pytest.fixture(scope="module")
def kernel():
    return built_kernel(lt.load_kernel, "TRL's torch folds stay")


def _head(n, vocab, dtype, seed, chunk, outputs=OUTPUTS, autocast=None, scale=1.0, temperature=1.0):
    """TRL's ChunkedLogProbFunction forward and backward on random data: outputs and the
    hidden states' gradient. Every other row's label is its top token, so the top-1 flags are
    not all false; rows 0 and 1 share their logits, and their top column has a copy as the
    last vocabulary entry: row 0's label is the first of the tie (top-1), row 1's the copy (not)."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(seed)
    # multiples of 1/4 and 1/8: every logit is exact in bf16 and float32 whatever the tiling, so ties are ties
    hidden = torch.randint(-4, 5, (n, 64), generator=g) / 4
    hidden[1] = hidden[0]
    weight = torch.randint(-2, 3, (vocab, 64), generator=g) / 8
    top = (hidden.to(dtype).float() @ weight.to(dtype).float().T).argmax(-1)
    weight[vocab - 1] = weight[top[0]]
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::2] = top[::2]
    targets[1] = vocab - 1
    hidden, weight = hidden.to(dtype).requires_grad_(True), weight.to(dtype)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = ChunkedLogProbFunction.apply(hidden, weight, None, targets, temperature, chunk, None, scale, outputs)
    lp, ent = out[0], out[1]
    (lp.sum() * 0.7 + (ent.sum() * 0.3 if ent is not None else 0)).backward()
    return out, hidden.grad


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("n,vocab,chunk", [(37, 1000, 256), (5, 4099, 4096), (64, 333, 1000)])
def test_compiled_folds_give_trl_s_outputs_and_gradients(kernel, monkeypatch, dtype, autocast, n, vocab, chunk):
    expected, expected_grad = _head(n, vocab, dtype, seed=n, chunk=chunk, autocast=autocast)
    _refuse_torch_folds(monkeypatch)
    with lt.compiled_logprob_tiles() as on:
        assert on
        got, got_grad = _head(n, vocab, dtype, seed=n, chunk=chunk, autocast=autocast)
    for name, e, o in zip(OUTPUTS, expected, got):
        if name == "is_top1":
            assert torch.equal(e, o), name
            assert e[0] and not e[1] and e.sum() >= n // 3, "the flags this data is built to give"
        else:
            torch.testing.assert_close(o, e, rtol=2e-5, atol=2e-5, msg=name)
    # the gradient goes through a bf16 tile under autocast: a float32 difference of an ulp can
    # round one element the other way, so the tolerance is bf16's there
    tol = 2e-5 if autocast is None else 1e-2
    torch.testing.assert_close(got_grad.float(), expected_grad.float(), rtol=tol, atol=tol)
    assert getattr(trl_tiles._forward_tile, "refuses", False), "the folds that were there are put back after the block"


def _refuse(*args, **kwargs):
    raise AssertionError("TRL's torch fold ran where the compiled one should have")


def _refuse_torch_folds(monkeypatch):
    """TRL's folds replaced by ones that fail (with TRL's signatures, which the patch checks),
    so a test proves the compiled folds did the work."""
    import functools

    for name in ("_forward_tile", "_backward_tile"):
        refusing = functools.wraps(getattr(trl_tiles, name))(lambda *a, **k: _refuse(*a, **k))
        refusing.refuses = True
        monkeypatch.setattr(trl_tiles, name, refusing)


def test_a_trl_fold_with_another_signature_is_left_alone(kernel, monkeypatch, caplog):
    """A TRL release whose fold takes other parameters keeps its own fold, and one warning says so."""
    def renamed(tile, stride, targets, *rest):
        return None

    monkeypatch.setattr(trl_tiles, "_forward_tile", renamed)
    with caplog.at_level("WARNING"), lt.compiled_logprob_tiles() as on:
        assert not on and trl_tiles._forward_tile is renamed
    assert "_forward_tile takes (tile, stride, targets, rest)" in caplog.text


def test_scale_temperature_and_partial_outputs(kernel, monkeypatch):
    kwargs = dict(outputs=("log_probs",), scale=0.5, temperature=0.7)
    expected, expected_grad = _head(16, 700, torch.float32, seed=3, chunk=300, **kwargs)
    _refuse_torch_folds(monkeypatch)
    with lt.compiled_logprob_tiles():
        got, got_grad = _head(16, 700, torch.float32, seed=3, chunk=300, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=2e-5, atol=2e-5)
    assert got[1] is None and expected[1] is None
    torch.testing.assert_close(got_grad, expected_grad, rtol=2e-5, atol=2e-5)


def test_tiles_it_does_not_take_go_to_trl(kernel):
    """A softcapped head and a float16 tile take TRL's torch fold, with TRL's results."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g)
    targets = torch.randint(0, 100, (8,), generator=g)
    plain = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, 30.0, 1.0, OUTPUTS)
    with lt.compiled_logprob_tiles():
        capped = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, 30.0, 1.0, OUTPUTS)
        half = lt._takes(torch.zeros(2, 4, dtype=torch.float16), 4, torch.zeros(2, dtype=torch.long), False)
    assert torch.equal(plain[0], capped[0])
    assert not half


def test_the_switch_is_off_by_environment(monkeypatch):
    monkeypatch.setenv("ESR_SPEED", "-logprob_tiles")
    lt.load_kernel.cache_clear()
    try:
        before = trl_tiles._forward_tile
        with lt.compiled_logprob_tiles() as on:
            assert not on and trl_tiles._forward_tile is before
    finally:
        lt.load_kernel.cache_clear()


@pytest.mark.parametrize("bf16", [True, False])
def test_training_through_the_compiled_head(kernel, monkeypatch, tmp_path, bf16):
    """TRL's trainer on a tiny Llama (bf16 under autocast, or float32): three LoRA steps
    through the compiled folds land where TRL's own folds do, to rounding."""
    from tests.test_adapter_casts import lora_trainer, lora_weights

    dtype = torch.bfloat16 if bf16 else torch.float32
    plain = lora_trainer(tmp_path / "plain", bf16, dtype)
    plain.train()
    compiled = lora_trainer(tmp_path / "compiled", bf16, dtype)
    _refuse_torch_folds(monkeypatch)
    with lt.compiled_logprob_tiles():
        compiled.train()
    expected, got = lora_weights(plain), lora_weights(compiled)
    assert expected.keys() == got.keys() and len(got) > 0
    moved = 0
    for name, w in expected.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-3 if bf16 else 1e-5, msg=name)
        moved += "lora_B" in name and bool(w.abs().max() > 1e-3)
    assert moved, "the adapters trained"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_logit_gives_trl_s_outputs(kernel, monkeypatch, bad):
    """One NaN (or +inf) column of the head: TRL's folds give NaN log-probabilities and
    gradients for every token, and no top-1 flag; the compiled folds must not hide it behind
    finite numbers. Every other row's label is its top finite logit, where a fold that skipped
    the bad column would say top-1."""
    from trl.kernels import ChunkedLogProbFunction

    def run():
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(9, 32, generator=g).requires_grad_(True)
        weight = torch.randn(300, 32, generator=g)
        targets = (hidden.detach() @ weight.T).argmax(-1)
        targets[1::2] = torch.randint(0, 300, (4,), generator=g)
        weight[17] = bad
        out = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, OUTPUTS)
        out[0].sum().backward()
        return out, hidden.grad

    expected, expected_grad = run()
    _refuse_torch_folds(monkeypatch)
    with lt.compiled_logprob_tiles():
        got, got_grad = run()
    assert torch.isnan(got[0]).all() and torch.isnan(got_grad).all()
    assert torch.isnan(expected[0]).all() and torch.isnan(expected_grad).all()
    assert torch.equal(got[-1], expected[-1]) and not got[-1].any()  # is_top1
    for name, e, o in zip(OUTPUTS[:-1], expected[:-1], got[:-1]):
        assert torch.equal(torch.isnan(o), torch.isnan(e)), name
