"""One entry point for every measurement this project reports.

    python benchmarks/run.py --suite baseline [--device cpu|cuda] [--dtype float32|bfloat16] [--quick] --out FILE.json

Each suite prints a markdown table and writes JSON (device, dtype, shapes, versions, and each figure as the median
of ≥ 5 runs after warm-up). Models compared in one suite run side by side in the same process, interleaved, so the
ratios are meaningful on a noisy machine; absolute times are only meaningful on a GPU.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path from a checkout: the repository's packages

import benchmarks.suites  # noqa: E402,F401  (registers every suite)
from benchmarks.harness import SUITES, markdown_table  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--quick", action="store_true", help="fewer layers and repeats: a smoke run, not a report")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (≥ 5 for a report)")
    parser.add_argument("--tiles", type=int, default=1, help="tiles of the prompt's image (baseline, pvtc, lvtc)")
    parser.add_argument(
        "--cpu-gqa",
        default="sdpa",
        choices=["sdpa", "repeat"],
        help="decode suite on a CPU: sdpa groups query heads itself (TRANSFORMERS_SDPA_FORCE_GQA=1, "
        "recommended) or Transformers' default repeats key/value heads (repeat_kv)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeats = args.repeats or (3 if args.quick else 7)
    torch.set_grad_enabled(False)

    result = SUITES[args.suite](args)
    report = {
        "suite": args.suite,
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "quick": args.quick,
        "repeats": args.repeats,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"## {args.suite} — {report['device']}, {args.dtype}{' (quick)' if args.quick else ''}\n")
    print(markdown_table(result["rows"]))
    for key, table in result.items():
        if key.endswith("_rows"):
            print(f"\n{key.removesuffix('_rows').replace('_', ' ')}:\n\n{markdown_table(table)}")
    print("\n" + "\n".join(f"- {k}: {v:.3f}" for k, v in result["ratios"].items()))
    print(f"\nshapes: {result['shapes']}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
