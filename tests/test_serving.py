"""Serving the digits checkpoint the usual ways: `generate` and the pipeline on its own generation config, images as
paths, URLs and base64, Transformers' OpenAI-compatible server (`examples/serve.py`) driven by the real `openai`
client, the Inference Endpoints handler, and the model card's widget."""

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from devtools.bundle import ROOT, Bundle
from tests.utils.docs import blocks
from tests.utils.serving import DEMO, EXAMPLES, ask, chat, client, digits_clip, encoded, image_part


def question(example: dict, image: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", **image}, {"type": "text", "text": example["question"]}]}]


@pytest.fixture(scope="module")
def demo():
    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True).eval()
    return model, processor


def test_generate_on_the_saved_generation_config_stops_at_the_end_of_the_turn(demo):
    """No stop token passed: the checkpoint's generation config ends generation at `<|im_end|>`."""
    model, processor = demo
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in model.generation_config.eos_token_id and model.generation_config.pad_token_id is not None
    for example in EXAMPLES:
        inputs = processor.apply_chat_template(
            question(example, {"path": str(DEMO / example["image"])}),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1] :]
        assert new[-1] == end and len(new) < 20
        assert processor.decode(new, skip_special_tokens=True).strip() == example["answer"]


@pytest.mark.parametrize("source", ["url", "path", "file url", "base64", "data uri", "pil"])
def test_the_pipeline_takes_images_as_chat_messages_carry_them(demo, source):
    model, processor = demo
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    for example in EXAMPLES:
        path = str(DEMO / example["image"])
        image = {
            "url": {"url": path},
            "path": {"path": path},
            "file url": {"url": f"file://{path}"},
            "base64": {"base64": encoded(example["image"])},
            "data uri": {"url": f"data:image/png;base64,{encoded(example['image'])}"},
            "pil": {"image": PIL.Image.open(path)},
        }[source]
        out = pipe(text=question(example, image), max_new_tokens=20, return_full_text=False)
        assert out[0]["generated_text"].strip() == example["answer"], (example, out)


@pytest.fixture
def http_folder():
    """The demo folder on a local HTTP server (127.0.0.1), for images given as http URLs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(DEMO)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_images_given_as_text_equal_the_same_image_given_as_pil(demo, http_folder):
    _, processor = demo
    name = EXAMPLES[2]["image"]
    path = str(DEMO / name)
    reference = processor.image_processor(PIL.Image.open(path))["pixel_values"]
    for source in (
        path,
        f"file://{path}",
        f"data:image/png;base64,{encoded(name)}",
        encoded(name),
        f"{http_folder}/{name}",
    ):
        torch.testing.assert_close(processor.image_processor(source)["pixel_values"], reference, rtol=0, atol=0)


def test_unreadable_images_are_refused_naming_the_image_and_why(demo, tmp_path, http_folder):
    _, processor = demo
    good = str(DEMO / EXAMPLES[0]["image"])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((DEMO / EXAMPLES[0]["image"]).read_bytes()[:200])
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    cases = {
        str(tmp_path / "missing.png"): r"image 1 of the batch: no such file .*missing\.png",
        "data:image/png;base64,!!!notbase64": r"image 1 of the batch \(a data URI of 34 characters\) could not be",
        base64.b64encode(b"plain text, not an image" * 4).decode(): r"image 1 of the batch \(a base64 string",
        str(truncated): r"image 1 of the batch \(the file .*truncated\.png\) could not be decoded",
        str(text_file): r"image 1 of the batch \(the file .*notes\.png\) could not be decoded",
        f"{http_folder}/missing.png": r"image 1 of the batch \(the URL http://127\.0\.0\.1:\d+/missing\.png\)",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError, match=message):
            processor.image_processor([good, source])


def test_the_decompression_bomb_limit_stays_on(demo, tmp_path):
    """A PNG whose header claims more pixels than Pillow allows is refused before anything is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    side = int((2 * PIL.Image.MAX_IMAGE_PIXELS) ** 0.5) + 1000
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="image 0 of the batch .* decompression-bomb limit"):
        demo[1].image_processor(str(bomb))


# ---- Transformers' OpenAI-compatible server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`examples/serve.py` (Transformers' `transformers serve`) on a free port of 127.0.0.1, as on a fresh machine: an
    empty `HF_HOME` (no Hub cache folder) and `HF_HUB_OFFLINE=1`; stopped by its PID."""
    from examples.serve import running

    fresh = {"HF_HOME": str(tmp_path_factory.mktemp("fresh-hf-home") / "hf"), "HF_HUB_OFFLINE": "1"}
    with running(DEMO, "--device", "cpu", log=ROOT / ".pytest-serve.log", env=fresh) as base_url:
        yield base_url


def test_the_server_lists_the_served_model_on_a_fresh_machine(server):
    """The OpenAI client's first call; Transformers ≤ 5.23 answered it with a 500 when no Hub cache folder exists."""
    listed = [model.id for model in client(server).models.list()]
    assert str(DEMO.resolve()) in listed
    assert (
        chat(
            server,
            [image_part(EXAMPLES[0]["image"]), {"type": "text", "text": EXAMPLES[0]["question"]}],
            model=listed[listed.index(str(DEMO.resolve()))],
        ).strip()
        == EXAMPLES[0]["answer"]
    )


def test_the_model_list_adapter_is_needed_only_before_transformers_5_24():
    """What changed: Transformers 5.24's server lists the served model itself (`ModelManager.list_models`); before,
    `/v1/models` scanned the Hub cache folder only (`ModelManager.get_gen_models`)."""
    from packaging.version import Version
    from transformers import __version__
    from transformers.cli.serving.model_manager import ModelManager

    assert hasattr(ModelManager, "list_models") == (Version(__version__) >= Version("5.24.0"))
    assert hasattr(ModelManager, "list_models") or hasattr(ModelManager, "get_gen_models")


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_chat_completions_answer_like_make_demo(server, stream):
    for example in EXAMPLES:
        assert ask(server, example, stream).strip() == example["answer"], example


def test_eight_concurrent_requests_are_all_answered(server):
    requests = [EXAMPLES[i % len(EXAMPLES)] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda example: ask(server, example), requests))
    assert [a.strip() for a in answers] == [e["answer"] for e in requests]


def test_bad_requests_get_400_with_the_reason_and_the_server_keeps_answering(server):
    from openai import BadRequestError

    text = {"type": "text", "text": "What digit is this?"}
    bad = {
        "an <image> placeholder without an image": (
            [{"type": "text", "text": "<image>\nWhat digit is this?"}],
            "1 image placeholders .* but no images",
        ),
        "corrupt base64": (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAbm90IGFuIGltYWdl"}}, text],
            "image 0 of the request is not an image Pillow can read",
        ),
        "50 images": (
            [image_part(EXAMPLES[0]["image"])] * 50 + [text],
            "the request holds 50 images and videos; this server takes at most 8",
        ),
    }
    for name, (content, message) in bad.items():
        with pytest.raises(BadRequestError, match=message):
            chat(server, content)
            pytest.fail(f"{name} was answered")
    with pytest.raises(BadRequestError) as unknown:
        chat(server, [text], model="someone/unknown-model")
    assert unknown.value.status_code == 400 and "someone/unknown-model" in unknown.value.response.text
    assert ask(server, EXAMPLES[0]).strip() == EXAMPLES[0]["answer"]


def test_the_serving_page_s_client_example_answers(server, monkeypatch):
    """The `needs-server` block of docs/serving.md, as written, against this server (only its address differs)."""
    (block,) = [block for block in blocks(ROOT / "docs" / "serving.md") if block.mark == "needs-server"]
    monkeypatch.chdir(ROOT)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block.code.replace("http://127.0.0.1:8000/v1", server), str(block), "exec"), {})
    assert output.getvalue().strip() == "6"


def test_the_launcher_refuses_continuous_batching_for_lvtc():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve.py"), str(DEMO), "--continuous-batching"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "uses LVTC, whose decoder layers hold different numbers of tokens" in result.stderr
    assert "each tile 64 tokens from layer 3 on instead of 16" in result.stderr
    assert "but --continuous-batching (Transformers' continuous batching) keeps one paged KV cache" in result.stderr


# ---- Inference Endpoints handler -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def handler():
    """As the endpoint toolkit does: import `handler.py` from the model folder, build `EndpointHandler(path)`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("handler", DEMO / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The handler sets its process's media policy (a server's) in the environment; this process is shared with the
    # other tests, whose library calls read local files: the variable is removed again afterwards.
    variable = Bundle(DEMO).load("media_internvl_x.MEDIA_POLICY_VARIABLE")
    assert variable not in os.environ
    try:
        yield module.EndpointHandler(str(DEMO))
    finally:
        os.environ.pop(variable, None)


def test_endpoint_handler_answers_like_make_demo(handler):
    for example in EXAMPLES:
        for image in (encoded(example["image"]), f"data:image/png;base64,{encoded(example['image'])}"):
            result = handler({"inputs": {"image": image, "text": example["question"]}})
            assert json.loads(json.dumps(result)) == [{"generated_text": example["answer"]}]
    example = EXAMPLES[4]
    messages = [
        {"role": "user", "content": [image_part(example["image"]), {"type": "text", "text": example["question"]}]}
    ]
    assert handler({"inputs": messages, "parameters": {"max_new_tokens": 8}}) == [{"generated_text": example["answer"]}]


def test_endpoint_handler_takes_a_video_as_the_processor_does(handler, tmp_path):

    clip = digits_clip(tmp_path, count=10)
    question = "What digit is this?"
    result = handler({"inputs": {"video": clip, "text": question}, "parameters": {"max_new_tokens": 8}})
    processor, model = handler.processor, handler.model
    messages = [{"role": "user", "content": [{"type": "video", "url": clip}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["num_patches"].tolist() == [1] * 8  # a video file gives 8 frames by default
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert result == [{"generated_text": processor.decode(ids, skip_special_tokens=True).strip()}]
    short = handler({"inputs": {"video": digits_clip(tmp_path, count=4), "text": question}})  # all of its 4 frames
    assert isinstance(short[0]["generated_text"], str)


@pytest.mark.parametrize(
    "payload,message",
    [
        ({"parameters": {}}, "must be a JSON object with `inputs`"),
        ({"inputs": {"image": encoded(EXAMPLES[0]["image"])}}, "needs a non-empty `text`"),
        ({"inputs": 42}, "`inputs` must be"),
        ({"inputs": {"text": "Hi", "image": 7}}, "must be a string"),
        ({"inputs": {"text": "Hi", "video": ["frames"]}}, "`inputs.video` must be a string"),
        (
            {"inputs": {"text": "Hi"}, "parameters": {"max_tokens": 5}},
            r"unknown or unaccepted generation parameters \['max_tokens'\]",
        ),
        ({"inputs": {"text": "What?", "image": "data:image/png;base64,AAAA"}}, "image 0 of the request is not an"),
        # what a stranger must not reach: the disk, this machine's network, unbounded work
        ({"inputs": {"text": "What?", "image": str(DEMO / EXAMPLES[0]["image"])}}, "reads no local files"),
        ({"inputs": {"text": "What?", "image": "file:///etc/hostname"}}, "reads no local files"),
        ({"inputs": {"text": "What?", "image": "http://127.0.0.1:9/x.png"}}, "not a public address"),
        ({"inputs": {"text": "What?", "image": "http://169.254.169.254/latest"}}, "not a public address"),
        (
            {"inputs": {"text": "Hi"}, "parameters": {"max_new_tokens": 10**6}},
            r"`max_new_tokens` must be an integer from 1 to 1024",
        ),
        ({"inputs": {"text": "Hi"}, "parameters": {"num_beams": 64}}, r"`num_beams` must be an integer from 1 to 4"),
        ({"inputs": {"text": "Hi"}, "parameters": {"cache_implementation": "static"}}, "unaccepted generation"),
        ({"inputs": {"text": "Hi"}, "parameters": {"do_sample": "yes"}}, "must be true or false"),
    ],
)
def test_endpoint_handler_refuses_bad_payloads_by_name(handler, payload, message):
    with pytest.raises(ValueError, match=message):
        handler(payload)


# ---- model card ----------------------------------------------------------------------------------------------------
def test_endpoint_handler_takes_no_source_but_one_string(handler, tmp_path):
    """A media source given as a list (or any other non-string) is refused by the intake, in every key a part may use:
    Transformers would hand the list to the processor, which would read what it names. Behind the intake, the handler's
    own process reads media under the server policy too, so even a processor call the intake never saw reads no
    local file."""
    private = tmp_path / "private.png"
    private.write_bytes((DEMO / EXAMPLES[0]["image"]).read_bytes())
    parts = [
        {"type": "image", "image": [str(private)]},
        {"type": "image", "url": [str(private)]},
        {"type": "image", "path": [str(private)]},
        {"type": "image", "url": [f"file://{private}"]},
        {"type": "video", "video": [str(private)]},
        {"type": "image_url", "image_url": {"url": [str(private)]}},
    ]
    for part in parts:
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What digit is this?"}]}]
        with pytest.raises(ValueError, match=r"must give its (image|video) as one string .* got list"):
            handler({"inputs": messages})
    with pytest.raises(ValueError, match="reads no local files"):
        handler.processor(text=["<image>"], images=[str(private)])


def test_the_model_card_parses_and_its_widget_asks_about_shipped_images():
    from huggingface_hub import ModelCard

    card = ModelCard.load(ROOT / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    widget = card.data.widget
    assert widget
    for entry in widget:
        (message,) = entry["messages"]
        kinds = [part["type"] for part in message["content"]]
        assert message["role"] == "user" and kinds == ["image_url", "text"]
        image = message["content"][0]["image_url"]["url"]
        (example,) = [e for e in EXAMPLES if image == f"examples/digits-demo/{e['image']}"]
        assert message["content"][1]["text"] == example["question"] and entry["output"]["text"] == example["answer"]
