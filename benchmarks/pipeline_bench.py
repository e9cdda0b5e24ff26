"""End to end: ``esr pipeline recipes/quick.yaml`` in a fresh run directory, timed as a
user runs it (a child process: interpreter start, imports, model loads included).

    python -m benchmarks.pipeline_bench [--recipe recipes/quick.yaml] [--json out.json]

Rows: ``quick_pipeline_s`` (wall; baseline: the 600 s target, so ratio <= 1 passes; the
note gives the stage breakdown), ``quick_pipeline_<stage>_s`` per stage (read from the
``pipeline.json`` the pipeline writes in its run directory), and
``quick_pipeline_peak_rss_mb``: the largest resident set of the pipeline process, in MiB,
as it records it after each stage (``VmHWM`` on Linux, restarted at each stage so the note
gives each stage's own peak; not a sum over processes). Not the
child's ``ru_maxrss`` from ``wait4``: exec keeps the high-water mark of the process that
forked it, so run from ``python -m benchmarks`` after the in-process benchmarks it would
report the parent's larger peak instead of the pipeline's; it is the fallback where the
stages recorded nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import emit, machine_meta, make_row
from esr_train.pipeline import maxrss_mib

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 600.0


def run_child(cmd: list[str], log_path: Path, cwd: Path = ROOT) -> tuple[int, float, float]:
    """Run ``cmd`` with stdout/stderr to ``log_path``; returns (exit code, wall s, peak RSS MiB)."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return proc.returncode, wall, maxrss_mib(usage.ru_maxrss)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quick.yaml"))
    parser.add_argument("--keep", help="run directory to use and keep (default: a temporary one, removed)")
    parser.add_argument("--json", help="write the rows here")
    return parser.parse_args(argv)


def measure(argv=None) -> list[dict]:
    """The rows (nothing printed but one line saying where the log goes)."""
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="esr-pipeline-bench-") as tmp:
        run = Path(args.keep).resolve() if args.keep else Path(tmp) / "run"
        if run.exists() and any(run.iterdir()):
            raise SystemExit(f"pipeline_bench: {run} is not empty (stages would be skipped, not timed)")
        log_path = Path(tmp) / "pipeline.log"
        cmd = [sys.executable, "-m", "esr_train.cli", "pipeline", str(Path(args.recipe).resolve()), "--out", str(run)]
        print(f"pipeline_bench: {' '.join(cmd)}", flush=True)
        code, wall, rss = run_child(cmd, log_path)
        if code != 0:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"pipeline_bench: esr pipeline exited {code}; end of its log:\n{tail}")
        stages = json.loads((run / "pipeline.json").read_text()).get("stages", {})
    seconds = {name: info["seconds"] for name, info in stages.items()}
    breakdown = ", ".join(f"{name} {s:.0f}s" for name, s in seconds.items())
    name = Path(args.recipe).stem
    meta = machine_meta()  # the recipe's dtype is auto
    rows = [make_row(f"{name}_pipeline_s", round(wall, 1), "s", meta=meta, baseline=TARGET_S,
                     note=f"stages: {breakdown}; stage sum {sum(seconds.values()):.0f}s; "
                          f"baseline: the {TARGET_S:.0f} s target (ratio <= 1 passes)")]
    rows += [make_row(f"{name}_pipeline_{stage}_s", s, "s", meta=meta, note=f"stage {stage} of {name}_pipeline_s")
             for stage, s in seconds.items()]
    peaks = {stage: info["peak_rss_mib"] for stage, info in stages.items() if "peak_rss_mib" in info}
    own = {stage: info.get("stage_peak_rss_mib") for stage, info in stages.items()}
    what = "high-water mark of the pipeline process (VmHWM on Linux; one process, not a sum); "
    if peaks and all(own.values()):
        note = what + "each stage's own peak (MiB): " + ", ".join(f"{stage} {mib:.0f}" for stage, mib in own.items())
    elif peaks:
        note = what + "after each stage (MiB): " + ", ".join(f"{stage} {mib:.0f}" for stage, mib in peaks.items())
    else:
        note = "ru_maxrss of the pipeline process from wait4 (the stages recorded none)"
    rows.append(make_row(f"{name}_pipeline_peak_rss_mb", round(max(peaks.values()) if peaks else rss, 1), "MiB",
                         meta=meta, note=note))
    return rows


def main(argv=None) -> list[dict]:
    return emit(measure(argv), parse(argv).json)


if __name__ == "__main__":
    main()
