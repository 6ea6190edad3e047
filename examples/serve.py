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
import contextlib
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


def bundle_name(model_dir: Path, name: str):
    """A top-level name of one of the checkpoint's own bundle files (`FILE.NAME`), loaded as Transformers loads them."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(name, model_dir)


def media_policy(args: argparse.Namespace):
    """The bundle's `MediaPolicy.for_servers()` with this launcher's switches."""
    local_root = str(args.allowed_local_media_path.resolve()) if args.allowed_local_media_path else None
    return bundle_name(args.model_dir, "media_internvl_x.MediaPolicy").for_servers(
        local_files=local_root is not None,
        local_root=local_root,
        internal_urls=args.allow_internal_urls,
        remote_urls=not args.no_remote_urls,
        fetch_timeout=args.fetch_timeout,
        max_bytes=args.max_image_mb * 2**20,
        max_pixels=args.max_image_pixels,
        max_frame_pixels=args.max_frame_pixels,
        max_video_frames=args.max_decoded_frames,
        max_decoded_pixels=args.max_decoded_pixels,
    )


def request_gate(args: argparse.Namespace) -> dict:
    """The bundle's `RequestGate` settings for the served checkpoint: its `Intake` under `media_policy(args)` and the
    launcher's `ServingLimits`."""
    limits = bundle_name(args.model_dir, "serving_internvl_x.ServingLimits")(
        max_body_bytes=args.max_request_mb * 2**20,
        max_media=args.max_images,
        max_video_frames=args.max_video_frames,
        allow_generation_config=args.allow_generation_config,
    )
    intake = bundle_name(args.model_dir, "serving_internvl_x.Intake").from_pretrained(
        args.model_dir, media_policy(args), limits
    )
    return dict(intake=intake, limits=limits)


GATE: tuple | None = None  # the bundle's `RequestGate` class and its settings, which `main` builds


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
            gate_class, settings = GATE
            app.add_middleware(gate_class, **settings)

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
    safety.add_argument("--fetch-timeout", type=float, default=20.0, help="seconds for all of a request's fetches")
    safety.add_argument("--max-image-mb", type=int, default=20, help="bytes of one image or video, in MiB")
    safety.add_argument("--max-image-pixels", type=int, default=40_000_000, help="pixels of one image (header)")
    safety.add_argument("--max-images", type=int, default=8, help="images and videos in one request")
    safety.add_argument(
        "--max-video-frames",
        type=int,
        default=32,
        help="frames a request may ask for per video (chat_template_kwargs num_frames; 32 when not asked)",
    )
    safety.add_argument(
        "--max-frame-pixels", type=int, default=3840 * 2160, help="pixels of one video frame (as decoded)"
    )
    safety.add_argument(
        "--max-decoded-frames", type=int, default=18_000, help="frames of one video (its length) at most"
    )
    safety.add_argument(
        "--max-decoded-pixels",
        type=int,
        default=1_000_000_000,
        help="width × height summed over the video frames one request decodes (up to each video's last frame taken)",
    )
    safety.add_argument("--max-request-mb", type=int, default=64, help="bytes of one request body, in MiB")
    return parser.parse_args(argv)


def serve_arguments(args: argparse.Namespace) -> list[str]:
    """The `transformers serve` command line for `args`, after checking what this checkpoint can do."""
    config_file = args.model_dir / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"error: {args.model_dir} holds no config.json: not a checkpoint folder.")
    if args.continuous_batching:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model_dir, trust_remote_code=True)
        schedule = bundle_name(args.model_dir, "modeling_internvl_x.build_token_schedule")(config)
        if schedule is not None:
            try:
                schedule.refuse_paged_engine("--continuous-batching (Transformers' continuous batching)")
            except ValueError as error:
                raise SystemExit(f"error: {error} Serve it without the flag.") from None
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


class ServerURL(str):
    """The base URL of a server `running` started (`http://127.0.0.1:PORT/v1`), with the `pid` of its process."""

    pid: int


@contextlib.contextmanager
def running(model_dir: Path, *options: str, log: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run this launcher in a child process on a free port of 127.0.0.1 until the block ends; yields the API's base
    URL (a `ServerURL`) once the server answers `/health`. `env` is added to this process's environment. The child is
    stopped by its PID."""
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
        url = ServerURL(f"http://127.0.0.1:{port}/v1")
        url.pid = process.pid
        yield url
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
    GATE = (bundle_name(args.model_dir, "serving_internvl_x.RequestGate"), request_gate(args))
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
