"""The vLLM plugin (`vllm_plugin/`, installed into `.venv-vllm` by `make test-vllm`) serving InternVL-X exactly: the
LVTC digits demo (k = 3 of 4 layers, 16 → 64 tokens per tile), a random-weight LVTC variant, and PVTC and pixel-shuffle
checkpoints, against the bundle's own `generate` (float32, sdpa, one request at a time).

Each engine runs in a process of its own (devtools/vllm_scenarios.py), with several scenarios per engine so that the
file stays within its share of CI: a batch, requests arriving while others decode, prefix caching, the keys and values
each layer writes; then a pool small enough to preempt, and a token budget that cuts prompts into chunks around their
images. Elsewhere than `.venv-vllm` vLLM is not importable and the file is skipped.
"""

import contextlib
import io
import json
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM runs in its own virtualenv: make test-vllm")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from devtools.bundle import ROOT  # noqa: E402
from tests.utils.docs import blocks  # noqa: E402
from tests.utils.engines import (  # noqa: E402
    DEMO,
    EXAMPLES,
    build,
    bundle_greedy,
    chat_prompt,
    devtool_output,
    question,
    raw_prompt,
    run_devtool,
    vllm_server,
    worst_logprob_gap,
)

IMAGES = {len_: str(DEMO / e["image"]) for len_, e in zip((3, 4, 3, 1, 5, 3), EXAMPLES)}  # tiles → an example image


def request(path: Path, example: dict, images: list[str], before: str = "") -> dict:
    """A chat prompt with `images` (one placeholder each, before the question) as the bundle renders it."""
    return {"prompt": chat_prompt(path, question(example, len(images), before)), "images": images}


def as_sent(requests: list[dict], **extra) -> list[dict]:
    return [{"prompt": raw_prompt(r["prompt"]), "images": r["images"], **extra} for r in requests]


def assert_exact(results: list[dict], references: list[dict], tolerance: float = 1e-4) -> None:
    for number, (result, reference) in enumerate(zip(results, references)):
        assert result["token_ids"] == reference["token_ids"], (number, result, reference)
    assert worst_logprob_gap(results, references) <= tolerance


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """The LVTC demo with the engine's defaults (prefix caching on): a batch of the six demo questions; requests of
    0, 1, 3 and 5 tiles and of two images added while others decode; questions sharing a long system prompt, one
    after the other; and the keys and values of one prefill."""
    tmp = tmp_path_factory.mktemp("demo-run")
    batch = [request(DEMO, e, [str(DEMO / e["image"])]) for e in EXAMPLES]
    mixed = [
        {"prompt": chat_prompt(DEMO, [{"role": "user", "content": "Count to three."}]), "images": []},
        request(DEMO, EXAMPLES[3], [IMAGES[1]]),
        request(DEMO, EXAMPLES[0], [IMAGES[3]]),
        request(DEMO, EXAMPLES[4], [IMAGES[5]]),
        request(DEMO, EXAMPLES[2], [IMAGES[1], IMAGES[5]], before="Two images:"),
    ]
    system = "You read handwritten digits for a living and answer in digits only. " * 6
    shared = [
        {
            "prompt": chat_prompt(
                DEMO,
                [{"role": "system", "content": system}, *question(e)],
            ),
            "images": [str(DEMO / e["image"])],
        }
        for e in EXAMPLES[:3]
    ]
    keys = request(DEMO, EXAMPLES[2], [IMAGES[1], IMAGES[3]], before="Look:")
    spec = {
        "engine": {"model": str(DEMO), "max_num_seqs": 8, "max_model_len": 1024},
        "phases": [
            {"kind": "batch", "requests": as_sent(batch)},
            {"kind": "staggered", "requests": [r | {"after_steps": 2 * i} for i, r in enumerate(as_sent(mixed))]},
            {"kind": "sequential", "requests": as_sent(shared)},
            {"kind": "keys", "requests": as_sent([keys])},
        ],
    }
    output = devtool_output("vllm_scenarios.py", tmp, spec)
    return {"output": output, "batch": batch, "mixed": mixed, "shared": shared, "keys": keys}


def test_a_batch_of_the_demo_questions_gives_the_bundle_s_tokens(demo_run):
    assert_exact(demo_run["output"]["phases"][0], bundle_greedy(DEMO, demo_run["batch"]))


def test_requests_arriving_while_others_decode_give_their_solo_tokens(demo_run):
    """Text only, 1, 3 and 5 tiles, two images: each added two steps after the one before, so that prefills run in
    the same steps as other requests' decodes; each gives what it gives alone."""
    assert_exact(demo_run["output"]["phases"][1], bundle_greedy(DEMO, demo_run["mixed"]))


def test_prefix_caching_reuses_the_shared_system_prompt_and_changes_no_token(demo_run):
    assert_exact(demo_run["output"]["phases"][2], bundle_greedy(DEMO, demo_run["shared"]))
    assert demo_run["output"]["counters"].get("vllm:prefix_cache_hits", 0) > 0  # the system prompt was reused


def test_each_layer_holds_the_bundle_s_keys_and_values_for_its_stream(demo_run):
    """After the prefill, layers 0..k-1 hold the bundle's keys and values of the short stream (short token s in slot
    s of the request's blocks) and layers k.. those of the long stream (long row p in slot p)."""
    recorded = demo_run["output"]["phases"][3]
    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.float32).eval()
    images = [Image.open(path).convert("RGB") for path in demo_run["keys"]["images"]]
    inputs = processor(images=images, text=demo_run["keys"]["prompt"], return_tensors="pt")
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    block_size, blocks = recorded["block_size"], recorded["block_ids"]
    k = model.config.lvtc_expand_layer
    for layer in range(model.config.text_config.num_hidden_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (heads, rows, head_dim)
        written = recorded["keys"][str(layer)]
        rows = keys.shape[1]
        assert rows == (inputs["input_ids"].shape[1] if layer < k else len(recorded["prompt_token_ids"]))
        for row in range(rows):
            slot = str(blocks[row // block_size] * block_size + row % block_size)
            key, value = (torch.tensor(part).view(keys.shape[0], -1) for part in written[slot])
            torch.testing.assert_close(key, keys[:, row], rtol=0, atol=1e-5)
            torch.testing.assert_close(value, values[:, row], rtol=0, atol=1e-5)


def test_preempted_requests_are_recomputed_to_the_same_tokens(tmp_path):
    """A KV pool that holds the first two prompts but not their 24 decoded tokens more: vLLM preempts requests (its
    counter says how many) and recomputes them from their prompts; every request still gives the bundle's tokens."""
    requests = [request(DEMO, e, [str(DEMO / e["image"])]) for e in EXAMPLES]
    spec = {
        "engine": {
            "model": str(DEMO),
            "max_num_seqs": 6,
            "max_model_len": 512,
            "block_size": 32,  # the CPU attention's smallest
            "num_gpu_blocks_override": 19,  # 608 slots: two prompts of 238 and 302 rows fit, not their 24 tokens more
        },
        "max_tokens": 24,
        "ignore_eos": True,
        "phases": [{"kind": "batch", "requests": as_sent(requests)}],
    }
    output = devtool_output("vllm_scenarios.py", tmp_path, spec)
    assert output["counters"].get("vllm:num_preemptions", 0) > 0
    assert_exact(output["phases"][0], bundle_greedy(DEMO, requests, max_tokens=24, ignore_eos=True))


def test_prompts_cut_into_chunks_around_their_images_give_the_same_tokens(tmp_path):
    """A token budget just above one image's long stream (5 tiles × 64 + 2 = 322): text before, between and after
    two images makes each prompt take at least three chunks, each image whole in one of them."""
    requests = [
        request(DEMO, EXAMPLES[4], [IMAGES[5], IMAGES[5]], before="Here are two pictures of digits to compare. " * 3),
        request(DEMO, EXAMPLES[0], [IMAGES[4], IMAGES[5]], before="A first picture, then a second one. " * 4),
    ]
    budget = 330
    spec = {
        "engine": {
            "model": str(DEMO),
            "max_num_seqs": 2,
            "max_model_len": 1024,
            "max_num_batched_tokens": budget,
            "enable_chunked_prefill": True,
        },
        "phases": [{"kind": "batch", "requests": as_sent(requests)}],
    }
    output = devtool_output("vllm_scenarios.py", tmp_path, spec)
    for result in output["phases"][0]:
        assert len(result["prompt_token_ids"]) > 2 * budget  # at least three chunks
    assert_exact(output["phases"][0], bundle_greedy(DEMO, requests))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plugin-checkpoints")
    return {
        "pvtc": build(root / "pvtc", lvtc_enabled=False),
        "pixel_shuffle": build(root / "pixel_shuffle", seed=1, lvtc_enabled=False, projector_type="pixel_shuffle"),
        # LVTC expanding at layer 2 of 4 (its LR injection at layer 1 before it), bilinear upsampling
        "lvtc_k2": build(root / "lvtc_k2", lvtc_expand_layer=2, lvtc_upsample_mode="bilinear"),
        "fastv": build(root / "fastv", lvtc_enabled=False, fastv_layer=1, fastv_ratio=0.5),
    }


@pytest.mark.parametrize("name", ["pvtc", "pixel_shuffle"])
def test_pvtc_and_pixel_shuffle_checkpoints_give_the_bundle_s_tokens(checkpoints, name, tmp_path):
    """One stream, N1² rows per tile: the prompts are the bundle processor's, token for token."""
    path = checkpoints[name]
    requests = [request(path, e, [str(DEMO / e["image"])]) for e in EXAMPLES]
    spec = {
        "engine": {"model": str(path), "max_model_len": 1024},
        "phases": [{"kind": "batch", "requests": as_sent(requests)}],
    }
    results = devtool_output("vllm_scenarios.py", tmp_path, spec)["phases"][0]
    references = bundle_greedy(path, requests)
    assert [r["prompt_token_ids"] for r in results] == [r["prompt_token_ids"] for r in references]
    assert_exact(results, references)


def test_another_lvtc_geometry_with_area_slicing_gives_the_bundle_s_tokens(checkpoints, tmp_path):
    """k = 2, bilinear upsampling, RVTC's area slicing: images of 1 to 5 tiles (thumbnails included), and two images in
    one prompt."""
    path = checkpoints["lvtc_k2"]
    options = {"slicing": "area"}
    sizes = [(64, 64), (120, 70), (64, 180), (200, 150), (250, 250)]
    images = []
    for index, (width, height) in enumerate(sizes):
        images.append(str(tmp_path / f"{index}.png"))
        Image.open(DEMO / EXAMPLES[index % len(EXAMPLES)]["image"]).convert("RGB").resize((width, height)).save(
            images[-1]
        )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    tiles = [processor.image_processor.get_number_of_image_patches(h, w, options) for w, h in sizes]
    assert sorted(set(tiles)) == [1, 3, 4, 5], tiles  # two tiles come with a thumbnail: three
    requests = [request(path, EXAMPLES[0], [image]) for image in images] + [
        request(path, EXAMPLES[1], images[1:3], before="Two of them:")
    ]
    spec = {
        "engine": {"model": str(path), "max_model_len": 1024, "mm_processor_kwargs": options},
        "phases": [{"kind": "batch", "requests": as_sent(requests)}],
    }
    results = devtool_output("vllm_scenarios.py", tmp_path, spec)["phases"][0]
    assert_exact(results, bundle_greedy(path, requests, **options))


def refusal(tmp_path, engine: dict) -> str:
    tmp_path.mkdir()
    result = run_devtool("vllm_scenarios.py", tmp_path, {"engine": engine, "phases": []}, timeout=600)
    assert result.returncode != 0 and not (tmp_path / "out.json").exists()
    return result.stdout + result.stderr


def test_fastv_a_pipeline_a_small_token_budget_and_windowed_layers_are_refused_by_name(checkpoints, tmp_path):
    output = refusal(tmp_path / "fastv", {"model": str(checkpoints["fastv"])})
    assert "this checkpoint uses FastV" in output and "vLLM cannot serve" in output
    output = refusal(tmp_path / "pipeline", {"model": str(DEMO), "pipeline_parallel_size": 2})
    assert "cannot cross pipeline stages: serve with pipeline_parallel_size=1" in output
    output = refusal(tmp_path / "budget", {"model": str(DEMO), "max_num_batched_tokens": 200, "max_model_len": 1024})
    assert "the largest image takes 322 rows" in output and "max_num_batched_tokens=200" in output
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    for file in DEMO.iterdir():
        (windowed / file.name).symlink_to(file.resolve())
    (windowed / "config.json").unlink()
    config = json.loads((DEMO / "config.json").read_text())
    config["text_config"]["layer_types"] = ["full_attention", "sliding_attention"] * 2
    (windowed / "config.json").write_text(json.dumps(config))
    output = refusal(tmp_path / "window", {"model": str(windowed)})
    assert "LVTC runs full causal attention in every decoder layer" in output and "sliding_attention" in output


def test_vllm_serve_answers_the_openai_client_as_the_bundle(tmp_path):
    """`vllm serve` of the LVTC demo (the plugin's model), driven by the `openai` client: a base64 image, answered as
    the bundle answers it, streamed and not; eight clients at once; an undecodable image gets a 4xx and the next
    request is answered."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from openai import BadRequestError, OpenAI

    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    requests = [request(DEMO, e, [str(DEMO / e["image"])]) for e in EXAMPLES]
    expected = [
        processor.decode(r["token_ids"], skip_special_tokens=True).strip() for r in bundle_greedy(DEMO, requests)
    ]

    def image_url(example: dict) -> str:
        return "data:image/png;base64," + base64.b64encode((DEMO / example["image"]).read_bytes()).decode()

    with vllm_server(DEMO, tmp_path, "--max-model-len", "1024") as base_url:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        (model,) = [entry.id for entry in client.models.list()]

        def ask(example: dict, url: str | None = None, stream: bool = False) -> str:
            content = [{"type": "image_url", "image_url": {"url": url or image_url(example)}}]
            content.append({"type": "text", "text": example["question"]})
            options = dict(model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0)
            if not stream:
                return client.chat.completions.create(**options).choices[0].message.content.strip()
            chunks = client.chat.completions.create(**options, stream=True)
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices).strip()

        assert ask(EXAMPLES[0]) == expected[0] and ask(EXAMPLES[1], stream=True) == expected[1]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, [EXAMPLES[i % len(EXAMPLES)] for i in range(8)]))
        assert answers == [expected[i % len(EXAMPLES)] for i in range(8)]
        with pytest.raises(BadRequestError) as refused:
            ask(EXAMPLES[0], "data:image/png;base64,AAAAbm90IGFuIGltYWdl")
        assert 400 <= refused.value.status_code < 500
        assert ask(EXAMPLES[2]) == expected[2]

        # The page's example (docs/serving.md, vLLM), as written: only the address and the served path differ.
        (block,) = [block for block in blocks(ROOT / "docs" / "serving.md") if block.mark == "needs-vllm"]
        code = block.code.replace("http://127.0.0.1:8000/v1", base_url).replace('"PATH"', repr(model))
        output = io.StringIO()
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(output):
            exec(compile(code, str(block), "exec"), {})
        assert output.getvalue().strip() == "6"
