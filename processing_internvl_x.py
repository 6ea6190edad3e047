# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""InternVL-X processor: tokenizer + tiling image processor + the InternLM2 (ChatML) chat template."""

import re

import PIL.Image
import torch
from packaging.version import Version
from transformers import __version__ as TRANSFORMERS_VERSION
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput

from .configuration_internvl_x import (
    CHAT_END_TOKEN,
    DEFAULT_SYSTEM_MESSAGE,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
)
from .media_internvl_x import (
    DecodeBudget,
    MediaPolicy,
    VideoClip,
    read_image,
    read_video,
)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
VIDEO_OPTIONS = ("num_frames", "fps", "frame_sampling", "do_sample_frames")
CHAT_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = (CHAT_END_TOKEN, CHAT_START_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN)
IMAGE_SPAN_TOKENS = (IMAGE_START_TOKEN, IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN)

# What `_get_num_multimodal_tokens` counts per image, as the installed Transformers' InternVL counts it (vLLM's
# Transformers backend reads it): up to 5.24 the whole span, `<img>`, the context tokens and `</img>`; from 5.25 only
# the tokens that hold the image's embeddings (its processor tests count those in each replacement).
COUNTS_IMAGE_DELIMITERS = Version(TRANSFORMERS_VERSION).release[:2] < (5, 25)

# InternLM2 chat format (ChatML): each turn is the start token, its role, a newline, its content, the end token and a
# newline; the InternVL2 system message unless one is given; every image item becomes the processor's image token,
# `<IMG_CONTEXT>`, on its own line (as in Transformers' InternVL; InternVL2's own prompts write `<image>` there, which
# the processor reads the same), which the processor expands into the image's span of image tokens. Serving engines
# that expand images themselves (vLLM) look for that token in the rendered prompt. Every video item becomes `<video>`
# on its own line, which the processor expands into one `FrameN: ` line per frame (InternVL2's video prompt). Each
# assistant reply and its <|im_end|> sit in a generation block: what `return_assistant_tokens_mask` marks for
# training. A content part the format cannot show (audio, a part without a type) is refused, never dropped.
# This is the only rendering of the format in the project: training and inference both use it.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) %}"
    "{%- if content is string %}{{ content }}"
    "{%- elif content is defined and content is not none %}{%- for item in content %}"
    "{%- if item['type'] in ('image', 'image_url') %}{{ '<IMG_CONTEXT>\\n' }}"
    "{%- elif item['type'] in ('video', 'video_url') %}{{ '<video>\\n' }}"
    "{%- elif item['type'] == 'text' %}{{ item['text'] }}"
    "{%- else %}{{ raise_exception('InternVL-X chats hold text, image and video parts only, got a part of type ' "
    "+ (item['type'] | string)) }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = render_content(messages[0]['content']) %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '" + DEFAULT_SYSTEM_MESSAGE + "' %}{%- endif %}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{ render_content(message['content']) + '<|im_end|>' }}{%- endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}{{ render_content(message['content']) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The content parts a chat message may hold: what the chat template renders.
TEXT_PART, IMAGE_PARTS, VIDEO_PARTS = "text", ("image", "image_url"), ("video", "video_url")


def check_conversation(messages, where: str = "the conversation") -> None:
    """Refuse, naming the message and the part, what the chat template cannot render faithfully: no messages, a
    message without a string `role`, content that is not a string or a list of parts, a part without a `type`, a
    text part without string `text`, or a part of another kind (audio, ...). Messages that are not dicts
    (dataclasses, pydantic models) are left to Transformers, which converts them."""
    if isinstance(messages, (list, tuple)) and not messages:
        raise ValueError(f"{where} has no messages; give at least one {{'role': ..., 'content': ...}} message.")
    for index, message in enumerate(messages if isinstance(messages, (list, tuple)) else []):
        if not isinstance(message, dict):
            continue
        name = f"message {index} of {where}"
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{name} needs a string `role` ('system', 'user', 'assistant', ...): {message!r:.200}.")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"{name} has content of type {type(content).__name__}: give a string or a list of parts.")
        for number, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == TEXT_PART and not isinstance(part.get("text"), str):
                raise ValueError(f"part {number} of {name} is a text part without a string `text`: {part!r:.200}.")
            if kind != TEXT_PART and kind not in IMAGE_PARTS and kind not in VIDEO_PARTS:
                raise ValueError(
                    f"part {number} of {name} has type {kind!r}; InternVL-X chats hold "
                    f"{[TEXT_PART, *IMAGE_PARTS, *VIDEO_PARTS]} parts only: {part!r:.200}."
                )


def prepare_tokenizer(tokenizer, config=None) -> dict[str, int]:
    """Add the InternVL-X special tokens the tokenizer lacks and return their ids.

    With `config` (an `InternVLXConfig`), record the image token ids in it. If the vocabulary grew past the model's
    embedding size, resize the model's embeddings (`model.resize_token_embeddings(len(tokenizer))`).
    """
    missing = [token for token in SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    if config is not None:
        config.image_token_id = ids[IMAGE_CONTEXT_TOKEN]
        config.image_start_token_id = ids[IMAGE_START_TOKEN]
        config.image_end_token_id = ids[IMAGE_END_TOKEN]
    return ids


def chat_generation_defaults(tokenizer) -> dict[str, int | list[int]]:
    """Generation settings every checkpoint of this bundle saves: a turn ends at `<|im_end|>` (or the tokenizer's
    EOS), and batches pad with the tokenizer's pad token."""
    end = tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN)
    eos = [end] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, end) else [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": tokenizer.bos_token_id}


def make_turn_end_the_eos(tokenizer) -> None:
    """Make `<|im_end|>` the tokenizer's end-of-sequence token, as Qwen-style chat tokenizers and Transformers' own
    InternVL conversions have it, so a caller that stops at `tokenizer.eos_token` (generic evaluation harnesses) stops
    where a turn ends. Call it after `chat_generation_defaults`, whose list keeps the tokenizer's previous EOS.
    Training labels do not change: the chat template writes `<|im_end|>` itself and padding keeps its own token."""
    tokenizer.eos_token = CHAT_END_TOKEN


def image_span(tiles: int, tokens_per_tile: int) -> str:
    """The text an image of `tiles` tiles becomes: `<img>` + `<IMG_CONTEXT>` × (tokens_per_tile × tiles) + `</img>`
    (the one rendering of an image span: the processor's, `chat`'s and fine-tuning's)."""
    return IMAGE_START_TOKEN + IMAGE_CONTEXT_TOKEN * (tokens_per_tile * tiles) + IMAGE_END_TOKEN


def expand_image_placeholders(text: list[str], num_patches: list[int], tokens_per_tile: int) -> list[str]:
    """Replace the i-th `<image>` (counted across the batch) by its `image_span` of `num_patches[i]` tiles."""
    counts = [sample.count(IMAGE_PLACEHOLDER) for sample in text]
    if sum(counts) != len(num_patches):
        raise ValueError(
            f"the text has {sum(counts)} `<image>` placeholders (per sample: {counts}) but {len(num_patches)} "
            f"images were given; put one `<image>` where each image belongs."
        )
    tiles = iter(num_patches)

    def span(_match: re.Match) -> str:
        return image_span(next(tiles), tokens_per_tile)

    return [re.sub(re.escape(IMAGE_PLACEHOLDER), span, sample) for sample in text]


class InternVLXImagesKwargs(ImagesKwargs, total=False):
    """The tiling options of `InternVLXImageProcessor`, beside Transformers' standard image options."""

    image_size: int
    min_patches: int
    max_patches: int
    use_thumbnail: bool
    slicing: str
    video_frames: list[bool]


class InternVLXProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: InternVLXImagesKwargs
    _defaults = {"text_kwargs": {"padding_side": "left"}, "common_kwargs": {"return_tensors": "pt"}}


class InternVLXProcessor(ProcessorMixin):
    r"""
    Tokenizer + [`InternVLXImageProcessor`] + chat template.

    Every image placeholder in the text, `<IMG_CONTEXT>` (Transformers' convention, as in native InternVL) or
    `<image>` (InternVL2's, which the chat template writes), becomes `<img>` + `<IMG_CONTEXT>` × (`image_seq_length` ×
    tiles of that image) + `</img>`, where `image_seq_length` is the number of visual tokens per tile that *enter*
    the language model (`config.tokens_per_tile`: N1² when LVTC is on). A `<video>` becomes one `FrameN: ` line per
    frame taken from its video, each frame an image of one tile. Batches are left-padded and returned as
    tensors unless told otherwise. The expansion is Transformers' own (`replace_image_token`), so
    `return_mm_token_type_ids` and `return_text_replacement_offsets` work as for its VLM processors.

    Args:
        image_processor ([`InternVLXImageProcessor`]): tiling and normalization.
        tokenizer: a tokenizer holding the image and chat tokens of `SPECIAL_TOKENS` (see `prepare_tokenizer`).
        chat_template (`str`, *optional*): defaults to the InternLM2 chat format with InternVL2's system message.
        image_seq_length (`int`, *optional*, defaults to 256): visual tokens per tile.
    """

    valid_processor_kwargs = InternVLXProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 256, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)
        self.image_seq_length = image_seq_length
        missing = [token for token in SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}; run `prepare_tokenizer(tokenizer)` first.")
        self.image_token = IMAGE_CONTEXT_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
        # The tokens of an image span, which `return_mm_token_type_ids` marks: <img>, <IMG_CONTEXT> and </img>.
        self.image_token_ids = [tokenizer.convert_tokens_to_ids(token) for token in IMAGE_SPAN_TOKENS]
        self.chat_end_token_id = tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: images of the whole batch in order of their placeholders (a flat or per-sample list).
            text: a string or a list of strings holding one placeholder (`<image>` or `<IMG_CONTEXT>`) per image and
                one `<video>` per video.
            videos (keyword): videos of the whole batch in order of their `<video>`s: files (paths, URLs, base64)
                or frames (`read_video`). Each becomes one `FrameN: <img>…</img>` line per frame, each frame one
                tile. (A keyword, not a named parameter: Transformers' common processor tests pair a `videos`
                parameter with a video processor, which frames read as tiles do not need.)
            kwargs: image-processor options (`max_patches`, `slicing`, ...), tokenizer options, `return_tensors`
                (`"pt"` unless given), `return_mm_token_type_ids`, `return_text_replacement_offsets`, or the same
                under `images_kwargs` / `text_kwargs`; `return_num_patches` (see below); for videos `num_frames`,
                `fps`, `frame_sampling` (`"uniform"` or `"internvl2"`), `do_sample_frames=False` (every frame) and
                `return_metadata` (adds `video_metadata`: each video's `frames_indices`, frame count and rate).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, with images or videos, `pixel_values` (every
            image's tiles and every video's frames, one row each, in placeholder order) and `num_patches` (tiles per
            image, 1 per frame). A caller that asks for
            `return_text_replacement_offsets` locates each image by its replacement and gets no `num_patches` unless
            it passes `return_num_patches=True`: vLLM's Transformers backend asks for the offsets and cuts every
            other output into images by their tile counts, which a field of one value per image does not fit.
        """
        if text is None:
            raise ValueError("InternVLXProcessor needs `text` (with one `<image>` per image, one `<video>` per video).")
        if kwargs.pop("audio", None) is not None:
            raise ValueError("InternVLXProcessor reads text, images and videos; it got audio.")
        videos = kwargs.pop("videos", None)
        video_options = {**kwargs.pop("videos_kwargs", {})}
        video_options.update({name: kwargs.pop(name) for name in VIDEO_OPTIONS if name in kwargs})
        if kwargs.get("is_split_into_words") or kwargs.get("text_kwargs", {}).get("is_split_into_words"):
            raise ValueError(
                "is_split_into_words=True (pre-tokenized text) is not taken: image placeholders are expanded in text; "
                "pass each sample as one string."
            )
        given = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not given or not all(isinstance(sample, str) for sample in given):
            got = f"{type(text).__name__} {text!r:.80}" if not isinstance(text, (list, tuple)) else f"{text!r:.80}"
            raise ValueError(f"text must be a string or a non-empty list of strings (one per sample), got {got}.")
        text = [sample.replace(IMAGE_PLACEHOLDER, IMAGE_CONTEXT_TOKEN) for sample in given]
        check_images_per_sample(images, text)
        images = [
            read_image(image, index) if isinstance(image, str) else image
            for index, image in enumerate(_flatten(images) if images is not None else [])
        ]
        if images:
            counts = [sample.count(IMAGE_CONTEXT_TOKEN) for sample in text]
            if sum(counts) != len(images):
                raise ValueError(
                    "the number of image placeholder tokens in the prompts should be the same as the number of images, "
                    f"but the text has {sum(counts)} (`<image>` or `<IMG_CONTEXT>`; per sample: {counts}) and "
                    f"{len(images)} images were given; put one placeholder where each image belongs."
                )
        elif any(IMAGE_PLACEHOLDER in sample or IMAGE_CONTEXT_TOKEN in sample for sample in given):
            count = sum(sample.count(IMAGE_PLACEHOLDER) + sample.count(IMAGE_CONTEXT_TOKEN) for sample in given)
            raise ValueError(
                f"the text has {count} image placeholders (`<image>` or `<IMG_CONTEXT>`) but no images were given."
            )
        clips = None
        if videos is not None or any(VIDEO_PLACEHOLDER in sample for sample in text):
            if kwargs.get("return_text_replacement_offsets"):
                raise ValueError("return_text_replacement_offsets is not available for videos.")
            clips = self.read_videos(videos, text, **video_options)
            text, images, frame_flags = self.expand_videos(text, images, clips)
            images_kwargs = {**kwargs.pop("images_kwargs", {}), "video_frames": frame_flags}
            kwargs["images_kwargs"] = images_kwargs
        text_kwargs = kwargs.get("text_kwargs", {})
        padding_set = "padding" in kwargs or "padding" in text_kwargs or "padding" in self.tokenizer.init_kwargs
        if len(text) > 1 and not padding_set:
            kwargs["padding"] = True  # a batch is padded (on the left) unless told otherwise
        bos = self.tokenizer.bos_token
        rendered = bos and all(sample.startswith(bos) for sample in text)
        if rendered and "add_special_tokens" not in kwargs and "add_special_tokens" not in text_kwargs:
            kwargs["add_special_tokens"] = False  # a rendered chat template already starts with BOS: not a second
        return_num_patches = kwargs.pop("return_num_patches", None)
        outputs = super().__call__(images=images or None, text=text, **kwargs)
        if clips is not None and kwargs.get("return_metadata"):
            outputs["video_metadata"] = [clip.metadata() for clip in clips]
        if return_num_patches is None:
            return_num_patches = "text_replacement_offsets" not in outputs
        if not return_num_patches:
            outputs.pop("num_patches", None)
        if "text_replacement_offsets" in outputs:
            outputs["text_replacement_offsets"] = [
                offsets_in_given_text(offsets, sample)
                for offsets, sample in zip(outputs["text_replacement_offsets"], given)
            ]
        return outputs

    def read_videos(
        self,
        videos,
        text: list[str],
        num_frames: int | None = None,
        fps: float | None = None,
        frame_sampling: str = "uniform",
        do_sample_frames: bool | None = None,
    ) -> list[VideoClip]:
        """Each video of the batch read and its frames taken (`read_video`), after checking that the text holds one
        `<video>` per video. `do_sample_frames=False` keeps every frame (of files too). The videos of one call share
        one decoding budget (`MediaPolicy.max_decoded_pixels`)."""
        videos = _flatten_videos(videos) if videos is not None else []
        counts = [sample.count(VIDEO_PLACEHOLDER) for sample in text]
        if sum(counts) != len(videos):
            raise ValueError(
                f"the text has {sum(counts)} `<video>` placeholders (per sample: {counts}) but {len(videos)} videos "
                "were given; put one `<video>` where each video belongs."
            )
        every_frame = do_sample_frames is False
        if every_frame:
            num_frames = fps = None
        policy = MediaPolicy.current()
        budget = DecodeBudget(policy.max_decoded_pixels)
        return [
            read_video(video, index, num_frames, fps, frame_sampling, policy, every_frame, budget)
            for index, video in enumerate(videos)
        ]

    def expand_videos(
        self, text: list[str], images: list, clips: list[VideoClip], image_placeholder: str = IMAGE_CONTEXT_TOKEN
    ) -> tuple[list[str], list, list[bool]]:
        """Write each `<video>` as one `FrameN: <IMG_CONTEXT>` line per frame (InternVL2's video prompt; the lines
        joined by newlines) and put its frames among the images in the order the placeholders appear (the counts of
        both are checked already; `image_placeholder`: how the text marks images, `<IMG_CONTEXT>` or InternVL2's
        `<image>`). Returns the text, the images and frames in that order, and which are frames."""
        pattern = re.compile(f"{re.escape(image_placeholder)}|{re.escape(VIDEO_PLACEHOLDER)}")
        given, clips, ordered, flags, written = iter(images), iter(clips), [], [], []

        def place(match: re.Match) -> str:
            if match.group() == image_placeholder:
                ordered.append(next(given))
                flags.append(False)
                return image_placeholder
            clip = next(clips)
            ordered.extend(PIL.Image.fromarray(frame) for frame in clip.frames)
            flags.extend([True] * len(clip.frames))
            return "\n".join(f"Frame{number + 1}: {image_placeholder}" for number in range(len(clip.frames)))

        for sample in text:
            written.append(pattern.sub(place, sample))
        return written, ordered, flags

    def load_video(
        self, video, num_segments: int = 8, frame_sampling: str = "internvl2", **image_kwargs
    ) -> tuple[torch.Tensor, list[int]]:
        """InternVL2's `load_video`: a video (a path, URL or base64 string, or frames) → `(pixel_values (frames, 3,
        size, size), num_patches_list)`, `num_segments` frames each one tile, taken by InternVL2's rule (see
        `sample_frame_indices`); for `model.chat` with a question that starts `Frame1: <image>\nFrame2: <image>\n...`.
        """
        clip = read_video(video, 0, num_segments, None, frame_sampling)
        frames = [PIL.Image.fromarray(frame) for frame in clip.frames]
        pixel_values = self.image_processor(
            frames, return_tensors="pt", video_frames=[True] * len(frames), **image_kwargs
        )["pixel_values"]
        return pixel_values, [1] * len(frames)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """Transformers' `apply_chat_template`, after `check_conversation` on each conversation of a batch.

        InternVL-X hears nothing: a video's sound is not read, whatever `load_audio_from_video` says (Transformers'
        server sets it for every video sent to a model it loads as multimodal)."""
        kwargs.pop("load_audio_from_video", None)
        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and all(isinstance(item, (list, tuple)) or hasattr(item, "messages") for item in conversation)
        )
        for index, messages in enumerate(conversation if batched else [conversation]):
            check_conversation(
                getattr(messages, "messages", messages), f"conversation {index}" if batched else "the conversation"
            )
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text an image's placeholder becomes: `<img>` + `<IMG_CONTEXT>` × (tokens per tile × tiles) + `</img>`."""
        return image_span(int(image_inputs["num_patches"][image_idx]), self.image_seq_length)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Tokens and tiles each image of `image_sizes` (`(height, width)` pairs) takes, for the slicing options in
        `kwargs` (what serving engines such as vLLM ask before processing): `image_seq_length` per tile, plus `<img>`
        and `</img>` up to Transformers 5.24 (`COUNTS_IMAGE_DELIMITERS`)."""
        data = {}
        if image_sizes is not None:
            images_kwargs = self._merge_kwargs(InternVLXProcessorKwargs, **kwargs)["images_kwargs"]
            tiles = [self.image_processor.get_number_of_image_patches(h, w, images_kwargs) for h, w in image_sizes]
            delimiters = 2 if COUNTS_IMAGE_DELIMITERS else 0
            tokens = [delimiters + self.image_seq_length * n for n in tiles]
            data = {"num_image_tokens": tokens, "num_image_patches": tiles}
        return MultiModalData(**data)

    def load_image(self, image, **image_kwargs) -> torch.Tensor:
        """InternVL's `load_image`: an image, or its path, URL or base64 string → `pixel_values (tiles, 3, size, size)`.

        `image_kwargs` override the image processor's options, e.g. `max_patches=12` or `slicing="edge"`.
        """
        return self.image_processor(image, return_tensors="pt", **image_kwargs)["pixel_values"]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids to text (what the `image-text-to-text` pipeline shows)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


def offsets_in_given_text(offsets: list[dict], given: str) -> list[dict]:
    """Transformers' replacement offsets of one sample, computed on its text with every `<image>` written as
    `<IMG_CONTEXT>`, put back onto the text as given: the i-th entry is the i-th placeholder's span and string."""
    placeholders = re.finditer(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(IMAGE_CONTEXT_TOKEN)}", given)
    return [{**offset, "span": match.span(), "text": match.group()} for offset, match in zip(offsets, placeholders)]


def check_images_per_sample(images, text: list[str]) -> None:
    """Images given per sample (a list of one list per sample) must match each sample's placeholders: flattened, an
    image would otherwise go to another sample's placeholder."""
    per_sample = isinstance(images, (list, tuple)) and len(images) == len(text) > 1
    if not per_sample or not all(isinstance(item, (list, tuple)) for item in images):
        return
    counts = [sample.count(IMAGE_CONTEXT_TOKEN) for sample in text]
    given = [len(_flatten(item)) if item else 0 for item in images]
    if counts != given:
        raise ValueError(
            f"the images are given per sample ({given} images) but the samples hold {counts} image placeholders; "
            "give each sample its own images, in order."
        )


def _flatten(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]


def _flatten_videos(videos) -> list:
    """The videos of a (nested) list in order: a video is a string, a `VideoClip`, a 4-D array or tensor, or a list
    of frames (PIL images or 3-D arrays)."""
    is_frame = lambda item: isinstance(item, PIL.Image.Image) or getattr(item, "ndim", 0) == 3  # noqa: E731
    if isinstance(videos, (list, tuple)) and not (videos and all(is_frame(item) for item in videos)):
        return [video for item in videos for video in _flatten_videos(item)]
    return [videos]


InternVLXProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "InternVLXProcessor",
    "prepare_tokenizer",
    "expand_image_placeholders",
    "chat_generation_defaults",
    "CHAT_TEMPLATE",
    "check_conversation",
    "VIDEO_PLACEHOLDER",
]
