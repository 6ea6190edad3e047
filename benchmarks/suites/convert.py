"""Conversion: peak resident memory of converting a large sharded InternVL2 checkpoint."""

import time
from pathlib import Path

from benchmarks.common import conversion_peak_rss, wide_internvl2_checkpoint
from benchmarks.harness import suite


@suite("convert")
def convert_suite(args) -> dict:
    """Peak memory of converting a ~500 MB multi-shard InternVL2 checkpoint (tiny widths, wide MLPs, 4 shards)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / "src", Path(folder) / "dst"
        layers = 4 if args.quick else 40
        shard_bytes = wide_internvl2_checkpoint(src, layers=layers, intermediate=16384, shards=4)
        largest = shard_bytes[-1] / 2**20
        out_shard_gb = shard_bytes[-1] / 2 / 2**30
        for projector in ("pixel_shuffle", "pvtc"):
            start = time.perf_counter()
            memory = conversion_peak_rss(
                [
                    "--src",
                    str(src),
                    "--dst",
                    str(dst),
                    "--overwrite",
                    "--projector",
                    projector,
                    "--max-shard-size-gb",
                    f"{out_shard_gb:.6f}",
                ]
            )
            rows.append(
                {
                    "projector": projector,
                    "checkpoint MB": sum(shard_bytes) / 2**20,
                    "largest shard MB": largest,
                    "peak RSS growth MB": memory["peak_growth_mb"],
                    "growth / largest shard": memory["peak_growth_mb"] / largest,
                    "RSS before MB (python + torch)": memory["rss_before_mb"],
                    "seconds": time.perf_counter() - start,
                }
            )
    ratios = {"worst_growth_over_largest_shard": max(r["growth / largest shard"] for r in rows)}
    return {"rows": rows, "ratios": ratios, "shapes": {"layers": layers, "shards": 4, "output_shard": "½ source"}}
