"""The bundle's files and classes: the one list of the files a checkpoint folder carries beside its weights, and the one
loader of their names, the way `trust_remote_code` loads them (copied into Transformers' dynamic-module cache and
imported from there), which the tests, Transformers' common tests, the benchmarks and the converters share."""

from pathlib import Path

from transformers.dynamic_module_utils import get_class_from_dynamic_module

ROOT = Path(__file__).resolve().parents[1]
# The bundle's modules (they import one another relatively, and nothing else of this repository) and the Inference
# Endpoints entry point. Converters copy them into every checkpoint; the demo checkpoints link to them.
BUNDLE_FILES = (
    "configuration_internvl_x.py",
    "modeling_internvl_x.py",
    "media_internvl_x.py",
    "image_processing_internvl_x.py",
    "processing_internvl_x.py",
    "serving_internvl_x.py",
    "handler.py",
)


class Bundle:
    """The bundle files of `folder` (the repository root by default, which is also a Hub folder)."""

    def __init__(self, folder: Path | str = ROOT):
        self.folder = Path(folder)
        self.Config = self.load("configuration_internvl_x.InternVLXConfig")
        self.Model = self.load("modeling_internvl_x.InternVLXModel")
        self.ForConditionalGeneration = self.load("modeling_internvl_x.InternVLXForConditionalGeneration")

    def load(self, name: str):
        """Any top-level name of a bundle file: `bundle.load("processing_internvl_x.prepare_tokenizer")`."""
        return get_class_from_dynamic_module(name, self.folder)
