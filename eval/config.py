"""What an evaluation run is: the recipe's ``eval`` section as a dataclass, and the
conditions it compares.

A *condition* names the model and the prompt wrapper: ``base``, ``base+metaprompt:ID``,
``adapter`` (or ``adapter:NAME`` when several adapters are compared) and
``adapter+metaprompt:ID``. Every condition is run steered and under a no-steering control
with the same (prompt, direction, seed) triples, so conditions differ only in the model.
"""

from __future__ import annotations

from esr_train.errors import EsrError
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


def _f(default, help_text: str):
    """A config field with its ``--help`` text; a mutable default becomes a factory."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


class EvalConfigError(EsrError, ValueError):
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

    model: str = _f("smollm2-135m", "bundled name, hub id or local directory of the base model")
    dtype: str = _f("auto", "auto | float32 | bfloat16 | float16 (auto: bf16 only where the hardware runs it natively)")
    adapters: list[str] = _f([], "adapter directories to compare (esr eval --adapter, repeatable)")
    conditions: list[str] | None = _f(None, "conditions to run, e.g. base,adapter,base+metaprompt:notice "
                                            "(null: base, base with the meta-prompt, and each adapter)")
    metaprompt: str = _f("notice", "meta-prompt of the default comparison: notice | focus | named | resist | "
                                   "a key of metaprompt_templates | all")
    metaprompt_templates: dict[str, str] = _f({}, "extra meta-prompts by id, as templates holding {prompt} "
                                                  "(and optionally {label}, the steering concept)")
    prompts: str | None = _f(None, "prompt file (.jsonl rows with 'prompt', or .txt one per line; null: the "
                                   "bundled held-out test prompts)")
    n_prompts: int = _f(40, "how many prompts to draw trials from")
    directions: str = _f("concept", "where steering directions come from: concept | sae | vectors")
    concepts: str | None = _f(None, "subject file for concept directions (null: the bundled held-out test subjects)")
    n_directions: int = _f(10, "how many directions (concepts or SAE latents) to draw trials from")
    sae: str | None = _f(None, "with directions: sae, a local sae-lens SAE directory or a sae-lens release name")
    sae_id: str | None = _f(None, "SAE id within the sae-lens release")
    latents: list[int] = _f([], "SAE latents to steer with (empty: drawn from the SAE, skipping the most active)")
    latent_labels: dict[int, str] = _f({}, "a readable label per SAE latent, used in reports and the named meta-prompt")
    exclude_top_k: int = _f(100, "skip the SAE latents among the K most active on the prompts (0: skip none)")
    vectors: list[str] = _f([], "with directions: vectors, direction files (.safetensors, .pt or .npy)")
    layer: int | None = _f(None, "decoder layer to steer at (null: the model's default layer)")
    schedule: str = _f("all", "which tokens get the push: all | generated | prompt+first:N")
    trials: int = _f(100, "steered trials per condition, each a (prompt, direction, seed) triple")
    unsteered_trials: int | None = _f(None, "unsteered control trials per condition, the same triples without the "
                                            "push (null: half of trials)")
    strength: float | None = _f(None, "push size in units of the layer's median residual norm (null: calibrated "
                                      "on the calibrate_on model to reach target_score)")
    strengths: list[float] = _f([], "fixed strengths to sweep, each a full set of trials (instead of calibrating)")
    sweep_factors: list[float] = _f([], "multiples of the calibrated strength to sweep (empty: the calibrated one)")
    target_score: float = _f(30.0, "calibration target: the mean first-attempt score (0-100) the push should leave")
    calibration: str = _f("per_direction", "per_direction: one strength per direction | shared: one for all")
    calibrate_on: str = _f("base", "the model whose first score calibration sets at target_score: base (the "
                                   "study's protocol) or an adapter condition (adapter, adapter:NAME)")
    calibration_prompts: int = _f(6, "prompts each calibration probe answers")
    calibration_probes: int = _f(5, "search rounds of the calibration (each a batch of steered answers)")
    strength_init: float = _f(0.3, "the calibration's first strength")
    strength_max: float = _f(1.5, "the largest strength the calibration tries")
    max_new_tokens: int = _f(128, "tokens generated per answer")
    temperature: float = _f(0.6, "sampling temperature")
    repetition_penalty: float = _f(1.1, "transformers' repetition penalty (1: off)")
    batch_size: int = _f(32, "answers generated together")
    seed: int = _f(0, "seed of the trial plan and of every trial's sampling")
    judge: str = _f("offline", "offline: the bundled embedding judge | llm: an OpenAI-compatible model")
    judge_base_url: str | None = _f(None, "with judge: llm, the endpoint (e.g. http://localhost:8000/v1)")
    judge_model: str | None = _f(None, "with judge: llm, the model name the endpoint serves")
    judge_api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the judge's API key (never stored)")
    judge_concurrency: int = _f(4, "parallel requests to the LLM judge")
    capability: bool = _f(True, "also measure each condition's perplexity on reference answers (capability cost)")

    def __post_init__(self) -> None:
        checks = [
            ("directions", self.directions in ("concept", "sae", "vectors"), "one of concept, sae, vectors"),
            ("calibration", self.calibration in ("per_direction", "shared"), "per_direction or shared"),
            ("judge", self.judge in ("offline", "llm"), "offline or llm"),
            ("trials", self.trials >= 1, "at least 1"),
            ("n_prompts", self.n_prompts >= 1, "at least 1"),
            ("n_directions", self.n_directions >= 1, "at least 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("target_score", 0 < self.target_score < 100, "between 0 and 100"),
            ("calibration_probes", self.calibration_probes >= 1, "at least 1"),
            ("calibration_prompts", self.calibration_prompts >= 1, "at least 1"),
            ("unsteered_trials", self.unsteered_trials is None or self.unsteered_trials >= 0, "0 or more, or null"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("temperature", self.temperature > 0, "above 0"),
            ("strength", self.strength is None or self.strength > 0, "above 0 (a push toward the concept), or null to calibrate"),
            ("strengths", all(x > 0 for x in self.strengths), "each above 0"),
            ("sweep_factors", all(x > 0 for x in self.sweep_factors), "each above 0"),
            ("strength_init", 0 < self.strength_init <= self.strength_max, "above 0 and at most strength_max"),
            ("judge_concurrency", self.judge_concurrency >= 1, "at least 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise EvalConfigError(f"eval.{name}: invalid value {getattr(self, name)!r}; it must be {rule}")
        if self.judge == "llm" and not (self.judge_base_url and self.judge_model):
            raise EvalConfigError("eval.judge: 'llm' needs judge_base_url and judge_model")
        if self.judge_base_url:  # refused here, before eval_config.json / summary.json could store them
            from esr_train.chat_client import check_base_url

            check_base_url(self.judge_base_url, self.judge_api_key_env, "eval.judge_base_url", EvalConfigError)
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
