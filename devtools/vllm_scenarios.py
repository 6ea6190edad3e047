"""Scenarios of one vLLM engine in a process of its own, for tests/test_vllm_lvtc.py: the process ends with the run,
and with it every engine process vLLM started.

    python devtools/vllm_scenarios.py SPEC.json OUT.json

SPEC: `{"engine": {LLM keyword arguments}, "max_tokens": N, "ignore_eos": BOOL, "phases": [PHASE, ...]}`. Each phase
has a `kind`:

- `batch`: `requests` (each `{"prompt": TEXT, "images": [PATH, ...]}`) submitted together;
- `staggered`: the same, each with `after_steps`: it is added once the engine has run that many steps, so prefills
  overlap other requests' decodes;
- `keys`: one request's prefill, with the keys and values every attention layer writes, by KV slot, recorded;
- `sequential`: requests one after the other (prefix caching sees the earlier ones);
- `timed`: for the benchmarks, `requests` submitted together (or, with `"alone": true`, each one alone), `repeats`
  times after the `warm_up` request (one of its own: vLLM keeps a request's vision outputs for later requests with
  the same image), with the phase's own `max_tokens`; OUT gets the seconds of each run (of each request alone) as
  well.

OUT gets, per phase, each request's generated `token_ids`, their log-probabilities and `prompt_token_ids`; `keys`
phases the recorded keys and values; and the engine's counters of preemptions and prefix-cache hits.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB; vLLM's default asks for more than these machines spare
# The `keys` phase hands the worker functions of this file (`collective_rpc`), which vLLM sends pickled only when told;
# a test tool's own engine, not a server.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def vllm_prompt(request: dict) -> dict:
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in request.get("images", [])]
    return {"prompt": request["prompt"], **({"multi_modal_data": {"image": images}} if images else {})}


def result(output) -> dict:
    completion = output.outputs[0]
    return {
        "token_ids": list(completion.token_ids),
        "logprobs": [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)],
        "prompt_token_ids": list(output.prompt_token_ids),
    }


def staggered(llm, requests: list[dict], sampling) -> list[dict]:
    engine, outputs, step = llm.llm_engine, {}, 0
    pending = sorted(enumerate(requests), key=lambda item: item[1].get("after_steps", 0))
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1].get("after_steps", 0) <= step:
            index, request = pending.pop(0)
            engine.add_request(str(index), vllm_prompt(request), sampling)
        for output in engine.step():
            if output.finished:
                outputs[int(output.request_id)] = result(output)
        step += 1
    return [outputs[index] for index in range(len(requests))]


def record_keys(worker):
    """In the worker: every attention layer's keys and values as written, by KV slot, from now on."""
    import torch
    from vllm.forward_context import get_forward_context

    model = worker.model_runner.get_model()
    worker.recorded_keys = recorded = {}

    def hook(module, args, kwargs):
        key, value = args[1], args[2]
        slots = get_forward_context().slot_mapping[module.layer_name]
        entries = recorded.setdefault(module.layer_name, {})
        for slot, k, v in zip(slots.tolist(), key.reshape(key.shape[0], -1), value.reshape(value.shape[0], -1)):
            entries[slot] = (k.float().tolist(), v.float().tolist())

    for index, layer in enumerate(model.language_model.model.layers):
        layer.self_attn.attn.register_forward_pre_hook(hook, with_kwargs=True)
        layer.self_attn.attn.layer_index = index
    return torch.__version__


def recorded_keys(worker):
    """In the worker: `{layer index: {slot: (key, value)}}` of what `record_keys` saw, and the block ids of the
    requests still running."""
    model = worker.model_runner.get_model()
    names = {layer.self_attn.attn.layer_name: index for index, layer in enumerate(model.language_model.model.layers)}
    runner = worker.model_runner
    blocks = {request_id: list(state.block_ids[0]) for request_id, state in runner.requests.items()}
    blocks["block_size"] = runner.input_batch.block_table[0].block_size
    return {names[name]: entries for name, entries in worker.recorded_keys.items()}, blocks


def keys_phase(llm, request: dict, sampling) -> dict:
    llm.collective_rpc(record_keys)
    engine = llm.llm_engine
    engine.add_request("keys", vllm_prompt(request), sampling)
    prompt = None
    while prompt is None:  # the prefill, in as many steps as it takes; its first token ends it
        for output in engine.step():
            prompt = list(output.prompt_token_ids)
    (recorded, blocks), *_ = llm.collective_rpc(recorded_keys)
    engine.abort_request(["keys"])
    while engine.has_unfinished_requests():
        engine.step()
    keys = {str(layer): entries for layer, entries in recorded.items()}
    (block_ids,) = [ids for request_id, ids in blocks.items() if request_id != "block_size"]  # the one request
    return {"prompt_token_ids": prompt, "keys": keys, "block_ids": block_ids, "block_size": blocks["block_size"]}


def timed_phase(llm, phase: dict, sampling) -> dict:
    """The seconds `llm.generate` takes for the phase's requests: together, or each alone (its time to first token
    when `max_tokens` is 1); the untimed `warm_up` request first."""
    import time

    requests = [vllm_prompt(r) for r in phase["requests"]]
    groups = [[request] for request in requests] if phase.get("alone") else [requests]
    llm.generate([vllm_prompt(phase["warm_up"])], sampling)
    seconds, outputs = [], []
    for _ in range(phase.get("repeats", 1)):
        for group in groups:
            start = time.perf_counter()
            outputs = llm.generate(group, sampling)
            seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "results": [result(output) for output in outputs]}


def counters(llm) -> dict:
    values = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:num_preemptions", "vllm:prefix_cache_hits"):
            values[metric.name] = getattr(metric, "value", 0)
    return values


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    options = dict(
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,
        limit_mm_per_prompt={"image": 4},
    )
    llm = LLM(**{**options, **spec["engine"]})
    sampling = SamplingParams(
        max_tokens=spec.get("max_tokens", 8), temperature=0, logprobs=1, ignore_eos=spec.get("ignore_eos", False)
    )
    phases = []
    for phase in spec["phases"]:
        kind, requests = phase["kind"], phase.get("requests", [])
        if kind == "batch":
            outputs = [result(output) for output in llm.generate([vllm_prompt(r) for r in requests], sampling)]
        elif kind == "sequential":
            outputs = [result(llm.generate([vllm_prompt(r)], sampling)[0]) for r in requests]
        elif kind == "staggered":
            outputs = staggered(llm, requests, sampling)
        elif kind == "timed":
            settings = dict(max_tokens=phase.get("max_tokens", spec.get("max_tokens", 8)), ignore_eos=True)
            outputs = timed_phase(llm, phase, SamplingParams(temperature=0, logprobs=1, **settings))
        elif kind == "keys":
            outputs = keys_phase(llm, requests[0], SamplingParams(max_tokens=64, temperature=0))
        else:
            raise ValueError(f"unknown phase kind {kind!r}")
        phases.append(outputs)
    with open(out_path, "w") as out:
        json.dump({"phases": phases, "counters": counters(llm)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
