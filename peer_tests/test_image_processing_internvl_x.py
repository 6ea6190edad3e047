"""Transformers' `ImageProcessingTestMixin` against `InternVLXImageProcessor`.

The mixin's shape checks expect one output image per input image, so the tester asks for one tile per image
(`max_patches=1`); the tiling itself (InternVL's matching, RVTC's caps, thumbnails) is tested in
tests/test_image_processor.py and tests/test_image_fuzz.py.
"""

import inspect
import unittest

from bundle import InternVLXImageProcessor
from transformers_tests.test_image_processing_common import ImageProcessingTestMixin, prepare_image_inputs


class InternVLXImageProcessingTester:
    def __init__(self, parent, batch_size=7, num_channels=3, min_resolution=30, max_resolution=400, image_size=56):
        self.parent = parent
        self.batch_size = batch_size
        self.num_channels = num_channels
        self.min_resolution = min_resolution
        self.max_resolution = max_resolution
        self.image_size = image_size
        self.size = {"height": image_size, "width": image_size}

    def prepare_image_processor_dict(self):
        return {"image_size": self.image_size, "max_patches": 1}

    def expected_output_image_shape(self, images):
        return self.num_channels, self.image_size, self.image_size

    def prepare_image_inputs(self, equal_resolution=False, numpify=False, torchify=False, **kwargs):
        options = dict(
            batch_size=self.batch_size,
            num_channels=self.num_channels,
            min_resolution=self.min_resolution,
            max_resolution=self.max_resolution,
        )
        options.update(kwargs)
        return prepare_image_inputs(equal_resolution=equal_resolution, numpify=numpify, torchify=torchify, **options)

    def prepare_processor_inputs(self, **kwargs):
        return {"images": self.prepare_image_inputs(**kwargs)}


# Up to some release the mixin's 4-channel test expects array images to keep a fourth channel without asking for it;
# later ones pass `do_convert_rgb=False`, which this processor honours (it makes every image RGB unless told not to).
KEEPS_CHANNELS_UNASKED = "do_convert_rgb=False" not in inspect.getsource(
    ImageProcessingTestMixin.test_call_numpy_4_channels
)


class InternVLXImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    def setUp(self):
        self.image_processor_tester = InternVLXImageProcessingTester(self)

    @property
    def image_processing_classes(self):
        # One implementation, on torch and torchvision (Transformers' "torchvision" backend for native models).
        return {"torchvision": InternVLXImageProcessor}

    @property
    def image_processor_dict(self):
        return self.image_processor_tester.prepare_image_processor_dict()

    def test_image_processor_properties(self):
        image_processor = InternVLXImageProcessor(**self.image_processor_dict)
        for name in ("image_size", "min_patches", "max_patches", "use_thumbnail", "slicing", "image_mean", "image_std"):
            self.assertTrue(hasattr(image_processor, name), name)

    @unittest.skipIf(
        KEEPS_CHANNELS_UNASKED,
        "This Transformers' test expects a 4-channel array to stay 4 channels without do_convert_rgb=False; InternVL-X "
        "makes every image RGB unless told not to (tests/test_image_processor.py), as the newer mixin asks explicitly.",
    )
    def test_call_numpy_4_channels(self):
        super().test_call_numpy_4_channels()
