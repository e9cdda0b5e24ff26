"""``esr probe``: a trained adapter's own negatives for an existing dataset, in one batch.

An on-policy round (``esr generate --adapter ... --restart_probes k``) writes a new set of
rows with the adapter *and* samples its unpushed answers to find its false restarts; the
rows cost most of the time. This is the probe alone, on the training prompts of a dataset
that exists: ``restart_probes`` unsteered answers per prompt, sampled as the evaluation's
unsteered trials are, by the model with ``adapter`` on. Answers that restart become mined
negatives (``esr_train.negatives.mine``); with ``openers`` the others are cut after an
opening sentence and given a restart phrase of the data (``cut_openers``), so the adapter
is shown restarting after *its own* on-topic text as the thing not to do.

The output is a copy of the dataset (same splits, same JSONL files) whose
``false_restarts.jsonl`` holds the dataset's own mined rows followed by the new ones, ready
for ``esr train --unlikelihood_weight``. The samples are cached in ``OUT/.work`` as they
finish, and ``summary.json`` is written last, so a killed run resumes and a finished one is
skipped.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

from esr_train import negatives
from data_gen.builder import GenerateConfig, GenerateError, self_backend
from esr_train.cache import atomic_write_json, atomic_write_text, read_json

OPENERS = ("none", "one", "every")
"""What happens to a probe answer that did not restart: nothing, one negative at a random
cut after one of its first sentences, or one at each such cut."""


def probe_dataset(cfg: GenerateConfig, dataset_dir: str | Path, out_dir: str | Path, openers: str = "one",
                  opener_sentences: int = 3, backend_impl=None) -> dict:
    """Probe ``cfg``'s writer (``cfg.adapter`` on ``cfg.model``) on the training prompts of
    ``dataset_dir`` and write the dataset with the new negatives to ``out_dir``; returns
    the summary. ``backend_impl`` lets a caller pass a ready self backend."""
    from datasets import load_from_disk

    from esr_train.negatives import restart_phrases

    src, out = Path(dataset_dir), Path(out_dir)
    if openers not in OPENERS:
        raise GenerateError(f"openers must be one of {', '.join(OPENERS)}, got {openers!r}")
    if cfg.backend != "self" or cfg.restart_probes < 1:
        raise GenerateError(f"esr probe samples with the self backend and needs restart_probes >= 1, got "
                            f"{cfg.backend!r} and {cfg.restart_probes}")
    if opener_sentences < 1:
        raise GenerateError(f"opener_sentences must be >= 1, got {opener_sentences}")
    if not (src / "dataset_dict.json").exists():
        raise GenerateError(f"{src}: not a dataset directory (no dataset_dict.json; write one with esr generate)")
    if out.resolve() == src.resolve():
        raise GenerateError(f"{out}: the output must be a new directory, not the dataset it copies")
    setting = {"source": str(src), "generate": cfg.fingerprint(), "openers": openers,
               "opener_sentences": opener_sentences}
    done = read_json(out / "summary.json")
    if done and done.get("probe", {}).get("config") == setting:
        return done

    t0 = time.perf_counter()
    train = load_from_disk(str(src))["train"]
    prompts = list(dict.fromkeys(train["prompt"]))
    restarts = restart_phrases(train)
    if openers != "none" and not restarts:
        raise GenerateError(f"{src}: no self-correction rows, so no restart phrases to put after the openers")
    stage_s: Counter = Counter()
    backend = self_backend(cfg, out, backend_impl, stage_s)
    texts = backend.probe(prompts, cfg.restart_probes)

    mined, bare = negatives.mine_each(texts, backend.label, cfg.seed)
    rng = random.Random(cfg.seed)
    cut = [] if openers == "none" else [
        row for prompt in prompts for row in negatives.cut_openers(
            prompt, texts[prompt], restarts, rng, backend.label, cfg.seed, opener_sentences, openers == "every")]

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # incomplete until the summary is back
    kept = (negatives.FILE, "summary.json")
    for item in src.iterdir():
        if item.name in kept or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    rows = negatives.read_mined(src) + mined + cut
    atomic_write_text(out / negatives.FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = dict(read_json(src / "summary.json") or {})
    summary["probe"] = {
        "config": setting, "writer": backend.label, "prompts": len(prompts),
        "samples": len(prompts) * cfg.restart_probes, "restarted": len(mined) + bare, "no_opener": bare,
        "restart_rows": len(mined), "opener_rows": len(cut), "rows_in_file": len(rows),
        "elapsed_s": round(time.perf_counter() - t0, 1), "stage_s": {k: round(v, 1) for k, v in stage_s.items()},
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def format_probe_summary(summary: dict) -> str:
    """One line per count, for the terminal."""
    p = summary["probe"]
    return (f"probed {p['writer']} on {p['prompts']} training prompts: {p['samples']} samples, "
            f"{p['restarted']} restarted ({p['restart_rows']} kept as mined negatives, {p['no_opener']} with no "
            f"opener), {p['opener_rows']} negatives cut from its own openers; {p['rows_in_file']} rows in "
            f"{negatives.FILE} ({p['elapsed_s']} s)")
