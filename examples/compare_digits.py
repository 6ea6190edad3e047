"""The paper's Table 3 / Table 4 in miniature on the digits task: same steps, same seeds, CPU only.

    python examples/compare_digits.py --steps 500 --seeds 0 1 --out benchmarks/results/digits-comparison.json

At an equal budget of 16 visual tokens per tile entering the language model: pixel shuffle vs PVTC (Table 3), and
LR-only (pixel shuffle, 16) vs LVTC (16 → 64 from layer 3 of 4, HR + multi projector) vs HR-only (64 throughout)
(Table 4). Reports held-out accuracy (mean ± half the spread over seeds) and training time, whatever the outcome.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.train_digits_demo import train  # noqa: E402

ROWS = (("pixel_shuffle", "pixel shuffle, 16 tokens (LR-only)"), ("pvtc", "PVTC, 16 tokens"),
        ("lvtc", "LVTC 16 → 64 (HR + multi)"), ("hr_only", "HR-only, 64 tokens"))  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = [train(variant, seed, args.steps, None, eval_samples=args.eval_samples)
            for variant, _ in ROWS for seed in args.seeds]  # fmt: skip
    lines = ["| variant | visual tokens per tile | accuracy | grid acc. | row acc. | train s |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def spread(mine: list[dict], key: str) -> str:
        values = [r[key] for r in mine]
        return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"

    for variant, label in ROWS:
        mine = [r for r in runs if r["variant"] == variant]

        tokens = {"lvtc": "16 → 64", "hr_only": "64"}.get(variant, "16")
        train_s = statistics.mean(r["train_seconds"] for r in mine)
        lines.append(f"| {label} | {tokens} | {spread(mine, 'accuracy')} | {spread(mine, 'grid_accuracy')} | "
                     f"{spread(mine, 'row_accuracy')} | {train_s:.0f} |")  # fmt: skip
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": runs, "table": table}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
