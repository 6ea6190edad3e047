"""Property-based check of the chat template as users call it: any conversation of system, user, assistant and tool
messages, string or list content, text and image parts (also OpenAI's `image_url`), with text that looks like
template syntax or special tokens. A valid conversation renders exactly as the InternLM2 chat format says (written
out independently below) and its images become one tile group each; anything else is refused with a `ValueError`
naming the message and part, never dropped, never another exception. Each hand-picked edge case is named."""

import base64
import io

import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from transformers import AutoProcessor

from tests.utils.tiny import SYSTEM

IMAGE_TOKENS = ("<image>", "<IMG_CONTEXT>")


FRAMES = np.random.default_rng(7).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)  # a video of two frames


def png(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8))


def data_uri(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def expected_rendering(messages: list[dict], add_generation_prompt: bool) -> str:
    """The InternLM2 chat format, written out from its description: `<s>`, the system turn (InternVL2's system
    message unless the first message is a system message), one `<|im_start|>role\\n…<|im_end|>\\n` turn per message,
    each image part a line of the image token, `<IMG_CONTEXT>`."""

    def content(value) -> str:
        if value is None or isinstance(value, str):
            return value or ""
        written = {"image": "<IMG_CONTEXT>\n", "image_url": "<IMG_CONTEXT>\n", "video": "<video>\n"}
        return "".join(written.get(part["type"]) or part["text"] for part in value)

    if messages and messages[0]["role"] == "system":
        system, messages = content(messages[0].get("content")), messages[1:]
    else:
        system = SYSTEM
    turns = [("system", system)] + [(message["role"], content(message.get("content"))) for message in messages]
    text = "<s>" + "".join(f"<|im_start|>{role}\n{body}<|im_end|>\n" for role, body in turns)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def problem(messages) -> str | None:
    """What a conversation's refusal must name, or None when the conversation is valid."""
    if not messages:
        return "has no messages"
    for index, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            return f"message {index} of the conversation needs a string `role`"
        value = message.get("content")
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list):
            return f"message {index} of the conversation has content of type {type(value).__name__}"
        for number, part in enumerate(value):
            kind = part.get("type")
            if kind == "text" and not isinstance(part.get("text"), str):
                return f"part {number} of message {index} of the conversation is a text part without a string"
            if kind not in ("text", "image", "image_url", "video", "video_url"):
                return f"part {number} of message {index} of the conversation has type {kind!r}"
    return None


texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "{{ messages }}", "{% endfor %}", "<|im_end|>", "<s>", "\n\n", "<img></img>", "答案是 6"]),
    st.sampled_from(IMAGE_TOKENS).map(lambda token: f"look at {token} here"),
)
good_parts = st.one_of(
    texts.map(lambda text: {"type": "text", "text": text}),
    st.integers(0, 3).map(lambda seed: {"type": "image", "image": png(seed)}),
    st.integers(0, 3).map(lambda seed: {"type": "image_url", "image_url": {"url": data_uri(png(seed))}}),
    st.just({"type": "video", "video": FRAMES}),
)
bad_parts = st.sampled_from(
    [
        {"type": "audio", "path": "a.wav"},
        {"text": "no type"},
        {"type": "text"},
        {"type": "text", "text": 5},
        {"type": "IMAGE"},
    ]
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), st.sampled_from([None, 3]))


@st.composite
def conversations(draw) -> list[dict]:
    messages = []
    for _ in range(draw(st.integers(0, 4))):
        parts = st.one_of(good_parts, bad_parts) if draw(st.integers(0, 9)) == 0 else good_parts
        content = draw(st.one_of(texts, st.none(), st.lists(parts, max_size=4), st.sampled_from([7, {"a": 1}])))
        message = {"content": content}
        role = draw(st.one_of(roles, st.sampled_from(["user", "assistant"])))
        if role is not None or draw(st.booleans()):
            message["role"] = role
        messages.append(message)
    return messages


@pytest.fixture(scope="module")
def processor(chat_dir):
    return AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)


def check(processor, messages: list[dict], add_generation_prompt: bool) -> None:
    """The property: rendered as the format says and tokenized with one tile group per image, or refused by name."""
    expected_problem = problem(messages)
    if expected_problem is not None:
        with pytest.raises(ValueError, match=expected_problem.replace("(", r"\(").replace("[", r"\[")):
            processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected_rendering(messages, add_generation_prompt)
    images = sum(
        part["type"] in ("image", "image_url")
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
    )
    written = sum(text.count(token) for token in IMAGE_TOKENS)
    if written != images:  # a placeholder typed in a text part
        with pytest.raises(ValueError, match=rf"the text has {written}\b"):
            processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    tiles = [int(n) for n in inputs.get("num_patches", [])]
    frames = sum(
        len(part["video"])
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part["type"] == "video"
    )
    assert len(tiles) == images + frames and tiles.count(1) >= frames  # a video frame is one tile
    image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == sum(tiles) * processor.image_seq_length


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations(), add_generation_prompt=st.booleans())
def test_any_conversation_renders_as_the_format_says_or_is_refused_by_name(processor, messages, add_generation_prompt):
    check(processor, messages, add_generation_prompt)


NAMED = {
    "no messages": [],
    "system message only": [{"role": "system", "content": "Be brief."}],
    "system message as parts": [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}
    ],
    "image in the system message": [
        {"role": "system", "content": [{"type": "image", "image": png(0)}]},
        {"role": "user", "content": "Which digit?"},
    ],
    "tool message": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "5"},
    ],
    "OpenAI image_url part": [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(png(1))}},
                {"type": "text", "text": "Which digit?"},
            ],
        }
    ],
    "two images in one message": [
        {"role": "user", "content": [{"type": "image", "image": png(2)}, {"type": "image", "image": png(3)}]}
    ],
    "template syntax in the text": [{"role": "user", "content": "{{ bos_token }} {% raw %}"}],
    "a placeholder typed in the text": [
        {"role": "user", "content": [{"type": "image", "image": png(0)}, {"type": "text", "text": "and <image>"}]}
    ],
    "video part": [{"role": "user", "content": [{"type": "video", "video": FRAMES}, {"type": "text", "text": "?"}]}],
    "audio part": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}],
    "part without a type": [{"role": "user", "content": [{"text": "hi"}]}],
    "text part without text": [{"role": "user", "content": [{"type": "text"}]}],
    "message without a role": [{"content": "hi"}],
    "number as content": [{"role": "user", "content": 7}],
    "dict as content": [{"role": "user", "content": {"type": "text", "text": "hi"}}],
}


@pytest.mark.parametrize("messages", NAMED.values(), ids=NAMED.keys())
def test_named_edge_cases(processor, messages):
    check(processor, messages, add_generation_prompt=True)


def test_the_template_itself_refuses_parts_it_cannot_render(processor):
    """Called through the tokenizer (no processor check in between), the template raises instead of dropping."""
    messages = [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(TemplateError, match="text, image and video parts only, got a part of type audio"):
        processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False)


def test_a_batch_of_conversations_names_the_conversation(processor):
    batch = [[{"role": "user", "content": "fine"}], [{"role": "user", "content": [{"type": "audio"}]}]]
    with pytest.raises(ValueError, match="part 0 of message 0 of conversation 1 has type 'audio'"):
        processor.apply_chat_template(batch)
    assert len(processor.apply_chat_template([batch[0], batch[0]])) == 2
