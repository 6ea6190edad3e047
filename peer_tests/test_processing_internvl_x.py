"""Transformers' `ProcessorTesterMixin` against `InternVLXProcessor`: a tokenizer trained here (no download) and the
image processor at one tile per image, so that each image gives `image_seq_length` tokens."""

import unittest

from bundle import BUNDLE, InternVLXImageProcessor, InternVLXProcessor, skip
from transformers_tests.test_processing_common import ProcessorTesterMixin

from devtools.tokenizer import build_tokenizer

IMAGE_SEQ_LENGTH = 4  # visual tokens per 56-pixel tile at patch 14 and pixel shuffle 0.5


@skip(
    "Reads its images from the Hub (hf-internal-testing) by URL: nothing here downloads. Chat templates with images "
    "and batches mixing image and text-only samples are tested in tests/test_processor.py.",
    "test_apply_chat_template_image",
    "test_processor_text_has_no_visual",
)
@skip(
    "Saving a remote-code processor adds `auto_map` to it (the Hub needs it in processor_config.json to find the "
    "class) and from_pretrained leaves it out, so the two to_dict()s differ by that key: Transformers' behaviour for "
    "every "
    "remote-code processor. The round trip without that key is tests/test_processor.py::"
    "test_the_processor_round_trips_through_save_pretrained.",
    "test_processor_from_and_save_pretrained",
)
class InternVLXProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = InternVLXProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return build_tokenizer(BUNDLE.load("processing_internvl_x.prepare_tokenizer"))

    @classmethod
    def _setup_image_processor(cls):
        return InternVLXImageProcessor(image_size=56, max_patches=1)

    @staticmethod
    def prepare_processor_dict():
        return {"image_seq_length": IMAGE_SEQ_LENGTH}
