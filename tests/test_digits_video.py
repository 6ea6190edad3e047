"""The digits video task and its trainer: clips hold their digits in order, generated rows train through
`examples/finetune.py`'s dataset, and `examples/train_digits_video.py` trains and evaluates every variant."""

import random

import numpy as np
import pytest
import torch

from examples.digits_task import DigitPool, make_clip


@pytest.fixture(scope="module")
def pool():
    return DigitPool("train")


@pytest.mark.parametrize("frames", [4, 8, 16])
def test_a_clip_shows_its_digits_one_after_another(pool, frames):
    for seed in range(20):
        clip = make_clip(pool, random.Random(seed), frames)
        labels = [int(d) for d in clip["answer"].split()]
        assert clip["video"].shape == (frames, 64, 64, 3) and clip["video"].dtype == np.uint8
        assert 2 <= len(labels) <= min(4, frames // 2)
        assert all(a != b for a, b in zip(labels, labels[1:]))  # a change of digit is always visible
        assert all(frame.any() for frame in clip["video"])  # every frame shows a digit
        # runs of equal length: each digit holds the screen for frames / count frames (rounded)
        bounds = [round(i * frames / len(labels)) for i in range(len(labels) + 1)]
        assert all(b - a >= 1 for a, b in zip(bounds, bounds[1:]))


def test_generated_rows_go_through_the_fine_tuning_dataset(pool):
    """The image demo's and the video demo's generated rows are `Row`s the dataset reads (the image demo's trainer
    once handed it `(record, root)` pairs it could not read)."""
    from transformers import AutoProcessor

    from examples.finetune import ChatDataset
    from examples.train_digits_demo import GeneratedRecords
    from examples.train_digits_video import DEMO, MixedRecords

    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    images = ChatDataset(GeneratedRecords(pool, 4, 0), processor)[0]
    assert images["pixel_values"].shape[0] == int(images["num_patches"].sum())
    mixed = ChatDataset(MixedRecords(pool, 12, 0, video_share=1.0), processor, num_frames=None)
    sample = mixed[0]
    frames = int((sample["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<img>")).sum())
    assert frames in (8, 16) and sample["num_patches"].tolist() == [1] * frames
    assert "Frame1:" in processor.tokenizer.decode(sample["input_ids"])


@pytest.mark.parametrize("variant", ["pvtc", "pixel_shuffle"])
def test_the_video_trainer_trains_and_evaluates_a_variant(variant, tmp_path):
    from examples.train_digits_video import train

    torch.manual_seed(0)
    metrics = train(variant, steps=2, batch_size=2, eval_samples=2, output=tmp_path, example_clips=False, align_steps=1)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "metrics.json").is_file()
    assert metrics["variant"] == variant and metrics["visual_tokens_per_frame"] == 16
    assert (metrics["aligned_parameters"] > 0) == (variant == "pixel_shuffle")  # the demo has PVTC's projector only
    assert metrics["visual_tokens_per_frame_last_layer"] == 16  # LVTC switched off in both
    for key in ("video_accuracy_8_frames", "video_accuracy_16_frames", "image_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert np.isfinite(metrics["final_loss"])


def test_alignment_trains_only_the_modules_the_demo_has_no_weights_for(tmp_path):
    """`--align-steps`: the pixel-shuffle projector (absent from the demo) trains alone first; every other parameter
    is left exactly as loaded, and all of them train again afterwards."""
    from examples.train_digits_video import align_new_modules, load

    assert load("lvtc")[2] == set()
    model, processor, new = load("pixel_shuffle")
    assert new and all(name.startswith("model.multi_modal_projector.") for name in new)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    options = dict(batch_size=2, lr=1e-3, seed=0, work=tmp_path)
    assert sorted(align_new_modules(model, processor, new, 2, options)) == sorted(new)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) == (name not in new), name
        assert parameter.requires_grad, name
