"""The committed digits checkpoint ships the current bundle code and answers its shipped examples."""

import json

import pytest

from tests.conftest import ROOT

DEMO = ROOT / "examples" / "digits-demo"
BUNDLE_FILES = (
    "configuration_internvl_x.py",
    "modeling_internvl_x.py",
    "processing_internvl_x.py",
    "image_processing_internvl_x.py",
    "handler.py",
)


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_demo_checkpoint_links_to_the_current_bundle_code(name):
    # a link to the repository file (trust_remote_code copies through it), so the two never drift; a copy would
    assert (DEMO / name).is_symlink() and (DEMO / name).resolve() == (ROOT / name).resolve()


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
