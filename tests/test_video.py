"""Video: frames read and sampled, the processor's `videos=` and chat video parts, the model on frames under every
token schedule, native InternVL's results on the same video, InternVL2's `load_video` + `chat`, and the refusals."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from tests.conftest import make_chat_bundle
from tests.utils.decoding import LVTC, assert_greedy_matches_recomputation, assert_same_greedy
from tests.utils.tiny import native_reference
from tests.utils.video import random_frames, write_video

SCHEDULES = {
    "plain": dict(text=dict(num_hidden_layers=4)),
    "pvtc": dict(text=dict(num_hidden_layers=4), projector_type="pvtc", pvtc_num_heads=4),
    "lvtc": LVTC,
    "fastv": dict(text=dict(num_hidden_layers=4), fastv_layer=2, fastv_ratio=0.5),
}


@pytest.fixture(scope="module")
def loaded(chat_dir):
    processor = AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(chat_dir, trust_remote_code=True).eval()
    return processor, model


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A 30-frame lossless clip at 10 fps (Matroska: no frame count in the container) and its frames."""
    frames = random_frames(30, seed=3)
    return write_video(tmp_path_factory.mktemp("video") / "clip.mkv", frames), frames


def greedy_generation(model, max_new_tokens: int = 4) -> dict:
    image_ids = [model.config.image_token_id, model.config.image_start_token_id, model.config.image_end_token_id]
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=model.generation_config.pad_token_id,
        suppress_tokens=image_ids,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return dict(generation_config=config)


def video_turn(video, question: str = "What happens?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]


@pytest.mark.compat
def test_frame_indices_are_transformers_internvl_s(bundle):
    from transformers import InternVLVideoProcessor
    from transformers.video_utils import VideoMetadata

    sample = bundle.load("media_internvl_x.sample_frame_indices")
    native = InternVLVideoProcessor()
    for total in (1, 7, 12, 30, 97, 301):
        metadata = VideoMetadata(total_num_frames=total, fps=25.0)
        for count in [n for n in (1, 2, 3, 7, 8, 16, 32) if n <= total]:
            assert sample(total, count) == native.sample_frames(metadata, num_frames=count).tolist(), (total, count)
        if total >= 13:  # fps=2 of a 25 fps clip: a frame per 12.5 (native InternVL divides by zero below that)
            assert sample(total, None, 2.0, 25.0) == native.sample_frames(metadata, fps=2.0).tolist(), total
    assert sample(7, None, 2.0, 25.0) == [3]  # at least one frame, as Transformers' default sampler takes


def test_internvl2_rule_takes_the_middle_of_segments_from_first_to_last_frame(bundle):
    sample = bundle.load("media_internvl_x.sample_frame_indices")
    for total, count in [(30, 8), (100, 8), (301, 32), (8, 8), (5, 1)]:
        # InternVL2's `get_index` with no time bound, as its README describes it (whole clip, frames 0..total-1).
        segment = (total - 1) / count
        expected = (segment / 2 + np.round(segment * np.arange(count))).astype(int).tolist()
        assert sample(total, count, sampling="internvl2") == expected
    assert sample(30, 8, sampling="internvl2") != sample(30, 8)  # the two rules differ


@pytest.mark.compat
@pytest.mark.parametrize("given_as", ["frames", "file"])
def test_processor_video_equals_native_internvl_s_and_so_do_the_logits(loaded, tmp_path, clip_file, given_as):
    from transformers.video_utils import VideoMetadata

    from tests.utils.video import native_processor

    processor, model = loaded
    path, frames = clip_file
    question = "<video>\nWhat happens?"
    native_processing = native_processor(processor.tokenizer, tmp_path, processor.image_seq_length)
    expected = native_processing(
        text=question, videos=[frames], num_frames=6, do_sample_frames=True, return_tensors="pt"
    )
    video = frames if given_as == "frames" else str(path)
    got = processor(text=question, videos=video, num_frames=6, return_metadata=True)
    native_indices = native_processing.video_processor.sample_frames(VideoMetadata(30, fps=10.0), num_frames=6)
    assert got["video_metadata"][0]["frames_indices"] == native_indices.tolist()
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    assert got["num_patches"].tolist() == [1] * 6
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-4)
    native = native_reference(model)
    with torch.no_grad():
        ours = model(input_ids=got["input_ids"], pixel_values=got["pixel_values"]).logits
        theirs = native(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"]).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_a_lossless_file_gives_the_frames_it_holds(bundle, clip_file):
    read_video = bundle.load("media_internvl_x.read_video")
    path, frames = clip_file
    clip = read_video(str(path), num_frames=5)
    assert clip.total_frames == 30 and clip.fps == 10.0
    assert np.array_equal(clip.frames, frames[clip.frames_indices])
    assert len(read_video(str(path)).frames) == 8  # a file gives 8 frames unless told otherwise
    assert read_video(str(path), fps=1.0).frames_indices == read_video(str(path), num_frames=3).frames_indices
    assert len(read_video(frames).frames) == 30  # frames already decoded are all kept unless told otherwise
    as_list = read_video([PIL.Image.fromarray(frame) for frame in frames[:4]])
    assert np.array_equal(as_list.frames, frames[:4])
    channels_first = read_video(torch.from_numpy(frames[:4]).permute(0, 3, 1, 2))
    assert np.array_equal(channels_first.frames, frames[:4])


def test_an_mp4_that_records_its_frame_count_reads_too(bundle, tmp_path):
    read_video = bundle.load("media_internvl_x.read_video")
    path = write_video(tmp_path / "clip.mp4", random_frames(12, seed=5), fps=4, lossless=False)
    clip = read_video(str(path), num_frames=3)
    assert (clip.total_frames, clip.fps, clip.frames_indices, clip.frames.shape) == (
        12,
        4.0,
        [2, 6, 10],
        (3, 40, 60, 3),
    )


@pytest.mark.compat
def test_chat_parts_mix_images_and_videos_in_order(loaded, clip_file):
    processor, model = loaded
    path, _ = clip_file
    image = PIL.Image.fromarray(random_frames(1, 30, 120, seed=9)[0])
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": str(path)},
                {"type": "image", "image": image},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<video>\n<IMG_CONTEXT>\nCompare." in text
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=3
    )
    image_tiles = processor.image_processor(image)["pixel_values"]
    assert out["num_patches"].tolist() == [1, 1, 1, len(image_tiles)]  # the frames first, as the video comes first
    alone = processor(text="<video>", videos=str(path), num_frames=3)
    assert torch.equal(out["pixel_values"][:3], alone["pixel_values"])
    assert torch.equal(out["pixel_values"][3:], image_tiles)
    rendered = processor.tokenizer.decode(out["input_ids"][0])
    assert rendered.count("Frame") == 3 and "Frame3: <img>" in rendered and "Frame4" not in rendered
    # Transformers' server asks every multimodal model for a video's sound; InternVL-X reads none
    heard = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=3, load_audio_from_video=True
    )
    assert torch.equal(heard["input_ids"], out["input_ids"]) and "audio" not in str(list(heard))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_schedule_generates_from_video_with_either_cache(bundle, tmp_path, clip_file, schedule):
    """A batch of two videos of 4 frames: the static cache decodes as the dynamic one, which (FastV aside: its
    pruning depends on the last prompt token, so a longer prompt prunes differently by design) equals recomputing the
    whole sequence at each step."""
    folder = make_chat_bundle(bundle, tmp_path, seed=1, **SCHEDULES[schedule])
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    path, frames = clip_file
    conversations = [video_turn(str(path)), video_turn(frames[:5], "And this one, frame by frame?")]
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=4
    )
    assert inputs["num_patches"].tolist() == [1] * 8  # two videos of 4 frames, one tile each
    with torch.no_grad():
        dynamic = model.generate(**inputs, **greedy_generation(model))
        static = model.generate(**inputs, **greedy_generation(model), cache_implementation="static")
    assert_same_greedy(static, dynamic)
    if schedule != "fastv":
        assert_greedy_matches_recomputation(model, dynamic, **inputs)


def test_internvl2_load_video_and_chat_answer_as_the_processor_does(loaded, clip_file):
    processor, model = loaded
    path, _ = clip_file
    pixel_values, num_patches_list = processor.load_video(str(path), num_segments=4)
    assert num_patches_list == [1, 1, 1, 1] and pixel_values.shape[0] == 4
    prefix = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(num_patches_list)))
    generation = dict(max_new_tokens=5, do_sample=False)
    question = prefix + "What happens?"
    answer = model.chat(processor.tokenizer, pixel_values, question, generation, num_patches_list=num_patches_list)
    inputs = processor.apply_chat_template(
        video_turn(str(path)),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        num_frames=4,
        frame_sampling="internvl2",
    )
    assert torch.equal(inputs["pixel_values"], pixel_values)
    with torch.no_grad():
        ids = model.generate(**inputs, **generation)[0, inputs["input_ids"].shape[1] :]
    assert answer == processor.decode(ids, skip_special_tokens=True).strip()


def test_bad_videos_are_refused_by_name(loaded, clip_file, tmp_path):
    processor, _ = loaded
    path, frames = clip_file
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    cases = [
        (dict(videos=str(junk)), r"video 0 of the batch \(the file .*junk.mp4\) could not be read as a video"),
        (dict(videos=np.zeros((0, 8, 8, 3), np.uint8)), "video 0 of the batch has no frames"),
        (dict(videos=[]), r"the text has 1 `<video>` placeholders \(per sample: \[1\]\) but 0 videos"),
        (dict(videos=str(path), num_frames=31), r"video 0 of the batch \(the file .*clip.mkv\) has 30 frames, fewer"),
        (dict(videos=str(path), fps=11.0), r"30 frames, fewer than the fps=11.0 \(33 frames\)"),
        (dict(videos=[frames, frames]), r"the text has 1 `<video>` placeholders .* but 2 videos were given"),
        (dict(videos=np.zeros((4, 8), np.uint8)), r"video 0 of the batch is an array of shape \(4, 8\)"),
        (dict(videos=frames, fps=2.0), "fps=2.0 needs the clip's frame rate"),
        (dict(videos=str(tmp_path / "missing.mp4")), "video 0 of the batch: no such file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            processor(text="<video>\nWhat happens?", **kwargs)
    with pytest.raises(ValueError, match="the text has 0 `<video>` placeholders"):
        processor(text="no placeholder", videos=frames)


def test_a_video_longer_than_the_context_is_refused_with_its_frames(bundle, tmp_path, clip_file):
    folder = make_chat_bundle(bundle, tmp_path, text=dict(max_position_embeddings=96))
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = processor(text="<video>\nWhat happens?", videos=str(clip_file[0]), num_frames=16)
    with pytest.raises(ValueError, match=r"max_position_embeddings = 96; a row holds up to 16 tiles of 4 image tokens"):
        model.generate(**inputs, max_new_tokens=2)


@pytest.mark.parametrize("task", ["image-text-to-text", "any-to-any"])
def test_pipelines_answer_a_video_chat_as_generate_does(chat_dir, loaded, clip_file, task):
    from transformers import pipeline

    processor, model = loaded
    path, _ = clip_file
    pipe = pipeline(task, model=str(chat_dir), trust_remote_code=True)
    messages = video_turn(str(path))
    result = pipe(text=messages, max_new_tokens=5, do_sample=False, return_full_text=False, num_frames=3)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=3
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert result[0]["generated_text"] == processor.decode(ids, skip_special_tokens=True)
