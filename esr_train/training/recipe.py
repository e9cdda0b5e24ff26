"""The recipe's ``model`` and ``train`` sections, split onto the libraries' own classes.

``model``: ``name`` (bundled name, hub id or directory), ``dtype`` (``auto``: bf16 only
where the hardware runs it natively), ``quantization`` (``4bit`` / ``8bit`` / null:
bitsandbytes QLoRA, CUDA only), ``attn_implementation``.

``train``: a flat mapping whose keys are spelled exactly as ``trl.SFTConfig`` and
``peft.LoraConfig`` spell them (``max_length``, ``warmup_steps`` as a ratio below 1,
``r``, ``lora_alpha``, ``target_modules``...), plus the few keys of ``TrainExtras``.
Each key is routed to the class that owns it; an unknown key is an error listing them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from esr_train.config import RecipeError, checked_values

QUANTIZATION = (None, "4bit", "8bit")


@dataclass
class ModelSection:
    name: str = field(default="smollm2-135m", metadata={"help": "bundled name, hub id or local directory"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    quantization: str | None = field(default=None, metadata={"help": "4bit | 8bit (bitsandbytes QLoRA, CUDA only)"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa | flash_attention_2"})

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION:
            raise RecipeError(f"model.quantization must be 4bit, 8bit or null, got {self.quantization!r}")


FALSE_RESTART_CUTS = ("one", "every")
"""Where each normal row's unlikelihood negatives go (``train.false_restart_cuts``)."""

STEER_SPANS = ("all", "until_answer")
"""Which tokens of a self-correction row the training push covers (``train.steer_span``)."""


@dataclass
class TrainExtras:
    """esr-train's own training keys (everything else belongs to SFTConfig / LoraConfig)."""

    dataset: str | None = field(default=None, metadata={"help": "dataset directory written by esr generate"})
    system_prompt: str | None = field(default=None, metadata={"help": "system turn added to every training chat"})
    eval_split: str | None = field(default="test", metadata={"help": "dataset split for eval loss (null: none)"})
    steer_strength: float | None = field(default=None, metadata={
        "help": "steer self-correction rows toward their subject while training (x median residual norm; null: off)"})
    steer_strength_max: float | None = field(default=None, metadata={
        "help": "draw each pushed row's strength from [steer_strength, steer_strength_max] at every step (null: fixed)"})
    steer_layer: int | None = field(default=None, metadata={"help": "layer for training-time steering (default: the model's)"})
    steer_schedule: str = field(default="all", metadata={"help": "all | generated | prompt+first:N, as in esr steer"})
    steer_span: str = field(default="all", metadata={
        "help": "all: push the whole self-correction row; until_answer: push prompt, distraction and restart only"})

    answer_loss_tokens: int | None = field(default=None, metadata={
        "help": "train only the restart and the answer's first N tokens (null: the whole answer)"})
    normal_loss_tokens: int | None = field(default=None, metadata={
        "help": "for normal rows, train the answer's first N tokens (null: as answer_loss_tokens)"})
    normal_skip_tokens: int = field(default=0, metadata={
        "help": "for normal rows, keep the answer's first K tokens out of the loss (the opener that restates the question)"})
    unlikelihood_weight: float = field(default=0.0, metadata={
        "help": "add each normal row cut after an opening sentence and followed by a restart, the restart trained "
                "by unlikelihood at this weight (0: off)"})
    false_restart_sentences: int = field(default=3, metadata={
        "help": "the false restarts follow one of the normal answer's first N sentences"})
    false_restart_cuts: str = field(default="one", metadata={
        "help": "one: each normal row's false restart follows one of those sentences, drawn at random; "
                "every: one false restart after each of them"})
    mined_positives: bool = field(default=False, metadata={
        "help": "pair each mined false restart with a self-correction row restarting with the same phrase"})
    unlikely_tokens: int | None = field(default=None, metadata={
        "help": "make only each false restart's first N tokens unlikely (null: the whole restart phrase)"})
    unlikely_floor: float | None = field(default=None, metadata={
        "help": "null: the unlikelihood loss -log(1 - p); a probability t in (0, 1): the hinge max(0, log p - log t) "
                "instead, whose gradient stays near 1 until p is below t (that of -log(1 - p) is about p)"})
    unpushed_negatives: bool = field(default=False, metadata={
        "help": "add each self-correction row again without the push, its restart made unlikely, so the push "
                "and not the drifted text is the cue to restart (needs steer_strength and unlikelihood_weight)"})

    def __post_init__(self) -> None:
        if self.unpushed_negatives and not (self.unlikelihood_weight and self.steer_strength):
            raise RecipeError("train.unpushed_negatives contrasts pushed and unpushed copies of each drift: it needs "
                              "train.unlikelihood_weight > 0 and train.steer_strength > 0")
        if self.unlikely_tokens is not None and self.unlikely_tokens < 1:
            raise RecipeError(f"train.unlikely_tokens must be >= 1 or null, got {self.unlikely_tokens}")
        if self.unlikely_floor is not None and not 0.0 < self.unlikely_floor < 1.0:
            raise RecipeError(f"train.unlikely_floor must be a probability in (0, 1) or null, got {self.unlikely_floor}")
        if self.unlikelihood_weight < 0 or self.false_restart_sentences < 1:
            raise RecipeError(f"train.unlikelihood_weight must be >= 0 and train.false_restart_sentences >= 1, got "
                              f"{self.unlikelihood_weight} and {self.false_restart_sentences}")
        for name in ("mined_positives", "unlikely_tokens", "unlikely_floor"):
            if getattr(self, name) not in (None, False) and not self.unlikelihood_weight:
                raise RecipeError(f"train.{name} shapes unlikelihood training, which is off: it needs "
                                  "train.unlikelihood_weight > 0")
        for name in ("answer_loss_tokens", "normal_loss_tokens", "normal_skip_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise RecipeError(f"train.{name} must be >= 0 or null, got {getattr(self, name)}")
        if self.steer_strength_max is not None and (not self.steer_strength
                                                    or self.steer_strength_max < self.steer_strength):
            raise RecipeError(f"train.steer_strength_max ({self.steer_strength_max}) needs a steer_strength at or "
                              f"below it (got {self.steer_strength})")
        if self.false_restart_cuts not in FALSE_RESTART_CUTS:
            raise RecipeError(f"train.false_restart_cuts must be one of {', '.join(FALSE_RESTART_CUTS)}, "
                              f"got {self.false_restart_cuts!r}")
        if self.steer_span not in STEER_SPANS:
            raise RecipeError(f"train.steer_span must be one of {', '.join(STEER_SPANS)}, got {self.steer_span!r}")


# defaults that differ from SFTConfig's, chosen for small CPU runs; a recipe overrides any
SFT_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 512,
    "packing": False,
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "seed": 0,
    # TRL's SFTConfig turns activation checkpointing on by default; a small model on a CPU has
    # memory to spare, and recomputing every block's forward in the backward makes each LoRA
    # step slower for the same adapter bit for bit (measured in docs/performance.md).
    # The GPU recipes turn it back on.
    "activation_checkpointing": False,
    "activation_checkpointing_kwargs": {"use_reentrant": False},
}
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                                 "task_type": "CAUSAL_LM"}


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def split_train_section(values: dict[str, Any], where: str) -> tuple[dict, dict, dict]:
    """(sft kwargs, lora kwargs, extras kwargs) from a flat ``train`` mapping."""
    from peft import LoraConfig
    from trl import SFTConfig

    sft_keys, lora_keys, extra_keys = _names(SFTConfig), _names(LoraConfig), _names(TrainExtras)
    renamed = {"max_seq_length": "max_length", "torch_dtype": "dtype (in the model section)",
               "gradient_checkpointing": "activation_checkpointing",
               "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
    sft, lora, extras = dict(SFT_DEFAULTS), dict(LORA_DEFAULTS), {}
    for key, value in values.items():
        if key in renamed:
            raise RecipeError(f"{where}: {key!r} is spelled {renamed[key]!r} in current TRL/transformers")
        if key in extra_keys:
            extras[key] = value
        elif key in lora_keys:
            lora[key] = value
        elif key in sft_keys:
            sft[key] = value
        else:
            raise RecipeError(
                f"{where}: unknown key {key!r}; valid: esr keys {', '.join(sorted(extra_keys))}; "
                f"peft.LoraConfig keys (r, lora_alpha, lora_dropout, target_modules, ...); trl.SFTConfig keys "
                f"(learning_rate, num_train_epochs, max_steps, max_length, ...): see `esr train --list-keys`")
    given_sft = checked_values(SFTConfig, {k: v for k, v in sft.items() if k in values}, where)
    given_lora = checked_values(LoraConfig, {k: v for k, v in lora.items() if k in values}, where)
    return {**sft, **given_sft}, {**lora, **given_lora}, extras


def resolve_sections(recipe: dict[str, dict], where: str = "recipe"):
    """(model section, sft kwargs, lora kwargs, extras) of the recipe's ``model`` and
    ``train`` sections, each key checked and routed to the class that owns it."""
    from esr_train.config import build

    section = build(ModelSection, dict(recipe.get("model") or {}), f"{where}: model")
    sft, lora, extras = split_train_section(dict(recipe.get("train") or {}), f"{where}: train")
    return section, sft, lora, build(TrainExtras, extras, f"{where}: train")


def all_train_keys() -> dict[str, list[str]]:
    from peft import LoraConfig
    from trl import SFTConfig

    return {"esr": sorted(_names(TrainExtras)), "peft.LoraConfig": sorted(_names(LoraConfig)),
            "trl.SFTConfig": sorted(_names(SFTConfig))}
