"""``esr train``: a data_gen dataset -> a PEFT LoRA adapter, with TRL's SFTTrainer.

The loss covers the restart and the answer only (normal rows: the whole answer); the
user prompt and the distraction are masked. That mask is built from the structured
parts with each model's own chat template (``esr_train.training.tokenize``) and handed
to SFTTrainer as a pre-tokenized dataset, because a conversational prompt/completion
pair cannot mask *part* of an assistant turn.

Output directory: the adapter (``PeftModel.from_pretrained(base, dir)`` loads it), the
tokenizer, the resolved recipe, ``train_log.jsonl`` (every logged step) and
``esr_train_summary.json`` (steps, tokens, tokens/s, final train/eval loss, dataset
fingerprint, dtype).
"""

from __future__ import annotations

from esr_train.errors import EsrError
import importlib.util
import json
import logging
import time
from pathlib import Path

from esr_train.cache import atomic_write_json, atomic_write_text, read_json
from esr_train.config import RecipeError
from esr_train.rows import TRAIN_COLUMNS
from esr_train.training.recipe import ModelSection, TrainExtras, resolve_sections

log = logging.getLogger(__name__)


class TrainError(EsrError, RuntimeError):
    """Training cannot start as configured; one line saying why and what to do."""


def _jsonl_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every log event (loss, lr, eval loss...) to ``train_log.jsonl``."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return JsonlLog()


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """The wall clock and the tokens seen at the end of every optimizer step, for the steady rate
        after the first step (which also pays for the trainer's warm-up: allocations, the first casts,
        the optimizer's state); a short run's whole-wall rate understates it."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0)))

        def steady_tokens_per_s(self) -> float | None:
            if len(self.marks) < 2 or self.marks[-1][1] <= self.marks[0][1]:
                return None
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
            return round((n1 - n0) / (t1 - t0), 1)

    return StepClock()


def quantization_config(section: ModelSection, dtype):
    """bitsandbytes settings for QLoRA; a clear error where the platform cannot run it."""
    if section.quantization is None:
        return None
    import torch

    if not torch.cuda.is_available():
        raise TrainError(f"model.quantization={section.quantization} (bitsandbytes QLoRA) needs a CUDA GPU, and this "
                         "machine has none; remove 'quantization' to train in full precision on CPU")
    from transformers import BitsAndBytesConfig

    if section.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # quant_storage equal to the compute dtype lets ZeRO-3 / FSDP shard the 4-bit weights
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def dataset_fingerprint(dataset_dir: Path, ds) -> dict:
    summary = read_json(dataset_dir / "summary.json", default={}) or {}
    return {"path": str(dataset_dir), "fingerprints": {k: v._fingerprint for k, v in ds.items()},
            "rows": {k: len(v) for k, v in ds.items()}, "generate_config": summary.get("config")}


def dataset_paths(spec: str | Path | None) -> list[Path]:
    """The dataset directories of ``--dataset``: one, or several joined by commas (an
    on-policy second round trained together with the first)."""
    paths = [Path(p.strip()) for p in str(spec or "").split(",") if p.strip()]
    for path in paths or [Path("")]:
        if not (path / "dataset_dict.json").exists():
            raise TrainError(f"no dataset at {str(path) or '(none given)'}: run `esr generate` first, or pass --dataset DIR")
    return paths


def load_training_data(paths: list[Path]):
    """The datasets at ``paths`` as one DatasetDict (each split the concatenation of that
    split in every dataset that has it, in the order given) and its fingerprint: one
    dataset's (the shape ``esr pipeline`` compares), or each part's."""
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    parts = [load_from_disk(str(p)) for p in paths]
    for path, part in zip(paths, parts):
        for split, data in part.items():
            missing = [c for c in TRAIN_COLUMNS if c not in data.column_names]
            if missing:
                raise TrainError(f"{path}: split {split!r} has columns {', '.join(data.column_names)} but lacks "
                                 f"{', '.join(missing)}; esr train reads the transcript parts esr generate writes "
                                 "(a plain 'messages' dataset has no drift or restart to mask)")
    if len(parts) == 1:
        return parts[0], dataset_fingerprint(paths[0], parts[0])
    splits = dict.fromkeys(split for ds in parts for split in ds)
    ds = DatasetDict({split: concatenate_datasets([d[split] for d in parts if split in d]) for split in splits})
    return ds, {"parts": [dataset_fingerprint(p, d) for p, d in zip(paths, parts)],
                "rows": {k: len(v) for k, v in ds.items()}}


def train(recipe: dict[str, dict], output_dir: str | Path, dataset_dir: str | Path | None = None,
          resume: bool = False, where: str = "recipe") -> dict:
    """Train one adapter with the recipe's ``model`` and ``train`` sections on
    ``dataset_dir`` (default: ``train.dataset``; several joined by commas); returns the
    training summary, also written to ``esr_train_summary.json`` beside the adapter."""
    import torch
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    from esr_train.dtype import resolve_dtype
    from esr_train.provenance import provenance
    from esr_train.speed.elementwise import compiled_elementwise
    from esr_train.speed.adapter_casts import adapter_input_casts_off
    from esr_train.speed.labelled_head import labelled_positions_only
    from esr_train.speed.logprob_tiles import compiled_logprob_tiles
    from esr_train.training.tokenize import tokenize_dataset
    from esr_train.rows import UNLIKELY_COLUMN
    from esr_train.training.unlikelihood import trainer_class
    from esr_train.zoo import load_model, load_tokenizer

    section, sft_kwargs, lora_kwargs, extras = resolve_sections(recipe, where)
    out = Path(output_dir)
    data_paths = dataset_paths(dataset_dir or extras.dataset)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last and not resume:
        raise TrainError(f"{out} already holds checkpoints ({Path(last).name}); pass --resume to continue, "
                         "or choose another --output_dir")
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(section.dtype, "cuda" if cuda else "cpu")
    ds, data_fingerprint = load_training_data(data_paths)
    negatives, twins, mined = 0, 0, []
    if extras.unlikelihood_weight:
        from esr_train.negatives import read_mined, with_false_restarts

        mined = [r for p in data_paths for r in read_mined(p)]
        ds["train"], negatives, twins = with_false_restarts(ds["train"], int(sft_kwargs.get("seed", 0)),
                                                            extras.false_restart_sentences, mined,
                                                            extras.mined_positives, extras.unpushed_negatives,
                                                            extras.false_restart_cuts == "every")
    tok = load_tokenizer(section.name)
    max_length = int(sft_kwargs.get("max_length") or 512)
    steer_cols: dict[str, dict] = {}
    subjects: list[str] = []
    keep: tuple[str, ...] = ()
    if extras.steer_strength:
        from esr_train.training.steered import SPAN_COLUMN, STEER_COLUMN, row_steer_ids, steer_subjects

        subjects = steer_subjects([r for split in ds for r in ds[split]])
        steer_cols = {split: {STEER_COLUMN: row_steer_ids(ds[split], subjects)} for split in ds}
        keep = (SPAN_COLUMN,) if extras.steer_span != "all" else ()
    if extras.unlikelihood_weight:
        keep = (*keep, UNLIKELY_COLUMN)
    # the same for the train and eval splits
    rows_as = dict(system=extras.system_prompt, keep=keep, answer_tokens=extras.answer_loss_tokens,
                   normal_tokens=extras.normal_loss_tokens, normal_skip=extras.normal_skip_tokens,
                   unlikely_tokens=extras.unlikely_tokens)
    train_ds, train_stats = tokenize_dataset(ds["train"], tok, max_length, extra_columns=steer_cols.get("train"),
                                             **rows_as)
    if len(train_ds) == 0:
        raise TrainError(f"no training rows left after tokenization ({train_stats}); raise max_length")
    eval_ds, eval_stats = (None, None)
    if extras.eval_split and extras.eval_split in ds and len(ds[extras.eval_split]):
        eval_ds, eval_stats = tokenize_dataset(ds[extras.eval_split], tok, max_length,
                                               extra_columns=steer_cols.get(extras.eval_split), **rows_as)
        sft_kwargs.setdefault("eval_strategy", "steps")
        sft_kwargs.setdefault("eval_steps", sft_kwargs.get("save_steps", 50))
    sft_kwargs.setdefault("bf16", dtype == torch.bfloat16)
    sft_kwargs.setdefault("fp16", dtype == torch.float16)
    sft_kwargs.setdefault("use_cpu", not cuda)
    # JSONL is always written (train_log.jsonl); tensorboard too where it is installed
    sft_kwargs.setdefault("report_to", ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none")
    sft_kwargs["output_dir"] = str(out)
    if "include_num_input_tokens_seen" in SFTConfig.__dataclass_fields__:
        sft_kwargs.setdefault("include_num_input_tokens_seen", True)
    try:
        # built before the model loads: under ZeRO-3 this arms zero3_init_flag, so each
        # process loads its shard instead of a full copy
        args = SFTConfig(**sft_kwargs)
        peft_config = LoraConfig(**lora_kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: train: {str(exc).splitlines()[0]}") from None
    model, _ = load_model(section.name, dtype=str(dtype).replace("torch.", ""),
                          quantization=quantization_config(section, dtype))
    if section.attn_implementation:
        model.config._attn_implementation = section.attn_implementation
    out.mkdir(parents=True, exist_ok=True)
    clock = _step_clock()
    common = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                  peft_config=peft_config, callbacks=[_jsonl_callback(out / "train_log.jsonl"), clock])
    if extras.steer_strength:
        from esr_train.concepts import saved_concept_directions
        from esr_train.training.steered import SteeredSFTTrainer, TrainSteering
        from esr_train.zoo import steer_layer

        # the directions esr generate saved beside the dataset, else built now with the base weights
        layer = steer_layer(section.name, model, extras.steer_layer)
        directions = saved_concept_directions(model, tok, subjects, layer, out / "directions",
                                              search=[p / ".work" / "directions" for p in data_paths])
        steering = TrainSteering(directions, extras.steer_strength, extras.steer_schedule, extras.steer_span,
                                 strength_max=extras.steer_strength_max, seed=args.seed)
        trainer_cls, common["steering"] = SteeredSFTTrainer, steering
    else:
        trainer_cls = SFTTrainer
    if extras.unlikelihood_weight:
        trainer_cls, common["unlikelihood_weight"] = trainer_class(trainer_cls), extras.unlikelihood_weight
        common["unlikely_floor"] = extras.unlikely_floor
    trainer = trainer_cls(**common)
    with labelled_positions_only(), compiled_logprob_tiles() as compiled_head, \
            adapter_input_casts_off(trainer) as casts_off, compiled_elementwise(trainer.model, with_grad=True) as norms_compiled:
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=last if resume and last else None)
        wall = time.perf_counter() - t0
        trainer.save_model(str(out))
        tok.save_pretrained(str(out))
        final_eval = trainer.evaluate() if eval_ds is not None else {}
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    summary = {
        "model": section.name, "dtype": str(dtype).replace("torch.", ""), "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch, "tokens": tokens, "train_runtime_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1) if tokens and wall else None,
        "steady_tokens_per_s": clock.steady_tokens_per_s(),
        "first_train_loss": losses[0] if losses else None, "final_train_loss": losses[-1] if losses else None,
        "train_loss_mean": result.training_loss, "final_eval_loss": final_eval.get("eval_loss"),
        "tokenize": {"train": train_stats, "eval": eval_stats}, "answer_loss_tokens": extras.answer_loss_tokens,
        "normal_loss_tokens": extras.normal_loss_tokens, "normal_skip_tokens": extras.normal_skip_tokens,
        "dataset": data_fingerprint, "resumed_from": Path(last).name if resume and last else None,
        "adapter_input_casts_off": casts_off, "compiled_logprob_tiles": compiled_head,
        "compiled_norms": norms_compiled,
        "activation_checkpointing": bool(args.activation_checkpointing),
        "lora": {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_kwargs.items()},
        "steering": {"strength": extras.steer_strength, "strength_max": extras.steer_strength_max,
                     "schedule": extras.steer_schedule, "span": extras.steer_span,
                     "subjects": len(subjects)} if extras.steer_strength else None,
        "unlikelihood": {"weight": extras.unlikelihood_weight, "false_restart_rows": negatives, "mined_rows": len(mined),
                         "mined_positive_rows": twins, "unpushed_negatives": extras.unpushed_negatives,
                         "sentences": extras.false_restart_sentences, "cuts": extras.false_restart_cuts,
                         "unlikely_tokens": extras.unlikely_tokens, "floor": extras.unlikely_floor}
        if extras.unlikelihood_weight else None,
        "provenance": provenance(dtype),
    }
    atomic_write_json(out / "esr_train_summary.json", summary)
    import yaml

    resolved = {"model": {k: getattr(section, k) for k in ModelSection.__dataclass_fields__},
                "train": {**{k: v for k, v in sft_kwargs.items() if k != "output_dir"}, **lora_kwargs,
                          **{k: getattr(extras, k) for k in TrainExtras.__dataclass_fields__}}}
    resolved["train"]["dataset"] = ",".join(map(str, data_paths))
    atomic_write_text(out / "esr_recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return summary


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Merge an adapter into a full-precision copy of its base (never into a 4-bit base)
    and save weights that ``AutoModelForCausalLM.from_pretrained`` loads."""
    from peft import PeftConfig, PeftModel

    from esr_train.cache import atomic_directory
    from esr_train.zoo import load_model

    from esr_train.preflight import check_adapter_dir, check_out_path

    adapter_dir = check_adapter_dir(adapter_dir, "adapter")
    check_out_path(out_dir)
    recipe = read_json(adapter_dir / "esr_train_summary.json", default={}) or {}
    base_name = recipe.get("model") or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model, tok = load_model(base_name, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if hasattr(merged.config, "esr_model_name"):
        merged.config.esr_model_name = f"{base_name}+{adapter_dir.name}"
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return Path(out_dir)
