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


def test_the_video_suite_s_flops_on_the_meta_device_equal_a_counted_forward():
    """`benchmarks/suites/video.py` counts a video prefill in parts on the meta device (a 32-frame HR-only prefill
    at the real widths does not fit in memory); the parts add up to the whole forward counted on real tensors, for
    every variant (at the quick depth and the CPU widths, 2 frames)."""
    from benchmarks.common import bundle_classes, geometry
    from benchmarks.suites.lvtc import counted_prefill_flops
    from benchmarks.suites.video import prefill_flops, variants, video_prompt_ids

    classes = bundle_classes()
    for name, overrides in variants(4).items():
        parts = prefill_flops(classes, classes.Config(**geometry("cpu", True, **overrides)), 2)["prefill"]
        config = classes.Config(**geometry("cpu", True, **overrides))
        whole = counted_prefill_flops(classes, config, video_prompt_ids(config, 2), 2, "cpu")["prefill"]
        assert abs(parts / whole - 1) < 1e-3, (name, parts, whole)
