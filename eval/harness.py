"""``esr eval``: steered and unsteered trials for every condition, judged, streamed to
``trials.jsonl``, summarised in ``summary.json``.

One model is loaded; adapters are attached with PEFT and switched per condition, and the
base conditions run with the adapters disabled, so every condition sees the same
prompts, directions, strengths and seeds. Trials are generated in chunks and appended as
soon as they are judged: a killed run loses at most one chunk and resumes where it
stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from eval.config import Condition, EvalConfig, EvalConfigError, parse_condition
from eval.judging import JudgeItem
from esr_train.zoo import adapters_off

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Triple:
    prompt_id: int
    direction_id: int
    seed: int


def trial_seed(record: dict[str, Any]) -> int:
    """The sampling seed of one trial, keyed by the trial itself: its user prompt, direction,
    strength and sample seed. Not its condition, so conditions that share a trial share its
    draws, and not its position in a batch, so a resumed run draws what the first would have."""
    from esr_train.generation import seed_from

    return seed_from(*(record[k] for k in ("prompt", "direction", "strength", "seed")))


def plan_triples(n_prompts: int, n_directions: int, n: int, seed: int) -> list[Triple]:
    """``n`` (prompt, direction, seed) triples: the prompt x direction grid in a seeded
    order, repeated with the next sample seed when ``n`` exceeds the grid."""
    grid = [(p, d) for p in range(n_prompts) for d in range(n_directions)]
    random.Random(seed).shuffle(grid)
    return [Triple(*grid[i % len(grid)], seed + i // len(grid)) for i in range(n)]


def make_judge(cfg: EvalConfig):
    if cfg.judge == "llm":
        from eval.llm_judge import make_llm_judge

        return make_llm_judge(cfg.judge_base_url, cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                              concurrency=cfg.judge_concurrency)
    from eval.offline_judge import OfflineJudge

    return OfflineJudge()


def _attach_adapters(model, adapters: dict[str, str]):
    """Wrap ``model`` with every adapter (PEFT names = condition names)."""
    from peft import PeftModel

    for i, (name, path) in enumerate(adapters.items()):
        if not (Path(path) / "adapter_config.json").exists():
            raise EvalConfigError(f"eval.adapters: {path} holds no adapter_config.json (train one with esr train)")
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    model.eval()
    return model


@contextmanager
def as_condition(model, adapter: str | None) -> Iterator[None]:
    """Run the block with ``adapter`` active, or with the base weights when None."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        if adapter is not None:
            raise EvalConfigError(f"condition needs adapter {adapter!r} but none is loaded")
        yield
    elif adapter is None:
        with adapters_off(model):
            yield
    else:
        model.set_adapter(adapter)
        yield


class EvalRun:
    """State of one evaluation: model, prompts, directions, judge and the trial file."""

    def __init__(self, cfg: EvalConfig, out_dir: str | Path, model_and_tokenizer=None, progress: bool = True) -> None:
        from esr_train.cache import atomic_write_json
        from esr_train.records import RecordFile
        from esr_train.zoo import load_model
        from eval.preflight import check_eval_inputs

        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        # every input is checked before the model loads; the folder is made only once the run can start
        check_eval_inputs(cfg, self.out, model_and_tokenizer[0] if model_and_tokenizer else None)
        self.adapters = cfg.adapter_names()
        self.conditions = [parse_condition(c, self.adapters, cfg.all_metaprompts()) for c in cfg.resolved_conditions()]
        base, self.tok = model_and_tokenizer or load_model(cfg.model, dtype=cfg.dtype)
        self.model = _attach_adapters(base, self.adapters) if self.adapters else base
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "eval_config.json", dataclasses.asdict(cfg))
        self.trials = RecordFile(self.out / "trials.jsonl")

    # -- generation and judging -------------------------------------------------
    def generate(self, adapter: str | None, rows: list[dict], seeds: list[int]) -> list[str]:
        """Responses for rows {"prompt" (as the model sees it), "direction" (or None),
        "strength"}, with ``adapter`` active (None: the base weights), each sampled from its
        own seed in ``seeds``."""
        from esr_train.generation import generate

        cfg = self.cfg
        with as_condition(self.model, adapter):
            return generate(self.model, self.tok, [r["prompt"] for r in rows],
                            max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                            repetition_penalty=cfg.repetition_penalty, batch_size=cfg.batch_size, seeds=seeds,
                            row_steering=[r["direction"] for r in rows], strength=[r["strength"] for r in rows],
                            schedule=cfg.schedule)

    def judge(self, rows: list[dict], responses: list[str]) -> list:
        items = [JudgeItem(r["prompt"], text, r["label"], self.references.get(r["prompt"]))
                 for r, text in zip(rows, responses)]
        return self.judge_.judge(items)

    # -- stages -------------------------------------------------------------------
    def prepare(self) -> None:
        """Prompts, directions and reference answers (base weights), then the judge."""
        from esr_train.generation import generate
        from esr_train.records import JsonlStore
        from esr_train.zoo import steer_layer
        from eval.sources import eval_directions, eval_prompts

        cfg = self.cfg
        self.prompts = eval_prompts(cfg)
        with as_condition(self.model, None):
            # an SAE fixes its own layer; other sources steer at the configured or the model's
            layer = None if cfg.directions == "sae" else steer_layer(cfg.model, self.model, cfg.layer)
            self.directions = eval_directions(cfg, self.model, self.tok, layer, self.prompts, self.out / "directions")
            self.layer = self.directions[0].layer
            store = JsonlStore(self.out / "references.jsonl")
            missing = [p for p in self.prompts if p not in store]
            if missing:
                for p, a in zip(missing, generate(self.model, self.tok, missing, max_new_tokens=cfg.max_new_tokens,
                                                  repetition_penalty=cfg.repetition_penalty,
                                                  batch_size=cfg.batch_size, progress=self.progress)):
                    store.put(p, a)
            self.references = {p: store[p] for p in self.prompts}
        judge = make_judge(cfg)
        if hasattr(judge, "calibrated"):
            judge = judge.calibrated(self.prompts, [self.references[p] for p in self.prompts],
                                     [d.label for d in self.directions])
        self.judge_ = judge

    def calibrate(self) -> dict[str, dict]:
        """Per-direction strengths (see :mod:`eval.calibration`), or the fixed one given."""
        from eval.calibration import calibrate

        cfg = self.cfg
        if cfg.strength is not None or cfg.strengths:
            return {d.label: {"strength": cfg.strength, "target": None, "probes": []} for d in self.directions}
        prompts = self.prompts[: cfg.calibration_prompts]

        on = None if cfg.calibrate_on == "base" else cfg.calibrate_on

        def probe(rows):
            batch = [{"prompt": p, "label": d.label, "direction": d, "strength": s} for d, s, p in rows]
            seeds = [trial_seed({"prompt": p, "direction": d.label, "strength": s, "seed": cfg.seed}) for d, s, p in rows]
            results = self.judge(batch, self.generate(on, batch, seeds))
            return [r.attempts[0]["score"] if r.attempts and r.error is None else None for r in results]

        settings = {"model": cfg.model, "layer": self.layer, "judge": self.judge_.name, "schedule": cfg.schedule,
                    "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                    "repetition_penalty": cfg.repetition_penalty, "seed": cfg.seed, "dtype": str(self.model.dtype)}
        if on is not None:  # the cache must not hand an adapter the base's strengths
            from esr_train.concepts import weights_fingerprint

            with as_condition(self.model, on):
                settings["calibrate_on"] = weights_fingerprint(self.model)
        return calibrate(self.directions, prompts, probe, target=cfg.target_score, rounds=cfg.calibration_probes,
                         start=cfg.strength_init, hi=cfg.strength_max, shared=cfg.calibration == "shared",
                         settings=settings)

    def plan(self, calibration: dict[str, dict]) -> list[dict]:
        """Every trial of the run, as records without a response yet."""
        cfg = self.cfg
        triples = plan_triples(len(self.prompts), len(self.directions), cfg.trials, cfg.seed)
        n_unsteered = cfg.unsteered_trials if cfg.unsteered_trials is not None else max(1, cfg.trials // 2)
        if cfg.strengths:
            levels = [(float(s), {d.label: float(s) for d in self.directions}) for s in cfg.strengths]
        else:
            factors = cfg.sweep_factors or [1.0]
            levels = [(float(f), {d.label: f * calibration[d.label]["strength"] for d in self.directions})
                      for f in factors]
        plan: list[dict] = []
        for cond in self.conditions:
            for level, strengths in levels:
                plan += [self._record(cond, t, True, level, strengths) for t in triples]
            plan += [self._record(cond, t, False, None, None) for t in triples[:n_unsteered]]
        return plan

    def _record(self, cond: Condition, t: Triple, steered: bool, level, strengths) -> dict[str, Any]:
        d = self.directions[t.direction_id]
        strength = round(strengths[d.label], 6) if steered else 0.0
        key = f"{cond.name}|{'steered' if steered else 'unsteered'}|p{t.prompt_id}|{d.label}|{strength}|{t.seed}"
        return {"key": key, "condition": cond.name, "steered": steered, "prompt_id": f"p{t.prompt_id}",
                "prompt": self.prompts[t.prompt_id], "direction": d.label, "strength": strength, "level": level,
                "layer": d.layer, "seed": t.seed, "schedule": self.cfg.schedule if steered else None}

    def run_trials(self, plan: list[dict]) -> None:
        """Generate and judge every planned trial not yet in ``trials.jsonl``."""
        cfg = self.cfg
        by_label = {d.label: d for d in self.directions}
        by_name = {c.name: c for c in self.conditions}
        todo = [r for r in plan if r["key"] not in self.trials]
        bar = tqdm(total=len(todo), desc="trials", unit="trial", disable=not self.progress or not todo)
        chunk_size = cfg.batch_size * 4
        groups: dict[str | None, list[dict]] = {}  # one model state per group: conditions share batches
        for r in plan:  # chunks are cut from the whole plan, so a resumed run batches as the first did
            groups.setdefault(by_name[r["condition"]].adapter, []).append(r)
        for adapter, rows in groups.items():
            for start in range(0, len(rows), chunk_size):
                chunk = rows[start:start + chunk_size]
                if all(r["key"] in self.trials for r in chunk):
                    continue
                batch = [{"prompt": by_name[r["condition"]].wrap(r["prompt"], r["direction"]), "label": r["direction"],
                          "direction": by_label[r["direction"]] if r["steered"] else None,
                          "strength": r["strength"]} for r in chunk]
                t0 = time.perf_counter()
                responses = self.generate(adapter, batch, [trial_seed(r) for r in chunk])
                took = time.perf_counter() - t0
                # a chunk a killed run left half stored is made again whole; only its missing trials are kept
                keep = [i for i, r in enumerate(chunk) if r["key"] not in self.trials]
                chunk, batch, responses = [chunk[i] for i in keep], [batch[i] for i in keep], [responses[i] for i in keep]
                # The judge sees the user's own prompt, and no concept for an unsteered control
                # (nothing was pushed, so nothing is to be resisted; see the judges' "" handling).
                judged = self.judge([{**b, "prompt": r["prompt"], "label": r["direction"] if r["steered"] else ""}
                                     for b, r in zip(batch, chunk)], responses)
                self.trials.extend([{**r, "response": text, **res.to_record(), "judge": self.judge_.name,
                                     "generate_s": round(took / len(chunk), 3)}
                                    for r, text, res in zip(chunk, responses, judged)])
                bar.update(len(chunk))
        bar.close()

    def capability(self) -> dict[str, dict]:
        """Perplexity of the reference answers under each model, and the unsteered score."""
        from eval.capability import answer_perplexity

        if not self.cfg.capability:
            return {}
        refs = [self.references[p] for p in self.prompts]
        ppl: dict[str | None, float | None] = {}
        for adapter in {c.adapter for c in self.conditions}:
            with as_condition(self.model, adapter):
                ppl[adapter] = answer_perplexity(self.model, self.tok, self.prompts, refs, self.cfg.batch_size)
        return {c.name: {"perplexity": ppl[c.adapter], "reference_answers": len(refs)} for c in self.conditions}


def run_eval(cfg: EvalConfig, out_dir: str | Path, *, model_and_tokenizer=None, progress: bool = True) -> dict:
    """The whole evaluation; returns the summary also written to ``OUT/summary.json``."""
    from esr_train.cache import atomic_write_json, read_json
    from esr_train.provenance import provenance
    from eval.summary import build_summary

    t0 = time.perf_counter()
    run = EvalRun(cfg, out_dir, model_and_tokenizer, progress)
    run.prepare()
    saved = read_json(run.out / "calibration.json") or {}
    # a resumed run keeps its own strengths (a fresh cache or a GPU's nondeterminism would
    # otherwise change every trial key)
    calibration = saved if set(saved) == {d.label for d in run.directions} else run.calibrate()
    atomic_write_json(run.out / "calibration.json", calibration)
    plan = run.plan(calibration)
    run.run_trials(plan)
    capability = run.capability()
    keys = {r["key"] for r in plan}
    trials = [t for t in run.trials.records() if t["key"] in keys]
    names = [c.name for c in run.conditions]
    config = {**dataclasses.asdict(cfg), "conditions": names, "judge": run.judge_.name, "layer": run.layer,
              "n_prompts": len(run.prompts), "n_directions": len(run.directions),
              "directions_used": [d.label for d in run.directions], "dtype": str(run.model.dtype),
              "sweep_unit": "strength" if cfg.strengths else "factor of the calibrated strength",
              "strength_unit": "multiples of the layer's median residual norm",
              "wall_s": round(time.perf_counter() - t0, 1)}
    summary = build_summary(trials, names, config=config, calibration=calibration, capability=capability)
    summary["provenance"] = provenance(run.model.dtype)
    for name, entry in capability.items():  # the unsteered control's mean first-attempt score
        entry["unsteered_mean_score"] = summary["conditions"][name]["unsteered"]["mean_first_score"]
    atomic_write_json(run.out / "summary.json", summary)
    return summary
