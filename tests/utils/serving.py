"""Helpers of the serving tests: the digits demo and its examples, the `openai` client and raw HTTP against a server
on 127.0.0.1, and the content parts requests are built of."""

import base64
import json
import urllib.error
import urllib.request

import PIL.Image
import pytest

from devtools.bundle import ROOT

DEMO = ROOT / "examples" / "digits-demo"
EXAMPLES = json.loads((DEMO / "examples.json").read_text())
MODEL = str(DEMO.resolve())
TEXT = {"type": "text", "text": EXAMPLES[0]["question"]}


def encoded(name: str) -> str:
    return base64.b64encode((DEMO / name).read_bytes()).decode()


def client(base_url: str):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def chat(base_url: str, content: list[dict], stream: bool = False, model: str | None = None) -> str:
    request = dict(
        model=model or MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=20,
        temperature=0,
    )
    if not stream:
        return client(base_url).chat.completions.create(**request).choices[0].message.content
    chunks = client(base_url).chat.completions.create(**request, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def image_part(name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded(name)}"}}


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(base_url: str, example: dict, stream: bool = False) -> str:
    return chat(base_url, [image_part(example["image"]), {"type": "text", "text": example["question"]}], stream)


def refused(base_url: str, content: list[dict], **fields) -> tuple[int, str]:
    """Status and message of a chat request the server is expected to refuse."""
    from openai import APIStatusError

    request = dict(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0)
    with pytest.raises(APIStatusError) as error:
        client(base_url).chat.completions.create(**{**request, **fields})
    body = error.value.response.json()
    return error.value.status_code, body["error"]["message"] if "error" in body else json.dumps(body)


def post(base_url: str, path: str, body: dict | bytes, method: str = "POST") -> tuple[int, str]:
    """Status and text of a raw HTTP request to the server's `path` (a JSON body, or bytes as they are)."""
    root = base_url.removesuffix("/v1")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        root + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def digits_clip(tmp_path, count: int = 4) -> str:
    """A data URI of a lossless video whose frames are the demo's example images (64×64)."""
    import numpy as np

    from tests.utils.video import write_video

    frames = np.stack([np.asarray(PIL.Image.open(DEMO / e["image"]).convert("RGB").resize((64, 64))) for e in EXAMPLES])
    path = write_video(tmp_path / "clip.mkv", frames[np.arange(count) % len(frames)])
    return "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()
