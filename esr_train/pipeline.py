"""``esr pipeline``: generate -> train -> eval -> report in one run directory.

Each stage writes into its own folder and is skipped when its output is already there and
was made from the same inputs (the data's settings, the dataset's fingerprint, the eval
settings plus the adapter's sha256), so re-running after a crash picks up where it
stopped (each stage also resumes internally: cached generations, trainer checkpoints,
streamed trials). The report is always rewritten (about a second). Layout::

    RUN/data/      dataset (datasets.load_from_disk) + train/test JSONL + summary.json
    RUN/adapter/   LoRA adapter (PeftModel.from_pretrained) + esr_train_summary.json
    RUN/round2/data/, RUN/round2/adapter/   only for a recipe with a ``round2`` section
    RUN/round3/data/, RUN/round3/adapter/   ... and so on for ``round3`` ... ``round9``
    RUN/eval/      trials.jsonl, summary.json, calibration.json
    RUN/eval/report.html, report.md, plots/

A ``round2`` section makes the run two rounds (see docs/results.md): the round-one
adapter writes more rows on-policy (``round2.data`` keys replace ``data`` keys; with the
self backend the adapter is the writer), and the final adapter is trained on both rounds
(``round2.train`` keys replace ``train`` keys, e.g. ``unlikelihood_weight``). The eval stage
evaluates the final adapter. Without ``round2`` the two stages do nothing.

``round3`` (then ``round4``, ...) repeats this once more: the
previous round's adapter writes and probes (its own false restarts become negatives), and a
new adapter is trained from the base model on every round's data. A round's keys replace
those of the round before, so ``round3`` names only what differs from ``round2``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from esr_train.cache import atomic_write_json, read_json

log = logging.getLogger(__name__)

STAGES = ("generate", "train", "generate2", "train2", "eval", "report")
"""The stages of a one- or two-round recipe; :func:`stage_names` gives any recipe's."""


def staged_recipe(recipe: dict, overrides: dict, k: int = 1) -> dict:
    """The recipe round ``k`` runs with: each round's ``data`` and ``train`` keys up to
    ``k`` on top of the recipe's, then the command line's ``--SECTION.KEY`` overrides,
    which win over every round."""
    from esr_train.config import round_settings

    staged = {name: dict(recipe.get(name) or {}) for name in ("model", "data", "train", "eval")}
    for part in ("data", "train"):
        staged[part].update(round_settings(recipe, k, part) if k > 1 else {})
    for section, values in (overrides or {}).items():
        staged.setdefault(section, {}).update(values)
    return staged


def _generate(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    from data_gen.builder import build_dataset
    from esr_train.settings import data_config

    return build_dataset(data_config(staged_recipe(recipe, overrides), recipe_path), run / "data")


def _train_on(staged: dict, recipe_path: str, out: Path, data: list[Path]) -> dict:
    """Train ``out`` on ``data`` unless it already holds an adapter trained on that data."""
    from esr_train.training.trainer import load_training_data, train

    done = read_json(out / "esr_train_summary.json")
    if done and (out / "adapter_config.json").exists() and done.get("dataset") == load_training_data(data)[1]:
        return done
    resume = any(out.glob("checkpoint-*")) if out.is_dir() else False
    return train(staged, out, dataset_dir=",".join(map(str, data)), resume=resume, where=recipe_path)


def _train(recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    return _train_on(staged_recipe(recipe, overrides), recipe_path, run / "adapter", [run / "data"])


def _round_dir(run: Path, k: int) -> Path:
    """Where round ``k`` keeps its data and adapter (round one: the run directory itself)."""
    return run if k == 1 else run / f"round{k}"


def _generate_round(k: int, recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    """Round ``k``'s data, written by round ``k - 1``'s adapter when the backend is ``self``."""
    from data_gen.builder import build_dataset
    from esr_train.config import rounds
    from esr_train.settings import data_config

    if k not in rounds(recipe):
        return {"skipped": f"no round{k} section"}
    staged = {**staged_recipe(recipe, overrides, k), "data": round_data(recipe, run, k, overrides)}
    return build_dataset(data_config(staged, f"{recipe_path}: round{k}"), _round_dir(run, k) / "data")


def round_data(recipe: dict, run: Path, k: int, overrides: dict | None = None) -> dict:
    """Round ``k``'s generation settings: ``data`` with each round's keys up to ``k`` on top
    and, for the ``self`` backend, round ``k - 1``'s adapter as the writer."""
    data = staged_recipe(recipe, overrides or {}, k)["data"]
    if data.get("backend", "self") == "self":
        data["adapter"] = str(_round_dir(run, k - 1) / "adapter")
    return data


def _train_round(k: int, recipe: dict, recipe_path: str, run: Path, overrides: dict) -> dict:
    """Round ``k``'s adapter, trained from the base model on every round's data so far."""
    from esr_train.config import rounds

    if k not in rounds(recipe):
        return {"skipped": f"no round{k} section"}
    return _train_on(staged_recipe(recipe, overrides, k), f"{recipe_path}: round{k}", _round_dir(run, k) / "adapter",
                     [_round_dir(run, j) / "data" for j in range(1, k + 1)])


def final_adapter(recipe: dict, run: Path) -> Path:
    """The adapter the eval stage measures: the last round's."""
    from esr_train.config import rounds

    return _round_dir(run, max(rounds(recipe), default=1)) / "adapter"


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

    from esr_train.settings import eval_config
    from eval.harness import run_eval

    adapter = final_adapter(recipe, run)
    cfg = eval_config(staged_recipe(recipe, overrides), recipe_path, adapters=[str(adapter)])
    out = run / "eval"
    stamp = json.loads(json.dumps({"eval": dataclasses.asdict(cfg),
                                   "adapter_sha256": _file_digest(adapter / "adapter_model.safetensors")}))
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
ROUND_STAGE = re.compile(r"(generate|train)([2-9])")


def stage_names(recipe: dict) -> tuple[str, ...]:
    """The recipe's stages in order: round one, then each further round's generate and
    train, then eval and report. generate2/train2 are always named (they skip without a
    round2 section), so ``--stages`` means the same for one- and two-round recipes."""
    from esr_train.config import rounds

    later = [s for k in (rounds(recipe) or [2]) for s in (f"generate{k}", f"train{k}")]
    return ("generate", "train", *later, "eval", "report")


def _runner(stage: str) -> Callable[[dict, str, Path, dict], dict]:
    later = ROUND_STAGE.fullmatch(stage)
    if later:
        step = _generate_round if later.group(1) == "generate" else _train_round
        return partial(step, int(later.group(2)))
    return RUNNERS[stage]


def maxrss_mib(ru_maxrss: int) -> float:
    """An ``ru_maxrss`` in MiB (it is KiB on Linux, bytes on macOS)."""
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark, in MiB: since it started, or since the
    last :func:`restart_peak_rss` (the pipeline restarts it at each stage, so read after a
    stage it is that stage's own peak).

    On Linux it is ``VmHWM`` (of this process image). ``ru_maxrss`` is not: exec keeps the
    high-water mark of the process that forked it, so a pipeline started from a large
    process (``python -m benchmarks`` after its in-process benchmarks) reads that parent's
    peak, not its own. Elsewhere, ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return round(maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1)


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc's
    ``malloc_trim``; elsewhere only the collection). Between stages: a stage's freed tensors
    otherwise stay in the process's heap and the next stage's peak lands on top of them, so
    the eval stage would report training's memory plus its own."""
    import ctypes
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the caching allocator's blocks, for the next stage's model
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the C library already loaded
    except (OSError, AttributeError):  # a C library without malloc_trim (musl)
        pass


def restart_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (Linux: ``clear_refs`` 5), so that the
    next :func:`peak_rss_mib` is one stage's own peak; False where that is not allowed. The
    kernel's mark is the one ``getrusage`` and ``/usr/bin/time`` read too, so for a pipeline
    they see only its last stage's peak; ``pipeline.json`` keeps the whole run's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def run_pipeline(recipe_path: str, run_dir: str | Path, *, stages: tuple[str, ...] | None = None,
                 overrides: dict[str, dict] | None = None) -> dict[str, Any]:
    """Run the stages in order; returns {"stages": {name: {"seconds", "peak_rss_mib",
    "stage_peak_rss_mib"}}, "summary": eval summary}. ``peak_rss_mib`` is the run's high-water
    mark at the end of the stage (a stage skipped as done adds nothing to it);
    ``stage_peak_rss_mib`` is the stage's own peak, from what the stages before it left
    resident (None where the high-water mark cannot be restarted). Freed memory is handed
    back between stages.

    ``overrides`` maps a section (model/data/train/eval) to keys that replace the recipe's
    in every round. The recipe, its rounds and the overrides are checked before anything
    is written."""
    from esr_train.config import RecipeError, load_recipe, rounds
    from esr_train.provenance import provenance
    from esr_train.preflight import check_out_path
    from esr_train.settings import validate_recipe

    recipe = load_recipe(recipe_path)
    names = stage_names(recipe)
    stages = names if stages is None else stages
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise RecipeError(f"--stages: unknown stage(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    check_out_path(run_dir)
    for k in (1, *rounds(recipe)):
        validate_recipe(staged_recipe(recipe, overrides or {}, k), f"{recipe_path}" + (f": round{k}" if k > 1 else ""))
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    timings = read_json(run / "pipeline.json", default={}) or {}
    timings.setdefault("stages", {})
    run_peak = 0.0
    for i, stage in enumerate(s for s in names if s in stages):
        print(f"[{i + 1}/{len(stages)}] {stage}", flush=True)
        release_freed_memory()
        own = restart_peak_rss()
        t0 = time.perf_counter()
        result = _runner(stage)(recipe, str(recipe_path), run, overrides or {})
        took = round(time.perf_counter() - t0, 1)
        stage_peak = peak_rss_mib()
        run_peak = max(run_peak, stage_peak)
        timings["stages"][stage] = {"seconds": took, "peak_rss_mib": run_peak,
                                    "stage_peak_rss_mib": stage_peak if own else None}
        log.info("%s finished in %.1fs", stage, took)
        if stage == "report":
            timings["report"] = result
        atomic_write_json(run / "pipeline.json", {**timings, "recipe": str(recipe_path), "provenance": provenance()})
    summary = read_json(run / "eval" / "summary.json")
    return {**timings, "summary": summary}


def describe(result: dict) -> str:
    """Stage timings (and each stage's own peak RSS, where recorded) as one line each."""
    def peak(info: dict) -> str:
        return f"  peak {info['stage_peak_rss_mib']:8.1f} MiB" if info.get("stage_peak_rss_mib") else ""

    return "\n".join(f"  {name:9s} {info['seconds']:7.1f}s{peak(info)}" for name, info in result["stages"].items()) + \
        "\n" + json.dumps({"total_s": round(sum(i["seconds"] for i in result["stages"].values()), 1),
                           "peak_rss_mib": max((i.get("peak_rss_mib") or 0 for i in result["stages"].values()),
                                               default=0)})
