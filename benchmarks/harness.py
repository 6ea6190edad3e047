"""The benchmark harness: the suite registry, interleaved timing, peak memory, FLOP counting, tables."""

import ctypes
import gc
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

SUITES = {}


def suite(name):
    def register(fn):
        SUITES[name] = fn
        return fn

    return register


# ---- timing and memory -------------------------------------------------------------------------------------------
def built_on(device: str, dtype: torch.dtype, model_class, config):
    """`model_class(config)` initialised directly on `device` (seconds on a GPU for the 2B widths), cast, in eval."""
    with torch.device(device):
        model = model_class(config)
    return model.to(dtype).eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, warmup: int = 2, setup=None) -> float:
    """Median wall time of `fn()` in seconds; `setup()` runs untimed before each call and its result is passed in."""
    times = []
    for i in range(warmup + repeats):
        state = setup() if setup else None
        synchronize(device)
        start = time.perf_counter()
        fn(state) if setup else fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str, repeats: int, setups: dict | None = None) -> dict:
    """Median time of each callable, measured round-robin so drift of the machine hits every entry alike;
    `setups[name]()` (untimed) gives the argument of `fns[name]` before each call."""
    setups = setups or {}
    for name, fn in fns.items():  # warm-up
        for _ in range(2):
            fn(setups[name]()) if name in setups else fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(median_time(fn, device, repeats=1, warmup=0, setup=setups.get(name)))
    return {name: statistics.median(values) for name, values in samples.items()}


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(run, device: str) -> float:
    """Peak memory that `run()` adds on top of what is allocated before it, in MiB.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: growth of the resident-set high-water mark (Linux `VmHWM`, reset
    through `/proc/self/clear_refs` after returning freed heap pages to the system).
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _vm_kb("VmRSS")
    run()
    return (_vm_kb("VmHWM") - base) / 1024


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class StepClock:
    """A logits processor that only reads the clock (after the device finishes), once per generated token."""

    def __init__(self, device: str):
        self.device, self.ticks = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.ticks.append(time.perf_counter())
        return scores


def bandwidth_gb_s(device: str, megabytes: int = 1024) -> float:
    """Memory bandwidth from a large device-to-device copy (each byte is read once and written once)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), device, repeats=10)
    return 2 * source.numel() / seconds / 1e9


# ---- reporting ---------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
