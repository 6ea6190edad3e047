"""`benchmarks/`: one module per suite under `benchmarks/suites/`, registered with the harness; `run.py` (run by path
from a checkout, as the docs show) offers each of them. The suites themselves are measurements, run by hand."""

import subprocess
import sys

from tests.conftest import ROOT


def test_every_suite_module_registers_its_suite_and_run_py_offers_it():
    import benchmarks.suites
    from benchmarks.harness import SUITES

    modules = sorted(path.stem for path in (ROOT / "benchmarks" / "suites").glob("*.py") if path.stem != "__init__")
    registered_by = {name: function.__module__.rsplit(".", 1)[-1] for name, function in SUITES.items()}
    assert sorted(set(registered_by.values())) == modules, (registered_by, benchmarks.suites)
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(name in help_text for name in SUITES), help_text
