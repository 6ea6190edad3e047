"""Processor, chat template, the image-text-to-text pipeline and InternVL2's chat API, end to end."""

import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from devtools.bundle import BUNDLE_FILES
from tests.utils.tiny import SYSTEM

GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def loaded(chat_dir):
    processor = AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(chat_dir, trust_remote_code=True).eval()
    return processor, model


def image(width=120, height=60, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_processor_classes(loaded):
    processor, model = loaded
    assert type(processor).__name__ == "InternVLXProcessor"
    assert type(processor.image_processor).__name__ == "InternVLXImageProcessor"
    assert processor.image_seq_length == model.config.tokens_per_tile


def test_a_saved_folder_ships_every_module_the_bundle_imports_and_answers_on_its_own(chat_dir, tmp_path):
    """`save_pretrained` copies each bundle file the saved classes import relatively (Transformers' loader follows
    relative imports, so `media_internvl_x.py` travels with the processors), and the folder alone, copied where no
    repository is, loads through the Auto classes and answers in a fresh process."""
    imported = {"configuration_internvl_x.py", "modeling_internvl_x.py", "media_internvl_x.py"}
    imported |= {"image_processing_internvl_x.py", "processing_internvl_x.py"}
    assert imported <= set(BUNDLE_FILES)
    hub = shutil.copytree(chat_dir, tmp_path / "hub")
    assert imported <= {path.name for path in hub.iterdir()}
    code = (
        "import sys, numpy, PIL.Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "image = PIL.Image.fromarray(numpy.zeros((40, 90, 3), numpy.uint8))\n"
        "inputs = processor(images=[image], text=['<image>\\nhi'])\n"
        "print(model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] - inputs['input_ids'].shape[1])\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code, str(hub)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "2"


@pytest.mark.compat
def test_placeholders_expand_to_tiles_times_tokens(loaded):
    processor, model = loaded
    out = processor(images=[image(), image(50, 50)], text=["<image>\nfirst <image>\nsecond", "no image here"])
    tiles = out["num_patches"].tolist()
    assert tiles == [3, 1]  # 120×60 at 56-pixel tiles and max 4 → 2×1 grid + thumbnail
    assert len(out["pixel_values"]) == sum(tiles)
    per_row = (out["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert per_row == [sum(tiles) * model.config.tokens_per_tile, 0]
    assert out["attention_mask"][1, 0] == 0 and out["attention_mask"][:, -1].all()  # left padding


def test_placeholder_and_image_counts_must_match(loaded):
    processor, _ = loaded
    with pytest.raises(ValueError, match=r"the text has 2 \(.*per sample: \[2\]\) and 1 images"):
        processor(images=[image()], text="<image> and <IMG_CONTEXT>")
    with pytest.raises(ValueError, match="1 image placeholders .* but no images"):
        processor(text="<image> alone")


def test_text_that_is_not_strings_is_refused_by_name(loaded):
    processor, _ = loaded
    for text in (5, [], [5], ["ok", None], {"text": "hi"}):
        with pytest.raises(ValueError, match="text must be a string or a non-empty list of strings"):
            processor(text=text)
    with pytest.raises(ValueError, match="is_split_into_words=True .* is not taken"):
        processor(text=[["What", "is", "it"]], is_split_into_words=True)


def test_images_given_per_sample_must_match_each_sample_s_placeholders(loaded):
    """`images=[[a, b], [c]]` for samples holding 1 and 2 placeholders: the totals agree, but flattened, b would
    answer the second sample's question; refused. Matching nesting is taken as it is."""
    processor, _ = loaded
    text = ["<image> one", "<image> two <image> three"]
    with pytest.raises(ValueError, match=r"given per sample \(\[2, 1\] images\) .* hold \[1, 2\] image placeholders"):
        processor(images=[[image(), image(seed=1)], [image(seed=2)]], text=text)
    per_sample = processor(images=[[image()], [image(seed=1), image(seed=2)]], text=text)
    flat = processor(images=[image(), image(seed=1), image(seed=2)], text=text)
    assert torch.equal(per_sample["pixel_values"], flat["pixel_values"])


@pytest.mark.compat
def test_chat_template_is_internlm2_chat(loaded):
    processor, _ = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n"
    assert text == expected + "<|im_start|>assistant\n"
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (
        processor.apply_chat_template(custom)
        == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def generate_from_messages(processor, model, messages):
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert (inputs["input_ids"][0] == processor.tokenizer.bos_token_id).sum() == 1  # one BOS, from the template
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        output = model.generate(**inputs, eos_token_id=end, pad_token_id=processor.tokenizer.pad_token_id, **GREEDY)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return inputs, answer.split("<|im_end|>")[0].strip()


@pytest.mark.compat
def test_generate_from_chat_template_with_an_image(loaded):
    processor, model = loaded
    messages = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What?"}]}]
    inputs, answer = generate_from_messages(processor, model, messages)
    assert inputs["pixel_values"].shape == (3, 3, 56, 56)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 3 * model.config.tokens_per_tile
    assert isinstance(answer, str)


@pytest.mark.compat
def test_chat_and_batch_chat_equal_the_processor_and_generate_path(loaded):
    processor, model = loaded
    pixel_values = processor.load_image(image())
    with torch.no_grad():
        answer, history = model.chat(processor, pixel_values, "What?", GREEDY, return_history=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What?"}]}]
    assert answer == generate_from_messages(processor, model, messages)[1]
    assert history == [("<image>\nWhat?", answer)]

    with torch.no_grad():
        second = model.chat(processor.tokenizer, pixel_values, "And then?", GREEDY, history=history)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    assert second == generate_from_messages(processor, model, messages)[1]

    images = [image(seed=1), image(50, 50, seed=2)]
    tiles = [processor.load_image(img) for img in images]
    with torch.no_grad():
        answers = model.batch_chat(
            processor, torch.cat(tiles), ["One?", "Two?"], GREEDY, num_patches_list=[len(t) for t in tiles]
        )
    for img, question, got in zip(images, ["One?", "Two?"], answers):
        one = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}]
        assert got == generate_from_messages(processor, model, one)[1]


def test_chat_refuses_a_processor_built_for_another_token_count(loaded, bundle):
    processor, model = loaded
    other = bundle.load("processing_internvl_x.InternVLXProcessor")(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer, image_seq_length=16
    )
    with pytest.raises(ValueError, match="16 tokens but this model takes 4 per tile"):
        model.chat(other, processor.load_image(image()), "What?", GREEDY)


@pytest.mark.compat
def test_image_text_to_text_pipeline(chat_dir):
    pipe = pipeline("image-text-to-text", model=str(chat_dir), trust_remote_code=True)
    message = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What?"}]}]
    out = pipe(text=message, max_new_tokens=4, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
    batch = pipe(
        text=[
            message,
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image(seed=3)}, {"type": "text", "text": "Two?"}],
                }
            ],
        ],
        max_new_tokens=4,
        return_full_text=False,
    )
    assert len(batch) == 2 and all(isinstance(item[0]["generated_text"], str) for item in batch)
    text_only = pipe(text=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], max_new_tokens=4)
    assert isinstance(text_only[0]["generated_text"], list | str)


def test_the_processor_round_trips_through_save_pretrained(loaded, tmp_path):
    processor, _ = loaded
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    # `auto_map` is what the saved copy adds for the Hub; everything else is the same
    assert {k: v for k, v in again.to_dict().items() if k != "auto_map"} == {
        k: v for k, v in processor.to_dict().items() if k != "auto_map"
    }
    batch = dict(images=[image(), image(50, 50)], text=["<image>\nfirst", "second <image>"])
    for name, value in again(**batch).items():
        assert torch.equal(value, processor(**batch)[name]), name


def test_serving_engines_get_token_counts_types_and_offsets(loaded):
    """What vLLM's Transformers backend reads: `image_token`, the token count per image before processing, which
    tokens belong to images, and where each placeholder went (on the text as given, `<image>` or `<IMG_CONTEXT>`)."""
    processor, model = loaded
    images = [image(120, 60), image(50, 50)]
    text = ["<image>\nA <IMG_CONTEXT> B"]
    out = processor(images=images, text=text, return_mm_token_type_ids=True, return_text_replacement_offsets=True)
    counts = processor._get_num_multimodal_tokens(image_sizes=[(60, 120), (50, 50)])
    assert processor.image_token == "<IMG_CONTEXT>" and processor.image_token_id == model.config.image_token_id
    assert counts["num_image_patches"] == [3, 1] and len(out["pixel_values"]) == 4
    # with the offsets, no per-image field beside the tiles (vLLM cuts every output by tiles), unless asked for
    assert "num_patches" not in out
    asked = processor(images=images, text=text, return_text_replacement_offsets=True, return_num_patches=True)
    assert asked["num_patches"].tolist() == [3, 1] and processor(images=images, text=text)["num_patches"].tolist() == [
        3,
        1,
    ]
    # Transformers' InternVL counts `<img>` and `</img>` up to 5.24, only the context tokens from 5.25
    delimiters = 2 if Version(transformers.__version__).release[:2] < (5, 25) else 0
    tiles = [3, 1]
    assert counts["num_image_tokens"] == [delimiters + n * model.config.tokens_per_tile for n in tiles]
    # the marked tokens are whole spans in every release: the context tokens, `<img>` and `</img>` of each image
    assert int(out["mm_token_type_ids"].sum()) == sum(2 + n * model.config.tokens_per_tile for n in tiles)
    (offsets,) = out["text_replacement_offsets"]
    assert [(o["span"], o["text"]) for o in offsets] == [((0, 7), "<image>"), ((10, 23), "<IMG_CONTEXT>")]
    assert [text[0][slice(*o["span"])] for o in offsets] == ["<image>", "<IMG_CONTEXT>"]
    assert [len(o["replacement"]) > 0 for o in offsets] == [True, True]
    # the slicing options reach the count as they reach the processor
    assert processor._get_num_multimodal_tokens(image_sizes=[(60, 120)], max_patches=1)["num_image_patches"] == [1]


def test_a_16_bit_image_in_a_chat_message_is_read_like_the_object(loaded, tmp_path):
    processor, _ = loaded
    ramp = (np.arange(56 * 56, dtype=np.uint16).reshape(56, 56) * 20).astype(np.uint16)
    PIL.Image.fromarray(ramp).save(tmp_path / "deep.png")
    reference = processor(images=[PIL.Image.open(tmp_path / "deep.png")], text=["<image>?"])["pixel_values"]
    for item in ({"path": str(tmp_path / "deep.png")}, {"url": f"file://{tmp_path / 'deep.png'}"}):
        messages = [{"role": "user", "content": [{"type": "image", **item}, {"type": "text", "text": "?"}]}]
        out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        torch.testing.assert_close(out["pixel_values"], reference, rtol=0, atol=0)
    assert float(reference.std()) > 0.1  # a ramp, not a white square
