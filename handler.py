# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""Hugging Face Inference Endpoints handler for an InternVL-X checkpoint (the toolkit imports `EndpointHandler`).

Request bodies (JSON):

    {"inputs": {"image": "<base64, data URI or http(s) URL>", "text": "What digit is this?"},
     "parameters": {"max_new_tokens": 32}}
    {"inputs": [{"role": "user", "content": [{"type": "image", "url": "..."}, {"type": "text", "text": "..."}]}],
     "parameters": {...}}

`inputs` is one question about one image (or none), or a chat conversation in Transformers' message format (images
as `{"type": "image", "url" | "base64" | "image": ...}`, or OpenAI's `image_url` parts). `parameters` are the
`generate` arguments of `PARAMETERS`, within their bounds (greedy by default, the checkpoint's generation config
otherwise). The answer is `[{"generated_text": "..."}]`. A request the model cannot take raises `ValueError` with the
reason, which the toolkit returns to the caller.

What a caller can reach (docs/serving.md, Security): images as base64, data URIs and http(s) URLs to public hosts,
fetched within 20 s and 20 MB, at most 40 megapixels and 8 images, their tokens within the model's context; no local
files. The deployer changes that with the `INTERNVL_X_MEDIA_POLICY` variable (JSON of the bundle's `MediaPolicy`
fields, e.g. `{"local_files": true, "local_root": "/data/images"}`).
"""

import importlib
import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

DEFAULT_MAX_NEW_TOKENS = 256
MAX_IMAGES = 8
# The `generate` arguments a caller may set: (type, lowest, highest); `None` for the model's context.
PARAMETERS = {
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


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        device_map = "auto" if torch.cuda.is_available() else None
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, trust_remote_code=True, dtype="auto", device_map=device_map
        ).eval()
        image_module = importlib.import_module(type(self.processor.image_processor).__module__)
        self.admit_chat_media = importlib.import_module(type(self.processor).__module__).admit_chat_media
        # Every image is taken in (and turned into a data URI) under this policy before the processor sees it.
        policy = image_module.MediaPolicy
        self.policy = policy.current() if image_module.MEDIA_POLICY_VARIABLE in os.environ else policy.for_servers()
        self.context = self.model.config.text_config.max_position_embeddings

    def __call__(self, data: dict) -> list[dict]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("the request body must be a JSON object with `inputs` (and optionally `parameters`).")
        messages = self.messages(data["inputs"])
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(
                f"`parameters` must be a JSON object of generate arguments, got {type(parameters).__name__}."
            )
        self.check_parameters(parameters)
        self.admit_chat_media(
            messages,
            self.processor.image_processor,
            self.processor.image_seq_length,
            self.policy,
            MAX_IMAGES,
            self.context,
        )
        settings = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, **parameters}
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            output = self.model.generate(**inputs, **settings)
        prompt_length = inputs["input_ids"].shape[1]
        answer = self.processor.decode(output[0, prompt_length:], skip_special_tokens=True)
        return [{"generated_text": answer.strip()}]

    def check_parameters(self, parameters: dict) -> None:
        """Refuse, by name, a parameter outside `PARAMETERS` or outside its bounds."""
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"unknown or unaccepted generation parameters {unknown}; accepted: {sorted(PARAMETERS)}.")
        for name, value in parameters.items():
            kind, low, high = PARAMETERS[name]
            high = self.context if high is None and kind is int else high
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"`{name}` must be true or false, got {value!r}.")
            if kind is not bool and (not number or (kind is int and not isinstance(value, int))):
                raise ValueError(f"`{name}` must be {'an integer' if kind is int else 'a number'}, got {value!r}.")
            if kind is not bool and not low <= value <= high:
                raise ValueError(f"`{name}` must be from {low} to {high}, got {value!r}.")

    @staticmethod
    def messages(inputs) -> list[dict]:
        """`inputs` as a conversation: a question (with an optional image and video, in that order; a video gives 8
        frames) becomes one user turn."""
        if isinstance(inputs, str):
            inputs = {"text": inputs}
        if isinstance(inputs, dict):
            text = inputs.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    "`inputs` needs a non-empty `text` (the question), and optionally an `image` and a `video`."
                )
            content = [{"type": "text", "text": text}]
            for kind in ("image", "video"):
                source = inputs.get(kind)
                if source is None:
                    continue
                if not isinstance(source, str):
                    raise ValueError(f"`inputs.{kind}` must be a string: base64, a data URI or an http(s) URL.")
                content.insert(len(content) - 1, {"type": kind, "url": source})
            return [{"role": "user", "content": content}]
        if isinstance(inputs, list) and inputs and all(isinstance(m, dict) and "role" in m for m in inputs):
            return inputs
        raise ValueError(
            "`inputs` must be {'image': ..., 'text': ...}, a question string, or a list of chat messages with `role` "
            f"and `content`; got {type(inputs).__name__}."
        )
