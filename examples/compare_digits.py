"""The paper's Table 3 / Table 4 in miniature on the digits task: same steps, same seeds, every variant.

    python examples/compare_digits.py --out benchmarks/results/digits-comparison-cpu.json   # 2-core CPU: 20 min
    python examples/compare_digits.py --batch-size 64 --curriculum-steps 400 --steps 1600 --jobs 8 --workers 1 \\
        --eval-samples 600 --out benchmarks/results/digits-comparison-gpu.json              # one H100: 6 min
    python examples/compare_digits.py ... --seeds 0 1 2 --fastv 1:0.75 1:0.5 2:0.5         # with FastV rows
    python examples/compare_digits.py --checkpoints CKPT [CKPT ...] --fastv 1:0.75 --out F  # FastV on saved HR-only

At an equal budget of 16 visual tokens per tile entering the language model: pixel shuffle vs PVTC (Table 3), and
LR-only (pixel shuffle, 16) vs LVTC (16 → 64 from layer 3 of 4, HR + multi projector) vs HR-only (64 throughout)
(Table 4). Reports held-out accuracy (mean ± half the spread over seeds, and each seed's) and training time,
whatever the outcome.
With `--jobs N` the runs share the machine N at a time, so their times compare with each other but not with a
sequential run.

`--fastv K:R ...` adds FastV rows: each trained HR-only model is also evaluated, without training, with its visual
tokens pruned from layer K on to the (1 − R) that get the most attention (`fastv_layer/_ratio`), on the
same held-out questions. On this 4-layer model K = 1, R = 0.75 gives the decoder LVTC's 112 visual token-layers per
tile (64 + 3 × 16, against 3 × 16 + 64); at FastV's own K = 2 no R reaches LVTC's cost (2 × 64 > 112), so K = 2,
R = 0.5 is the setting that keeps more. The table's token-layer column shows each row's cost. `--save-dir` keeps the
trained checkpoints (for `examples/attention_analysis.py`); `--checkpoints` evaluates saved HR-only ones instead of
training.
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

ROWS = (
    ("pixel_shuffle", "pixel shuffle, 16 tokens (LR-only)"),
    ("pvtc", "PVTC, 16 tokens"),
    ("lvtc", "LVTC 16 → 64 (HR + multi)"),
    ("hr_only", "HR-only, 64 tokens"),
)


def fastv_settings(specs: list[str]) -> dict[str, dict]:
    """`["1:0.75"]` → `{"FastV K=1 R=75%": {"fastv_layer": 1, "fastv_ratio": 0.75}}`."""
    settings = {}
    for spec in specs:
        layer, _, ratio = spec.partition(":")
        if not layer.isdigit() or not ratio:
            raise SystemExit(f"--fastv takes K:R pairs such as 1:0.75, got {spec!r}")
        settings[f"FastV K={layer} R={float(ratio):.0%}"] = dict(fastv_layer=int(layer), fastv_ratio=float(ratio))
    return settings


def share_cores(jobs: int) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def table(runs: list[dict]) -> str:
    """Mean ± half the spread over seeds of every variant (and FastV setting) that has runs."""

    def spread(mine: list[dict], key: str) -> str:
        values = [r[key] for r in mine]
        return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"

    def line(label: str, mine: list[dict], seeds: list[int], tokens: str, train_s: str) -> str:
        by_seed = " · ".join(f"{seed}: {r['accuracy']:.3f}" for seed, r in zip(seeds, mine))
        return (
            f"| {label} | {tokens} | {mine[0].get('visual_token_layers_per_tile', '')} | {len(mine)} | "
            f"{spread(mine, 'accuracy')} | {by_seed} | {spread(mine, 'single_accuracy')} | "
            f"{spread(mine, 'grid_accuracy')} | {spread(mine, 'row_accuracy')} | {train_s} |"
        )

    lines = [
        "| variant | visual tokens per tile | visual token-layers per tile | seeds | accuracy | accuracy by seed "
        "| single | corner | left to right | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, label in ROWS:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        if not mine:
            continue
        seeds = [r["seed"] for r in mine]
        first, last = mine[0]["visual_tokens_per_tile"], mine[0]["visual_tokens_per_tile_last_layer"]
        tokens = f"{first} → {last}" if last != first else str(first)
        train_s = statistics.mean(r["train_seconds"] for r in mine) if "train_seconds" in mine[0] else None
        lines.append(line(label, mine, seeds, tokens, f"{train_s:.0f}" if train_s is not None else ""))
        for name in mine[0].get("also", {}):
            pruned = [r["also"][name] for r in mine]
            lines.append(line(f"↳ {name} (pruned, no training)", pruned, seeds, "", ""))
    return "\n".join(lines)


def evaluate_checkpoints(folders: list[Path], also: dict[str, dict], eval_samples: int) -> list[dict]:
    """Evaluate saved checkpoints (e.g. from `--save-dir`) as they are, and those without LVTC also with each of
    `also`, all on the same held-out questions."""
    from examples.train_digits_demo import evaluate, evaluate_with, held_out, load_checkpoint, schedule_metrics

    questions, runs = held_out(eval_samples), []
    for folder in folders:
        model, processor = load_checkpoint(folder)
        saved = json.loads((folder / "metrics.json").read_text())
        run = evaluate(model, processor, questions)
        prunable = not model.config.lvtc_enabled  # FastV and LVTC do not combine
        pruned = {name: evaluate_with(model, processor, questions, **c) for name, c in also.items() if prunable}
        run.update(
            variant=saved["variant"], seed=saved["seed"], checkpoint=str(folder), also=pruned, **schedule_metrics(model)
        )
        runs.append(run)
    return runs


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
    parser.add_argument("--variants", nargs="+", choices=[v for v, _ in ROWS], default=[v for v, _ in ROWS])
    parser.add_argument("--fastv", nargs="+", default=[], metavar="K:R", help="FastV settings to evaluate HR-only at")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep each trained checkpoint in DIR/VARIANT-SEED")
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=None, help="evaluate these instead of training")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    also = fastv_settings(args.fastv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.checkpoints:
        runs = evaluate_checkpoints(args.checkpoints, also, args.eval_samples)
        settings = vars(args) | {
            "out": str(args.out),
            "checkpoints": [str(c) for c in args.checkpoints],
            "save_dir": str(args.save_dir),
        }
        args.out.write_text(json.dumps({"settings": settings, "runs": runs, "table": table(runs)}, indent=2))
        print(table(runs))
        return
    settings = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        eval_samples=args.eval_samples,
        warmup_steps=args.curriculum_steps,
        cpu=args.cpu,
        example_images=False,
    )
    plan = [
        dict(
            variant=variant,
            seed=seed,
            also_evaluate=also if variant == "hr_only" else None,
            output=args.save_dir / f"{variant}-{seed}" if args.save_dir else None,
            **settings,
        )
        for variant in args.variants
        for seed in args.seeds
    ]
    runs = []

    def record(run: dict) -> None:  # after every finished run, so a cut-short comparison keeps what it has
        runs.append(run)
        done = len(runs) == len(plan)
        report = {
            "settings": vars(args) | {"out": str(args.out), "save_dir": str(args.save_dir)},
            "runs": runs,
            "table": table(runs) if done else None,
        }
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
