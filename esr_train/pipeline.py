"""``esr pipeline``: generate -> train -> eval -> report in one run directory.

Each stage writes into its own folder and is skipped when its output is already there and
was made from the same inputs, so re-running after a crash picks up where it stopped
(each stage also resumes internally: cached generations, trainer checkpoints, streamed
trials). Layout::

    RUN/data/      dataset (datasets.load_from_disk) + train/test JSONL + summary.json
    RUN/adapter/   LoRA adapter (PeftModel.from_pretrained) + esr_train_summary.json
    RUN/eval/      trials.jsonl, summary.json, calibration.json
    RUN/eval/report.html, report.md, plots/
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from esr_train.cache import atomic_write_json, read_json

log = logging.getLogger(__name__)

STAGES = ("generate", "train", "eval", "report")


def _generate(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    from data_gen.builder import GenerateConfig, build_dataset
    from esr_train.config import build

    values = {**recipe.get("data", {}), "model": recipe.get("model", {}).get("name"), **overrides.get("data", {})}
    return build_dataset(build(GenerateConfig, values, f"{recipe_path}: data"), run / "data")


def _train(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    from esr_train.training.trainer import dataset_fingerprint, train

    out, data = run / "adapter", run / "data"
    done = read_json(out / "esr_train_summary.json")
    if done and (out / "adapter_config.json").exists():
        from datasets import load_from_disk

        if done.get("dataset") == dataset_fingerprint(data, load_from_disk(str(data))):
            return done
    resume = any(out.glob("checkpoint-*")) if out.is_dir() else False
    return train(recipe, out, overrides=overrides.get("train", {}), dataset_dir=data, resume=resume,
                 where=recipe_path)


def _eval(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    from esr_train.config import build
    from eval.config import EvalConfig
    from eval.harness import run_eval

    model = recipe.get("model", {})
    values = {**recipe.get("eval", {}), "model": model.get("name"), "dtype": model.get("dtype", "auto"),
              "adapters": [str(run / "adapter")], **overrides.get("eval", {})}
    return run_eval(build(EvalConfig, values, f"{recipe_path}: eval"), run / "eval")


def _report(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    from eval.report import write_report

    paths = write_report([run / "eval"])
    return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v]) for k, v in paths.items()}


RUNNERS: dict[str, Callable[[dict, str, Path, dict], dict]] = {
    "generate": _generate, "train": _train, "eval": _eval, "report": _report}


def run_pipeline(recipe_path: str, run_dir: str | Path, *, stages: tuple[str, ...] = STAGES,
                 overrides: dict[str, dict] | None = None) -> dict[str, Any]:
    """Run the stages in order; returns {"stages": {name: {"seconds", ...}}, "summary": eval summary}.

    ``overrides`` maps a section (data/train/eval) to keys that replace the recipe's."""
    from esr_train.config import load_recipe

    recipe = load_recipe(recipe_path)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    timings = read_json(run / "pipeline.json", default={}) or {}
    timings.setdefault("stages", {})
    for i, stage in enumerate(s for s in STAGES if s in stages):
        print(f"[{i + 1}/{len(stages)}] {stage}", flush=True)
        t0 = time.perf_counter()
        result = RUNNERS[stage](recipe, str(recipe_path), run, overrides or {})
        took = round(time.perf_counter() - t0, 1)
        timings["stages"][stage] = {"seconds": took}
        log.info("%s finished in %.1fs", stage, took)
        atomic_write_json(run / "pipeline.json", {**timings, "recipe": str(recipe_path)})
        if stage == "report":
            timings["report"] = result
    summary = read_json(run / "eval" / "summary.json")
    return {**timings, "summary": summary}


def describe(result: dict) -> str:
    """Stage timings as one line each."""
    return "\n".join(f"  {name:9s} {info['seconds']:7.1f}s" for name, info in result["stages"].items()) + \
        "\n" + json.dumps({"total_s": round(sum(i["seconds"] for i in result["stages"].values()), 1)})
