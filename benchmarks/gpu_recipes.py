"""Peak GPU memory and training speed of a shipped GPU recipe, measured on a model of the
recipe's hub architecture with fewer layers (random init from the published config; no
weights downloaded), so a user can see before downloading 16 GB whether it fits.

    python -m benchmarks.gpu_recipes recipes/gemma-2-9b-it-qlora.yaml --layers 2 --json a.json
    python -m benchmarks.gpu_recipes recipes/gemma-2-9b-it-qlora.yaml --layers 4 --json b.json
    python -m benchmarks.gpu_recipes --fit a.json b.json      # memory = a + b x layers, at full depth

For a recipe meant for DeepSpeed, launch it the way the README launches training, e.g.
``accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 1 -m benchmarks.gpu_recipes ...``.
Everything else comes from the recipe's ``model`` and ``train`` sections (LoRA rank, 4-bit,
optimizer, micro-batch, activation checkpointing); the rows are bundled training prompts
answered with template text of about ``--row_tokens`` tokens, the study's length. The tokenizer is the bundled SmolLM2 one (its ids
fit every vocabulary here; the embedding keeps the hub model's size).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

# published configs (config.json on the hub), depth aside
ARCHITECTURES = {
    "meta-llama/Llama-3.1-8B-Instruct": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    "google/gemma-2-9b-it": ("Gemma2Config", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, sliding_window=4096, query_pre_attn_scalar=256,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=8192)),
    "google/gemma-2-2b-it": ("Gemma2Config", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=4096, query_pre_attn_scalar=256,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=8192)),
}


def _build_model(name: str, layers: int, root: Path) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from esr_train.zoo import load_tokenizer

    if name not in ARCHITECTURES:
        raise SystemExit(f"gpu_recipes: no architecture on file for {name!r}; known: {', '.join(ARCHITECTURES)}")
    cls, values = ARCHITECTURES[name]
    tok = load_tokenizer("smollm2-135m")
    config = getattr(transformers, cls)(**{**values, "num_hidden_layers": layers, "pad_token_id": tok.pad_token_id,
                                           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def measure(recipe_path: str, layers: int, steps: int, row_tokens: int) -> dict:
    import torch

    from benchmarks.train_bench import template_dataset
    from esr_train.config import load_recipe
    from esr_train.training.trainer import train

    recipe = load_recipe(recipe_path)
    name = recipe["model"]["name"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = _build_model(name, layers, root)
        recipe["model"]["name"] = str(model_dir)
        train_section = {k: v for k, v in recipe["train"].items() if k not in ("num_train_epochs", "eval_split")}
        train_section.update(max_steps=steps, logging_steps=1, save_steps=10 * steps, eval_split=None,
                             report_to="none")
        recipe["train"] = train_section
        batch = train_section.get("per_device_train_batch_size", 8) * train_section.get("gradient_accumulation_steps", 1)
        sentence = "Work through the next part slowly, check it, and note what changed. "  # ~14 tokens
        data = template_dataset(root, n=batch * steps, answer=(sentence * max(1, row_tokens // 14)).strip(),
                                distraction="Volcanoes form where magma rises through the crust. " * 4)
        torch.cuda.reset_peak_memory_stats()
        summary = train(recipe, root / "adapter", dataset_dir=data)
        peak = torch.cuda.max_memory_allocated() / 2**30
    return {"recipe": recipe_path, "model": name, "layers": layers, "full_layers": ARCHITECTURES[name][1]["num_hidden_layers"],
            "quantization": recipe["model"].get("quantization"), "steps": summary["steps"],
            "tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"],
            "step_s": round(summary["train_runtime_s"] / max(summary["steps"], 1), 2),
            "peak_gib": round(peak, 2), "device": torch.cuda.get_device_name()}


def fit(paths: list[str]) -> dict:
    """Peak memory is a + b x layers (embeddings and optimizer state of the head in a, one
    decoder layer's weights, LoRA state and checkpointed activations in b)."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["layers"])
    lo, hi = runs[0], runs[-1]
    if lo["layers"] == hi["layers"]:
        raise SystemExit("gpu_recipes --fit: give two runs at different depths")
    per_layer = (hi["peak_gib"] - lo["peak_gib"]) / (hi["layers"] - lo["layers"])
    full = lo["peak_gib"] + per_layer * (lo["full_layers"] - lo["layers"])
    return {"model": lo["model"], "per_layer_gib": round(per_layer, 3), "full_layers": lo["full_layers"],
            "full_depth_peak_gib": round(full, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--row_tokens", type=int, default=640, help="tokens per training row (the study: ~128 + 512)")
    parser.add_argument("--json")
    parser.add_argument("--fit", nargs="+", metavar="JSON", help="fit memory against depth from earlier runs")
    args = parser.parse_args(argv)
    result = fit(args.fit) if args.fit else measure(args.recipe, args.layers, args.steps, args.row_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
