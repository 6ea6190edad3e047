"""The converter streams: its peak memory grows by less than two of the largest source shard."""

from benchmarks.common import conversion_peak_rss, wide_internvl2_checkpoint


def test_conversion_peak_memory_stays_below_two_shards(tmp_path):
    shard_bytes = wide_internvl2_checkpoint(tmp_path / "src", layers=20, intermediate=16384, shards=4)
    largest_mb = shard_bytes[-1] / 2**20
    assert sum(shard_bytes) > 200 * 2**20 and largest_mb > 50
    memory = conversion_peak_rss(
        [
            "--src",
            str(tmp_path / "src"),
            "--dst",
            str(tmp_path / "dst"),
            "--projector",
            "pixel_shuffle",
            "--max-shard-size-gb",
            f"{shard_bytes[-1] / 2 / 2**30:.6f}",
        ]
    )
    assert memory["peak_growth_mb"] < 2 * largest_mb, (memory, largest_mb)
    assert len(list((tmp_path / "dst").glob("model-*.safetensors"))) > 4  # output written in several shards
