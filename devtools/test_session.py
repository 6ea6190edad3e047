"""What every test session sets before Transformers is imported (`tests/conftest.py`, `peer_tests/conftest.py`)."""

import atexit
import os
import shutil
import tempfile


def isolate_test_session() -> None:
    """Offline, quiet, and a dynamic-module cache of the session's own, removed when the session ends. Child
    processes (torchrun, servers) inherit the variables; an `HF_MODULES_CACHE` set by the caller is kept as it is."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "HF_MODULES_CACHE" not in os.environ:
        cache = tempfile.mkdtemp(prefix="internvl_x_modules_")
        os.environ["HF_MODULES_CACHE"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
