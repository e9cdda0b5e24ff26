"""The compiled RMSNorm and rotary embedding against transformers' Llama and Gemma 3 code: the norm
to float32 rounding (bfloat16 roundings at most one unit apart, NaN kept), the rotary embedding bit for
bit, and transformers' code switched only inside ``compiled_elementwise`` and only in inference."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import transformers.models.gemma3.modeling_gemma3 as gemma3_code
import transformers.models.llama.modeling_llama as llama_code

from esr_train.speed import elementwise
from esr_train.speed.elementwise import compiled_elementwise
from tests.conftest import built_kernel, tiny_gemma3, tiny_llama

MODULES = {"llama": (LlamaRMSNorm, False, 1.0), "gemma3": (Gemma3RMSNorm, True, 0.0)}  # class, gemma, weight mean


@pytest.fixture(scope="module")
def kernel():
    return built_kernel(elementwise.load_kernel, "transformers' code stays")


def _norm(kind: str, width: int, dtype: torch.dtype, seed: int):
    cls, gemma, centre = MODULES[kind]
    g = torch.Generator().manual_seed(seed)
    module = cls(width, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(centre + 0.3 * torch.randn(width, generator=g))
    x = (3 * torch.randn(7, 3, width, generator=g)).to(dtype)
    return module.to(dtype), x, gemma


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("width", [576, 64, 60, 5])  # 60 and 5: the scalar tail after 8-lane blocks
def test_float32_is_the_module_to_rounding(kernel, kind, width):
    module, x, gemma = _norm(kind, width, torch.float32, seed=width)
    with torch.inference_mode():
        expected = module(x)
        got = kernel.rms_norm(x, module.weight, 1e-5, gemma)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("width", [576, 60])
def test_bfloat16_roundings_match_but_for_rare_one_unit_moves(kernel, kind, width):
    module, x, gemma = _norm(kind, width, torch.bfloat16, seed=width + 1)
    with torch.inference_mode():
        expected = module(x).float()
        got = kernel.rms_norm(x, module.weight, 1e-5, gemma).float()
    assert (got == expected).float().mean() >= 0.99
    one_unit = expected.abs() * 2.0 ** -7  # bf16 keeps 8 significant bits
    assert bool(((got - expected).abs() <= one_unit + 1e-30).all())


def test_a_nan_row_stays_nan_and_leaves_the_others_alone(kernel):
    module, x, gemma = _norm("llama", 64, torch.float32, seed=3)
    x[2, 1, 7] = float("nan")
    with torch.inference_mode():
        got = kernel.rms_norm(x, module.weight, 1e-5, gemma)
        expected = module(x)
    assert bool(got[2, 1].isnan().all())
    keep = torch.ones(7, 3, dtype=torch.bool)
    keep[2, 1] = False
    torch.testing.assert_close(got[keep], expected[keep], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_switched_only_inside_the_block_and_only_without_grad(kernel, build):
    model = build()
    norms = [m for m in model.modules() if type(m).__name__ in elementwise.NORMS]
    assert norms and all("forward" not in vars(m) for m in norms)
    x = torch.randn(2, 4, model.config.hidden_size)
    norms.sort(key=lambda m: m.weight.shape[0] != x.shape[-1])  # one of hidden-size width first (Gemma's q/k norms are not)
    calls = []
    real = kernel.rms_norm

    class Counting:
        def rms_norm(self, *args):
            calls.append(1)
            return real(*args)

    original = elementwise.load_kernel
    elementwise.load_kernel = lambda cache_root=None: Counting()
    try:
        with compiled_elementwise(model):
            assert all("forward" in vars(m) for m in norms)
            out = norms[0](x)  # grad enabled: the module's own forward, bit for bit
            assert not calls and torch.equal(out, type(norms[0]).forward(norms[0], x))
            with torch.inference_mode():
                norms[0](x)
            assert calls == [1]
    finally:
        elementwise.load_kernel = original
    assert all("forward" not in vars(m) for m in norms)


def _rotary(batch, heads, length, dim, dtype, seed):
    """q or k as the attention layer holds it (a transposed view of the projection), and the cos/sin
    of ``LlamaRotaryEmbedding`` at random positions, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, dim, generator=g).to(dtype).transpose(1, 2)
    pos = torch.randint(0, 2000, (batch, length), generator=g).float()
    freqs = pos[..., None] / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    emb = torch.cat([freqs, freqs], -1)
    return x, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 9, 1, 64), (3, 4, 7, 64), (2, 2, 3, 10), (2, 1, 5, 256)])
def test_rotary_embedding_is_transformers_bit_for_bit(kernel, dtype, shape):
    batch, heads, length, dim = shape
    q, cos, sin = _rotary(batch, heads, length, dim, dtype, seed=dim + length)
    k = _rotary(batch, 1, length, dim, dtype, seed=dim + length + 1)[0]
    expected = llama_code.apply_rotary_pos_emb(q, k, cos, sin)
    got = (kernel.rope(q, cos, sin), kernel.rope(k, cos, sin))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    one_row = kernel.rope(q[:1], cos[:1], sin[:1])  # cos/sin of one row broadcast as [1, L, D]
    assert torch.equal(one_row, expected[0][:1])


@pytest.mark.parametrize("build, code", [(tiny_llama, llama_code), (tiny_gemma3, gemma3_code)])
def test_decoding_takes_the_kernels_and_gives_transformers_code_back(kernel, build, code):
    """A float32 greedy decode through ``stream_decode`` runs the compiled norm and rotary embedding
    and gives the same tokens as ``model.generate``; afterwards transformers' function is back."""
    from esr_train.decoding import stream_decode

    model = build()
    plain = code.apply_rotary_pos_emb
    calls = {"rms_norm": 0, "rope": 0}

    class Counting:
        def __getattr__(self, name):
            def counted(*args):
                calls[name] += 1
                return getattr(kernel, name)(*args)
            return counted

    original = elementwise.load_kernel
    elementwise.load_kernel = lambda cache_root=None: Counting()
    try:
        prompts = [[1, 5, 9, 12], [1, 7]]
        got = dict(stream_decode(model, prompts, max_new_tokens=6, batch_size=2, eos_token_id=[], pad_token_id=0))
    finally:
        elementwise.load_kernel = original
    assert calls["rms_norm"] > 0 and calls["rope"] > 0
    assert code.apply_rotary_pos_emb is plain
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert got[i] == expected


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("ESR_SPEED", "-elementwise")
    elementwise.load_kernel.cache_clear()
    try:
        model = tiny_llama()
        with compiled_elementwise(model):
            assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, LlamaRMSNorm))
    finally:
        monkeypatch.delenv("ESR_SPEED")
        elementwise.load_kernel.cache_clear()


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_norm_gradient_is_autograds_through_the_module(kernel, kind, dtype):
    """The compiled forward and backward of a frozen norm against torch's autograd through the module:
    float32 to rounding, bfloat16 one unit at most (and nearly every value equal)."""
    module, x, _ = _norm(kind, 576, dtype, seed=11)
    module.requires_grad_(False)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(12)).to(dtype)
    plain_x = x.clone().requires_grad_(True)
    module(plain_x).backward(grad)
    compiled_x = x.clone().requires_grad_(True)
    with compiled_elementwise(module, with_grad=True) as switched:
        out = module(compiled_x)
        assert switched and out.grad_fn is not None and "RMSNorm" in type(out.grad_fn).__name__
        out.backward(grad)
    expected, got = plain_x.grad.float(), compiled_x.grad.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    else:
        assert (got == expected).float().mean() >= 0.99
        assert bool(((got - expected).abs() <= expected.abs() * 2.0 ** -7 + 1e-6).all())


def test_training_norm_with_a_trainable_weight_is_the_modules_own(kernel):
    module, x, _ = _norm("llama", 64, torch.float32, seed=13)
    x.requires_grad_(True)
    with compiled_elementwise(module, with_grad=True):
        out = module(x)
    assert "RMSNorm" not in type(out.grad_fn).__name__
    assert torch.equal(out, type(module).forward(module, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_rotary_embedding_and_its_gradient_are_autograds_bit_for_bit(kernel, dtype):
    """Inside ``compiled_elementwise(with_grad=True)`` (training), Llama's rotary embedding runs the kernel forward and
    backward; outputs and gradients equal autograd's through transformers' function exactly."""
    model = tiny_llama()
    q0 = _rotary(3, 4, 7, 16, dtype, seed=21)[0].transpose(1, 2).contiguous()  # [B, L, H, D], as projected
    k0, cos, sin = _rotary(3, 2, 7, 16, dtype, seed=22)
    k0 = k0.transpose(1, 2).contiguous()
    g = torch.Generator().manual_seed(23)
    grads = [torch.randn(3, 4, 7, 16, generator=g).to(dtype), torch.randn(3, 2, 7, 16, generator=g).to(dtype)]
    results = []
    for compiled in (False, True):
        q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        with compiled_elementwise(model, with_grad=True) if compiled else contextlib.nullcontext():
            out = llama_code.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            if compiled:
                assert "Rotary" in type(out[0].grad_fn).__name__
        torch.autograd.backward(list(out), grads)
        results.append((out[0].detach(), out[1].detach(), q.grad, k.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))
