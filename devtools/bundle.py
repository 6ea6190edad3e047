"""The bundle's classes, loaded from a folder the way `trust_remote_code` loads them (copied into Transformers'
dynamic-module cache and imported from there): the one loader the tests, Transformers' common tests, the benchmarks
and the converters share."""

from pathlib import Path

from transformers.dynamic_module_utils import get_class_from_dynamic_module

ROOT = Path(__file__).resolve().parents[1]


def bundle_class(name: str, folder: Path | str = ROOT):
    """Any top-level name of a bundle file in `folder`: `bundle_class("processing_internvl_x.prepare_tokenizer")`."""
    return get_class_from_dynamic_module(name, Path(folder))


class Bundle:
    """The bundle files of `folder` (the repository root by default, which is also a Hub folder)."""

    def __init__(self, folder: Path | str = ROOT):
        self.folder = Path(folder)
        self.Config = self.load("configuration_internvl_x.InternVLXConfig")
        self.Model = self.load("modeling_internvl_x.InternVLXModel")
        self.ForConditionalGeneration = self.load("modeling_internvl_x.InternVLXForConditionalGeneration")

    def load(self, name: str):
        """Any top-level name of a bundle file: `bundle.load("processing_internvl_x.prepare_tokenizer")`."""
        return bundle_class(name, self.folder)

    def function(self, module: str, name: str):
        """`load` with the file and the name apart: `bundle.function("processing_internvl_x", "prepare_tokenizer")`."""
        return self.load(f"{module}.{name}")

    def module(self, name: str):
        """Any top-level name of the modeling file: `bundle.module("InternVLXPVTCProjector")`."""
        return self.load(f"modeling_internvl_x.{name}")
