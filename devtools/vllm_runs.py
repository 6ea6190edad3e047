"""One vLLM engine run in a process of its own, for tests/test_vllm.py and the `vllm` benchmark suite: the process
ends with the run, and with it every engine process vLLM started (an orphaned engine holds about 1.5 GB).

    python devtools/vllm_runs.py SPEC.json OUT.json

SPEC: `{"model": PATH, "requests": [...], "kind": "generate" | "chat", "max_tokens": N, "ignore_eos": BOOL,
"warm_up": BOOL, "repeats": N, "mm_processor_kwargs": {...}, "max_num_seqs": N}`. For `generate` each request is
`{"prompt": TEXT, "images": [PATH, ...]}`, for `chat` a list of OpenAI-style messages. OUT gets, per request, the
generated `token_ids`, the log-probability of each, the `prompt_token_ids`, the `text`, the `finish_reason`, and the
median seconds of the `repeats` runs of the batch.
"""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB; vLLM's default asks for more than these machines spare


def engine(spec: dict):
    from vllm import LLM

    return LLM(
        model=spec["model"],
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        max_model_len=spec.get("max_model_len"),
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": spec.get("max_images", 4)},
        mm_processor_kwargs=spec.get("mm_processor_kwargs") or None,
        max_num_seqs=spec.get("max_num_seqs", 16),
    )


def prompts(spec: dict) -> list[dict]:
    """`generate` requests as vLLM takes them: the prompt, and its images under `multi_modal_data`."""
    from PIL import Image

    requests = []
    for request in spec["requests"]:
        images = [Image.open(path).convert("RGB") for path in request.get("images", [])]
        requests.append({"prompt": request["prompt"], **({"multi_modal_data": {"image": images}} if images else {})})
    return requests


def main(spec_path: str, out_path: str) -> None:
    from vllm import SamplingParams

    spec = json.loads(open(spec_path).read())
    llm = engine(spec)
    sampling = SamplingParams(
        max_tokens=spec.get("max_tokens", 8), temperature=0, logprobs=1, ignore_eos=spec.get("ignore_eos", False)
    )
    chat = spec.get("kind", "generate") == "chat"
    requests = spec["requests"] if chat else prompts(spec)
    if spec.get("warm_up"):  # one request first, outside the timing
        (llm.chat if chat else llm.generate)(requests[:1], SamplingParams(max_tokens=2, temperature=0))
    timings = []
    for _ in range(spec.get("repeats", 1)):
        start = time.perf_counter()
        outputs = (llm.chat if chat else llm.generate)(requests, sampling)
        timings.append(time.perf_counter() - start)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        results.append(
            {
                "token_ids": list(completion.token_ids),
                "logprobs": [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)],
                "prompt_token_ids": list(output.prompt_token_ids),
                "text": completion.text,
                "finish_reason": completion.finish_reason,
            }
        )
    with open(out_path, "w") as out:
        json.dump({"results": results, "seconds": statistics.median(timings)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
