"""The code InternVL users already have: the InternVL-X README's quick start, InternVL2's model-card usage and what
evaluation harnesses (lmms-eval's `internvl2` / `internvl3` and `huggingface` adapters) call, run unchanged on the
digits demo and on a converted InternVL2 checkpoint.

InternVL's documented recipe is written out here from its description (a 448-px, here the checkpoint's, dynamic tiling
by aspect ratio with a thumbnail, ImageNet mean and std, `max_num` tiles; video frames one tile each): `load_image`
below is the test's own oracle, independent of the bundle's image processor. Every answer is compared with the
processor path (`AutoProcessor` + `generate`) on the same images.
"""

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as transformers_logging

from conversion import convert_internvl2_to_internvl_x as convert_script
from devtools.checkpoints import internvl2_checkpoint
from tests.conftest import ROOT
from tests.utils.tiny import SYSTEM

pytestmark = pytest.mark.compat
DEMO = ROOT / "examples" / "digits-demo"
EXAMPLES = json.loads((DEMO / "examples.json").read_text())
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GENERATION = dict(max_new_tokens=12, do_sample=False)


# ---- InternVL's preprocessing recipe, written from its description --------------------------------------------------
def closest_grid(width: int, height: int, max_num: int, size: int) -> tuple[int, int]:
    """(columns, rows) with 1 ≤ columns·rows ≤ max_num whose ratio is nearest the image's; among equally near grids,
    fewer tiles first, a larger grid winning only while the image covers more than half of it."""
    grids = sorted(
        {(c, r) for n in range(1, max_num + 1) for c in range(1, n + 1) for r in range(1, n + 1) if c * r <= max_num},
        key=lambda g: g[0] * g[1],
    )
    best, best_gap = (1, 1), float("inf")
    for columns, rows in grids:
        gap = abs(width / height - columns / rows)
        if gap < best_gap or (gap == best_gap and width * height > 0.5 * size * size * columns * rows):
            best, best_gap = (columns, rows), gap
    return best


def to_tensor(image: PIL.Image.Image, size: int) -> torch.Tensor:
    pixels = np.asarray(image.convert("RGB").resize((size, size), PIL.Image.Resampling.BICUBIC), dtype=np.float32)
    tensor = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)
    return (tensor - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_image(image: PIL.Image.Image, input_size: int, max_num: int) -> torch.Tensor:
    """`pixel_values (tiles, 3, input_size, input_size)`: the grid's tiles row by row, then a thumbnail if several."""
    image = image.convert("RGB")
    columns, rows = closest_grid(*image.size, max_num, input_size)
    grid = image.resize((columns * input_size, rows * input_size), PIL.Image.Resampling.BICUBIC)
    tiles = [
        grid.crop((c * input_size, r * input_size, (c + 1) * input_size, (r + 1) * input_size))
        for r in range(rows)
        for c in range(columns)
    ]
    if len(tiles) > 1:
        tiles.append(image)
    return torch.stack([to_tensor(tile, input_size) for tile in tiles])


# ---- the processor path every answer is compared with ----------------------------------------------------------------
def processor_answer(model, processor, images, question, history=(), max_patches=4, system=None, **options):
    """The answer `generate` gives through the checkpoint's processor (tiling by aspect ratio, as the recipe) for the
    same turns: `question` holds one `<image>` per image; `history` is `(question, answer)` pairs; `system` a system
    message in place of the template's default."""
    messages = [{"role": "system", "content": system}] if system else []
    for previous, answer in history:
        messages += [{"role": "user", "content": previous}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": question})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=images or None, slicing="ratio", max_patches=max_patches, **options)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        output = model.generate(**inputs, **GENERATION)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def demo_image(example) -> PIL.Image.Image:
    return PIL.Image.open(DEMO / example["image"]).convert("RGB")


@pytest.fixture(scope="module")
def demo():
    """The InternVL-X README's quick start, on the demo (its tile size is 64)."""
    model = AutoModel.from_pretrained(
        DEMO, torch_dtype=torch.float32, low_cpu_mem_usage=True, use_flash_attention_2=False, trust_remote_code=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True, use_fast=False)
    return model, tokenizer, AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)


def test_auto_model_gives_the_model_that_chats_and_from_config_the_base_model():
    model = AutoModel.from_pretrained(DEMO, trust_remote_code=True, use_flash_attn=True)
    assert all(callable(getattr(model, name, None)) for name in ("chat", "batch_chat", "generate"))
    assert model.lm_head.weight.shape[0] == model.config.text_config.vocab_size
    # vLLM's Transformers backend and other engines build the base model from a config and add their own head.
    config = AutoConfig.from_pretrained(DEMO, trust_remote_code=True)
    base = AutoModel.from_config(config, trust_remote_code=True)
    assert type(base).__name__ == "InternVLXModel" and not hasattr(base, "lm_head")
    # The Transformers way is unchanged, and so is what the pipeline loads.
    assert type(AutoModelForImageTextToText.from_config(config, trust_remote_code=True)).__name__ == (
        "InternVLXForConditionalGeneration"
    )
    # Hidden states only: the chat model's base model gives what the base model gives.
    inputs = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)(
        text="<image>\nhi", images=[demo_image(EXAMPLES[0])]
    )
    base.load_state_dict(model.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)


FLASH_KEYWORDS = [
    dict(use_flash_attn=True),
    dict(use_flash_attention_2=True),
    dict(use_flash_attn=False),
    dict(low_cpu_mem_usage=True, torch_dtype="float32"),
]


@pytest.mark.parametrize("keywords", FLASH_KEYWORDS, ids=lambda k: ",".join(f"{n}={v}" for n, v in k.items()))
def test_internvl_loading_keywords_are_taken(keywords, caplog):
    """Flash attention asked InternVL's way runs on sdpa here (flash-attn is not installed), saying so once."""
    logging.Logger.warning_once.cache_clear()
    transformers_logging.enable_propagation()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    try:
        with caplog.at_level("WARNING"):
            model = AutoModel.from_pretrained(DEMO, trust_remote_code=True, **keywords)
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.disable_propagation()
    assert model.config._attn_implementation == "sdpa"
    asked = [name for name in ("use_flash_attn", "use_flash_attention_2") if keywords.get(name)]
    for name in asked:
        assert f"{name}=True (InternVL's loading keyword): flash-attn is not installed" in caplog.text
        assert "runs sdpa attention" in caplog.text and "attn_implementation='flash_attention_2'" in caplog.text
    if not asked:
        assert "InternVL's loading keyword" not in caplog.text


def test_internvl_2_s_eight_bit_keyword_is_refused_with_its_replacement():
    with pytest.raises(ValueError, match=r"load_in_8bit=True .* quantization_config=BitsAndBytesConfig"):
        AutoModel.from_pretrained(DEMO, trust_remote_code=True, load_in_8bit=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{e['image']}" for e in EXAMPLES])
def test_chat_with_internvl_pixel_values_answers_as_the_processor(demo, example):
    model, tokenizer, processor = demo
    image = demo_image(example)
    pixel_values = load_image(image, input_size=64, max_num=4)
    answer = model.chat(tokenizer, pixel_values, "<image>\n" + example["question"], GENERATION)
    assert answer == processor_answer(model, processor, [image], "<image>\n" + example["question"])
    assert answer == example["answer"]  # the demo answers these correctly
    # The recipe and the processor (by aspect ratio) cut the image into the same number of tiles.
    assert pixel_values.shape[0] == processor.image_processor(image, slicing="ratio")["pixel_values"].shape[0]


def test_several_images_and_video_frames_by_num_patches_list(demo):
    model, tokenizer, processor = demo
    images = [demo_image(e) for e in EXAMPLES[:2]]
    question = "Image-1: <image>\nImage-2: <image>\nWhat digit is this?"
    tiles = [load_image(image, 64, 4) for image in images]
    answer = model.chat(tokenizer, torch.cat(tiles), question, GENERATION, num_patches_list=[len(t) for t in tiles])
    assert answer == processor_answer(model, processor, images, question)
    # Video: each frame one tile, `Frame{i}: <image>` per frame.
    frames = [demo_image(e) for e in EXAMPLES[:4]]
    prefix = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(frames)))
    pixel_values = torch.cat([load_image(frame, 64, 1) for frame in frames])
    answer = model.chat(
        tokenizer, pixel_values, prefix + "What digit is this?", GENERATION, num_patches_list=[1] * len(frames)
    )
    assert answer == processor_answer(model, processor, frames, prefix + "What digit is this?", max_patches=1)
    with pytest.raises(ValueError, match=r"num_patches_list \[1, 1, 1\] adds up to 3 tiles but pixel_values has 4"):
        model.chat(tokenizer, pixel_values, prefix + "What digit?", GENERATION, num_patches_list=[1, 1, 1])


def test_history_batch_chat_and_a_streamer(demo):
    model, tokenizer, processor = demo
    image = demo_image(EXAMPLES[4])
    pixel_values = load_image(image, 64, 4)
    first, history = model.chat(tokenizer, pixel_values, EXAMPLES[4]["question"], GENERATION, return_history=True)
    assert history == [("<image>\n" + EXAMPLES[4]["question"], first)]
    second = model.chat(tokenizer, pixel_values, "What digit is in the top-left?", GENERATION, history=history)
    assert second == processor_answer(model, processor, [image], "What digit is in the top-left?", history=history)

    # batch_chat: one question per image, the same answers as one chat() each.
    images = [demo_image(e) for e in EXAMPLES[:3]]
    tiles = [load_image(i, 64, 4) for i in images]
    questions = [e["question"] for e in EXAMPLES[:3]]
    answers = model.batch_chat(
        tokenizer, torch.cat(tiles), questions, GENERATION, num_patches_list=[len(t) for t in tiles]
    )
    assert answers == [model.chat(tokenizer, t, q, GENERATION) for t, q in zip(tiles, questions)]

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            self.ended = True

    streamer = Collect()
    answer = model.chat(tokenizer, tiles[0], questions[0], dict(GENERATION, streamer=streamer))
    assert streamer.ended and tokenizer.decode(streamer.tokens, skip_special_tokens=True).strip().endswith(answer)


def test_the_system_message_is_the_model_s_as_in_internvl(demo):
    """InternVL's `chat` and `batch_chat` open the prompt with `model.system_message`, which a loaded model holds
    (InternVL2's default) and evaluation harnesses set (VLMEvalKit's reasoning prompts): the prompt ids follow it, and
    the default gives the processor's own rendering."""
    model, tokenizer, processor = demo
    from transformers import AutoModel

    fresh = AutoModel.from_pretrained(DEMO, trust_remote_code=True)
    assert fresh.system_message == SYSTEM  # InternVL2's default, written out
    question, image = ["<image>\nWhat digit is this?"], demo_image(EXAMPLES[0])

    def processed(messages):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return processor(text=text, images=[image])

    expected = processed([{"role": "user", "content": question[0]}])
    tiles = expected["num_patches"].tolist()
    default_ids = model._chat_inputs(tokenizer, question, [None], tiles)["input_ids"]
    assert torch.equal(default_ids, expected["input_ids"])
    model.system_message = "Answer with one digit."
    try:
        custom_ids = model._chat_inputs(tokenizer, question, [None], tiles)["input_ids"]
        custom = [{"role": "system", "content": "Answer with one digit."}, {"role": "user", "content": question[0]}]
        assert not torch.equal(custom_ids, default_ids)
        assert torch.equal(custom_ids, processed(custom)["input_ids"])
        pixel_values = load_image(demo_image(EXAMPLES[0]), 64, 1)
        chat_answer = model.chat(tokenizer, pixel_values, question[0], GENERATION)
        assert model.batch_chat(tokenizer, pixel_values, question, GENERATION) == [chat_answer]
    finally:
        del model.system_message
    assert model.system_message == fresh.system_message


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(question=5), "the question must be a string, got int"),
        (dict(history=[("q", "a", "extra")]), r"history must be a list of \(question, answer\) string pairs"),
        (dict(history="q"), r"history must be a list of \(question, answer\) string pairs"),
        (dict(generation_config="greedy"), "generation_config must be a dict of generate arguments"),
        (dict(num_patches_list=[2, 0]), r"num_patches_list \[2, 0\] gives image 1 0 tiles"),
        (dict(num_patches_list="2"), "num_patches_list must be a list of tile counts"),
        (dict(pixel_values=np.zeros((2, 3, 64, 64), np.float32)), "pixel_values must be a torch.Tensor"),
        (dict(uint8=True), "pixel_values must be floating point"),
    ],
)
def test_chat_arguments_of_the_wrong_kind_are_refused_by_name(demo, change, message):
    model, tokenizer, _ = demo
    arguments = dict(
        tokenizer=tokenizer,
        pixel_values=load_image(demo_image(EXAMPLES[0]), 64, 2)[:2],
        question="<image>\nWhat digit?",
        generation_config=GENERATION,
    )
    if change.pop("uint8", False):
        arguments["pixel_values"] = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        model.chat(**arguments)


def test_chat_takes_generation_configs_as_generate_does(demo):
    """`generation_config=None` (the defaults) and a `GenerationConfig` answer as the dict of the same settings."""
    from transformers import GenerationConfig

    model, tokenizer, _ = demo
    pixel_values = load_image(demo_image(EXAMPLES[0]), 64, 4)
    question = "<image>\n" + EXAMPLES[0]["question"]
    expected = model.chat(tokenizer, pixel_values, question, GENERATION)
    assert model.chat(tokenizer, pixel_values, question, GenerationConfig(**GENERATION)) == expected
    assert isinstance(model.chat(tokenizer, pixel_values, question, None), str)


def test_hand_written_image_prompts_and_image_token_keywords(demo):
    model, tokenizer, processor = demo
    image = demo_image(EXAMPLES[1])
    pixel_values = load_image(image, 64, 4)
    question = "What digit is this?\n<image>"  # the image where the user put it, not moved to the front
    answer = model.chat(tokenizer, pixel_values, question, GENERATION, IMG_CONTEXT_TOKEN="<IMG_CONTEXT>")
    assert answer == processor_answer(model, processor, [image], question)
    with pytest.raises(ValueError, match="this model's image tokens are"):
        model.chat(tokenizer, pixel_values, question, GENERATION, IMG_CONTEXT_TOKEN="<image_ctx>")


def test_a_generic_generate_stops_at_the_tokenizer_s_eos(demo):
    """lmms-eval's `huggingface` adapter: AutoModelForCausalLM, the tokenizer's chat template, `generate` stopping at
    `tokenizer.eos_token_id`. The answer ends where the turn ends (`<|im_end|>`), not at max_new_tokens."""
    _, tokenizer, processor = demo
    model = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True).eval()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id in model.generation_config.eos_token_id
    example = EXAMPLES[1]
    text = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + example["question"]}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=text, images=[demo_image(example)])
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 20
    assert tokenizer.decode(new, skip_special_tokens=True).strip() == example["answer"]


def test_lmms_eval_s_internvl_adapter_calls(demo):
    """lmms-eval's `internvl2` / `internvl3` adapters: bf16, low_cpu_mem_usage, a device map, the slow tokenizer, their
    generation keywords (num_beams, top_p) and `chat` with `load_image` tiles."""
    _, tokenizer, processor = demo
    model = AutoModel.from_pretrained(
        DEMO, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, trust_remote_code=True, device_map="cpu"
    ).eval()
    example = EXAMPLES[0]
    image = demo_image(example)
    pixel_values = load_image(image, 64, 4).to(torch.bfloat16)
    settings = dict(max_new_tokens=12, do_sample=False, num_beams=1, top_p=None)
    answer = model.chat(tokenizer, pixel_values, "<image>\n" + example["question"], settings)
    assert answer == processor_answer(model, processor, [image], "<image>\n" + example["question"])


def test_vlmevalkit_s_internvl_chat_calls(demo):
    """VLMEvalKit's `InternVLChat(version="V2.0")` as its wrapper (`vlmeval/vlm/internvl/`) calls the model: bf16,
    a device map; prompts as its helpers write them (one image: `<image>` first; several: `Image-i: <image>` lines;
    video frames: `Frame-i: <image>` lines, one tile each; multiple choice: options and its instruction), tiles from
    InternVL's `load_image` with `num_patches_list`, its generation keywords (temperature and top_p given with
    greedy decoding), its reasoning prompt set as `model.system_message`, and multi-turn `chat` with history tuples
    and `return_history`. Every answer equals the processor path's on the same tiles and prompt. The harness cuts
    448-px tiles (`load_image`'s default); the demo's are 64 px, which its `input_size` sets (the refusal otherwise
    names both sizes and that keyword)."""
    _, tokenizer, processor = demo
    model = AutoModel.from_pretrained(
        DEMO, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, trust_remote_code=True, device_map="cpu"
    ).eval()
    settings = dict(do_sample=False, max_new_tokens=12, top_p=0.95, temperature=0.6)
    images = [demo_image(e) for e in EXAMPLES[:2]]

    def ask(question, pictures, max_num=4, **chat_options):
        tiles = [load_image(picture, 64, max_num).to(torch.bfloat16) for picture in pictures]
        pixel_values = torch.cat(tiles) if tiles else None
        return model.chat(
            tokenizer,
            pixel_values,
            question,
            dict(settings),
            num_patches_list=[len(t) for t in tiles],
            **chat_options,
        )

    question = (
        EXAMPLES[0]["question"] + "\nA. 3\nB. 7\nAnswer with the option's letter from the given choices directly."
    )
    single = "<image>\n" + question
    assert ask(single, images[:1]) == processor_answer(model, processor, images[:1], single)
    several = "Image-1: <image>\nImage-2: <image>\nWhich digits are shown?"
    assert ask(several, images) == processor_answer(model, processor, images, several)
    frames = [demo_image(e) for e in EXAMPLES[:4]]
    video = "".join(f"Frame-{i + 1}: <image>\n" for i in range(4)) + "What digit comes first?"
    assert ask(video, frames, max_num=1) == processor_answer(model, processor, frames, video, max_patches=1)

    reasoning = "You are an expert reasoner. Think step by step, then answer."
    model.system_message = reasoning  # what the wrapper does with cot_prompt_version='r1'
    try:
        assert ask(single, images[:1]) == processor_answer(model, processor, images[:1], single, system=reasoning)
    finally:
        del model.system_message

    first, history = ask(single, images[:1], return_history=True)
    assert history == [(single, first)]
    follow_up = "And the digit in the top-left?"
    second = ask(follow_up, images[:1], history=history)
    assert second == processor_answer(model, processor, images[:1], follow_up, history=history)

    with pytest.raises(ValueError, match=r"tiles are 64 px .* these are 448 px.*load_image\(\.\.\., input_size=64\)"):
        model.chat(tokenizer, load_image(images[0], 448, 4).to(torch.bfloat16), single, dict(settings))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted InternVL2 (InternLM2) checkpoint, as `conversion/convert_internvl2_to_internvl_x.py` writes it."""
    folder = tmp_path_factory.mktemp("internvl2_usage")
    internvl2_checkpoint(folder / "src", llm="internlm2")
    convert_script.main(["--src", str(folder / "src"), "--dst", str(folder / "dst")])
    return folder / "dst"


def test_the_model_card_usage_on_a_converted_internvl2_checkpoint(converted):
    model = AutoModel.from_pretrained(
        converted, torch_dtype=torch.float32, low_cpu_mem_usage=True, use_flash_attn=True, trust_remote_code=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted, trust_remote_code=True, use_fast=False)
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    assert tokenizer.eos_token == "<|im_end|>"
    assert set(model.generation_config.eos_token_id) == {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("</s>"),
    }
    size = model.config.tile_size
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (2 * size, 3 * size, 3), dtype=np.uint8))
    pixel_values = load_image(image, size, max_num=6)
    answer = model.chat(tokenizer, pixel_values, "Describe the image.", GENERATION)
    assert answer == processor_answer(model, processor, [image], "<image>\nDescribe the image.", max_patches=6)


def test_training_labels_do_not_depend_on_the_tokenizer_s_eos():
    """The demo's tokenizer ends sequences at `<|im_end|>` now; `examples/finetune.py` builds the same tokens and labels
    as with the `</s>` it had (the chat template writes `<|im_end|>` itself)."""
    from examples.finetune import ChatDataset, Row

    messages = [{"role": "user", "content": "<image>\nWhat digit is this?"}, {"role": "assistant", "content": "6"}]
    row = Row(messages=messages, images=[demo_image(EXAMPLES[1])], where="row 1")
    built = {}
    for eos in ("<|im_end|>", "</s>"):
        processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
        processor.tokenizer.eos_token = eos
        sample = ChatDataset([row], processor)[0]
        built[eos] = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert built["<|im_end|>"] == built["</s>"]
    end = AutoTokenizer.from_pretrained(DEMO).convert_tokens_to_ids("<|im_end|>")
    assert [t for t in built["</s>"][1] if t != -100][-1] == end  # the reply is learnt with its <|im_end|>
