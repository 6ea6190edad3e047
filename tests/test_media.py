"""The media file's bounds on the work one read may cost, each against a host or file built to exceed it: fetches end
at one deadline whatever stage a slow host stalls in (headers as well as body), video decoding is bounded by the
pixels of the frames decoded rather than by what a header claims, and malformed sources are refused by name."""

import base64
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from devtools.bundle import Bundle
from tests.utils.video import random_frames, write_resizing_clip, write_video


@pytest.fixture(scope="module")
def media():
    bundle = Bundle()
    return {name: bundle.load(f"media_internvl_x.{name}") for name in ("MediaPolicy", "fetch_bytes", "read_video")}


class StallingHost(BaseHTTPRequestHandler):
    """`/headers`: the status line, then one header byte every 0.1 s for 30 s; `/body`: headers, then one body byte
    every 0.1 s. `cut_off` is set when the client hung up before the host finished."""

    cut_off = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        try:
            if self.path == "/headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(300):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.1)
                self.wfile.write(b": y\r\n\r\n")
            else:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n")
                for _ in range(300):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.1)
        except OSError:
            StallingHost.cut_off.set()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stalling_host():
    host = ThreadingHTTPServer(("127.0.0.1", 0), StallingHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


@pytest.mark.parametrize("stage", ["headers", "body"])
def test_a_fetch_ends_at_its_deadline_whichever_stage_the_host_stalls_in(media, stalling_host, stage):
    """A host that trickles its headers (or its body) a byte at a time, each byte well within any read timeout, is cut
    off at the fetch's deadline: the refusal names it, and the host sees the connection closed long before it is done
    (it would trickle for 30 s)."""
    StallingHost.cut_off.clear()
    policy = media["MediaPolicy"](fetch_timeout=1.0)
    with pytest.raises(ValueError, match=r"^image 0 \(a URL\): not fetched within 1 s\.$"):
        media["fetch_bytes"](f"{stalling_host}/{stage}", "image 0 (a URL)", policy)
    assert StallingHost.cut_off.wait(10)


def test_one_deadline_covers_all_the_fetches_it_is_given(media, stalling_host):
    """A server passes one deadline for all of a request's fetches: one already spent refuses the next fetch at once,
    before a connection is made."""
    policy = media["MediaPolicy"](fetch_timeout=20.0)
    with pytest.raises(ValueError, match="not fetched within 20 s"):
        media["fetch_bytes"](f"{stalling_host}/body", "image 1", policy, deadline=time.monotonic() - 1)


def test_video_decoding_is_bounded_by_the_pixels_decoded(media, tmp_path):
    """30 frames of 64×64: 8 frames taken uniformly means decoding frames 0..28 (29 × 4096 pixels). A budget below
    that is refused before any work when the header tells; the same clip within the budget decodes."""
    path = write_video(tmp_path / "clip.mkv", random_frames(30, 64, 64))
    policy = media["MediaPolicy"]
    needed = 29 * 64 * 64
    with pytest.raises(ValueError, match=rf"takes more than the {needed - 1} pixels .* per request"):
        media["read_video"](str(path), policy=policy(max_decoded_pixels=needed - 1))
    clip = media["read_video"](str(path), policy=policy(max_decoded_pixels=needed))
    assert clip.frames_indices[-1] == 28 and len(clip.frames) == 8


def test_a_header_that_understates_the_frames_is_caught_by_what_is_decoded(media, tmp_path):
    """A clip whose header records 64×64 frames but whose frames 1.. are 512×512: the header passes every check; the
    decoder refuses to allocate a frame larger than allowed, and the budget counts decoded frames, not the header."""
    path = str(write_resizing_clip(tmp_path / "lying.mkv", [64] + [512] * 5))
    policy = media["MediaPolicy"]
    larger = r"could not be decoded \(a corrupt stream, or a frame is larger than the 16384 pixels"
    with pytest.raises(ValueError, match=larger):
        media["read_video"](path, num_frames=2, policy=policy(max_frame_pixels=128 * 128))
    budget = 64 * 64 + 2 * 512 * 512  # the header alone would say 6 × 4096 fits easily
    with pytest.raises(ValueError, match=rf"takes more than the {budget} pixels"):
        media["read_video"](path, num_frames=6, policy=policy(max_decoded_pixels=budget))
    assert media["read_video"](path, num_frames=2, policy=policy()).frames.shape[1:3] == (512, 512)


def test_do_sample_frames_false_keeps_every_frame_of_a_file(tmp_path, chat_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)
    path = str(write_video(tmp_path / "clip.mkv", random_frames(32, 28, 28)))
    every = processor(text="<video>\nHi", videos=[path], do_sample_frames=False, return_metadata=True)
    assert every["video_metadata"][0]["frames_indices"] == list(range(32)) and len(every["pixel_values"]) == 32
    messages = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "Hi"}]}]
    rendered = processor.apply_chat_template(messages, tokenize=True, return_dict=True, do_sample_frames=False)
    assert len(rendered["pixel_values"]) == 32
    assert len(processor(text="<video>\nHi", videos=[path])["pixel_values"]) == 8  # the default, sampled


@pytest.mark.parametrize("fps", [math.nan, math.inf, -1.0, 0, True])
def test_a_frame_rate_that_is_not_a_positive_finite_number_is_refused_by_name(media, tmp_path, fps):
    path = str(write_video(tmp_path / "clip.mkv", random_frames(6, 28, 28)))
    with pytest.raises(ValueError, match=r"video 0 of the batch .*fps must be a positive finite number"):
        media["read_video"](path, fps=fps)


def test_a_data_uri_without_a_comma_is_refused_by_name(chat_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)
    for source in ("data:image/png;base64", "data:image/png;base64" + base64.b64encode(b"x" * 90).decode()):
        with pytest.raises(ValueError, match="image 0 of the batch .* has no comma before its data"):
            processor(text="<image>\nHi", images=[source])


def test_frames_decoded_earlier_are_not_reread(media):
    """Frames given as arrays cost no decoding: the budget applies to files only."""
    frames = np.zeros((40, 100, 100, 3), np.uint8)
    clip = media["read_video"](frames, policy=media["MediaPolicy"](max_decoded_pixels=1))
    assert len(clip.frames) == 40
