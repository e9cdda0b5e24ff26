"""``esr pipeline``: generate -> train -> eval -> report in one run directory.

Each stage writes into its own folder and is skipped when its output is already there and
was made from the same inputs (the data's settings, the dataset's fingerprint, the eval
settings plus the adapter's sha256), so re-running after a crash picks up where it
stopped (each stage also resumes internally: cached generations, trainer checkpoints,
streamed trials). The report is always rewritten (about a second). Layout::

    RUN/data/      dataset (datasets.load_from_disk) + train/test JSONL + summary.json
    RUN/adapter/   LoRA adapter (PeftModel.from_pretrained) + esr_train_summary.json
    RUN/eval/      trials.jsonl, summary.json, calibration.json
    RUN/eval/report.html, report.md, plots/
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import sys
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


def _file_digest(path: Path) -> str | None:
    """sha256 of a file (the adapter's weights), or None when it is missing."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _eval(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    """Skipped when ``RUN/eval`` holds a finished summary made with these settings for
    these adapter weights (``eval/pipeline_stamp.json``). An eval made for other adapter
    weights (the train stage re-ran) is moved to ``eval.stale-N``, never mixed in."""
    import dataclasses

    from esr_train.config import build
    from eval.config import EvalConfig
    from eval.harness import run_eval

    model = recipe.get("model", {})
    values = {**recipe.get("eval", {}), "model": model.get("name"), "dtype": model.get("dtype", "auto"),
              "adapters": [str(run / "adapter")], **overrides.get("eval", {})}
    cfg = build(EvalConfig, values, f"{recipe_path}: eval")
    out = run / "eval"
    stamp = json.loads(json.dumps({"eval": dataclasses.asdict(cfg),
                                   "adapter_sha256": _file_digest(run / "adapter" / "adapter_model.safetensors")}))
    previous = read_json(out / "pipeline_stamp.json")
    summary = read_json(out / "summary.json")
    if summary and previous == stamp:
        return summary
    if previous and previous.get("adapter_sha256") != stamp["adapter_sha256"]:
        n = 1
        while out.with_name(f"eval.stale-{n}").exists():
            n += 1
        out.rename(out.with_name(f"eval.stale-{n}"))
        log.warning("%s was made for other adapter weights; moved to eval.stale-%d", out, n)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "pipeline_stamp.json", stamp)
    return run_eval(cfg, out)


def _report(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    from eval.report import write_report

    paths = write_report([run / "eval"])
    return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v]) for k, v in paths.items()}


RUNNERS: dict[str, Callable[[dict, str, Path, dict], dict]] = {
    "generate": _generate, "train": _train, "eval": _eval, "report": _report}


def maxrss_mib(ru_maxrss: int) -> float:
    """An ``ru_maxrss`` in MiB (it is KiB on Linux, bytes on macOS)."""
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark so far, in MiB. Recorded after each
    stage, it shows which stage set the pipeline's peak."""
    return round(maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1)


def run_pipeline(recipe_path: str, run_dir: str | Path, *, stages: tuple[str, ...] = STAGES,
                 overrides: dict[str, dict] | None = None) -> dict[str, Any]:
    """Run the stages in order; returns {"stages": {name: {"seconds", "peak_rss_mib"}},
    "summary": eval summary}. ``peak_rss_mib`` is the process's high-water mark at the end
    of the stage (a stage skipped as done adds nothing to it).

    ``overrides`` maps a section (data/train/eval) to keys that replace the recipe's."""
    from esr_train.config import load_recipe

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    recipe = load_recipe(recipe_path)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    timings = read_json(run / "pipeline.json", default={}) or {}
    timings.setdefault("stages", {})
    for i, stage in enumerate(s for s in STAGES if s in stages):
        print(f"[{i + 1}/{len(stages)}] {stage}", flush=True)
        t0 = time.perf_counter()
        result = RUNNERS[stage](recipe, str(recipe_path), run, overrides or {})
        took = round(time.perf_counter() - t0, 1)
        timings["stages"][stage] = {"seconds": took, "peak_rss_mib": peak_rss_mib()}
        log.info("%s finished in %.1fs", stage, took)
        if stage == "report":
            timings["report"] = result
        atomic_write_json(run / "pipeline.json", {**timings, "recipe": str(recipe_path)})
    summary = read_json(run / "eval" / "summary.json")
    return {**timings, "summary": summary}


def describe(result: dict) -> str:
    """Stage timings as one line each."""
    return "\n".join(f"  {name:9s} {info['seconds']:7.1f}s" for name, info in result["stages"].items()) + \
        "\n" + json.dumps({"total_s": round(sum(i["seconds"] for i in result["stages"].values()), 1)})
