"""LoRA layers without PEFT's float32 input cast under bf16 autocast
(esr_train.speed.adapter_casts): the same adapter, bit for bit, from fewer copies."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from esr_train.speed.adapter_casts import adapter_input_casts_off
from tests.conftest import tiny_llama


def word_tokenizer():
    """A 128-word tokenizer for rows of token ids (the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w3"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="w0", bos_token="w1", eos_token="w2")


def lora_trainer(tmp_path, bf16: bool, dtype=torch.bfloat16) -> SFTTrainer:
    """TRL's trainer for three LoRA steps of a tiny Llama (weights in ``dtype``) on fixed rows,
    the first four tokens of each masked from the loss."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 128, (int(n),), generator=g).tolist()} for n in (9, 14, 11, 16, 12, 10)]
    for r in rows:
        r["labels"] = [-100] * 4 + r["input_ids"][4:]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, bf16=bf16, max_length=None, save_strategy="no", logging_strategy="no",
                     dataset_num_proc=None, seed=0, learning_rate=1e-2)
    return SFTTrainer(model=tiny_llama().to(dtype), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=word_tokenizer(),
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def _train(tmp_path, bf16: bool, casts_off: bool):
    """Three LoRA steps of a bf16 tiny Llama on fixed rows; returns the adapter's weights,
    the dtypes one ``lora_A`` saw, and whether the casts were off."""
    trainer = lora_trainer(tmp_path, bf16)
    seen: list[torch.dtype] = []
    probe = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.1.mlp.up_proj.lora_A.default"))
    probe.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    if casts_off:
        with adapter_input_casts_off(trainer) as off:
            trainer.train()
    else:
        trainer.train()
        off = False
    return lora_weights(trainer), set(seen), off


def test_casts_off_under_autocast_give_the_same_adapter(tmp_path):
    with_casts, seen_with, _ = _train(tmp_path / "a", bf16=True, casts_off=False)
    without, seen_without, off = _train(tmp_path / "b", bf16=True, casts_off=True)
    assert off
    assert seen_with == {torch.float32} and seen_without == {torch.bfloat16}  # the cast really went
    assert next(iter(with_casts.values())).dtype == torch.float32  # PEFT's float32 adapter on a bf16 base
    assert with_casts.keys() == without.keys() and len(with_casts) > 0
    for name, w in with_casts.items():
        assert torch.equal(w, without[name]), name
    assert any(not torch.equal(w, torch.zeros_like(w)) for n, w in without.items() if "lora_B" in n)  # it trained


def test_without_autocast_the_casts_stay(tmp_path):
    """A bf16 base trained without bf16 autocast needs PEFT's cast: it is left on."""
    _, seen, off = _train(tmp_path, bf16=False, casts_off=True)
    assert not off and seen == {torch.float32}
