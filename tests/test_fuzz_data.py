"""Fuzzing the data layer: mutated zips, PNGs, dataset.json files and CIFAR tarballs end in a valid output or a
one-line error, never a traceback, a hang or a partial file (the generator and checks: tests/data_fuzzer.py)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from .data_fuzzer import KINDS, CaseTimeout, Sources, deadline, make_case, pristine_cases, run_case, run_cases

SEED = 0
CASES = 23 * len(KINDS)  # 207: 23 of each input kind; benchmarks/fuzz_data.py runs thousands
# (seed, case) pairs past the first CASES that found bugs in the library (fixed): kept so that they stay fixed.
FOUND = [
    (0, 266),   # LONG_BINPUT 997361213 in a CIFAR pickle: the C unpickler cleared a 16 GB memo (a hang)
    (0, 310),   # a label of 2**63 in dataset.json: OverflowError
    (0, 742),   # a label of 2**31: per-class counts allocated 16 GB (a hang)
    (0, 864),   # a zip entry with an empty name: IndexError in zipfile
    (0, 1177),  # a CIFAR pickle whose error message has a line break
    (0, 1466),  # a ragged CIFAR label list: ValueError
    (0, 1764),  # "zip file version 25.0": NotImplementedError
    (0, 2439),  # zip flag bit 5: NotImplementedError
    (0, 2736),  # an unknown zip compression method: NotImplementedError
    (0, 2745),  # a zip entry name with a \x1d (a line separator) in the error message
    (1, 9697),  # longtail keeping no image: the error named the destination's temporary file
]


@pytest.fixture(scope="module")
def sources() -> Sources:
    return Sources.build()


def test_pristine_inputs_pass_every_command(sources: Sources, tmp_path: Path) -> None:
    # The fuzzer is not vacuous: every command succeeds on the inputs before they are mutated.
    for i, case in enumerate(pristine_cases(sources)):
        (tmp_path / str(i)).mkdir()
        result = run_case(case, tmp_path / str(i))
        assert result.problems == [] and set(result.outcomes.values()) == {"ok"}, (str(case), result)


def test_mutated_inputs_end_in_a_valid_output_or_a_one_line_error(sources: Sources, tmp_path: Path) -> None:
    results = run_cases(range(CASES), SEED, tmp_path, timeout=10.0, sources=sources)
    for seed in sorted({seed for seed, _ in FOUND}):
        found = [index for s, index in FOUND if s == seed]
        results += run_cases(found, seed, tmp_path / f"found-{seed}", timeout=10.0, sources=sources)
    failures = [f"{r.case}: {problem}" for r in results for problem in r.problems]
    assert not failures, "\n".join(failures)
    outcomes = Counter((r.case.kind, outcome) for r in results for outcome in r.outcomes.values())
    for kind in KINDS:  # each kind both gets through and gets caught: the mutations are neither too mild nor fatal
        assert outcomes[(kind, "ok")] and outcomes[(kind, "error")], (kind, outcomes)


def test_cases_are_reproducible(sources: Sources) -> None:
    first, again = make_case(sources, SEED, 5), make_case(sources, SEED, 5)
    assert (first.how, first.files) == (again.how, again.files)
    assert make_case(sources, SEED + 1, 5).files != first.files


def test_the_deadline_stops_a_hang() -> None:
    start = time.perf_counter()
    with pytest.raises(CaseTimeout), deadline(0.2):
        time.sleep(5)
    assert time.perf_counter() - start < 2
