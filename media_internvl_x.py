# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""InternVL-X media: images and videos read from paths, URLs, base64 and arrays, under a media policy that says how far
a read may reach (local files, which hosts, how many bytes, pixels and frames). The processors read every image and
video through this file; servers take a stranger's media in under `MediaPolicy.for_servers()`."""

import base64
import dataclasses
import http.client
import io
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

CHANNEL_COUNTS = (1, 3, 4)  # grayscale, RGB, RGBA
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL modes of more than 8 bits per pixel
FLOAT_ROUNDING = 1e-5  # how far past [0, 1] a floating-point image may stray by rounding alone
BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")


# ---- where images may come from -------------------------------------------------------------------------------------
MEDIA_POLICY_VARIABLE = "INTERNVL_X_MEDIA_POLICY"  # JSON of `MediaPolicy` fields; servers set it for their processes


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """Which image and video sources `read_image` and `read_video` read, and how much work a read may take.

    The default is a user's own machine: any local path or `file://` URL, any `http(s)` URL. A server or handler that
    strangers can reach runs with `MediaPolicy.for_servers()` (in its processes through the `INTERNVL_X_MEDIA_POLICY`
    variable, which `examples/serve.py` and `handler.py` set): no local file unless under `local_root`, URLs to public
    addresses only, every fetch within one deadline (name lookup, connection, headers and body), an image's size read
    from its header before it is decoded, and a video's decoding bounded by the pixels of the frames it decodes.
    """

    local_files: bool = True  # read local paths and file:// URLs at all
    local_root: str | None = None  # if set, only under this folder (links resolved)
    remote_urls: bool = True  # fetch http(s) URLs at all
    internal_urls: bool = True  # fetch URLs whose host resolves to a loopback, private, link-local, ... address
    fetch_timeout: float = 60.0  # seconds for all the fetches of one read (or one request), redirects included
    max_bytes: int = 512 * 2**20  # of one image or video
    max_redirects: int = 5
    max_pixels: int | None = None  # of one image, from its header; None: Pillow's bomb limit only
    max_frame_pixels: int | None = None  # of one video frame, as decoded; None: `max_pixels`
    max_video_frames: int | None = None  # frames of one video decoded at most (decoding is sequential); None: any
    max_decoded_pixels: int | None = None  # width × height summed over every video frame one read decodes

    @classmethod
    def for_servers(cls, **overrides) -> "MediaPolicy":
        """What a network service accepts by default: base64 and data URIs, public http(s) URLs (20 s for all of a
        request's fetches, 20 MB each, 3 redirects), images of at most 40 megapixels, video frames of at most 3840×2160,
        videos of at most 18,000 frames (10 minutes at 30 fps) of which at most 10⁹ pixels (about 480 frames of
        1920×1080) are decoded, no local files."""
        settings = dict(
            local_files=False,
            internal_urls=False,
            fetch_timeout=20.0,
            max_bytes=20 * 2**20,
            max_redirects=3,
            max_pixels=40_000_000,
            max_frame_pixels=3840 * 2160,
            max_video_frames=18_000,
            max_decoded_pixels=1_000_000_000,
        )
        return cls(**{**settings, **overrides})

    @classmethod
    def current(cls) -> "MediaPolicy":
        """The policy of this process: `INTERNVL_X_MEDIA_POLICY` (JSON of fields) if set, else the default."""
        text = os.environ.get(MEDIA_POLICY_VARIABLE)
        return cls(**json.loads(text)) if text else cls()

    def to_environment(self) -> dict[str, str]:
        """`{INTERNVL_X_MEDIA_POLICY: json}`, for the environment of the processes that read images."""
        return {MEDIA_POLICY_VARIABLE: json.dumps(dataclasses.asdict(self))}

    @property
    def frame_pixel_limit(self) -> int | None:
        """Pixels of one video frame at most."""
        return self.max_frame_pixels if self.max_frame_pixels is not None else self.max_pixels


# ---- fetching: every step under one deadline -------------------------------------------------------------------------
def seconds_left(deadline: float, where: str, timeout: float) -> float:
    """Seconds until `deadline` (a `time.monotonic()` value), or the refusal once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ValueError(f"{where}: not fetched within {timeout:g} s.")
    return left


def host_addresses(host: str, port: int, deadline: float, where: str, timeout: float) -> list[str]:
    """The addresses `host` resolves to, looked up in a thread of its own so that a slow name server cannot hold the
    caller past `deadline` (the lookup itself ends when the system resolver gives up)."""
    found: dict = {}

    def look_up() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            found["infos"] = []

    lookup = threading.Thread(target=look_up, daemon=True)
    lookup.start()
    lookup.join(seconds_left(deadline, where, timeout))
    if lookup.is_alive():
        raise ValueError(f"{where}: not fetched within {timeout:g} s.")
    return list(dict.fromkeys(info[4][0] for info in found["infos"]))


def is_public_address(address: str) -> bool:
    """Whether `address` is a public (global unicast) one; an IPv4 address mapped into IPv6 counts as itself."""
    ip = ipaddress.ip_address(address.split("%")[0])
    ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
    return ip.is_global and not ip.is_multicast


class DeadlineReader(io.RawIOBase):
    """A socket read as a file whose every read ends by `deadline`: a peer that trickles its headers or body a byte
    at a time is cut off there, not a read timeout later."""

    def __init__(self, sock: socket.socket, deadline: float, where: str, timeout: float):
        self.sock, self.deadline, self.where, self.timeout = sock, deadline, where, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(seconds_left(self.deadline, self.where, self.timeout))
        return self.sock.recv_into(buffer)


class DeadlineSocket:
    """What `http.client.HTTPResponse` reads a response from: the socket, through a `DeadlineReader`."""

    def __init__(self, reader: DeadlineReader):
        self.reader = reader

    def makefile(self, mode: str):
        return io.BufferedReader(self.reader)


def tls_context() -> ssl.SSLContext:
    """Certificates checked against certifi's authorities where installed (as Transformers' HTTP client does), else
    the system's."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def connect(parts: urllib.parse.SplitResult, addresses: list[str], port: int, deadline: float, where: str, timeout):
    """A connection to the first of `addresses` (already checked against the policy) that answers, TLS-wrapped for
    https, within `deadline`. The checked address is the one connected to: no second name lookup happens."""
    sock = None
    for address in addresses:
        try:
            sock = socket.create_connection((address, port), timeout=seconds_left(deadline, where, timeout))
            break
        except ValueError:
            raise
        except OSError:
            continue
    if sock is None:
        raise ValueError(f"{where}: could not be fetched.")
    if parts.scheme == "https":
        sock = tls_context().wrap_socket(sock, server_hostname=parts.hostname, do_handshake_on_connect=False)
        while True:  # the handshake, one socket wait at a time, each bounded by what is left of the deadline
            sock.settimeout(seconds_left(deadline, where, timeout))
            try:
                sock.do_handshake()
                break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
    return sock


def http_get(url: str, addresses: list[str], deadline: float, where: str, policy: "MediaPolicy"):
    """`(status, location, body)` of one GET of `url` from one of `addresses`, the body read up to the byte cap; a
    redirect's body is not read."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    timeout = policy.fetch_timeout
    sock = connect(parts, addresses, port, deadline, where, timeout)
    try:
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        host += f":{parts.port}" if parts.port else ""
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: internvl-x\r\nAccept: */*\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
        )
        sock.settimeout(seconds_left(deadline, where, timeout))
        sock.sendall(request.encode("ascii"))
        response = http.client.HTTPResponse(DeadlineSocket(DeadlineReader(sock, deadline, where, timeout)))
        response.begin()
        if response.status in (301, 302, 303, 307, 308):
            return response.status, response.getheader("location", ""), b""
        if response.status != 200:
            raise ValueError(f"{where}: the server answered HTTP {response.status}.")
        declared = response.length or 0  # the Content-Length header, when it holds a number
        if declared > policy.max_bytes:
            raise ValueError(f"{where}: {declared} bytes, more than the {policy.max_bytes} allowed.")
        body = bytearray()
        while chunk := response.read(65536):
            body += chunk
            if len(body) > policy.max_bytes:
                raise ValueError(f"{where}: more than the {policy.max_bytes} bytes allowed.")
        return response.status, None, bytes(body)
    finally:
        sock.close()


def fetch_bytes(url: str, where: str, policy: MediaPolicy, deadline: float | None = None) -> bytes:
    """The bytes at `url` under `policy`: each hop's host looked up and checked (every address public unless
    `internal_urls`), the checked address connected to, redirects followed by hand up to the limit, the body read
    against the byte cap, and all of it (name lookups, connections, TLS, headers, body, every hop) done by `deadline`
    (default: `policy.fetch_timeout` from now; a server passes one deadline for all of a request's fetches). Failures
    are `ValueError`s naming the item (`where`, e.g. "image 1 of the request (a URL)") and the rule, without the
    network's details (a refused address and a closed port read the same)."""
    deadline = deadline if deadline is not None else time.monotonic() + policy.fetch_timeout
    timeout = policy.fetch_timeout
    for _ in range(policy.max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{where}: only http(s) URLs are fetched, got a {parts.scheme or 'schemeless'} URL.")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"{where}: the URL's port is not a number from 0 to 65535.") from None
        addresses = host_addresses(parts.hostname, port, deadline, where, timeout)
        if not policy.internal_urls and not (addresses and all(map(is_public_address, addresses))):
            raise ValueError(
                f"{where}: its host is not a public address; this server fetches images from public hosts only."
            )
        try:
            status, location, body = http_get(url, addresses, deadline, where, policy)
        except ValueError:
            raise
        except TimeoutError:
            raise ValueError(f"{where}: not fetched within {timeout:g} s.") from None
        except Exception:  # noqa: BLE001 (refused, reset, TLS, a malformed answer: one message for all)
            raise ValueError(f"{where}: could not be fetched.") from None
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)
    raise ValueError(f"{where}: more than {policy.max_redirects} redirects.")


def local_path_allowed(path: str, where: str, policy: MediaPolicy) -> str:
    """`path` if `policy` lets it be read (resolved, under `local_root` when one is set); else a `ValueError` naming
    the item (`where`, e.g. "image 0 of the batch") and the rule, not whether the file exists."""
    if not policy.local_files:
        raise ValueError(
            f"{where} is a local path or file:// URL; this server reads no local files (send it as base64, a data "
            "URI or an http(s) URL)."
        )
    if policy.local_root is not None:
        resolved, root = os.path.realpath(path), os.path.realpath(policy.local_root)
        if os.path.commonpath([resolved, root]) != root:
            raise ValueError(f"{where} is a local path outside the folder this server reads from.")
        return resolved
    return path


def open_media(
    source: str, where: str, policy: MediaPolicy, deadline: float | None = None
) -> tuple[str, str | io.BytesIO]:
    """`(what, data)` of an image or video given as text, under `policy`: a local path or `file://` URL (`data` is the
    path), an `http(s)` URL (fetched by `deadline`, see `fetch_bytes`), or base64 (a data URI or the bare payload).
    `what` describes the source for messages ("the file x.mp4", "a URL", ...); refusals are `ValueError`s naming
    `where` and the rule."""
    path = source.removeprefix("file://") if source.startswith("file://") else source
    if source.startswith("data:"):
        what = f"a data URI of {len(source)} characters"
        if "," not in source:
            raise ValueError(f"{where} ({what}) has no comma before its data: write data:image/png;base64,DATA.")
    elif source.startswith(("http://", "https://")):
        if not policy.remote_urls:
            raise ValueError(f"{where} is a URL; this service fetches no URLs.")
        what = "a URL" if not policy.internal_urls else f"the URL {source}"
        return what, io.BytesIO(fetch_bytes(source, f"{where} ({what})", policy, deadline))
    elif (
        source.startswith("file://")
        or not BASE64.match(source)
        or len(source) < 64
        or (policy.local_files and os.path.isfile(path))  # without local files, no look at the disk at all
    ):
        path = local_path_allowed(path, where, policy)
        if not os.path.isfile(path):
            raise ValueError(f"{where}: no such file {path!r} (nor a URL or base64 data).")
        return f"the file {path}", path
    else:
        what = f"a base64 string of {len(source)} characters"
    payload = source.split(",", 1)[1] if source.startswith("data:") else source
    try:
        return what, io.BytesIO(base64.b64decode("".join(payload.split()), validate=True))
    except ValueError:
        # the payload itself may be megabytes: not repeated in the message
        raise ValueError(f"{where} ({what}) could not be decoded: its base64 is invalid.") from None


def read_image(source: str, index: int, policy: MediaPolicy | None = None) -> PIL.Image.Image:
    """An image given as text → PIL image as stored (its mode kept: 16-bit and float images are scaled later, not
    clipped to 8 bits): a local path, a `file://` URL, an `http(s)` URL (fetched only then, with the HTTP client
    Transformers uses), or base64 (a `data:image/...;base64,` URI or the bare payload). Training (`finetune.py`) and
    inference read images through this one function, under `policy` (default: this process's, `MediaPolicy.current`).

    Any failure is a `ValueError` naming the image's index in the batch and why. The image's size is checked from its
    header before it is decoded (`policy.max_pixels`, and Pillow's decompression-bomb limit, as for every image Pillow
    opens).
    """
    policy = policy or MediaPolicy.current()
    where = f"image {index} of the batch"
    what, data = open_media(source, where, policy)
    try:
        image = PIL.Image.open(data)
        width, height = image.size  # from the header: nothing is decoded yet
        if policy.max_pixels is not None and width * height > policy.max_pixels:
            raise ValueError(
                f"image {index} of the batch ({what}) is {width}×{height} = {width * height} pixels, more than the "
                f"{policy.max_pixels} allowed; send a smaller image."
            )
        image.load()  # decode now: a truncated or corrupt file fails here, by name
        return image
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"image {index} of the batch ({what}) exceeds Pillow's decompression-bomb limit: {error}"
        ) from error
    except ValueError as error:
        if str(error).startswith(f"image {index} of the batch"):
            raise
        raise ValueError(f"image {index} of the batch ({what}) could not be decoded: {str(error)[:300]}") from None
    except Exception as error:  # noqa: BLE001 (bad base64, not an image, truncated file, ...)
        # `from None`: the original message may hold the whole payload, which can be megabytes of base64
        raise ValueError(
            f"image {index} of the batch ({what}) could not be decoded: {type(error).__name__}: {str(error)[:300]}"
        ) from None


FRAME_SAMPLING = ("uniform", "internvl2")
DEFAULT_NUM_FRAMES = 8  # frames taken from a video file when neither `num_frames` nor `fps` is given


def sample_frame_indices(
    total_frames: int,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    sampling: str = "uniform",
    where: str = "the video",
) -> list[int]:
    """Which of a clip's `total_frames` frames to take: `num_frames` of them, or `fps` per second of a clip recorded
    at `video_fps`, or (neither given) all of them.

    The clip is cut into `num_frames` equal segments and the frame in the middle of each is taken. `"uniform"` is
    Transformers' InternVL rule (segments over all `total_frames`, the middle rounded down); `"internvl2"` is
    InternVL2's `load_video` (segments spanning the first to the last frame, each middle offset rounded half to even).
    Refusals name `where` and the numbers.
    """
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLING}, got {sampling!r}.")
    if total_frames < 1:
        raise ValueError(f"{where} has no frames.")
    if num_frames is not None and fps is not None:
        raise ValueError(f"{where}: give num_frames or fps, not both (got num_frames={num_frames}, fps={fps}).")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"{where}: fps must be a positive finite number, got {fps!r}.")
        if not video_fps:
            raise ValueError(
                f"{where}: fps={fps} needs the clip's frame rate, which it does not record; give num_frames."
            )
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return list(range(total_frames))
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"{where}: num_frames must be a positive integer, got {num_frames!r}.")
    if num_frames > total_frames:
        asked = f"num_frames={num_frames}" if fps is None else f"fps={fps} ({num_frames} frames)"
        raise ValueError(f"{where} has {total_frames} frames, fewer than the {asked} asked for.")
    if sampling == "uniform":
        step = total_frames / num_frames
        return torch.arange(step / 2, total_frames, step).int().tolist()
    segment = (total_frames - 1) / num_frames
    return [int(segment / 2 + round(segment * index)) for index in range(num_frames)]


@dataclasses.dataclass
class VideoClip:
    """The frames taken from one video: `frames` `(T, H, W, 3)` uint8 RGB, which of the clip's `total_frames` they
    are (`frames_indices`) and the clip's frame rate, if it records one."""

    frames: np.ndarray
    frames_indices: list[int]
    total_frames: int
    fps: float | None = None
    container_format: str | None = None  # of a file: FFmpeg's short name ("matroska", "mov", ...)

    def metadata(self) -> dict:
        """As Transformers' `VideoMetadata` names it."""
        return {"total_num_frames": self.total_frames, "fps": self.fps, "frames_indices": self.frames_indices}


def frames_as_array(video, where: str) -> np.ndarray:
    """A video given as frames → `(T, H, W, 3)` uint8: a `(T, H, W, C)` or `(T, C, H, W)` array or tensor (C of 1, 3
    or 4; uint8, or float in [0, 1]), or a list of PIL images / `(H, W, C)` arrays of one size."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{where} has no frames.")
        frames = [to_image_tensor(frame, number) for number, frame in enumerate(video)]
        sizes = sorted({tuple(frame.shape[1:]) for frame in frames})
        if len(sizes) > 1:
            raise ValueError(f"the frames of {where} differ in size (height, width): {sizes[:4]}.")
        stacked = torch.stack(frames)
    else:
        stacked = torch.as_tensor(video.copy() if isinstance(video, np.ndarray) else video.detach().cpu())
        if stacked.dim() != 4:
            raise ValueError(
                f"{where} is an array of shape {tuple(stacked.shape)}; a video is (frames, height, width, channels)."
            )
        if stacked.shape[0] == 0:
            raise ValueError(f"{where} has no frames.")
        channels_last = stacked.shape[-1] in CHANNEL_COUNTS
        stacked = torch.stack(
            [
                to_image_tensor(frame, number, "channels_last" if channels_last else "channels_first")
                for number, frame in enumerate(stacked)
            ]
        )
    if stacked.is_floating_point():
        stacked = (stacked * 255).round().to(torch.uint8)
    return stacked.permute(0, 2, 3, 1).contiguous().numpy()


class DecodeBudget:
    """The pixels (width × height, summed over every frame decoded, kept or not) that the videos of one read, or one
    request, may still decode: what decoding costs is the frames it runs through, whatever a file's header claims or
    how few bytes hold them. None: no bound."""

    def __init__(self, pixels: int | None):
        self.total = self.left = pixels

    def spend(self, pixels: int, where: str) -> None:
        if self.left is None:
            return
        self.left -= pixels
        if self.left < 0:
            raise ValueError(
                f"{where}: decoding it takes more than the {self.total} pixels (width × height × frames decoded, up to "
                "the last frame taken) this service decodes per request; send a shorter or smaller clip."
            )


def open_video(data, where: str, what: str, policy: MediaPolicy):
    """Open a video file (a path or file object) with PyAV, the backend Transformers' `load_video` uses by default,
    and check it under `policy` before any frame is decoded: a video stream, its frame size, its frame count (from
    the container or, where it records none, counted from its packets, up to `policy.max_video_frames`). The decoder
    is told the frame size allowed, so a frame larger than its header said fails before it is allocated. Returns
    `(container, stream, total_frames, fps)`; the caller closes the container."""
    try:
        import av
    except ImportError:
        raise ImportError(f"reading {where} needs PyAV: `pip install av`.") from None
    try:
        container = av.open(data)
    except Exception as error:  # noqa: BLE001 (not a container FFmpeg knows, truncated, ...)
        raise ValueError(f"{where} ({what}) could not be read as a video: {type(error).__name__}.") from None
    try:
        if not container.streams.video:
            raise ValueError(f"{where} ({what}) holds no video stream.")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        limit = policy.frame_pixel_limit
        if limit is not None:
            if width * height > limit:
                raise ValueError(
                    f"{where} ({what}) has frames of {width}×{height} = {width * height} pixels, more than the "
                    f"{limit} allowed."
                )
            stream.codec_context.options = {"max_pixels": str(limit)}  # FFmpeg refuses to allocate larger frames
        rate = stream.average_rate or stream.guessed_rate
        cap = policy.max_video_frames
        total = stream.frames
        if not total:  # containers such as Matroska do not record a count
            for packet in container.demux(stream):
                total += bool(packet.size)
                if cap is not None and total > cap:
                    break
            container.seek(0, stream=stream)
        if cap is not None and total > cap:
            raise ValueError(f"{where} ({what}) has more than the {cap} frames this service decodes.")
        return container, stream, total, float(rate) if rate else None
    except ValueError:
        container.close()
        raise
    except Exception as error:  # noqa: BLE001 (a corrupt stream)
        container.close()
        raise ValueError(f"{where} ({what}) could not be read as a video: {type(error).__name__}.") from None


def decode_video(
    data, where: str, what: str, policy: MediaPolicy, pick, budget: DecodeBudget, keep: bool = True
) -> VideoClip:
    """Decode the frames `pick(total_frames, video_fps)` chooses from a video file (`open_video`), in order up to the
    last one taken, each decoded frame's pixels spent from `budget` (refused as soon as it runs out) and its size
    checked as decoded. `keep=False` checks the clip without converting the frames taken (`frames` is then empty)."""
    container, stream, total, fps = open_video(data, where, what, policy)
    count, frames = 0, {}
    name = f"{where} ({what})"
    limit = policy.frame_pixel_limit
    with container:
        indices = pick(total, fps)
        wanted, last = set(indices), max(indices)
        declared = stream.codec_context.width * stream.codec_context.height
        if budget.left is not None and declared * (last + 1) > budget.left:  # by the header: refused before any work
            budget.spend(declared * (last + 1), name)
        decoded = container.decode(stream)
        for number in range(last + 1):
            try:
                frame = next(decoded, None)
            except Exception as error:  # noqa: BLE001 (a corrupt stream, or a frame FFmpeg refused to allocate)
                larger = f", or a frame is larger than the {limit} pixels allowed" if limit is not None else ""
                reason = f"a corrupt stream{larger}: {type(error).__name__}"
                raise ValueError(f"{name} could not be decoded ({reason}).") from None
            if frame is None:
                break
            count += 1
            pixels = frame.width * frame.height
            if limit is not None and pixels > limit:
                raise ValueError(
                    f"{name}: frame {number} is {frame.width}×{frame.height} = {pixels} pixels, more than the "
                    f"{limit} allowed."
                )
            budget.spend(pixels, name)
            if number in wanted:
                frames[number] = frame.to_ndarray(format="rgb24") if keep else None
        container_format = container.format.name.split(",")[0]
    if len(frames) < len(wanted):
        raise ValueError(
            f"{where} ({what}) records {total} frames but only {count} could be decoded; frames "
            f"{sorted(wanted - set(frames))[:8]} are missing."
        )
    taken = np.stack([frames[i] for i in indices]) if keep else np.zeros((0, 0, 0, 3), np.uint8)
    return VideoClip(taken, indices, total, fps, container_format)


def video_frame_count(video, index: int = 0, policy: MediaPolicy | None = None) -> int:
    """How many frames `video` (any input `read_video` takes) holds, decoding none: a file's count from its container
    (or its packets, `open_video`), frames' count as given."""
    where = f"video {index} of the batch"
    if isinstance(video, VideoClip):
        return video.total_frames
    if isinstance(video, str):
        policy = policy or MediaPolicy.current()
        what, data = open_media(video, where, policy)
        container, _, total, _ = open_video(data, where, what, policy)
        container.close()
        return total
    return len(frames_as_array(video, where))


def read_video(
    video,
    index: int = 0,
    num_frames: int | None = None,
    fps: float | None = None,
    sampling: str = "uniform",
    policy: MediaPolicy | None = None,
    every_frame: bool = False,
    budget: DecodeBudget | None = None,
) -> VideoClip:
    """One video → the frames to show the model. `video` is a file (a path, `file://` or `http(s)` URL, base64 or a
    data URI, read under `policy` as images are), frames already decoded (a `(T, H, W, C)` array or tensor, or a list
    of PIL images or arrays), or a `VideoClip`.

    A file gives `num_frames` frames (`DEFAULT_NUM_FRAMES` if neither it nor `fps` is given, or all of a shorter
    clip); frames already decoded are all kept unless `num_frames` or `fps` is given; `every_frame=True` keeps every
    frame of either (Transformers' `do_sample_frames=False`). See `sample_frame_indices` for the `sampling` rules. A
    file's decoding spends `budget` (default: `policy.max_decoded_pixels` for this video alone). Refusals are
    `ValueError`s naming the video (`index` in the batch) and the numbers.
    """
    where = f"video {index} of the batch"
    if every_frame and (num_frames is not None or fps is not None):
        raise ValueError(f"{where}: every frame was asked for (do_sample_frames=False) and also num_frames or fps.")
    if isinstance(video, VideoClip):
        return video
    if isinstance(video, str):
        policy = policy or MediaPolicy.current()
        what, data = open_media(video, where, policy)

        def pick(total: int, video_fps: float | None) -> list[int]:
            default = None if every_frame else min(DEFAULT_NUM_FRAMES, total)
            count = num_frames if num_frames is not None or fps is not None else default
            return sample_frame_indices(total, count, fps, video_fps, sampling, f"{where} ({what})")

        budget = budget if budget is not None else DecodeBudget(policy.max_decoded_pixels)
        return decode_video(data, where, what, policy, pick, budget)
    if not isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        raise ValueError(
            f"{where} has unsupported type {type(video).__name__}: pass a path, URL or base64 string of a video file, "
            "a (frames, height, width, channels) array or tensor, or a list of frames."
        )
    frames = frames_as_array(video, where)
    indices = sample_frame_indices(len(frames), num_frames, fps, None, sampling, where)
    return VideoClip(frames[indices], indices, len(frames))


def scaled_to_unit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """A high-bit-depth PIL image's values → float32 in [0, 1], scaled by its bit depth rather than clipped: 16-bit
    modes (and 32-bit "I" holding 16-bit data, as Pillow opens some 16-bit PNGs) over 65535, other "I" images over
    their maximum; "F" images in [0, 1] as they are, up to 255 over 255, beyond that over their maximum."""
    pixels = np.clip(pixels, 0, None)
    high = float(pixels.max()) if pixels.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and high <= 65535):
        scale = 65535.0
    elif mode == "F" and high <= 1.0:
        scale = 1.0
    elif mode == "F" and high <= 255.0:
        scale = 255.0
    else:
        scale = max(high, 1.0)
    return (pixels / scale).astype(np.float32)


def has_alpha(image: PIL.Image.Image) -> bool:
    """Whether a PIL image carries transparency (an alpha band, or a palette or grey level marked transparent)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """A transparent image composited onto white, as RGB: what it shows, not the colour hidden under its alpha."""
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def to_image_tensor(
    image, index: int = 0, input_data_format: str | ChannelDimension | None = None, convert_rgb: bool = True
) -> torch.Tensor:
    """Any supported image → `(3, H, W)` tensor: uint8 (0..255) for 8-bit images, float32 in [0, 1] for floating-point
    and 16-bit ones; with `convert_rgb=False` the image keeps its own channels, `(C, H, W)` (C = 1 for grayscale, 4
    with alpha).

    PIL images of any mode are converted to RGB (transparent ones composited onto white, as Transformers' image
    processors do; 16-bit scaled to 8-bit); strings are read with
    `read_image`; arrays and tensors may be HW, HWC or CHW with 1, 3 or 4 channels, uint8, uint16 or floating point in
    [0, 1]. The channel axis is `input_data_format` (`"channels_first"` / `"channels_last"`) or, when not given, found
    by Transformers' rule (`infer_channel_dimension_format`: an axis of 1, 3 or 4 first, then last; when both could be,
    first, with Transformers' warning). Floating-point values outside [0, 1] (e.g. 0..255 stored as float) or not
    finite are refused, naming `index`, the image's place in the batch.
    """
    if isinstance(image, str):
        image = read_image(image, index)
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index} of the batch has zero size {image.width}×{image.height}.")
        image = PIL.ImageOps.exif_transpose(image)  # upright, as Transformers' `load_image` gives every image
        if image.mode in HIGH_BIT_MODES:
            image = scaled_to_unit(np.asarray(image, dtype=np.float64), image.mode)  # read on as a float array
        else:
            if convert_rgb or image.mode not in ("L", "LA", "RGB", "RGBA"):
                image = on_white(image) if has_alpha(image) else image.convert("RGB")
            pixels = torch.from_numpy(np.array(image))
            return (pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)).contiguous()
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image.astype(np.float32) if image.dtype == np.uint16 else image))
        if image.dtype == np.uint16:
            tensor = tensor / 65535.0
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype == torch.uint16:
            tensor = tensor.float() / 65535.0
    else:
        raise ValueError(
            f"image {index} of the batch has unsupported type {type(image).__name__}: pass PIL images, numpy arrays, "
            "tensors, or paths, URLs or base64 strings."
        )

    if tensor.dim() == 2:
        tensor, input_data_format = tensor[None], ChannelDimension.FIRST  # grayscale: the channel axis is added
    if tensor.dim() != 3:
        raise ValueError(
            f"image {index} of the batch: arrays must be (H, W), (H, W, C) or (C, H, W); got shape "
            f"{tuple(tensor.shape)}."
        )
    if input_data_format is None:
        if tensor.shape[0] not in CHANNEL_COUNTS and tensor.shape[-1] not in CHANNEL_COUNTS:
            raise ValueError(
                f"image {index} of the batch: no channel axis of size 1, 3 or 4 in shape {tuple(tensor.shape)}."
            )
        input_data_format = infer_channel_dimension_format(tensor, num_channels=CHANNEL_COUNTS)
    if ChannelDimension(input_data_format) == ChannelDimension.LAST:
        tensor = tensor.permute(2, 0, 1)
    if tensor.shape[0] not in CHANNEL_COUNTS:
        raise ValueError(
            f"image {index} of the batch has {tensor.shape[0]} channels in shape {tuple(image.shape)} read as "
            f"{ChannelDimension(input_data_format).value}; images need 1, 3 or 4."
        )
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"image {index} of the batch has zero size {tensor.shape[2]}×{tensor.shape[1]}.")
    if tensor.dtype == torch.uint8:
        pass
    elif tensor.is_floating_point():
        tensor = tensor.float()
        finite = torch.isfinite(tensor)
        if not finite.all():
            raise ValueError(
                f"image {index} of the batch has {int((~finite).sum())} pixel values that are NaN or infinite."
            )
        low, high = float(tensor.min()), float(tensor.max())
        if low < -FLOAT_ROUNDING or high > 1.0 + FLOAT_ROUNDING:
            raise ValueError(
                f"image {index} of the batch is floating point with values in [{low:.4g}, {high:.4g}], but "
                "floating-point images are read as [0, 1]; divide 0..255 values by 255, or pass uint8."
            )
        tensor = tensor.clamp(0.0, 1.0)  # rounding's overshoot (1.0000001) only
    else:
        raise ValueError(
            f"image {index} of the batch has dtype {tensor.dtype}: use uint8, uint16 or floating point in [0, 1]."
        )
    if not convert_rgb:
        return tensor.contiguous()
    tensor = tensor[:3] if tensor.shape[0] == 4 else tensor
    return (tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor).contiguous()
