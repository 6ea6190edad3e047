"""Helpers of the vLLM tests: the bundle's own greedy answers (the reference), prompts as vLLM takes them, and engines
run in processes of their own (devtools/vllm_runs.py, devtools/vllm_scenarios.py); a free port and waiting for a
server to answer (the web demo's browser test uses those too)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from devtools.bundle import ROOT

DEMO = ROOT / "examples" / "digits-demo"
EXAMPLES = json.loads((DEMO / "examples.json").read_text())
MAX_TOKENS = 8
ENV = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT))


def build(folder: Path, seed: int = 0, **overrides) -> Path:
    """The demo checkpoint with `overrides`, saved with its processor (and, with `projector_type`, a new projector
    initialised from `seed`)."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True, **overrides)
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(DEMO, trust_remote_code=True).save_pretrained(folder)
    return folder


def question(example: dict, images: int = 1, before: str = "") -> list[dict]:
    content = [{"type": "text", "text": before}] if before else []
    content += [{"type": "image"}] * images + [{"type": "text", "text": example["question"]}]
    return [{"role": "user", "content": content}]


def bundle_greedy(
    path: Path, requests: list[dict], max_tokens: int = MAX_TOKENS, ignore_eos: bool = False, **processor_kwargs
) -> list[dict]:
    """Per request (`{"prompt": rendered chat prompt, "images": [PATH, ...]}`): the bundle's greedy tokens through
    `generate` (float32, one request at a time; past the end of the turn with `ignore_eos`), their log-probabilities
    and the prompt's ids."""
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    results = []
    for request in requests:
        images = [Image.open(image).convert("RGB") for image in request.get("images", [])]
        inputs = processor(images=images or None, text=request["prompt"], return_tensors="pt", **processor_kwargs)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **({"eos_token_id": None} if ignore_eos else {}),
            )
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, tokens)]
        results.append({"token_ids": tokens, "logprobs": logprobs, "prompt_token_ids": inputs["input_ids"][0].tolist()})
    return results


def chat_prompt(path: Path, messages: list[dict]) -> str:
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def raw_prompt(prompt: str, bos: str = "<s>") -> str:
    """A rendered chat prompt as vLLM's `generate` takes it: vLLM's tokenizer adds the BOS the template wrote."""
    return prompt.removeprefix(bos)


def run_devtool(script: str, tmp_path: Path, spec: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """`devtools/SCRIPT SPEC.json OUT.json` in a process of its own (the engine ends with it)."""
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, str(ROOT / "devtools" / script), str(tmp_path / "spec.json"), str(tmp_path / "out.json")]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def devtool_output(script: str, tmp_path: Path, spec: dict) -> dict:
    result = run_devtool(script, tmp_path, spec)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return json.loads((tmp_path / "out.json").read_text())


def worst_logprob_gap(results: list[dict], references: list[dict]) -> float:
    """The largest difference between a result's token log-probabilities and its reference's (tokens equal)."""
    gaps = [abs(a - b) for r, ref in zip(results, references) for a, b in zip(r["logprobs"], ref["logprobs"])]
    return max(gaps, default=0.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answering(url: str, process: subprocess.Popen, log: Path, seconds: float) -> None:
    """Until `url` answers 200; fails with the end of `log` if `process` exits first, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
        time.sleep(0.5)


@contextlib.contextmanager
def vllm_server(model: Path, tmp_path: Path, *options: str):
    """`vllm serve MODEL OPTIONS` (float32, eager) on a free port of 127.0.0.1 in a process group of its own, stopped
    with it; yields the API's base URL once `/health` answers."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        str(model),
        "--trust-remote-code",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *options,
    ]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    # the server as users run it: its engine core in a process of its own (whatever the scenarios run with)
    env = {name: value for name, value in ENV.items() if name != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/health", process, tmp_path / "serve.log", 600)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_group(process)
        log.close()


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine processes included), SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
