"""The bundle's classes, imported through Transformers' remote-code loader from the repository folder, and `skip`."""

import unittest

from devtools.bundle import Bundle

BUNDLE = Bundle()
InternVLXConfig = BUNDLE.Config
InternVLXModel = BUNDLE.Model
InternVLXForConditionalGeneration = BUNDLE.ForConditionalGeneration
InternVLXImageProcessor = BUNDLE.load("image_processing_internvl_x.InternVLXImageProcessor")
InternVLXProcessor = BUNDLE.load("processing_internvl_x.InternVLXProcessor")


def skip(reason: str, *names: str):
    """Class decorator: skip the mixin tests `names`, with each parameterized expansion of them, for `reason`."""

    def decorate(cls):
        for attribute in dir(cls):
            if any(attribute == name or attribute.startswith(f"{name}_") for name in names):
                setattr(cls, attribute, unittest.skip(reason)(getattr(cls, attribute)))
        return cls

    return decorate
