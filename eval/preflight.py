"""Everything ``esr eval`` can check before it loads a model or writes to ``--out``.

:func:`check_eval_inputs` reads only small files (the prompt and subject banks, adapter
configs, vector files, the model's config); an error names the field and the fix, and the
run folder is left as it was (absent stays absent), so the corrected command can use the
same ``--out``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from esr_train.preflight import check_adapter_dir, check_layer, check_out_path, check_vector_file, model_shape
from eval.config import EvalConfig, EvalConfigError

TRIAL_FIELDS = ("model", "dtype", "adapters", "metaprompt_templates", "prompts", "directions", "concepts", "sae",
                "sae_id", "latents", "vectors", "layer", "schedule", "strength", "strengths", "sweep_factors",
                "target_score", "calibration", "calibrate_on", "max_new_tokens", "temperature", "repetition_penalty",
                "seed", "judge", "judge_model")
"""The settings a run's trials depend on: a run folder made with other values is refused."""
DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}
"""What a run folder written before a setting existed holds for it."""


def check_settings_match(cfg: EvalConfig, out: Path) -> None:
    """A run folder that already holds a run made with other trial settings is refused."""
    from esr_train.cache import read_json

    previous = read_json(out / "eval_config.json") if out.is_dir() else None
    if previous:
        settings = dataclasses.asdict(cfg)
        changed = [k for k in TRIAL_FIELDS if previous.get(k, DEFAULTS.get(k)) != settings.get(k)]
        if changed:
            raise EvalConfigError(f"{out}: holds a run made with other settings ({', '.join(changed)}); "
                                  f"use a new --out or delete it")


def check_eval_inputs(cfg: EvalConfig, out: str | Path, model=None) -> None:
    """Raise the first problem with the run's inputs; write nothing. ``model``, when the
    caller already holds one, stands in for reading the model's config."""
    from eval.sources import eval_prompts, eval_subjects

    from esr_train.records import parse_records

    out = check_out_path(out)
    check_settings_match(cfg, out)
    if (out / "trials.jsonl").is_file():  # a resumed run's trials must read before anything loads
        parse_records((out / "trials.jsonl").read_bytes(), out / "trials.jsonl")
    eval_prompts(cfg)
    if cfg.directions == "concept":
        eval_subjects(cfg)
    for path in cfg.adapters:
        check_adapter_dir(path, "--adapter")
    if cfg.directions == "sae" and cfg.sae and (cfg.sae.startswith((".", "/")) or Path(cfg.sae).exists()):
        if not Path(cfg.sae).is_dir():
            raise EvalConfigError(f"eval.sae {cfg.sae}: no such SAE directory")
    shape = model_shape(cfg.model, model)
    if shape is None:
        return
    n_layers, width = shape
    check_layer(cfg.layer, n_layers, "eval.layer")
    if cfg.directions == "sae" and cfg.sae and Path(cfg.sae).is_dir():
        check_sae_dir(Path(cfg.sae), n_layers, width)
    if cfg.directions == "vectors":
        from esr_train.zoo import ZOO

        layer = cfg.layer if cfg.layer is not None else (ZOO[cfg.model].default_layer if cfg.model in ZOO
                                                         else n_layers // 2)
        for path in cfg.vectors:
            check_vector_file(path, layer, width, "eval.vectors")


def check_sae_dir(path: Path, n_layers: int, width: int) -> None:
    """A local sae-lens SAE folder fits the model: its ``d_in`` is the residual width and its
    hook names a decoder layer the model has."""
    import json

    from esr_train.layers import layer_from_hook_name

    try:
        cfg = json.loads((path / "cfg.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise EvalConfigError(f"eval.sae {path}: no readable cfg.json; give a folder sae-lens saved") from None
    if cfg.get("d_in") != width:
        raise EvalConfigError(f"eval.sae {path}: an SAE of width {cfg.get('d_in')}, but the model's residual stream "
                              f"has width {width} (an SAE for another model?)")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    try:
        layer = layer_from_hook_name(str(hook))
    except Exception:
        raise EvalConfigError(f"eval.sae {path}: hook {hook!r} names no decoder layer") from None
    check_layer(layer, n_layers, f"eval.sae {path}: the SAE's layer")
