"""What a stranger can reach through `examples/serve.py` (Transformers' server behind the launcher's `RequestGate`),
driven by the real `openai` client and plain HTTP over 127.0.0.1: no code loading, no local files, no internal
addresses, bounded fetches that never freeze the server, image sizes checked from their headers, generation fields
within bounds; and each opt-in switch reaching exactly as far as documented. Image hosts are local HTTP servers the
test runs itself (a slow one trickles bytes, one redirects forever)."""

import base64
import io
import json
import re
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import PIL.Image
import pytest
from transformers import AutoImageProcessor

from devtools.bundle import ROOT, Bundle
from tests.utils.serving import (
    DEMO,
    EXAMPLES,
    MODEL,
    TEXT,
    chat,
    client,
    digits_clip,
    encoded,
    image_part,
    post,
    refused,
    url_part,
)


class ImageHost(BaseHTTPRequestHandler):
    """`/demo/NAME`: a demo image; `/slow`: headers, then a byte every 0.2 s for a minute; `/slow-headers`: the status
    line, then a header byte every 0.2 s for a minute (`stalling` counts those in progress); `/hop/N`: a redirect to
    `/hop/N+1`, forever; `/big`: 3 MB."""

    trickling = threading.Event()
    stalling = 0
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow-headers":
            with ImageHost.lock:
                ImageHost.stalling += 1
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(300):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            finally:
                with ImageHost.lock:
                    ImageHost.stalling -= 1
        elif self.path.startswith("/demo/"):
            data = (DEMO / self.path.removeprefix("/demo/")).read_bytes()
            self.answer(data)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            ImageHost.trickling.set()
            try:
                for _ in range(300):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            finally:
                ImageHost.trickling.clear()
        elif self.path.startswith("/hop/"):
            self.send_response(302)
            self.send_header("location", f"/hop/{int(self.path.rsplit('/', 1)[1]) + 1}")
            self.end_headers()
        elif self.path == "/big":
            self.answer(b"\x89PNG" + b"\0" * (3 * 2**20))

    def answer(self, data: bytes):
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    host = ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """The launcher with its defaults."""
    from examples.serve import running

    env = {"HF_HOME": str(tmp_path_factory.mktemp("hf") / "hf"), "HF_HUB_OFFLINE": "1"}
    with running(DEMO, "--device", "cpu", env=env, log=ROOT / ".pytest-serve-safety.log") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    """The launcher with every reach switched on, and tight limits."""
    from examples.serve import running

    env = {"HF_HOME": str(tmp_path_factory.mktemp("hf") / "hf"), "HF_HUB_OFFLINE": "1"}
    options = (
        "--device",
        "cpu",
        "--allow-internal-urls",
        "--allowed-local-media-path",
        str(DEMO),
        "--fetch-timeout",
        "3",
        "--max-decoded-pixels",
        "2000000",
        "--max-image-mb",
        "1",
    )
    with running(DEMO, *options, env=env, log=ROOT / ".pytest-serve-opened.log") as base_url:
        yield base_url


def test_no_client_can_load_code_or_unload_the_model(guarded, tmp_path):
    planted = tmp_path / "evil"
    planted.mkdir()
    (planted / "config.json").write_text('{"auto_map": {"AutoConfig": "evil.Config"}}')
    (planted / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    for path, body in (("/load_model", {"model": str(planted)}), ("/reset", {})):
        status, text = post(guarded, path, body)
        assert status == 403 and "serves one checkpoint only" in text
    assert not (tmp_path / "ran").exists()
    # a request naming another model is refused by Transformers' pinning; the served one still answers
    assert refused(guarded, [TEXT], model=str(planted))[0] == 400
    assert chat(guarded, [image_part(EXAMPLES[0]["image"]), TEXT]).strip() == EXAMPLES[0]["answer"]


def test_local_files_are_refused_without_telling_whether_they_exist(guarded):
    existing, missing = str(DEMO / EXAMPLES[0]["image"]), str(DEMO / "no-such-image.png")
    messages = set()
    for source in (existing, missing, f"file://{existing}", f"file://{missing}", "../../../etc/hostname"):
        status, message = refused(guarded, [url_part(source), TEXT])
        assert status == 400 and "reads no local files" in message
        messages.add(message)
    assert len(messages) == 1  # the same words for a file that exists and one that does not


def test_internal_addresses_are_refused_alike(guarded, image_host):
    messages = set()
    internal = (
        f"{image_host}/demo/{EXAMPLES[0]['image']}",
        "http://127.0.0.1:9/closed.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:9/x.png",
        "http://localhost:1/x.png",
    )
    for url in internal:
        status, message = refused(guarded, [url_part(url), TEXT])
        assert status == 400 and "not a public address" in message
        messages.add(message)
    assert len(messages) == 1  # an open port and a closed one read the same: no port scanning


def test_generation_fields_are_bounded(guarded):
    image = [image_part(EXAMPLES[0]["image"]), TEXT]
    cases = {
        "stop": (dict(stop=["\n"]), "`stop` is not accepted by this server"),
        "generation_config": (
            dict(extra_body={"generation_config": json.dumps({"max_length": 10**6})}),
            "may allow it with --allow-generation-config",
        ),
        "max_tokens": (dict(max_tokens=10**6), r"`max_tokens` must be an integer from 1 to 1024"),
        "temperature": (dict(temperature=9.0), r"`temperature` must be a number from 0.0 to 2.0"),
    }
    for name, (fields, message) in cases.items():
        status, text = refused(guarded, image, **fields)
        assert status == 400 and re.search(message, text), (name, text)


def test_image_sizes_are_checked_from_the_header_before_decoding(guarded):
    huge = PIL.Image.new("1", (10_000, 10_000))  # 100 megapixels in a few kilobytes of PNG
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    status, message = refused(guarded, [url_part(data_uri), TEXT])
    assert status == 400 and "10000×10000 = 100000000 pixels, more than the 40000000 allowed" in message


def test_a_slow_image_host_does_not_freeze_the_server(opened, image_host):
    """The fetch runs off the event loop and stops at the total timeout (3 s here) although bytes keep coming."""
    outcome = {}

    def slow_request():
        outcome["refusal"] = refused(opened, [url_part(f"{image_host}/slow"), TEXT])

    worker = threading.Thread(target=slow_request)
    worker.start()
    assert ImageHost.trickling.wait(30)
    with urllib.request.urlopen(opened.removesuffix("/v1") + "/health", timeout=30) as response:
        assert response.status == 200
    health_answered_while_trickling = ImageHost.trickling.is_set()
    worker.join(60)
    assert health_answered_while_trickling
    status, message = outcome["refusal"]
    assert status == 400 and "not fetched within 3 s" in message


def test_what_each_switch_opens(opened, image_host, tmp_path):
    example = EXAMPLES[1]
    question = {"type": "text", "text": example["question"]}
    # --allow-internal-urls: a URL on this machine is fetched and answered
    assert chat(opened, [url_part(f"{image_host}/demo/{example['image']}"), question]).strip() == example["answer"]
    # --allowed-local-media-path DEMO: a file there is read; one outside it is not
    assert chat(opened, [url_part(str(DEMO / example["image"])), question]).strip() == example["answer"]
    outside = tmp_path / "outside.png"
    outside.write_bytes((DEMO / example["image"]).read_bytes())
    status, message = refused(opened, [url_part(str(outside)), question])
    assert status == 400 and "outside the folder this server reads from" in message
    # the limits still hold: bytes (--max-image-mb 1) and redirects (3)
    status, message = refused(opened, [url_part(f"{image_host}/big"), question])
    assert status == 400 and "3145732 bytes, more than the 1048576 allowed" in message
    status, message = refused(opened, [url_part(f"{image_host}/hop/0"), question])
    assert status == 400 and "more than 3 redirects" in message


def test_the_images_tokens_are_checked_against_the_context_from_their_headers():
    """The intake refuses by the tiles the images' header sizes give, before decoding: a PNG whose pixel data is cut
    off is admitted (nothing decoded) while the context holds, and refused by the context when it does not."""
    bundle = Bundle(DEMO)
    intake_class, limits = bundle.load("serving_internvl_x.Intake"), bundle.load("serving_internvl_x.ServingLimits")()
    parts = bundle.load("serving_internvl_x.message_parts")
    policy = bundle.load("media_internvl_x.MediaPolicy").for_servers()
    image_processor = AutoImageProcessor.from_pretrained(DEMO, trust_remote_code=True)
    plain = bundle.Config.from_pretrained(DEMO, lvtc_enabled=False)
    intake = intake_class(plain, image_processor, policy, limits)
    cut = base64.b64encode((DEMO / EXAMPLES[2]["image"]).read_bytes()[:120]).decode()  # header intact, data cut
    messages = [{"role": "user", "content": [url_part(f"data:image/png;base64,{cut}"), TEXT]}]
    intake.admit(parts(messages))
    assert messages[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    tiles = image_processor.get_number_of_image_patches(*PIL.Image.open(DEMO / EXAMPLES[2]["image"]).size[::-1])
    plain.text_config.max_position_embeddings = 2 + 16 * tiles - 1
    intake = intake_class(plain, image_processor, policy, limits)
    with pytest.raises(ValueError, match=rf"take {2 + 16 * tiles} positions or more .* {tiles} tiles of 16\), more "):
        intake.admit(parts(messages))


def test_the_processor_of_a_server_process_reads_no_local_files(monkeypatch):
    """Defence in depth: the launcher puts the same policy in the environment of the processes that read images."""
    media_policy = Bundle(DEMO).load("media_internvl_x.MediaPolicy")
    read_image = Bundle(DEMO).load("media_internvl_x.read_image")
    monkeypatch.setenv(*media_policy.for_servers().to_environment().popitem())
    with pytest.raises(ValueError, match="reads no local files"):
        read_image(str(DEMO / EXAMPLES[0]["image"]), 0)
    assert read_image(f"data:image/png;base64,{encoded(EXAMPLES[0]['image'])}", 0).size  # data URIs still read
    monkeypatch.delenv(Bundle(DEMO).load("media_internvl_x.MEDIA_POLICY_VARIABLE"))
    assert read_image(str(DEMO / EXAMPLES[0]["image"]), 0).size  # a library user's own files, by default


# ---- the request surface, drawn --------------------------------------------------------------------------------------
def drawn_requests():
    """Chat requests of every shape a client can send: valid and invalid messages and parts, images of every kind
    (good, corrupt, huge by header, local, internal), and generation fields in and out of bounds."""
    from hypothesis import strategies as st

    good = f"data:image/png;base64,{encoded(EXAMPLES[0]['image'])}"
    images = st.sampled_from(
        [
            good,
            "data:image/png;base64,AAAA",
            "data:image/png;base64,!!",
            str(DEMO / "x.png"),
            "file:///etc/hostname",
            "http://127.0.0.1:1/x.png",
            "http://169.254.169.254/",
            7,
            None,
            {"url": good},
            "../../etc/passwd",
            "ftp://example.com/x.png",
        ]
    )
    parts = st.one_of(
        st.builds(lambda url: {"type": "image_url", "image_url": {"url": url}}, images),
        st.builds(lambda url: {"type": "image_url", "image_url": url}, images),
        st.builds(lambda text: {"type": "text", "text": text}, st.one_of(st.text(max_size=30), st.integers())),
        st.sampled_from([{"type": "video", "video": "x.mp4"}, {"type": "nope"}, {}, "just text", None]),
    )
    content = st.one_of(st.text(max_size=40), st.lists(parts, max_size=4), st.none(), st.integers())
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "", 5]), "content": content}
    )
    fields = st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.sampled_from([0, 1, 4, -1, 10**9, "8", 2.5, None]),
            "temperature": st.sampled_from([0, 0.7, 3, -1, "hot", None]),
            "top_p": st.sampled_from([0.5, 1.5, -0.1, None]),
            "stop": st.sampled_from([["\n"], "x", None]),
            "generation_config": st.sampled_from(['{"max_length": 100000}', "{", None]),
            "logit_bias": st.sampled_from([{"5": 1.0}, {str(i): 1 for i in range(400)}, "x", None]),
            "n": st.sampled_from([1, 2]),
        },
    )
    return st.tuples(st.lists(message, min_size=0, max_size=3), fields)


def test_drawn_requests_get_an_answer_or_a_4xx_never_a_crash(guarded):
    """40 drawn requests (the same on every machine): each is answered (200 with a reply) or refused with a 4xx and a
    message; none gets a 5xx or takes the server down, and a good request is answered after them all."""
    from hypothesis import HealthCheck, given, settings

    seen = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=drawn_requests())
    def one(request):
        messages, fields = request
        fields = {key: value for key, value in fields.items() if value is not None}
        status, text = post(
            guarded, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 4, **fields}
        )
        seen.append(status)
        assert status < 500, (messages, fields, status, text[:500])
        if status == 200:
            assert "choices" in json.loads(text)
        else:
            assert 400 <= status < 500 and text.strip(), (status, text)

    one()
    assert any(status == 200 for status in seen) and any(status >= 400 for status in seen)
    assert chat(guarded, [image_part(EXAMPLES[0]["image"]), TEXT]).strip() == EXAMPLES[0]["answer"]


def test_videos_come_as_video_url_parts_within_bounds(guarded, image_host, tmp_path):
    """A `video_url` part (Transformers' server's extension of the OpenAI API) is answered as the processor and
    `generate` answer it here; the frames a request asks for are bounded, other `chat_template_kwargs` refused, and
    a video is checked and fetched under the same rules as an image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    clip = digits_clip(tmp_path)
    content = [{"type": "video_url", "video_url": {"url": clip}}, {"type": "text", "text": "What digit is this?"}]
    answer = (
        client(guarded)
        .chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=8,
            temperature=0,
            extra_body={"chat_template_kwargs": {"num_frames": 4}},
        )
        .choices[0]
        .message.content
    )
    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True).eval()
    local = [{"type": "video", "url": clip}, content[1]]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": local}], add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=4
    )
    ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer.strip() == processor.decode(ids, skip_special_tokens=True).strip()
    cases = [
        ({"chat_template_kwargs": {"max_patches": 99}}, r"`chat_template_kwargs` may set only \['num_frames'\]"),
        ({"chat_template_kwargs": {"num_frames": 500}}, "`num_frames` must be an integer from 1 to 32, got 500"),
        ({}, "video 0 of the request has 4 frames, fewer than the 32 this server takes per video"),
    ]
    for extra, message in cases:
        status, text = refused(guarded, content, extra_body=extra)
        assert status == 400 and re.search(message, text), (extra, text)
    internal = [{"type": "video_url", "video_url": {"url": f"{image_host}/demo/clip.mp4"}}, content[1]]
    status, text = refused(guarded, internal, extra_body={"chat_template_kwargs": {"num_frames": 4}})
    assert status == 400 and "video 0 of the request (a URL): its host is not a public address" in text
    status, text = refused(guarded, [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}])
    assert status == 400 and "video 0 of the request (as sent) could not be read as a video" in text


# ---- round 4: routes, every route's media, the work a request may cost -----------------------------------------------
def test_only_the_listed_routes_are_answered(guarded, tmp_path):
    """An allow-list: a route Transformers' server has but the gate does not list (5.24's `/v1/systemone`, which reads
    local files and fetches URLs through Transformers' `load_image`; transcriptions; legacy completions) is refused
    before the server sees it, as are other methods on listed paths; the listed routes answer."""
    secret = tmp_path / "secret.png"
    secret.write_bytes((DEMO / EXAMPLES[0]["image"]).read_bytes())
    systemone = {
        "model": MODEL,
        "state": "look at <img>",
        "questions": {"q": {"type": "choice", "options": ["a", "b"]}},
        "assets": {"img": {"data_base64": str(secret)}},
    }
    for path, body in (
        ("/v1/systemone", systemone),
        ("/v1/audio/transcriptions", {}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2}),
        ("/v1/something-new", {}),
    ):
        status, text = post(guarded, path, body)
        assert status == 404 and f"POST {path} is not served here" in text, (path, status, text[:300])
    status, text = post(guarded, "/v1/chat/completions", b"", method="GET")
    assert status == 404 and "GET /v1/chat/completions is not served here" in text
    assert post(guarded, "/v1/models", b"", method="OPTIONS")[0] == 404
    assert post(guarded, "/v1/models", b"", method="GET")[0] == 200
    assert chat(guarded, [image_part(EXAMPLES[0]["image"]), TEXT]).strip() == EXAMPLES[0]["answer"]


def test_responses_api_images_are_taken_in_like_chat_images(guarded):
    """`/v1/responses` `input_image` parts go through the same intake: a local path is refused, a 100-megapixel PNG
    is refused by its header, an unknown part type is refused by name (the server would drop it), and a good image is
    answered as chat completions answer it."""
    huge = PIL.Image.new("1", (10_000, 10_000))
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    cases = (
        (str(DEMO / EXAMPLES[0]["image"]), "reads no local files"),
        ("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), "more than the 40000000 allowed"),
    )
    for url, message in cases:
        content = [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "Hi"}]
        body = {"model": MODEL, "input": [{"role": "user", "content": content}], "stream": False}
        status, text = post(guarded, "/v1/responses", body)
        assert status == 400 and message in text, text[:300]
    file_part = {"model": MODEL, "input": [{"type": "input_file", "file_id": "x"}], "stream": False}
    status, text = post(guarded, "/v1/responses", file_part)
    assert status == 400 and "part 0 of the input has type 'input_file'" in text
    example = EXAMPLES[0]
    content = [
        {"type": "input_image", "image_url": f"data:image/png;base64,{encoded(example['image'])}"},
        {"type": "input_text", "text": example["question"]},
    ]
    body = {"model": MODEL, "input": content, "stream": False, "max_output_tokens": 20, "temperature": 0}
    status, text = post(guarded, "/v1/responses", body)
    assert status == 200, text[:500]
    assert example["answer"] in json.dumps(json.loads(text)["output"])
    body["max_output_tokens"] = 10**6
    status, text = post(guarded, "/v1/responses", body)
    assert status == 400 and "`max_output_tokens` must be an integer from 1 to 1024" in text


def test_a_data_uri_without_a_comma_is_a_400(guarded):
    for part in (url_part("data:image/png;base64"), {"type": "video_url", "video_url": {"url": "data:video/mp4"}}):
        status, message = refused(guarded, [part, TEXT], extra_body={"chat_template_kwargs": {"num_frames": 1}})
        assert status == 400 and "has no comma before its data" in message


def test_hosts_that_stall_their_headers_hold_neither_the_server_nor_other_requests(opened, image_host):
    """Six requests whose images come from a host that sends its headers a byte at a time (each byte well within any
    read timeout): while all six are stalled, a text-only request and `/health` are answered; each of the six is
    refused at the request's fetch deadline (3 s here) with the rule."""
    outcomes = []

    def stalled_request():
        outcomes.append(refused(opened, [url_part(f"{image_host}/slow-headers"), TEXT]))

    workers = [threading.Thread(target=stalled_request) for _ in range(6)]
    for worker in workers:
        worker.start()
    while ImageHost.stalling < 6 and any(worker.is_alive() for worker in workers):
        time.sleep(0.05)
    assert ImageHost.stalling == 6
    answer = chat(opened, [{"type": "text", "text": "Say something."}])
    with urllib.request.urlopen(opened.removesuffix("/v1") + "/health", timeout=60) as response:
        assert response.status == 200
    answered_while_stalled = ImageHost.stalling == 6
    for worker in workers:
        worker.join(120)
    assert isinstance(answer, str) and answered_while_stalled
    assert len(outcomes) == 6
    assert all(status == 400 and "not fetched within 3 s" in message for status, message in outcomes), outcomes


def hostile_clip(tmp_path, name: str) -> str:
    """Data URIs of videos of a few hundred kilobytes at most whose decoding costs more than the `opened` server's
    budget of 2,000,000 decoded pixels: 40 flat frames of 256×256 (2.6 million pixels), or a header of 64×64 frames
    that holds 2000×2000 ones."""
    from tests.utils.video import write_resizing_clip, write_video

    if name == "many":
        import numpy as np

        path = write_video(tmp_path / "many.mkv", np.zeros((40, 256, 256, 3), np.uint8))
    else:
        path = write_resizing_clip(tmp_path / "lying.mkv", [64, 2000, 2000, 2000])
    return "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("name", ["many", "lying"])
def test_video_decoding_is_bounded_by_what_is_decoded_at_the_gate(opened, tmp_path, name):
    clip = hostile_clip(tmp_path, name)
    assert len(clip) < 400_000  # a few hundred kilobytes
    content = [{"type": "video_url", "video_url": {"url": clip}}, TEXT]
    status, message = refused(opened, content, extra_body={"chat_template_kwargs": {"num_frames": 4}})
    assert status == 400 and "takes more than the 2000000 pixels" in message, message


def test_the_gate_counts_positions_as_the_model_s_token_schedule_does():
    """The demo is LVTC (16 tokens per tile enter, 64 from layer 3 on): the intake counts an image of T tiles as
    2 + 64·T positions, what the model's own context check counts, not 2 + 16·T; with LVTC off, 2 + 16·T."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    bundle = Bundle(DEMO)
    intake_class, limits = bundle.load("serving_internvl_x.Intake"), bundle.load("serving_internvl_x.ServingLimits")()
    policy = bundle.load("media_internvl_x.MediaPolicy").for_servers()
    image_processor = AutoImageProcessor.from_pretrained(DEMO, trust_remote_code=True)
    lvtc = intake_class(bundle.Config.from_pretrained(DEMO), image_processor, policy, limits)
    plain = intake_class(bundle.Config.from_pretrained(DEMO, lvtc_enabled=False), image_processor, policy, limits)
    assert [lvtc.positions(tiles) for tiles in (1, 3, 5)] == [2 + 64 * tiles for tiles in (1, 3, 5)]
    assert [plain.positions(tiles) for tiles in (1, 3, 5)] == [2 + 16 * tiles for tiles in (1, 3, 5)]
    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True)
    image = PIL.Image.open(DEMO / EXAMPLES[2]["image"])
    inputs = processor(images=[image], text=["<image>"], add_special_tokens=False)
    tiles = int(inputs["num_patches"][0])
    assert model.model.positions_needed(inputs["input_ids"], inputs["attention_mask"]) == lvtc.positions(tiles)


def test_requests_waiting_for_the_intake_beyond_its_bound_get_503(image_host):
    """The gate takes at most `intake_workers` requests' media in at once and lets `max_waiting` more wait; beyond
    that a request with media is answered 503 at once, while text-only requests pass. Driven in-process through the
    gate's ASGI interface (the app behind it answers every request it is handed with 200)."""
    import asyncio

    bundle = Bundle(DEMO)
    policy = bundle.load("media_internvl_x.MediaPolicy").for_servers(internal_urls=True, fetch_timeout=3.0)
    limits = bundle.load("serving_internvl_x.ServingLimits")(intake_workers=1, max_waiting=1)
    intake = bundle.load("serving_internvl_x.Intake").from_pretrained(DEMO, policy, limits)

    async def answered(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = bundle.load("serving_internvl_x.RequestGate")(answered, intake=intake, limits=limits)

    async def call(content: list[dict]) -> int:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        statuses = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await gate(scope, receive, send)
        return statuses[0]

    async def scenario():
        stalled = [asyncio.create_task(call([url_part(f"{image_host}/slow-headers"), TEXT])) for _ in range(2)]
        while gate.pending < 2:
            await asyncio.sleep(0.01)
        third = await call([url_part(f"{image_host}/slow-headers"), TEXT])
        text_only = await call([TEXT])
        return third, text_only, await asyncio.gather(*stalled)

    third, text_only, stalled = asyncio.run(scenario())
    assert (third, text_only) == (503, 200) and stalled == [400, 400]


def process_tree_rss(pid: int) -> int:
    """Resident memory in bytes of process `pid` and its descendants (Linux /proc)."""
    from pathlib import Path

    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def test_a_mixed_load_of_good_bad_and_hostile_requests(opened, image_host, tmp_path):
    """Six clients, two rounds each of a mix of good, bad and hostile requests (stalling hosts, decoding bombs,
    headers that lie, huge images by header, unknown routes, list-shaped sources), with `/health` polled throughout:
    every good request gets its answer, every other one a 4xx, nothing a 5xx, `/health` answers every poll, and the
    server's memory after the second round is within 200 MB of after the first (each hostile payload alone would cost
    gigabytes if decoded)."""
    huge = io.BytesIO()
    PIL.Image.new("1", (10_000, 10_000)).save(huge, format="PNG")
    many, lying = hostile_clip(tmp_path, "many"), hostile_clip(tmp_path, "lying")
    frames = {"chat_template_kwargs": {"num_frames": 4}}

    def video(url):
        return [{"type": "video_url", "video_url": {"url": url}}, TEXT]

    hostile = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [url_part(f"{image_host}/slow-headers")]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": video(many)}], **frames}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": video(lying)}], **frames}),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [url_part("data:image/png;base64," + base64.b64encode(huge.getvalue()).decode())],
                    }
                ]
            },
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image", "url": [str(DEMO)]}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [url_part("data:image/png;base64,!!")]}]}),
        ("/v1/systemone", {"assets": {"a": {"data_base64": "/etc/hostname"}}}),
        ("/v1/responses", {"input": [{"type": "input_image", "image_url": f"{image_host}/slow-headers"}]}),
    ]
    good = [
        (example, [image_part(example["image"]), {"type": "text", "text": example["question"]}]) for example in EXAMPLES
    ]
    failures, health = [], []
    done = threading.Event()

    def poll_health():
        while not done.is_set():
            try:
                with urllib.request.urlopen(opened.removesuffix("/v1") + "/health", timeout=60) as response:
                    health.append(response.status)
            except OSError as error:
                health.append(repr(error))
            time.sleep(0.2)

    def client_round(number: int):
        for index in range(len(hostile) + len(good)):
            pick = (index + number) % (len(hostile) + len(good))
            if pick < len(hostile):
                path, body = hostile[pick]
                status, text = post(opened, path, {"model": MODEL, "max_tokens": 4, "stream": False, **body})
                if not 400 <= status < 500:
                    failures.append((path, status, text[:300]))
            else:
                example, content = good[pick - len(hostile)]
                if chat(opened, content).strip() != example["answer"]:
                    failures.append(("answer", example))

    poller = threading.Thread(target=poll_health)
    poller.start()
    memory = []
    try:
        for _ in range(2):
            clients = [threading.Thread(target=client_round, args=(number,)) for number in range(6)]
            for worker in clients:
                worker.start()
            for worker in clients:
                worker.join(600)
            memory.append(process_tree_rss(opened.pid))
    finally:
        done.set()
        poller.join(120)
    print(f"mixed load: {len(health)} /health polls, server RSS after each round {[m >> 20 for m in memory]} MB")
    assert not failures, failures[:5]
    assert health and all(status == 200 for status in health), [s for s in health if s != 200][:5]
    assert memory[1] - memory[0] < 200 * 2**20, memory
