# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""Hugging Face Inference Endpoints handler for an InternVL-X checkpoint (the toolkit imports `EndpointHandler`).

Request bodies (JSON):

    {"inputs": {"image": "<base64, data URI or http(s) URL>", "text": "What digit is this?"},
     "parameters": {"max_new_tokens": 32}}
    {"inputs": [{"role": "user", "content": [{"type": "image", "url": "..."}, {"type": "text", "text": "..."}]}],
     "parameters": {...}}

`inputs` is one question about one image (or none), or a chat conversation in Transformers' message format (images
as `{"type": "image", "url" | "path" | "base64" | "image": ...}`, or OpenAI's `image_url` parts). `parameters` are
`generate` arguments (greedy by default, the checkpoint's generation config otherwise). The answer is
`[{"generated_text": "..."}]`. A request the model cannot take raises `ValueError` with the reason, which the
toolkit returns to the caller.
"""

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

DEFAULT_MAX_NEW_TOKENS = 256


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        device_map = "auto" if torch.cuda.is_available() else None
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, trust_remote_code=True, dtype="auto", device_map=device_map
        ).eval()
        self.generation_keys = set(GenerationConfig().to_dict()) | {"max_new_tokens", "min_new_tokens"}

    def __call__(self, data: dict) -> list[dict]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("the request body must be a JSON object with `inputs` (and optionally `parameters`).")
        messages = self.messages(data["inputs"])
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(
                f"`parameters` must be a JSON object of generate arguments, got {type(parameters).__name__}."
            )
        unknown = sorted(set(parameters) - self.generation_keys)
        if unknown:
            raise ValueError(
                f"unknown generation parameters {unknown}; use `generate` arguments such as max_new_tokens."
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

    @staticmethod
    def messages(inputs) -> list[dict]:
        """`inputs` as a conversation: a question (with an optional image) becomes one user turn."""
        if isinstance(inputs, str):
            inputs = {"text": inputs}
        if isinstance(inputs, dict):
            text = inputs.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("`inputs` needs a non-empty `text` (the question), and optionally an `image`.")
            content = [{"type": "text", "text": text}]
            image = inputs.get("image")
            if image is not None:
                if not isinstance(image, str):
                    raise ValueError("`inputs.image` must be a string: base64, a data URI or an http(s) URL.")
                content.insert(0, {"type": "image", "url": image})
            return [{"role": "user", "content": content}]
        if isinstance(inputs, list) and inputs and all(isinstance(m, dict) and "role" in m for m in inputs):
            return inputs
        raise ValueError(
            "`inputs` must be {'image': ..., 'text': ...}, a question string, or a list of chat messages with `role` "
            f"and `content`; got {type(inputs).__name__}."
        )
