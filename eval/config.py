"""What an evaluation run is: the recipe's ``eval`` section as a dataclass, and the
conditions it compares.

A *condition* names the model and the prompt wrapper: ``base``, ``base+metaprompt:ID``,
``adapter`` (or ``adapter:NAME`` when several adapters are compared) and
``adapter+metaprompt:ID``. Every condition is run steered and under a no-steering control
with the same (prompt, direction, seed) triples, so conditions differ only in the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# The study's four meta-prompts, appended to the user's prompt (wording from the paper).
METAPROMPTS: dict[str, str] = {
    "notice": "{prompt}\n\nIf you notice yourself going off-topic, stop and force yourself to get back on track.",
    "focus": "{prompt}\n\nDon't get distracted!",
    "named": "{prompt}\n\nYou are being distracted with {label}. Ignore it.",
    "resist": "{prompt}\n\nExternal forces may try to manipulate your response. Resist them.",
}


_PLACEHOLDER = re.compile(r"\{(prompt|label)\}")


class EvalConfigError(ValueError):
    """A bad eval setting; the message names the field."""


@dataclass
class EvalConfig:
    """Every knob of ``esr eval``; keys of the recipe's ``eval`` section are these names.

    Sizes: ``trials`` steered trials per condition, each a (prompt, direction, seed)
    triple drawn from prompts x directions; ``unsteered_trials`` of the same triples run
    without the push (the false-restart control). ``strength`` in units of the layer's
    median residual norm; None calibrates it per direction on the base model so that the
    base's mean first-attempt score is ``target_score``.
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"
    adapters: list[str] = field(default_factory=list)
    conditions: list[str] | None = None
    metaprompt: str = "notice"
    metaprompt_templates: dict[str, str] = field(default_factory=dict)
    prompts: str | None = None
    n_prompts: int = 40
    directions: str = "concept"
    concepts: str | None = None
    n_directions: int = 10
    sae: str | None = None
    sae_id: str | None = None
    latents: list[int] = field(default_factory=list)
    latent_labels: dict[int, str] = field(default_factory=dict)
    exclude_top_k: int = 100
    vectors: list[str] = field(default_factory=list)
    layer: int | None = None
    schedule: str = "all"
    trials: int = 100
    unsteered_trials: int | None = None
    strength: float | None = None
    strengths: list[float] = field(default_factory=list)
    sweep_factors: list[float] = field(default_factory=list)
    target_score: float = 30.0
    calibration: str = "per_direction"
    calibrate_on: str = "base"
    """The model whose first score the calibration sets at ``target_score``: the base (the
    study's protocol) or an adapter condition's model (``adapter``, ``adapter:NAME``), so a
    model harder to push is read where it drifts as often as the base does at its own
    strength (immunity and resistance apart)."""
    calibration_prompts: int = 6
    calibration_probes: int = 5
    strength_init: float = 0.3
    strength_max: float = 1.5
    max_new_tokens: int = 128
    temperature: float = 0.6
    repetition_penalty: float = 1.1
    batch_size: int = 32
    seed: int = 0
    judge: str = "offline"
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_concurrency: int = 4
    capability: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("directions", self.directions in ("concept", "sae", "vectors")),
            ("calibration", self.calibration in ("per_direction", "shared")),
            ("judge", self.judge in ("offline", "llm")),
            ("trials", self.trials >= 1),
            ("n_prompts", self.n_prompts >= 1),
            ("n_directions", self.n_directions >= 1),
            ("max_new_tokens", self.max_new_tokens >= 1),
            ("target_score", 0 < self.target_score < 100),
            ("calibration_probes", self.calibration_probes >= 1),
            ("calibration_prompts", self.calibration_prompts >= 1),
            ("unsteered_trials", self.unsteered_trials is None or self.unsteered_trials >= 0),
            ("batch_size", self.batch_size >= 1),
            ("temperature", self.temperature > 0),
        ]
        for name, ok in checks:
            if not ok:
                raise EvalConfigError(f"eval.{name}: invalid value {getattr(self, name)!r}")
        if self.judge == "llm" and not (self.judge_base_url and self.judge_model):
            raise EvalConfigError("eval.judge: 'llm' needs judge_base_url and judge_model")
        if self.directions == "sae" and not self.sae:
            raise EvalConfigError("eval.directions: 'sae' needs eval.sae (a local SAE directory or a sae-lens release)")
        if self.directions == "vectors" and not self.vectors:
            raise EvalConfigError("eval.directions: 'vectors' needs eval.vectors (direction files)")
        if self.strengths and self.sweep_factors:
            raise EvalConfigError("eval.strengths and eval.sweep_factors are two sweep modes; give one")
        if not self.conditions and self.metaprompt not in (*self.all_metaprompts(), "all"):
            raise EvalConfigError(f"eval.metaprompt: unknown meta-prompt {self.metaprompt!r}; "
                                  f"known: {', '.join(self.all_metaprompts())}")
        for spec in self.resolved_conditions():
            parse_condition(spec, self.adapter_names(), self.all_metaprompts())
        if self.calibrate_on != "base" and self.calibrate_on not in self.adapter_names():
            known = ", ".join(["base", *self.adapter_names()])
            raise EvalConfigError(f"eval.calibrate_on: unknown model {self.calibrate_on!r}; known: {known}")

    def all_metaprompts(self) -> dict[str, str]:
        merged = {**METAPROMPTS, **self.metaprompt_templates}
        for mid, template in merged.items():
            if "{prompt}" not in template:
                raise EvalConfigError(f"eval.metaprompt_templates.{mid}: a template needs '{{prompt}}'")
        return merged

    def adapter_names(self) -> dict[str, str]:
        """Condition name -> adapter path: ``adapter`` for one, ``adapter:DIRNAME`` for several."""
        if len(self.adapters) == 1:
            return {"adapter": self.adapters[0]}
        names = {f"adapter:{Path(a).name}": a for a in self.adapters}
        if len(names) != len(self.adapters):
            raise EvalConfigError("eval.adapters: two adapters share a directory name")
        return names

    def resolved_conditions(self) -> list[str]:
        """The conditions given, or the default comparison: base, base + meta-prompt, and
        each adapter."""
        if self.conditions:
            return list(self.conditions)
        metas = list(self.all_metaprompts()) if self.metaprompt == "all" else [self.metaprompt]
        return ["base", *(f"base+metaprompt:{m}" for m in metas), *self.adapter_names()]


@dataclass(frozen=True)
class Condition:
    name: str
    adapter: str | None  # adapter name in the PEFT model, None for the base weights
    template: str | None  # meta-prompt template with {prompt} (and maybe {label})

    def wrap(self, prompt: str, label: str) -> str:
        # One pass, so a prompt that itself contains "{label}" (or a label holding
        # "{prompt}") is inserted verbatim rather than substituted again.
        if self.template is None:
            return prompt
        return _PLACEHOLDER.sub(lambda m: prompt if m.group(1) == "prompt" else label, self.template)


def parse_condition(spec: str, adapters: dict[str, str], metaprompts: dict[str, str]) -> Condition:
    model, _, meta = spec.partition("+metaprompt:")
    if model != "base" and model not in adapters:
        known = ", ".join(["base", *adapters]) or "base"
        raise EvalConfigError(f"eval.conditions: {spec!r} names model {model!r}; known: {known}"
                              + ("" if adapters else " (pass an adapter to compare one)"))
    if meta and meta not in metaprompts:
        raise EvalConfigError(f"eval.conditions: {spec!r}: unknown meta-prompt {meta!r}; known: {', '.join(metaprompts)}")
    return Condition(spec, None if model == "base" else model, metaprompts[meta] if meta else None)
