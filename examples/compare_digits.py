"""The paper's Table 3 / Table 4 in miniature on the digits task: same steps, same seeds, every variant.

    python examples/compare_digits.py --out benchmarks/results/digits-comparison-cpu.json   # 2-core CPU: 20 min
    python examples/compare_digits.py --batch-size 64 --curriculum-steps 400 --steps 1600 --jobs 8 --workers 1 \\
        --eval-samples 600 --out benchmarks/results/digits-comparison-gpu.json              # one H100: 6 min

At an equal budget of 16 visual tokens per tile entering the language model: pixel shuffle vs PVTC (Table 3), and
LR-only (pixel shuffle, 16) vs LVTC (16 → 64 from layer 3 of 4, HR + multi projector) vs HR-only (64 throughout)
(Table 4). Reports held-out accuracy (mean ± half the spread over seeds) and training time, whatever the outcome.
With `--jobs N` the runs share the machine N at a time, so their times compare with each other but not with a
sequential run.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.train_digits_demo import bundle, train  # noqa: E402

ROWS = (("pixel_shuffle", "pixel shuffle, 16 tokens (LR-only)"), ("pvtc", "PVTC, 16 tokens"),
        ("lvtc", "LVTC 16 → 64 (HR + multi)"), ("hr_only", "HR-only, 64 tokens"))  # fmt: skip


def share_cores(jobs: int) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def table(runs: list[dict]) -> str:
    def spread(mine: list[dict], key: str) -> str:
        values = [r[key] for r in mine]
        return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"

    lines = ["| variant | visual tokens per tile | accuracy | single | corner | left to right | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for variant, label in ROWS:
        mine = [r for r in runs if r["variant"] == variant]
        first, last = mine[0]["visual_tokens_per_tile"], mine[0]["visual_tokens_per_tile_last_layer"]
        tokens = f"{first} → {last}" if last != first else str(first)
        train_s = statistics.mean(r["train_seconds"] for r in mine)
        lines.append(f"| {label} | {tokens} | {spread(mine, 'accuracy')} | {spread(mine, 'single_accuracy')} | "
                     f"{spread(mine, 'grid_accuracy')} | {spread(mine, 'row_accuracy')} | {train_s:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="steps on the full task, after the curriculum")
    parser.add_argument("--curriculum-steps", type=int, default=1000, help="first steps on single digits, one tile")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (e.g. 8 on one GPU)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes per run")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is visible")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = dict(steps=args.steps, output=None, batch_size=args.batch_size, lr=args.lr, workers=args.workers,
                    eval_samples=args.eval_samples, warmup_steps=args.curriculum_steps, cpu=args.cpu)  # fmt: skip
    plan = [dict(variant=variant, seed=seed, **settings) for variant, _ in ROWS for seed in args.seeds]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []

    def record(run: dict) -> None:  # after every finished run, so a cut-short comparison keeps what it has
        runs.append(run)
        done = len(runs) == len(plan)
        report = {"settings": vars(args) | {"out": str(args.out)}, "runs": runs, "table": table(runs) if done else None}
        args.out.write_text(json.dumps(report, indent=2))

    if args.jobs == 1:
        for run in plan:
            record(train(**run))
    else:
        bundle("modeling_internvl_x.InternVLXForConditionalGeneration")  # fill the module cache once, before the jobs
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=share_cores, initargs=(args.jobs,)) as pool:
            for future in as_completed([pool.submit(train, **run) for run in plan]):
                record(future.result())
    print(table(runs))


if __name__ == "__main__":
    main()
