"""Serve an InternVL-X checkpoint over an OpenAI-compatible HTTP API with Transformers' own server.

    pip install "transformers[serving]"
    python examples/serve.py MODEL_DIR [--host 127.0.0.1] [--port 8000] [--device auto|cpu|cuda] \\
        [--dtype auto|float32|bfloat16] [--compile] [--continuous-batching]

Then any OpenAI client talks to it (images as `image_url` parts: `data:image/png;base64,...` or an http(s) URL; videos
as `video_url` parts the same way, which Transformers' server takes as an extension of the OpenAI API):

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model=MODEL_DIR, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What digit is this?"}]}])

This script only registers the bundle's classes with the Auto classes and the server's model tables (the server
finds a model's class by name in Transformers, which a `trust_remote_code` model is not) and has the server answer
inputs the model refuses with 400 and the reason; then it runs `transformers serve MODEL_DIR --trust-remote-code` in
the same process: HTTP, streaming, request parsing and model management are Transformers'. `--compile` uses a
static cache and a compiled decode step on accelerators.

`--continuous-batching` is refused for LVTC models: Transformers' continuous batching keeps every layer's keys and
values in one paged cache with the same sequence length in every layer, while LVTC's layers from k on hold each
tile's N2² tokens and the earlier ones N1². (Transformers' server also runs vision-language models without it:
it falls back to one request at a time.)
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def register(model_dir: Path) -> str:
    """Register the checkpoint's own bundle classes; returns the model type."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForMultimodalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto import modeling_auto

    config_class = get_class_from_dynamic_module("configuration_internvl_x.InternVLXConfig", model_dir)
    model_class = get_class_from_dynamic_module("modeling_internvl_x.InternVLXForConditionalGeneration", model_dir)
    model_type = config_class.model_type
    AutoConfig.register(model_type, config_class, exist_ok=True)
    for auto_class in (AutoModelForImageTextToText, AutoModelForMultimodalLM):
        auto_class.register(config_class, model_class, exist_ok=True)
    # The server loads a model through AutoModelForMultimodalLM only if its type is in this table, and it tells
    # what inputs a model takes (images or not) from the class names in the same table.
    modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES[model_type] = model_class.__name__
    return model_type


# ---- what a client may ask ----------------------------------------------------------------------------------------
# Body fields of a chat completion whose values the gate bounds, by name: (lowest, highest). Tokens are bounded by the
# model's context separately.
BOUNDED_FIELDS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "frequency_penalty": (-2.0, 2.0)}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
# Fields refused unless the deployer opts in: `generation_config` sets any `generate` argument (a static cache of a
# million positions, a thousand beams); `stop` needs a tokenizer Transformers' server does not hand `generate`.
GUARDED_FIELDS = {
    "generation_config": "--allow-generation-config",
    "stop": None,
}
# What a request may set through `chat_template_kwargs` (which Transformers' server hands the processor): the frames
# taken per video, up to `--max-video-frames`. Anything else there (tiling, template switches) is refused.
CHAT_TEMPLATE_OPTIONS = ("num_frames",)
SERVER_NUM_FRAMES = 32  # frames per video when a request names none: Transformers' server's default
CHAT_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/completions")
MANAGEMENT_PATHS = ("/load_model", "/reset")


class RequestGate:
    """An ASGI middleware in front of Transformers' server: what strangers may ask of this machine.

    `POST /load_model` and `/reset` (load any folder or Hub repo with remote code; unload the model) are refused. A
    chat request's body is read up to `max_body_bytes`; its generation fields are checked against bounds (and
    `generation_config` refused unless allowed; `chat_template_kwargs` may set the frames per video only); its images
    and videos are taken in by the bundle's `admit_chat_media` in a worker
    thread (fetches never block the event loop, `/health` keeps answering), so the model sees data URIs whose sizes
    were checked from their headers. Every refusal is a 4xx with the field or image and the rule.
    """

    def __init__(
        self,
        app,
        *,
        admit,
        max_body_bytes: int,
        max_new_tokens: int,
        allow_generation_config: bool,
        max_video_frames: int = SERVER_NUM_FRAMES,
    ):
        self.app, self.admit = app, admit
        self.max_body_bytes, self.max_new_tokens = max_body_bytes, max_new_tokens
        self.allow_generation_config = allow_generation_config
        self.max_video_frames = max_video_frames

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if path in MANAGEMENT_PATHS:
            return await self.refuse(send, 403, f"{path} is disabled: this server serves one checkpoint only.")
        if path not in CHAT_PATHS:
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self.refuse(send, 413, f"the request body exceeds {self.max_body_bytes} bytes.")
            if not message.get("more_body"):
                break
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("the request body must be a JSON object.")
            self.check_fields(request)
            if path == "/v1/chat/completions":
                self.check_messages(request.get("messages"))
            num_frames = (request.get("chat_template_kwargs") or {}).get("num_frames", SERVER_NUM_FRAMES)
            await asyncio.to_thread(self.admit, request.get("messages") or request.get("input"), num_frames)
        except ValueError as error:
            return await self.refuse(send, 400, str(error))
        replayed = json.dumps(request).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(replayed)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": replayed, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    def check_messages(messages) -> None:
        """The chat's shape, as the OpenAI API defines it: a non-empty list of messages with a string `role` and
        content that is a string or a list of typed parts (text with string `text`, `image_url` or `video_url` with a
        string URL)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("`messages` must be a non-empty list of {'role': ..., 'content': ...} messages.")
        for index, message in enumerate(messages):
            where = f"message {index}"
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
                raise ValueError(f"{where} must be an object with a string `role`.")
            content = message.get("content")
            if content is None or isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise ValueError(
                    f"{where}: `content` must be a string or a list of parts, got {type(content).__name__}."
                )
            for number, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                media = part.get(kind) if kind in ("image_url", "video_url") else None
                url = media.get("url") if isinstance(media, dict) else media
                if kind == "text" and isinstance(part.get("text"), str):
                    continue
                if kind in ("image_url", "video_url") and isinstance(url, str):
                    continue
                raise ValueError(
                    f"part {number} of {where} must be {{'type': 'text', 'text': str}} or {{'type': 'image_url' | "
                    f"'video_url', 'image_url' | 'video_url': {{'url': str}}}}, got {str(part)[:120]}."
                )

    def check_fields(self, request: dict) -> None:
        for name, switch in GUARDED_FIELDS.items():
            if request.get(name) is None or (name == "generation_config" and self.allow_generation_config):
                continue
            how = f"; the deployer may allow it with {switch}" if switch else ""
            raise ValueError(f"`{name}` is not accepted by this server{how}.")
        for name, (low, high) in BOUNDED_FIELDS.items():
            value = request.get(name)
            if value is not None and (not isinstance(value, (int, float)) or not low <= value <= high):
                raise ValueError(f"`{name}` must be a number from {low} to {high}, got {value!r}.")
        for name in TOKEN_FIELDS:
            value = request.get(name)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= self.max_new_tokens):
                raise ValueError(f"`{name}` must be an integer from 1 to {self.max_new_tokens}, got {value!r}.")
        options = request.get("chat_template_kwargs")
        if options is not None:
            if not isinstance(options, dict) or set(options) - set(CHAT_TEMPLATE_OPTIONS):
                raise ValueError(
                    f"`chat_template_kwargs` may set only {list(CHAT_TEMPLATE_OPTIONS)} on this server, got "
                    f"{str(options)[:120]}."
                )
            frames = options.get("num_frames", SERVER_NUM_FRAMES)
            if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= self.max_video_frames:
                raise ValueError(f"`num_frames` must be an integer from 1 to {self.max_video_frames}, got {frames!r}.")
        bias = request.get("logit_bias")
        if bias is not None and (not isinstance(bias, dict) or len(bias) > 300):
            raise ValueError("`logit_bias` must be an object of at most 300 token ids.")

    @staticmethod
    async def refuse(send, status: int, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def request_gate(args: argparse.Namespace):
    """The `RequestGate` settings for the served checkpoint: the bundle's image intake under `media_policy(args)`, the
    model's context as the bound on images' tokens and on new tokens."""
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(args.model_dir, trust_remote_code=True)
    context = config.text_config.max_position_embeddings
    image_processor = AutoImageProcessor.from_pretrained(args.model_dir, trust_remote_code=True)
    admit_chat_media = get_class_from_dynamic_module("processing_internvl_x.admit_chat_media", args.model_dir)
    policy = media_policy(args)

    def admit(messages, num_frames: int) -> None:
        admit_chat_media(
            messages, image_processor, config.tokens_per_tile, policy, args.max_images, context, num_frames
        )

    return dict(
        admit=admit,
        max_body_bytes=args.max_request_mb * 2**20,
        max_new_tokens=context,
        allow_generation_config=args.allow_generation_config,
        max_video_frames=args.max_video_frames,
    )


def media_policy(args: argparse.Namespace):
    """The bundle's `MediaPolicy.for_servers()` with this launcher's switches."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    policy_class = get_class_from_dynamic_module("media_internvl_x.MediaPolicy", args.model_dir)
    local_root = str(args.allowed_local_media_path.resolve()) if args.allowed_local_media_path else None
    return policy_class.for_servers(
        local_files=local_root is not None,
        local_root=local_root,
        internal_urls=args.allow_internal_urls,
        remote_urls=not args.no_remote_urls,
        fetch_timeout=args.fetch_timeout,
        max_bytes=args.max_image_mb * 2**20,
        max_pixels=args.max_image_pixels,
        max_video_frames=args.max_decoded_frames,
    )


GATE: dict | None = None  # the `RequestGate` settings `main` builds for the served checkpoint


def report_input_errors_as_bad_requests() -> None:
    """Put the `RequestGate` in front of the server, and make it answer a request the model refuses (a `ValueError`
    from the processor or the model: an image that does not decode, too many images for the context, ...) with 400 and
    the reason, instead of a bare 500."""
    from fastapi.responses import JSONResponse
    from transformers.cli.serving import server

    build_server = server.build_server

    def build_server_reporting_input_errors(*args, **kwargs):
        app = build_server(*args, **kwargs)
        if GATE is not None:
            app.add_middleware(RequestGate, **GATE)

        async def bad_request(request, error: ValueError) -> JSONResponse:
            return JSONResponse(status_code=400, content={"error": {"message": str(error), "type": "invalid_request"}})

        app.add_exception_handler(ValueError, bad_request)
        return app

    server.build_server = build_server_reporting_input_errors


def list_the_served_model(model_dir: Path) -> None:
    """Make `GET /v1/models` name the served checkpoint on a machine that never downloaded from the Hub.

    Adapter for Transformers ≤ 5.23, whose server lists only the models of the Hub cache folder: a local checkpoint
    is missing from the list, and with no cache folder yet (a fresh machine, `HF_HUB_OFFLINE=1`) the call fails
    with a 500 (`CacheNotFound`). Transformers 5.24 lists the served model itself (`ModelManager.list_models`)."""
    from huggingface_hub.errors import CacheNotFound
    from transformers.cli.serving.model_manager import ModelManager

    if hasattr(ModelManager, "list_models"):
        return
    scan_cache = ModelManager.get_gen_models
    served = {"owned_by": "local", "id": str(model_dir.resolve()), "object": "model", "created": 0}

    def cached_and_served_models(cache_dir: str | None = None) -> list[dict]:
        try:
            models = list(scan_cache(cache_dir))
        except CacheNotFound:
            models = []
        return models + ([served] if all(model["id"] != served["id"] for model in models) else [])

    ModelManager.get_gen_models = staticmethod(cached_and_served_models)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="folder of an InternVL-X checkpoint (bundle files included)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:0', ...")
    parser.add_argument("--dtype", default="auto", help="'auto' (the checkpoint's), 'float32', 'bfloat16', ...")
    parser.add_argument("--compile", action="store_true", help="static cache + compiled decode step (accelerators)")
    parser.add_argument("--continuous-batching", action="store_true", help="not available with LVTC (see above)")
    parser.add_argument("--log-level", default="warning")
    safety = parser.add_argument_group("what clients may reach (docs/serving.md, Security); all off by default")
    safety.add_argument(
        "--allowed-local-media-path",
        type=Path,
        default=None,
        help="read images given as local paths or file:// URLs, under this folder only",
    )
    safety.add_argument(
        "--allow-internal-urls",
        action="store_true",
        help="fetch image URLs whose host is a loopback, private or link-local address",
    )
    safety.add_argument("--no-remote-urls", action="store_true", help="fetch no image URLs at all")
    safety.add_argument(
        "--allow-generation-config",
        action="store_true",
        help="accept a request's `generation_config` (any generate argument)",
    )
    safety.add_argument("--fetch-timeout", type=float, default=20.0, help="seconds for a whole image fetch")
    safety.add_argument("--max-image-mb", type=int, default=20, help="bytes of one image or video, in MiB")
    safety.add_argument("--max-image-pixels", type=int, default=40_000_000, help="pixels of one image (header)")
    safety.add_argument("--max-images", type=int, default=8, help="images and videos in one request")
    safety.add_argument(
        "--max-video-frames",
        type=int,
        default=SERVER_NUM_FRAMES,
        help="frames a request may ask for per video (chat_template_kwargs num_frames; 32 when not asked)",
    )
    safety.add_argument(
        "--max-decoded-frames", type=int, default=18_000, help="frames of one video decoded at most (its length)"
    )
    safety.add_argument("--max-request-mb", type=int, default=64, help="bytes of one request body, in MiB")
    return parser.parse_args(argv)


def serve_arguments(args: argparse.Namespace) -> list[str]:
    """The `transformers serve` command line for `args`, after checking what this checkpoint can do."""
    config_file = args.model_dir / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"error: {args.model_dir} holds no config.json: not a checkpoint folder.")
    config = json.loads(config_file.read_text())
    if args.continuous_batching and config.get("lvtc_enabled"):
        raise SystemExit(
            "error: --continuous-batching cannot serve an LVTC model: Transformers' continuous batching keeps one "
            f"paged cache whose sequence length is the same in every layer, but this model's layers from "
            f"{config.get('lvtc_expand_layer')} on hold each tile's expanded tokens. Serve it without the flag."
        )
    command = [
        "serve",
        str(args.model_dir.resolve()),
        "--trust-remote-code",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--log-level",
        args.log_level,
    ]
    if args.compile:
        command.append("--compile")
    if args.continuous_batching:
        command.append("--continuous-batching")
    return command


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(model_dir: Path, *options: str, log: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run this launcher in a child process on a free port of 127.0.0.1 until the block ends; yields the API's base
    URL (`http://127.0.0.1:PORT/v1`) once the server answers `/health`. `env` is added to this process's
    environment. The child is stopped by its PID."""
    port = free_port()
    output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (open for the server's lifetime)
    command = [sys.executable, str(Path(__file__).resolve()), str(model_dir), "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                tail = log.read_text()[-3000:] if log else ""
                raise RuntimeError(f"the server exited with status {process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        if log:
            output.close()


# From Transformers 5.25 the server loads and runs the model in a process it spawns. A spawned process imports the
# parent's main file again, as `__mp_main__`: there the bundle's classes are registered from this variable.
SERVED_MODEL = "INTERNVL_X_SERVED_MODEL"


def main(argv=None) -> None:
    args = parse_args(argv)
    command = serve_arguments(args)
    os.environ[SERVED_MODEL] = str(args.model_dir.resolve())
    register(args.model_dir)
    global GATE
    GATE = request_gate(args)
    # The processes that read images (this one, and the one 5.25's server spawns) read them under the same policy.
    os.environ.update(media_policy(args).to_environment())
    report_input_errors_as_bad_requests()
    list_the_served_model(args.model_dir)
    from transformers.cli.transformers import app

    print(f"serving {args.model_dir.resolve()} at http://{args.host}:{args.port}/v1 (OpenAI API)", flush=True)
    sys.exit(app(args=command, prog_name="transformers", standalone_mode=True))


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__" and SERVED_MODEL in os.environ:
    register(Path(os.environ[SERVED_MODEL]))
