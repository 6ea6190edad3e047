"""Serving with vLLM's Transformers backend (`model_impl="transformers"`), on vLLM's CPU build: `make test-vllm` runs
this file in `.venv-vllm` (devtools/vllm_env.py); elsewhere vLLM is not importable and it is skipped.

Checkpoints are built from the committed digits demo: with LVTC off (its PVTC projector, as the authors' released
models), and with LVTC off and a pixel-shuffle projector (InternVL2's). Each engine runs in a process of its own
(devtools/vllm_runs.py, or `vllm serve`), so it is shut down with it. References are Transformers' `generate` on the
same checkpoint, in this process.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM runs in its own virtualenv: make test-vllm")

from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from tests.conftest import ROOT  # noqa: E402
from tests.utils.engines import (  # noqa: E402
    DEMO,
    ENV,
    EXAMPLES,
    MAX_TOKENS,
    build,
    bundle_greedy,
    chat_prompt,
    question,
    raw_prompt,
    vllm_server,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-checkpoints")
    return {
        "pvtc": build(root / "pvtc", lvtc_enabled=False),
        "pixel_shuffle": build(root / "pixel_shuffle", seed=1, lvtc_enabled=False, projector_type="pixel_shuffle"),
        "fastv": build(root / "fastv", lvtc_enabled=False, fastv_layer=1, fastv_ratio=0.5),
        "lvtc": DEMO,
    }


def transformers_greedy(path: Path, examples: list[dict], **processor_kwargs) -> list[dict]:
    """Per example: the bundle's greedy tokens (ending at `<|im_end|>`), their log-probabilities, the prompt."""
    requests = [{"prompt": chat_prompt(path, question(e)), "images": [str(DEMO / e["image"])]} for e in examples]
    return [
        {**result, "prompt": request["prompt"]}
        for result, request in zip(bundle_greedy(path, requests, **processor_kwargs), requests)
    ]


def vllm_run(tmp_path: Path, spec: dict) -> subprocess.CompletedProcess:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [
        sys.executable,
        str(ROOT / "devtools" / "vllm_runs.py"),
        str(tmp_path / "spec.json"),
        str(tmp_path / "out.json"),
    ]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)


def vllm_results(tmp_path: Path, spec: dict) -> list[dict]:
    result = vllm_run(tmp_path, spec)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())["results"]


@pytest.mark.parametrize("name", ["pvtc", "pixel_shuffle"])
def test_a_batch_of_demo_questions_gives_transformers_greedy_tokens(checkpoints, name, tmp_path):
    references = transformers_greedy(checkpoints[name], EXAMPLES)
    requests = [
        {"prompt": raw_prompt(r["prompt"]), "images": [str(DEMO / e["image"])]} for r, e in zip(references, EXAMPLES)
    ]
    results = vllm_results(tmp_path, {"model": str(checkpoints[name]), "requests": requests, "max_tokens": MAX_TOKENS})
    worst = 0.0
    for reference, result in zip(references, results):
        assert result["prompt_token_ids"] == reference["prompt_token_ids"]  # the same image spans, token for token
        assert result["token_ids"] == reference["token_ids"]
        worst = max([worst] + [abs(a - b) for a, b in zip(result["logprobs"], reference["logprobs"])])
    assert worst <= 1e-4, worst
    if name == "pvtc":  # the answers end the turn: `<|im_end|>` is the checkpoint's end of generation
        end = AutoProcessor.from_pretrained(checkpoints[name], trust_remote_code=True).tokenizer.convert_tokens_to_ids(
            "<|im_end|>"
        )
        assert all(result["token_ids"][-1] == end and result["finish_reason"] == "stop" for result in results)


def test_chat_with_an_image_url_answers_as_transformers_and_stops_at_the_end_of_the_turn(checkpoints, tmp_path):
    examples = EXAMPLES[:3]
    references = transformers_greedy(checkpoints["pvtc"], examples)
    conversations = []
    for example in examples:
        data = base64.b64encode((DEMO / example["image"]).read_bytes()).decode()
        conversations.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                        {"type": "text", "text": example["question"]},
                    ],
                }
            ]
        )
    spec = {"model": str(checkpoints["pvtc"]), "kind": "chat", "requests": conversations, "max_tokens": MAX_TOKENS}
    results = vllm_results(tmp_path, spec)
    processor = AutoProcessor.from_pretrained(checkpoints["pvtc"], trust_remote_code=True)
    for reference, result in zip(references, results):
        assert result["prompt_token_ids"] == reference["prompt_token_ids"]
        assert result["token_ids"] == reference["token_ids"] and result["finish_reason"] == "stop"
        assert result["text"].strip() == processor.decode(reference["token_ids"], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name,schedule", [("lvtc", "LVTC"), ("fastv", "FastV")])
def test_lvtc_and_fastv_are_refused_when_the_engine_loads_them(checkpoints, name, schedule, tmp_path):
    spec = {"model": str(checkpoints[name]), "requests": [{"prompt": "Hello"}], "max_tokens": 2}
    result = vllm_run(tmp_path, spec)
    assert result.returncode != 0 and not (tmp_path / "out.json").exists()
    output = result.stdout + result.stderr
    assert f"this checkpoint uses {schedule}, whose decoder layers hold different numbers of tokens" in output
    assert "Serve a PVTC or pixel-shuffle checkpoint" in output and "transformers serve" in output


@pytest.mark.parametrize("slicing", ["area", "edge"])
def test_rvtc_slicing_gives_vllm_the_processor_s_tile_counts(checkpoints, slicing, tmp_path):
    """Images of several shapes: vLLM asks the processor how many tiles each takes (`_get_num_multimodal_tokens`)
    and cuts `pixel_values` by it; the prompts it builds are the processor's, token for token."""
    sizes = [(64, 64), (200, 70), (30, 180), (300, 300)]
    options = {"slicing": slicing, "max_patches": 6}
    processor = AutoProcessor.from_pretrained(checkpoints["pvtc"], trust_remote_code=True)
    requests, expected = [], []
    for index, (width, height) in enumerate(sizes):
        path = tmp_path / f"{index}.png"
        Image.open(DEMO / EXAMPLES[0]["image"]).convert("RGB").resize((width, height)).save(path)
        prompt = processor.apply_chat_template(question(EXAMPLES[0]), add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[Image.open(path)], text=prompt, **options)
        requests.append({"prompt": raw_prompt(prompt), "images": [str(path)]})
        expected.append(inputs["input_ids"][0].tolist())
    tiles = [processor.image_processor.get_number_of_image_patches(h, w, options) for w, h in sizes]
    assert len(set(tiles)) > 2, tiles  # the shapes exercise the slicing
    spec = {"model": str(checkpoints["pvtc"]), "requests": requests, "max_tokens": 1, "mm_processor_kwargs": options}
    results = vllm_results(tmp_path, spec)
    assert [result["prompt_token_ids"] for result in results] == expected


# ---- vllm serve ----------------------------------------------------------------------------------------------------
@pytest.fixture
def server(checkpoints, tmp_path):
    with vllm_server(checkpoints["pvtc"], tmp_path, "--model-impl", "transformers") as base_url:
        yield base_url


def test_vllm_serve_answers_the_openai_client_as_transformers(checkpoints, server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=300)
    (model,) = [entry.id for entry in client.models.list()]
    processor = AutoProcessor.from_pretrained(checkpoints["pvtc"], trust_remote_code=True)
    references = transformers_greedy(checkpoints["pvtc"], EXAMPLES[:2])

    def ask(example: dict, url: str) -> str:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": example["question"]}]
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].message.content

    def image_url(example: dict) -> str:
        return "data:image/png;base64," + base64.b64encode((DEMO / example["image"]).read_bytes()).decode()

    for example, reference in zip(EXAMPLES[:2], references):
        expected = processor.decode(reference["token_ids"], skip_special_tokens=True).strip()
        assert ask(example, image_url(example)).strip() == expected
    with pytest.raises(BadRequestError) as refused:
        ask(EXAMPLES[0], "data:image/png;base64,AAAAbm90IGFuIGltYWdl")
    assert 400 <= refused.value.status_code < 500
    expected = processor.decode(references[0]["token_ids"], skip_special_tokens=True).strip()
    assert ask(EXAMPLES[0], image_url(EXAMPLES[0])).strip() == expected  # still answering
