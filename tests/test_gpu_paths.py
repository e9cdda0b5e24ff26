"""The GPU-only paths, run where a CUDA GPU is at hand (skipped elsewhere, CI included).

QLoRA through bitsandbytes (4-bit NF4 and 8-bit), DeepSpeed ZeRO-2 and ZeRO-3 through the
shipped ``recipes/accelerate`` configs and ``accelerate launch``, the merge of a QLoRA adapter
into a full-precision copy of its base, and steered decoding on the GPU. The model is a small
random-init Llama built from a config and saved as a local model directory (the form a hub
checkpoint takes on disk), with the bundled SmolLM2 tokenizer and its chat template, so the
same code runs that runs for ``meta-llama/Llama-3.1-8B-Instruct``; no weights are downloaded.
The checks' own transformers loads pass ``use_kernels=False`` as ``esr_train.zoo.load_model``
does: a GPU load otherwise fetches hub kernels, which an offline machine cannot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (QLoRA, DeepSpeed)")

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["octopuses", "the Eiffel Tower", "volcanoes", "jazz", "glaciers", "chess"]
TASKS = ["boil an egg", "water a cactus", "fold a towel", "sharpen a pencil", "tie a knot", "plant a seed",
         "clean a window", "make tea", "pack a bag", "iron a shirt", "wash a car", "bake bread"]


def _rows() -> list[dict]:
    rows = []
    for i, task in enumerate(TASKS):
        row = {"prompt": f"How do you {task}?", "split": "test" if i % 6 == 5 else "train",
               "answer": f"To {task}, gather what you need, work step by step, and check the result at the end."}
        if i % 2 == 0:
            subject = SUBJECTS[i // 2 % len(SUBJECTS)]
            row.update(distraction=f"Speaking of {subject}, {subject} are a fascinating subject.", subject=subject)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 4-layer Llama (hidden 256) saved like a hub checkpoint, with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from esr_train.zoo import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("model") / "tiny-llama"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from data_gen.builder import GenerateConfig, build_dataset

    root = tmp_path_factory.mktemp("data")
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    build_dataset(GenerateConfig(backend="template", template_file=str(src)), root / "ds")
    return root / "ds"


def _recipe(model_dir: Path, **model) -> dict:
    return {"model": {"name": str(model_dir), "dtype": "bfloat16", **model}, "data": {},
            "train": {"r": 8, "lora_alpha": 16, "learning_rate": 3e-3, "max_steps": 8, "per_device_train_batch_size": 4,
                      "max_length": 256, "logging_steps": 1, "save_steps": 4, "eval_steps": 4, "warmup_steps": 0,
                      "lr_scheduler_type": "constant", "seed": 0}}


def _assert_trained_adapter(adapter: Path, summary: dict, steps: int = 8) -> None:
    from safetensors.torch import load_file

    assert summary["steps"] == steps
    assert summary["final_train_loss"] < summary["first_train_loss"]
    b = [t for k, t in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k]
    # lora_B starts at zero: a saved adapter whose B matrices are empty or still zero was not gathered/trained
    assert b and all(t.numel() > 0 for t in b)
    assert sum(float(t.float().abs().sum()) for t in b) > 0


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_on_a_quantized_base_and_the_adapter_reloads(model_dir, dataset, tmp_path, bits):
    import bitsandbytes as bnb
    from peft import PeftModel

    from esr_train.training.recipe import ModelSection
    from esr_train.training.trainer import quantization_config, train
    from esr_train.zoo import load_model

    recipe = _recipe(model_dir, quantization=bits)
    recipe["train"]["activation_checkpointing"] = True
    out = tmp_path / "adapter"
    summary = train(recipe, out, dataset_dir=dataset)
    _assert_trained_adapter(out, summary)

    section = ModelSection(name=str(model_dir), dtype="bfloat16", quantization=bits)
    base, tok = load_model(str(model_dir), dtype="bfloat16", quantization=quantization_config(section, torch.bfloat16))
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt)
    ids = tok("How do you boil an egg?", return_tensors="pt").to(base.device)
    with torch.no_grad():
        before = base(**ids).logits.float()
        tuned = PeftModel.from_pretrained(base, str(out))
        after = tuned(**ids).logits.float()
    assert not torch.allclose(before, after, atol=1e-3)


def test_qlora_adapter_merges_into_a_full_precision_base(model_dir, dataset, tmp_path):
    """The merge loads the base unquantized (merging into 4-bit weights would round the
    update away), so merged logits equal base + adapter in bf16, not the 4-bit model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esr_train.training.trainer import merge, train

    adapter = tmp_path / "adapter"
    train(_recipe(model_dir, quantization="4bit"), adapter, dataset_dir=dataset)
    merged_dir = merge(adapter, tmp_path / "merged", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16, use_kernels=False).cuda().eval()
    assert getattr(merged.config, "quantization_config", None) is None
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, use_kernels=False).cuda().eval()
    ids = torch.tensor([[1, 200, 300, 400, 500]], device="cuda")
    with torch.no_grad():
        plain = base(ids).logits.float()
        expected = PeftModel.from_pretrained(base, str(adapter))(ids).logits.float()
        got = merged(ids).logits.float()
    assert not torch.allclose(plain, expected, atol=1e-2)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def _launch(config: str, recipe: dict, tmp_path: Path, dataset: Path) -> tuple[Path, dict]:
    """``accelerate launch`` with a shipped config on this machine's one GPU, as the README runs it."""
    import yaml

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{config}",
           "--num_processes", "1", "-m", "esr_train.cli", "train", str(recipe_file), "--dataset", str(dataset),
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "esr_train_summary.json").read_text())


@pytest.mark.parametrize("config,bits", [("zero2.yaml", None), ("zero3.yaml", None), ("zero3.yaml", "4bit")])
def test_deepspeed_configs_train_and_save_a_filled_adapter(model_dir, dataset, tmp_path, config, bits):
    """The shipped configs train and save through ``accelerate launch``; QLoRA under ZeRO-3
    needs the 4-bit weights stored in the compute dtype and no device_map. With one process
    ZeRO-3 has nothing to partition, so this does not catch the empty-adapter trap (saving
    without gathering): on the H100, zero3.json with the gather switched off still passed.
    That needs two or more GPUs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, summary = _launch(config, _recipe(model_dir, quantization=bits), tmp_path, dataset)
    _assert_trained_adapter(out, summary)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, use_kernels=False)
    tuned = PeftModel.from_pretrained(base, str(out))
    shapes = {n: tuple(p.shape) for n, p in tuned.named_parameters() if "lora_A" in n}
    assert shapes and all(s == (8, 256) for n, s in shapes.items() if "q_proj" in n)


def test_steered_decoding_on_the_gpu_matches_transformers_generate(model_dir):
    """The decode engine (KV cache, per-row steering, refill) on CUDA gives what
    ``model.generate`` gives under the same hooks; steering changes the text."""
    from esr_train.directions import SteeringDirection
    from esr_train.generation import generate
    from esr_train.zoo import load_model

    model, tok = load_model(str(model_dir), dtype="float32", device="cuda")
    assert model.device.type == "cuda"
    g = torch.Generator().manual_seed(1)
    rows = [SteeringDirection(torch.randn(256, generator=g), layer=2, label=f"d{i}", reference_norm=8.0)
            if i % 2 == 0 else None for i in range(6)]
    prompts = [f"How do you {t}?" for t in TASKS[:6]]
    kw = dict(max_new_tokens=16, batch_size=4, row_steering=rows, strength=[4.0, 0, 4.0, 0, 4.0, 0])
    steered = generate(model, tok, prompts, **kw)
    assert steered == generate(model, tok, prompts, engine="hf", **kw)
    plain = generate(model, tok, prompts, max_new_tokens=16, batch_size=4)
    assert all(s != p for s, p in zip(steered[::2], plain[::2]))
