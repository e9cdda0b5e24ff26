"""Shared fixtures: tiny random-init Llama and Gemma 3 models built from configs (no
weights downloaded, milliseconds to build) for mechanics tests, and the real bundled
models (loaded once per session from the esr cache) for behaviour tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

def built_kernel(load, fallback: str):
    """One of esr-train's compiled CPU kernels (``load`` is its ``load_kernel``): skipped where
    no C++ compiler is installed (the code keeps ``fallback``), and required to build where one is."""
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip(f"no C++ compiler: {fallback}")
    built = load()
    assert built is not None, "a compiler is here, so the kernel must build"
    return built


SHARED = Path(os.environ.get("ESR_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def tiny_llama(**config):
    """``config`` overrides the defaults (e.g. ``vocab_size`` to match a tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2), **config})
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=8, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(params=["llama", "gemma3"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gemma3()


@pytest.fixture(scope="session")
def smollm():
    from esr_train.zoo import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def gemma():
    from esr_train.zoo import load_model

    return load_model("gemma3-270m", dtype="float32")
