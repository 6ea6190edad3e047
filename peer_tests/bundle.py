"""The bundle's classes, imported through Transformers' remote-code loader from the repository folder, and `skip`."""

import unittest
from pathlib import Path

from transformers.dynamic_module_utils import get_class_from_dynamic_module

ROOT = Path(__file__).resolve().parents[1]


def bundle_class(module: str, name: str):
    return get_class_from_dynamic_module(f"{module}.{name}", ROOT)


InternVLXConfig = bundle_class("configuration_internvl_x", "InternVLXConfig")
InternVLXModel = bundle_class("modeling_internvl_x", "InternVLXModel")
InternVLXForConditionalGeneration = bundle_class("modeling_internvl_x", "InternVLXForConditionalGeneration")
InternVLXImageProcessor = bundle_class("image_processing_internvl_x", "InternVLXImageProcessor")
InternVLXProcessor = bundle_class("processing_internvl_x", "InternVLXProcessor")


def skip(reason: str, *names: str):
    """Class decorator: skip the mixin tests `names`, with each parameterized expansion of them, for `reason`."""

    def decorate(cls):
        for attribute in dir(cls):
            if any(attribute == name or attribute.startswith(f"{name}_") for name in names):
                setattr(cls, attribute, unittest.skip(reason)(getattr(cls, attribute)))
        return cls

    return decorate
