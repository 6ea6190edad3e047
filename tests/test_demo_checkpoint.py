"""The committed digits checkpoints (images, and videos) ship the current bundle code and answer their shipped
examples."""

import json

import pytest

from devtools.bundle import BUNDLE_FILES, ROOT

DEMO = ROOT / "examples" / "digits-demo"
VIDEO_DEMO = ROOT / "examples" / "digits-video-demo"


@pytest.mark.parametrize("folder", [DEMO, VIDEO_DEMO], ids=lambda folder: folder.name)
@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_demo_checkpoint_links_to_the_current_bundle_code(folder, name):
    # a link to the repository file (trust_remote_code copies through it), so the two never drift; a copy would
    assert (folder / name).is_symlink() and (folder / name).resolve() == (ROOT / name).resolve()


def test_demo_checkpoint_answers_its_examples():
    import PIL.Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from examples.demo import answer

    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True).eval()
    examples = json.loads((DEMO / "examples.json").read_text())
    assert examples
    for example in examples:
        assert (
            answer(model, processor, PIL.Image.open(DEMO / example["image"]), example["question"]) == example["answer"]
        )


def test_video_demo_checkpoint_answers_its_example_clips():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from examples.train_digits_video import answer_clip

    processor = AutoProcessor.from_pretrained(VIDEO_DEMO, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(VIDEO_DEMO, trust_remote_code=True).eval()
    examples = json.loads((VIDEO_DEMO / "examples.json").read_text())
    assert examples
    for example in examples:
        video = str(VIDEO_DEMO / example["video"])
        assert answer_clip(model, processor, video, example["question"], example["num_frames"]) == example["answer"]
