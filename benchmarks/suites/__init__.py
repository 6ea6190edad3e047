"""One module per benchmark suite; importing the package registers them all (`benchmarks.harness.SUITES`)."""

from benchmarks.suites import baseline, convert, decode, lvtc, memory, pvtc, rvtc, serve, video, vllm, vllm_lvtc  # noqa: F401
