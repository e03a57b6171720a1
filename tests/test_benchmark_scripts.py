"""Every benchmark script imports and builds its command line: ``python benchmarks/NAME.py --help`` exits 0.

The scripts are run by hand, far from CI, so an import that a refactor breaks (a helper moved in ``common``, a
renamed library function) would otherwise show only when someone next measures. This runs each script's ``main``
with ``--help`` in-process (argparse prints the usage and exits), which imports the module and builds its parser
without training anything.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common")


def test_every_script_is_listed() -> None:
    assert len(SCRIPTS) >= 10 and "quickstart_metrics" in SCRIPTS and "longtail" in SCRIPTS


@pytest.fixture(autouse=True)
def forget_benchmark_modules():
    """Drop the scripts' modules afterwards: their top-level names (``common``, ``precision``) must not shadow
    modules of the same name that later tests import."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if str(BENCHMARKS) in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their shared module as `common`
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
