"""examples/finetune.py's data: both row formats give the same tokens, every row it cannot use is refused naming its
file and line, `repeat_time` works as in InternVL, rows with nothing to learn are counted and left out, and images are
read as inference reads them (EXIF orientation, 16-bit images)."""

import json
import logging

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from transformers import AutoProcessor

from examples import finetune
from tests.conftest import make_chat_bundle


@pytest.fixture(scope="module")
def processor(bundle, tmp_path_factory):
    folder = make_chat_bundle(bundle, tmp_path_factory.mktemp("data_bundle"))
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def write(folder, rows: list, **entry) -> str:
    (folder / "images").mkdir(exist_ok=True)
    PIL.Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(folder / "images" / "a.png")
    PIL.Image.fromarray(np.full((50, 30, 3), 200, np.uint8)).save(folder / "images" / "b.png")
    (folder / "data.jsonl").write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows))
    (folder / "meta.json").write_text(json.dumps({"set": {"annotation": "data.jsonl", "root": "images", **entry}}))
    return str(folder / "meta.json")


INTERNVL = {
    "image": ["a.png", "b.png"],
    "conversations": [
        {"from": "human", "value": "<image>\nFirst, then <image>\nsecond?"},
        {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "quite"},
    ],
}
MESSAGES = {
    "images": ["a.png"],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "First, then "},
                {"type": "image", "path": "b.png"},
                {"type": "text", "text": "second?"},
            ],
        },
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": [{"type": "text", "text": "quite"}]},
    ],
}


def test_internvl_rows_and_messages_rows_give_the_same_sample(processor, tmp_path):
    rows = finetune.read_meta(write(tmp_path, [INTERNVL, MESSAGES]))
    dataset = finetune.ChatDataset(rows, processor)
    first, second = dataset[0], dataset[1]
    for name in ("input_ids", "labels", "pixel_values", "num_patches"):
        assert torch.equal(first[name], second[name]), name
    assert processor.tokenizer.decode(first["labels"][first["labels"] != -100]) == "yes<|im_end|>quite<|im_end|>"


@pytest.mark.parametrize(
    "row,message",
    [
        ("{not json", "data.jsonl:2: not a JSON object"),
        ({"image": "a.png", "text": "no conversation"}, "data.jsonl:2: a row needs `conversations`"),
        (
            {"image": "a.png", "conversations": [{"from": "gpt", "value": "an answer"}]},
            "data.jsonl:2: the row has 1 images but no user turn to put them in",
        ),
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}],
            },
            "data.jsonl:2: the text has 2 `<image>` placeholders but the row has 1",
        ),
        (
            {"image": "missing.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
            "data.jsonl:2: image 'missing.png' not found",
        ),
        ({"conversations": [{"from": "robot", "value": "?"}]}, "data.jsonl:2: unknown role 'robot'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "data.jsonl:2: content item of unknown type 'audio'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
            "data.jsonl:2: 1 image items have no image",
        ),
        (["a list"], "data.jsonl:2: a row must be a JSON object"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
            "data.jsonl:2: a text item needs a string `text`, got None",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
            "data.jsonl:2: a text item needs a string `text`, got 7",
        ),
    ],
)
def test_a_row_the_trainer_cannot_use_is_refused_by_file_and_line(processor, tmp_path, row, message):
    meta = write(tmp_path, [INTERNVL, row])
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("`", "`")):
        finetune.read_meta(meta)


def test_repeat_time_copies_then_samples_the_fraction(processor, tmp_path):
    rows = [
        dict(INTERNVL, conversations=[{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}])
        for i in range(4)
    ]
    assert len(finetune.read_meta(write(tmp_path, rows))) == 4
    assert len(finetune.read_meta(write(tmp_path, rows, repeat_time=2))) == 8
    half = finetune.read_meta(write(tmp_path, rows, repeat_time=0.5))
    assert len(half) == 2 and len({row.messages[0]["content"] for row in half}) == 2
    assert len(finetune.read_meta(write(tmp_path, rows, repeat_time=1.5))) == 6
    with pytest.raises(ValueError, match="repeat_time must be a finite number ≥ 0, got -1.0"):
        finetune.read_meta(write(tmp_path, rows, repeat_time=-1))


def test_rows_with_nothing_to_learn_are_counted_and_left_out(processor, tmp_path, caplog):
    idle = [
        {"conversations": [{"from": "human", "value": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    ]
    with caplog.at_level(logging.WARNING, logger=finetune.logger.name):
        rows = finetune.read_meta(write(tmp_path, [INTERNVL, *idle, MESSAGES]))
    assert [row.where.rsplit(":", 1)[1] for row in rows] == ["1", "4"]
    assert "2 rows have no assistant reply to learn from and are left out" in caplog.text
    assert "data.jsonl:2" in caplog.text and "data.jsonl:3" in caplog.text


def test_every_row_of_an_epoch_is_served_and_a_cut_reply_is_refused(processor, tmp_path):
    rows = finetune.read_meta(
        write(
            tmp_path,
            [
                INTERNVL,
                MESSAGES,
                {"conversations": [{"from": "human", "value": "long " * 50}, {"from": "gpt", "value": "short"}]},
            ],
        )
    )
    dataset = finetune.ChatDataset(rows, processor, max_length=4096)
    assert [len(dataset[i]["input_ids"]) > 0 for i in range(len(dataset))] == [True] * 3
    with pytest.raises(ValueError, match=r"data.jsonl:3 has \d+ tokens; max_length=40 cuts off every reply"):
        finetune.ChatDataset(rows, processor, max_length=40)[2]


def exif_rotated(path, pixels: np.ndarray) -> None:
    """Save `pixels` with an EXIF orientation tag of 6 (the camera was turned: show rotated 90° clockwise)."""
    image = PIL.Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def test_training_reads_images_as_inference_does(processor, tmp_path):
    """An EXIF-rotated photo and a 16-bit PNG: the training sample's tiles equal the processor's for the same path, and
    the photo is read upright."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    exif_rotated(tmp_path / "images" / "photo.jpg", rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))
    PIL.Image.fromarray(np.arange(60 * 50, dtype=np.uint16).reshape(50, 60) * 20).save(tmp_path / "images" / "deep.png")
    rows = [
        {"image": name, "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]}
        for name in ("photo.jpg", "deep.png")
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"s": {"annotation": "data.jsonl", "root": "images"}}))
    dataset = finetune.ChatDataset(finetune.read_meta(str(tmp_path / "meta.json")), processor)
    for index, name in enumerate(("photo.jpg", "deep.png")):
        path = str(tmp_path / "images" / name)
        inference = processor(images=[path], text=["<image>?"])["pixel_values"]
        torch.testing.assert_close(dataset[index]["pixel_values"], inference, rtol=0, atol=0)
    upright = PIL.ImageOps.exif_transpose(PIL.Image.open(tmp_path / "images" / "photo.jpg"))
    assert upright.size == (40, 90)  # turned: 90 wide becomes 90 high
    torch.testing.assert_close(dataset[0]["pixel_values"], processor.image_processor(upright)["pixel_values"])


def test_video_rows_train_on_the_frames_and_prompt_inference_uses(processor, tmp_path):
    """InternVL's `video` rows and `messages` rows with video items give the same sample, whose prompt (frames one
    tile each, `FrameN:` lines) and pixels are what the processor gives at inference for the same video."""
    from tests.utils.video import random_frames, write_video

    write(tmp_path, [])
    write_video(tmp_path / "images" / "clip.mkv", random_frames(20, seed=2))
    internvl = {
        "video": "clip.mkv",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<video>\nand <image>\nWhat changes?"},
            {"from": "gpt", "value": "noise"},
        ],
    }
    messages = {
        "videos": ["clip.mkv"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video"},
                    {"type": "text", "text": "and "},
                    {"type": "image", "path": "a.png"},
                    {"type": "text", "text": "What changes?"},
                ],
            },
            {"role": "assistant", "content": "noise"},
        ],
    }
    dataset = finetune.ChatDataset(finetune.read_meta(write(tmp_path, [internvl, messages])), processor, num_frames=5)
    first, second = dataset[0], dataset[1]
    for name in ("input_ids", "labels", "pixel_values", "num_patches"):
        assert torch.equal(first[name], second[name]), name
    assert first["num_patches"].tolist()[:5] == [1] * 5  # five frames, one tile each, before the image
    turn = [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": str(tmp_path / "images" / "clip.mkv")},
                {"type": "text", "text": "and "},
                {"type": "image", "path": str(tmp_path / "images" / "a.png")},
                {"type": "text", "text": "What changes?"},
            ],
        }
    ]
    inference = processor.apply_chat_template(
        turn, add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=5
    )
    prompt = inference["input_ids"][0]
    assert torch.equal(first["input_ids"][: len(prompt)], prompt)
    assert torch.equal(first["pixel_values"], inference["pixel_values"])
    assert processor.tokenizer.decode(first["labels"][first["labels"] != -100]) == "noise<|im_end|>"


@pytest.mark.parametrize(
    "row,message",
    [
        (
            {"video": "clip.mkv", "conversations": [{"from": "human", "value": "<video> <video>"}]},
            "data.jsonl:2: the text has 2 `<video>` placeholders but the row has 1 videos",
        ),
        ({"video": "gone.mp4", "conversations": [{"from": "human", "value": "?"}]}, "video 'gone.mp4' not found"),
        (
            {
                "video": "clip.mkv",
                "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "<video>"}],
            },
            "an assistant turn holds an video",
        ),
    ],
)
def test_a_video_row_the_trainer_cannot_use_is_refused(processor, tmp_path, row, message):
    from tests.utils.video import random_frames, write_video

    write(tmp_path, [])
    write_video(tmp_path / "images" / "clip.mkv", random_frames(4))
    with pytest.raises(ValueError, match=message):
        finetune.read_meta(write(tmp_path, [INTERNVL, row]))


def test_a_video_shorter_than_num_frames_is_refused_by_line(processor, tmp_path):
    from tests.utils.video import random_frames, write_video

    write(tmp_path, [])
    write_video(tmp_path / "images" / "clip.mkv", random_frames(4))
    row = {"video": "clip.mkv", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]}
    rows = finetune.read_meta(write(tmp_path, [INTERNVL, row]))
    with pytest.raises(ValueError, match=r"data.jsonl:2: video 0 has 4 frames, fewer than --num_frames 8"):
        finetune.check_video_lengths(rows, processor, num_frames=8)  # when the data is read, not at its first step
    finetune.check_video_lengths(rows, processor, num_frames=4)
    assert len(finetune.ChatDataset(rows, processor, num_frames=4)[1]["pixel_values"]) == 4


@pytest.mark.parametrize("name,value", [("max_length", -1), ("max_length", 0), ("num_frames", 0), ("max_length", 2.5)])
def test_lengths_that_are_not_positive_whole_numbers_are_refused(processor, tmp_path, name, value):
    rows = finetune.read_meta(write(tmp_path, [INTERNVL]))
    with pytest.raises(ValueError, match=f"--{name} must be a positive whole number, got {value}"):
        finetune.ChatDataset(rows, processor, **{name: value})
