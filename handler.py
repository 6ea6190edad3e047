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
`generate` arguments of the bundle's `GENERATION_BOUNDS`, within their bounds (greedy by default, the checkpoint's
generation config otherwise). The answer is `[{"generated_text": "..."}]`. A request the model cannot take raises
`ValueError` with the reason, which the toolkit returns to the caller.

What a caller can reach is what the OpenAI-compatible server allows (docs/serving.md, Security; the bundle's
`serving_internvl_x.py` holds the intake and bounds both use): images and videos as base64, data URIs and http(s) URLs
to public hosts, no local files, every request's work bounded before it starts. The deployer changes that with the
`INTERNVL_X_MEDIA_POLICY` variable (JSON of the bundle's `MediaPolicy` fields, e.g. `{"local_files": true,
"local_root": "/data/images"}`).
"""

import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

DEFAULT_MAX_NEW_TOKENS = 256
SERVING_NAMES = ("Intake", "ServingLimits", "message_parts", "check_generation_arguments")


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        device_map = "auto" if torch.cuda.is_available() else None
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, trust_remote_code=True, dtype="auto", device_map=device_map
        ).eval()
        serving = {name: get_class_from_dynamic_module(f"serving_internvl_x.{name}", path) for name in SERVING_NAMES}
        policy_class = get_class_from_dynamic_module("media_internvl_x.MediaPolicy", path)
        variable = get_class_from_dynamic_module("media_internvl_x.MEDIA_POLICY_VARIABLE", path)
        policy = policy_class.current() if variable in os.environ else policy_class.for_servers()
        # The processor reads every image under the same policy (it reads this process's variable), whatever a request
        # hands it: defence in depth behind the intake.
        os.environ.update(policy.to_environment())
        limits = serving["ServingLimits"]()
        self.intake = serving["Intake"](self.model.config, self.processor.image_processor, policy, limits)
        self.message_parts = serving["message_parts"]
        self.check_generation_arguments = serving["check_generation_arguments"]
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
        self.check_generation_arguments(parameters, self.context)
        self.intake.admit(self.message_parts(messages))
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
