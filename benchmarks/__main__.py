"""All benchmarks in one run, one table: ``python -m benchmarks [--json out.json] [--quick]``.

Each figure is printed beside its baseline or ceiling measured in the same run (the
machine is noisy; ratios travel, absolute numbers do not)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import generate_bench, steer_bench, train_bench
from benchmarks.report import machine_meta


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write {meta, rows} here")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    args = parser.parse_args(argv)
    rows = []
    rows += steer_bench.main(["--n", "32" if args.quick else "64"])
    rows += train_bench.main(["--steps", "2" if args.quick else "4"])
    rows += generate_bench.main(["--n", "24" if args.quick else "48"])
    result = {"meta": machine_meta(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
