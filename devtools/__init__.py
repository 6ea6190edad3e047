"""Repository tools, none of them part of the bundle: the one loader of the bundle's classes (`bundle`), tiny
checkpoints in the released layouts for tests and benchmarks (`checkpoints`), the environment each test session
sets first (`test_session`), and the CI tools — the Transformers release matrix (`compat_matrix`) and vLLM's CPU
virtualenv with its patches and child-process runner (`vllm_env`, `vllm_cpu_fixes`, `vllm_runs`)."""
