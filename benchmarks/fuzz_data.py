"""Fuzz the data layer with thousands of mutated inputs (the generator and checks: tests/data_fuzzer.py).

    python benchmarks/fuzz_data.py [--cases 5000] [--seed 0] [--start 0] [--timeout 10] [--keep DIR]

Each case mutates a dataset zip, a PNG in a zip or folder, a dataset.json, or a CIFAR python tarball (its gzip
bytes, its tar headers, a pickled batch, or a batch's values) and runs ``diffusion-transfer-data convert``,
``info --verify``, ``longtail`` and ``ZipImageDataset`` on it, in-process. It prints the outcomes per input kind and
every broken promise (a traceback, a multi-line or unnamed error, a partial or unreadable output, a hang) with the
case that broke it; ``--start I --cases 1 --keep DIR`` keeps that case's input in DIR. CI runs the first 200 cases
of seed 0 (tests/test_fuzz_data.py). Writes benchmarks/results/fuzz_data.json; exits 1 if a promise broke.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the generator lives in the tests package, shared with tests/test_fuzz_data.py

from tests.data_fuzzer import KINDS, CaseResult, Sources, run_cases  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per command before it counts as a hang")
    parser.add_argument("--keep", default=None, help="folder to keep the inputs of failing cases in")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fuzz_data.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # e.g. PIL's decompression-bomb warning, when a library call (not the tool) warns
    sources = Sources.build()
    outcomes: Counter[tuple[str, str, str]] = Counter()
    failures: list[dict[str, object]] = []

    def report(result: CaseResult) -> None:
        for command, outcome in result.outcomes.items():
            outcomes[(result.case.kind, command, outcome)] += 1
        if result.problems:
            failures.append({"case": result.case.index, "kind": result.case.kind, "input": result.case.how,
                             "problems": result.problems})
            print(f"FAIL {result.case}: " + " | ".join(result.problems), flush=True)
            if args.keep:
                folder = Path(args.keep) / f"case-{result.case.index}"
                for name, data in result.case.files.items():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(data)
        done = result.case.index - args.start + 1
        if done % 500 == 0:
            print(f"{done} cases, {len(failures)} failing", flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_cases(range(args.start, args.start + args.cases), args.seed, Path(tmp), args.timeout, sources, report)
    seconds = time.perf_counter() - start
    commands = ("convert", "info", "longtail", "dataset")
    print(f"\n{args.cases} cases (seed {args.seed}, from {args.start}) in {seconds:.0f} s, {len(failures)} failing\n")
    print("| input | " + " | ".join(f"{c} ok / error" for c in commands) + " |\n|---|" + "---|" * len(commands))
    for kind in KINDS:
        cells = [f"{outcomes[(kind, c, 'ok')]} / {outcomes[(kind, c, 'error')]}"
                 if outcomes[(kind, c, 'ok')] + outcomes[(kind, c, 'error')] else "-" for c in commands]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "args": vars(args), "seconds": round(seconds, 1), "failing": len(failures), "failures": failures,
              "outcomes": [{"kind": k, "command": c, "outcome": o, "count": n}
                           for (k, c, o), n in sorted(outcomes.items())]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
