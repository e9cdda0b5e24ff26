"""The CPU decode-step attention kernel against transformers' SDPA function, and the switch
that puts a model on it only while ``stream_decode`` runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from esr_train.speed import decode_attention as da
from tests.conftest import built_kernel, tiny_llama


@pytest.fixture(scope="module")
def kernel():
    return built_kernel(da.load_kernel, "decoding keeps SDPA")


def _case(batch, heads, groups, dim, width, dtype, mask: bool):
    """Query, key/value views of a cache with spare columns (as the in-place cache holds
    them), and a left-padding mask."""
    g = torch.Generator().manual_seed(width)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    k = torch.randn(batch, groups, width + 16, dim, generator=g).to(dtype)[:, :, :width]
    v = torch.randn(batch, groups, width + 16, dim, generator=g).to(dtype)[:, :, :width]
    m = None
    if mask:
        pad = torch.randint(0, width // 2 + 1, (batch,), generator=g)
        m = (torch.arange(width)[None, :] >= pad[:, None]).view(batch, 1, 1, width)
    module = SimpleNamespace(num_key_value_groups=heads // groups, is_causal=True)
    return module, q, k, v, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# SmolLM2, Gemma 3, tiny; with AVX-512 the first, third and last two take the register-blocked
# path (R * D / 16 <= 16 floats of 16 lanes) and Gemma's R 4 x D 256 the AVX2 loops
@pytest.mark.parametrize("heads,groups,dim", [(9, 3, 64), (4, 1, 256), (4, 2, 16), (8, 8, 32), (4, 2, 128)])
@pytest.mark.parametrize("width,mask", [(1, False), (37, True), (64, False), (203, True)])
@torch.inference_mode()
def test_kernel_equals_sdpa(kernel, dtype, heads, groups, dim, width, mask):
    module, q, k, v, m = _case(5, heads, groups, dim, width, dtype, mask)
    want = sdpa_attention_forward(module, q, k, v, m, scaling=dim ** -0.5)[0]
    got, weights = da.attention_forward(module, q, k, v, m, scaling=dim ** -0.5)
    assert weights is None and got.shape == want.shape == (5, 1, heads, dim) and got.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_prefill_and_autograd_take_sdpa_itself(kernel):
    """Anything but an inference decode step is SDPA's own result, bit for bit."""
    module, q, k, v, m = _case(3, 4, 2, 16, 20, torch.float32, True)
    with torch.no_grad():
        prefill = torch.randn(3, 4, 5, 16)
        assert torch.equal(da.attention_forward(module, prefill, k, v, None)[0],
                           sdpa_attention_forward(module, prefill, k, v, None)[0])
    q.requires_grad_(True)
    got = da.attention_forward(module, q, k, v, m)[0]
    assert got.requires_grad and torch.equal(got, sdpa_attention_forward(module, q, k, v, m)[0])


def test_stream_decode_switches_the_model_only_while_it_runs(kernel, monkeypatch):
    """Every pass of ``stream_decode`` sees the kernel's implementation; before and after,
    the model is on SDPA; ``ESR_SPEED=-decode_attention`` keeps SDPA throughout."""
    from esr_train.decoding import stream_decode

    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"

    class Seen:
        def __init__(self):
            self.names = set()

        def update(self, prompt_rows, offsets):
            if prompt_rows is not None:  # None: the loop's last call, as it cleans up
                self.names.add(model.config._attn_implementation)

    seen = Seen()
    list(stream_decode(model, [[1, 5, 9], [1, 7]], max_new_tokens=4, batch_size=2, observer=seen))
    assert seen.names == {da.NAME} and model.config._attn_implementation == "sdpa"

    monkeypatch.setenv("ESR_SPEED", "-decode_attention")
    da.load_kernel.cache_clear()
    try:
        seen = Seen()
        list(stream_decode(model, [[1, 5, 9]], max_new_tokens=3, batch_size=1, observer=seen))
        assert seen.names == {"sdpa"}
    finally:
        monkeypatch.delenv("ESR_SPEED")
        da.load_kernel.cache_clear()
