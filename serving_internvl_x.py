# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""What a server of an InternVL-X checkpoint admits, and how much work one request may cost: the routes it answers,
the generation arguments a request may set and their bounds, and one intake for every image and video of every
request. The OpenAI-compatible server (`examples/serve.py`, Transformers' `transformers serve` behind `RequestGate`) and
the Inference Endpoints handler (`handler.py`) both take requests through this file, so a bound cannot differ between
them. docs/serving.md states the rule: every request's work is bounded before it starts."""

import asyncio
import base64
import concurrent.futures
import dataclasses
import io
import json
import time

import PIL.Image
import torch

from .media_internvl_x import (
    DEFAULT_NUM_FRAMES,
    DecodeBudget,
    MediaPolicy,
    decode_video,
    open_media,
    sample_frame_indices,
)
from .modeling_internvl_x import build_token_schedule

# ---- routes: what the server answers ---------------------------------------------------------------------------------
# Every other path is refused before Transformers' server sees it, so a route a new release adds stays closed until it
# is listed here.
ROUTES = {
    "/health": "GET",
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/responses": "POST",
}
CLOSED_ROUTES = ("/load_model", "/reset")  # would load any folder with its code, or unload the served model

# ---- generation: what a request may set ----------------------------------------------------------------------------
# `generate` arguments a request may set: (type, lowest, highest), highest None meaning the model's context.
GENERATION_BOUNDS = {
    "max_new_tokens": (int, 1, None),
    "min_new_tokens": (int, 0, None),
    "do_sample": (bool, None, None),
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 1000),
    "repetition_penalty": (float, 0.5, 2.0),
    "no_repeat_ngram_size": (int, 0, 16),
    "num_beams": (int, 1, 4),
}
# The OpenAI fields Transformers' server turns into those arguments: (argument, offset added to the field's value).
OPENAI_FIELDS = {
    "max_tokens": ("max_new_tokens", 0),
    "max_completion_tokens": ("max_new_tokens", 0),
    "max_output_tokens": ("max_new_tokens", 0),
    "temperature": ("temperature", 0),
    "top_p": ("top_p", 0),
    "frequency_penalty": ("repetition_penalty", 1.0),  # Transformers' server: repetition_penalty = 1 + value
}
# Fields refused unless the deployer opts in (the switch), or always (None): `generation_config` sets any `generate`
# argument (a static cache of a million positions, a thousand beams); `stop` needs a tokenizer Transformers' server
# does not hand `generate`.
GUARDED_FIELDS = {"generation_config": "--allow-generation-config", "stop": None}
MAX_LOGIT_BIAS = 300
# What a request may set through `chat_template_kwargs`, which Transformers' server hands the processor.
CHAT_TEMPLATE_OPTIONS = ("num_frames",)
SERVER_NUM_FRAMES = 32  # frames per video when a request names none: Transformers' server's default

# ---- content: the parts a message may hold ---------------------------------------------------------------------------
TEXT_PARTS = ("text", "input_text", "output_text")
# Media parts by type: (kind, the keys that may hold the source). OpenAI's `image_url` / `input_image` hold it under
# their own name, as a string or `{"url": ...}`; `video_url` (Transformers' extension) as `{"url": ...}`; Transformers'
# own chat format (the handler, pipelines) under one of `url`, `path`, `base64` or the kind's name.
MEDIA_PARTS = {
    "image_url": ("image", ("image_url",)),
    "input_image": ("image", ("image_url",)),
    "video_url": ("video", ("video_url",)),
    "image": ("image", ("url", "path", "base64", "image")),
    "video": ("video", ("url", "path", "base64", "video")),
}


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """The bounds of one request that are not about a single image or video (those are the `MediaPolicy`'s)."""

    max_body_bytes: int = 64 * 2**20  # of one request body
    max_media: int = 8  # images and videos in one request
    max_video_frames: int = SERVER_NUM_FRAMES  # frames a request may ask for per video (`num_frames`)
    allow_generation_config: bool = False  # accept a request's `generation_config`
    intake_workers: int = 4  # requests whose media are taken in at once, off the event loop
    max_waiting: int = 16  # requests with media waiting for an intake worker; more are answered 503


@dataclasses.dataclass
class MediaPart:
    """Where one image or video of a request sits: `holder[key]` is its source; `where` names it in refusals."""

    holder: dict
    key: str
    kind: str
    where: str


def part_source(part, where: str) -> MediaPart | None:
    """The media source of one content `part`, or None for a text part; any other part is refused by name (a server
    that dropped it would answer a question the client did not ask)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS:
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where} is a {kind} part without a string `text`.")
        return None
    if kind not in MEDIA_PARTS:
        raise ValueError(
            f"{where} has type {kind!r}; this server takes {sorted(TEXT_PARTS)} and {sorted(MEDIA_PARTS)} parts only."
        )
    media, keys = MEDIA_PARTS[kind]
    given = [key for key in keys if part.get(key) is not None]
    if len(given) != 1:
        raise ValueError(f"{where} ({kind}) needs exactly one of {list(keys)}, got {given or 'none'}.")
    holder, key = part, given[0]
    if isinstance(part[key], dict) and kind in ("image_url", "input_image", "video_url"):
        holder, key = part[key], "url"
    elif kind == "video_url":
        raise ValueError(f"{where} (video_url) must be {{'video_url': {{'url': ...}}}}.")
    if not isinstance(holder.get(key), str):
        got = type(holder.get(key)).__name__
        raise ValueError(
            f"{where} ({kind}) must give its {media} as one string (base64, a data URI or a URL), got {got}."
        )
    return MediaPart(holder, key, media, where)


def content_parts(content, where: str) -> list[MediaPart]:
    """The media parts of one message's `content` (a string, None, or a list of parts)."""
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise ValueError(f"{where}: `content` must be a string or a list of parts, got {type(content).__name__}.")
    found = (part_source(part, f"part {number} of {where}") for number, part in enumerate(content))
    return [part for part in found if part is not None]


def message_parts(messages) -> list[MediaPart]:
    """The media parts of chat `messages` (the OpenAI chat API and Transformers' chat format): a non-empty list of
    messages with a string `role`, and content that is a string or a list of parts; every part checked."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list of {'role': ..., 'content': ...} messages.")
    found = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise ValueError(f"{where} must be an object with a string `role`.")
        found += content_parts(message.get("content"), where)
    return found


def response_parts(body: dict) -> list[MediaPart]:
    """The media parts of a Responses API request: `input` is a string, a list of parts (one user turn), or a list of
    items (messages with a `role`, or tool items); `instructions` a string."""
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise ValueError("`instructions` must be a string.")
    given = body.get("input")
    if isinstance(given, str):
        return []
    if not isinstance(given, list) or not given:
        raise ValueError("`input` must be a string or a non-empty list of items.")
    if all(isinstance(item, dict) and "role" not in item and item.get("type") != "message" for item in given):
        return content_parts(given, "the input")
    found = []
    for index, item in enumerate(given):
        if not isinstance(item, dict):
            raise ValueError(f"input item {index} must be an object, got {type(item).__name__}.")
        if "role" in item or item.get("type") == "message":
            found += content_parts(item.get("content"), f"input item {index}")
    return found


class Intake:
    """Takes every image and video of a request in, in place, before the model sees any of it.

    Each source (a URL, base64, a data URI; a local path only where the policy allows) becomes a data URI of its bytes,
    read under the `MediaPolicy`: all of the request's fetches within one deadline, every item within the byte cap. An
    image's size is read from its header; a video is decoded (its frames converted to nothing) within the request's
    decoding budget, every frame's size checked as decoded. The tokens they take are counted as the model's token
    schedule counts them (LVTC's tiles hold N2² positions from layer k on) against the model's context. Refusals are
    `ValueError`s naming the item and the rule. Blocking: a server calls `admit` off its event loop.
    """

    def __init__(self, config, image_processor, policy: MediaPolicy, limits: ServingLimits):
        self.image_processor, self.policy, self.limits = image_processor, policy, limits
        self.tokens_per_tile = config.tokens_per_tile
        self.schedule = build_token_schedule(config)
        self.context = config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, folder, policy: MediaPolicy, limits: ServingLimits) -> "Intake":
        """The intake of the checkpoint in `folder` (its config and image processor, loaded as Transformers loads
        them)."""
        from transformers import AutoConfig, AutoImageProcessor

        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        return cls(config, AutoImageProcessor.from_pretrained(folder, trust_remote_code=True), policy, limits)

    def positions(self, tiles: int) -> int:
        """Positions an image of `tiles` tiles takes: `<img>`, its tokens, `</img>`, and what the token schedule adds
        (LVTC: each tile's N2² − N1² from layer k on)."""
        gained = 0 if self.schedule is None else int(self.schedule.positions_gained(torch.tensor([tiles]))[0])
        return 2 + tiles * self.tokens_per_tile + gained

    def admit(self, parts: list[MediaPart], num_frames: int | None = None) -> None:
        """Take `parts` (from `message_parts` / `response_parts`) in; `num_frames` is what the processor will take
        of each video (None: a file's default, `DEFAULT_NUM_FRAMES` or all of a shorter clip)."""
        if len(parts) > self.limits.max_media:
            raise ValueError(
                f"the request holds {len(parts)} images and videos; this server takes at most {self.limits.max_media}."
            )
        deadline = time.monotonic() + self.policy.fetch_timeout
        budget = DecodeBudget(self.policy.max_decoded_pixels)
        positions, counts = 0, {"image": 0, "video": 0}
        for part in parts:
            where = f"{part.kind} {counts[part.kind]} of the request"
            counts[part.kind] += 1
            data = self.read(part.holder[part.key], where, deadline)
            if part.kind == "video":
                taken, container_format = self.check_video(data, where, num_frames, budget)
                positions += taken * self.positions(1)
                detail = f"{where}: {taken} frames of {self.positions(1)} positions"
                part.holder[part.key] = f"data:video/{container_format};base64," + base64.b64encode(data).decode()
            else:
                width, height, image_format = self.check_image(data, where)
                tiles = self.image_processor.get_number_of_image_patches(height, width)
                positions += self.positions(tiles)
                detail = f"{where}: {width}×{height}, {tiles} tiles of {self.tokens_per_tile}"
                part.holder[part.key] = f"data:image/{image_format};base64," + base64.b64encode(data).decode()
            if positions > self.context:
                raise ValueError(
                    f"the request's images and videos take {positions} positions or more ({detail}), more than the "
                    f"model's {self.context}; send fewer or smaller images, fewer or shorter videos, or ask for fewer "
                    "frames (num_frames)."
                )

    def read(self, source: str, where: str, deadline: float) -> bytes:
        what, opened = open_media(source, where, self.policy, deadline)
        if isinstance(opened, io.BytesIO):  # fetched (within the byte cap) or decoded base64
            data = opened.getvalue()
        else:  # a local file, where the policy allows one: read up to the byte cap
            try:
                with open(opened, "rb") as file:
                    data = file.read(self.policy.max_bytes + 1)
            except OSError:
                raise ValueError(f"{where} ({what}): the file could not be read.") from None
        if len(data) > self.policy.max_bytes:
            raise ValueError(f"{where}: more than the {self.policy.max_bytes} bytes allowed.")
        return data

    def check_image(self, data: bytes, where: str) -> tuple[int, int, str]:
        """`(width, height, format)` from the image's header; nothing is decoded."""
        try:
            header = PIL.Image.open(io.BytesIO(data))
            width, height, image_format = *header.size, (header.format or "png").lower()
        except Exception:  # noqa: BLE001 (not an image Pillow knows)
            raise ValueError(f"{where} is not an image Pillow can read.") from None
        limit = self.policy.max_pixels
        if limit is not None and width * height > limit:
            raise ValueError(
                f"{where} is {width}×{height} = {width * height} pixels, more than the {limit} allowed; send a "
                "smaller image."
            )
        return width, height, image_format

    def check_video(self, data: bytes, where: str, num_frames: int | None, budget: DecodeBudget) -> tuple[int, str]:
        """`(frames taken, container format)`: the clip decoded up to its last frame taken (as the processor takes
        them), within `budget`, each frame's size checked as decoded; no frame is kept."""

        def pick(total: int, video_fps: float | None) -> list[int]:
            frames = num_frames if num_frames is not None else min(DEFAULT_NUM_FRAMES, total)
            if frames > total:
                raise ValueError(f"{where} has {total} frames, fewer than the {frames} this server takes per video.")
            return sample_frame_indices(total, frames, None, video_fps, "uniform", where)

        clip = decode_video(io.BytesIO(data), where, "as sent", self.policy, pick, budget, keep=False)
        return len(clip.frames_indices), clip.container_format


# ---- checks of a request's fields ------------------------------------------------------------------------------------
def check_generation_arguments(arguments: dict, context: int, names: dict | None = None) -> None:
    """Refuse, naming the field, a `generate` argument outside `GENERATION_BOUNDS` or outside its bounds. `names` maps
    the fields of `arguments` to the arguments they set (`OPENAI_FIELDS`); without it every field is an argument."""
    names = names if names is not None else {name: (name, 0) for name in GENERATION_BOUNDS}
    unknown = sorted(field for field in arguments if field not in names)
    if unknown:
        raise ValueError(f"unknown or unaccepted generation parameters {unknown}; accepted: {sorted(names)}.")
    for field, value in arguments.items():
        argument, offset = names[field]
        kind, low, high = GENERATION_BOUNDS[argument]
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"`{field}` must be true or false, got {value!r}.")
            continue
        high = context if high is None else high
        what = "an integer" if kind is int else "a number"
        number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        if not number or not low - offset <= value <= high - offset:  # NaN fails the comparison too
            raise ValueError(f"`{field}` must be {what} from {low - offset} to {high - offset}, got {value!r}.")


def check_request_fields(request: dict, context: int, limits: ServingLimits) -> int:
    """Refuse a chat or Responses API request whose generation fields are outside their bounds, a guarded field the
    deployer did not allow, or `chat_template_kwargs` other than the frames per video. Returns the frames the
    processor will take per video."""
    for name, switch in GUARDED_FIELDS.items():
        if request.get(name) is None or (switch and name == "generation_config" and limits.allow_generation_config):
            continue
        how = f"; the deployer may allow it with {switch}" if switch else ""
        raise ValueError(f"`{name}` is not accepted by this server{how}.")
    given = {name: request[name] for name in OPENAI_FIELDS if request.get(name) is not None}
    check_generation_arguments(given, context, OPENAI_FIELDS)
    bias = request.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS):
        raise ValueError(f"`logit_bias` must be an object of at most {MAX_LOGIT_BIAS} token ids.")
    options = request.get("chat_template_kwargs")
    if options is None:
        return SERVER_NUM_FRAMES
    if not isinstance(options, dict) or set(options) - set(CHAT_TEMPLATE_OPTIONS):
        raise ValueError(
            f"`chat_template_kwargs` may set only {list(CHAT_TEMPLATE_OPTIONS)} on this server, got "
            f"{str(options)[:120]}."
        )
    frames = options.get("num_frames", SERVER_NUM_FRAMES)
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= limits.max_video_frames:
        raise ValueError(f"`num_frames` must be an integer from 1 to {limits.max_video_frames}, got {frames!r}.")
    return frames


def route_parts(path: str, request: dict) -> list[MediaPart]:
    """The media parts of a request to `path`, every part of it checked."""
    return message_parts(request.get("messages")) if path == "/v1/chat/completions" else response_parts(request)


# ---- the gate in front of Transformers' server -----------------------------------------------------------------------
class RequestGate:
    """An ASGI middleware in front of Transformers' server: what strangers may ask of this machine.

    Only `ROUTES` are answered (any other path or method gets 404, `/load_model` and `/reset` 403). A request's body is
    read up to `max_body_bytes`; its fields are checked (`check_request_fields`), every content part of every message
    checked (`route_parts`), and its images and videos taken in by the `Intake` in a pool of `intake_workers` threads,
    so fetching and decoding never block the event loop (`/health` and text-only requests keep being answered); more
    than `max_waiting` requests waiting for a worker are answered 503. The model then sees data URIs whose sizes, frame
    counts and decoding cost were checked. Every refusal is a 4xx (or that 503) naming the field, item and rule.
    """

    def __init__(self, app, *, intake: Intake, limits: ServingLimits):
        self.app, self.intake, self.limits = app, intake, limits
        self.workers = concurrent.futures.ThreadPoolExecutor(limits.intake_workers, thread_name_prefix="intake")
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1008})
        path, method = scope.get("path", ""), scope.get("method", "")
        if path in CLOSED_ROUTES:
            return await self.refuse(send, 403, f"{path} is disabled: this server serves one checkpoint only.")
        if ROUTES.get(path) != method:
            served = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
            return await self.refuse(send, 404, f"{method} {path} is not served here; this server answers {served}.")
        if method == "GET":
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.limits.max_body_bytes:
                return await self.refuse(send, 413, f"the request body exceeds {self.limits.max_body_bytes} bytes.")
            if not message.get("more_body"):
                break
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("the request body must be a JSON object.")
            num_frames = check_request_fields(request, self.intake.context, self.limits)
            parts = route_parts(path, request)
            if parts:
                if self.pending >= self.limits.intake_workers + self.limits.max_waiting:
                    return await self.refuse(send, 503, "the server is busy taking other requests' media in; retry.")
                self.pending += 1
                try:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self.workers, self.intake.admit, parts, num_frames)
                finally:
                    self.pending -= 1
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
    async def refuse(send, status: int, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


__all__ = ["RequestGate", "Intake", "ServingLimits", "check_generation_arguments", "message_parts", "GENERATION_BOUNDS"]
