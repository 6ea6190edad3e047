"""Shared fixtures: the bundle loaded the way users load it (trust_remote_code from a folder), and tiny configs."""

import os
from pathlib import Path

from devtools.test_session import isolate_test_session

isolate_test_session()  # offline, quiet, a throw-away module cache: before Transformers is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from devtools.bundle import ROOT, Bundle  # noqa: E402
from tests.utils.tiny import tiny_config_kwargs  # noqa: E402

# Property-based tests draw the same examples on every machine (a red run reproduces anywhere); set
# HYPOTHESIS_PROFILE=explore to search new ones.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def child_env(**variables: str) -> dict[str, str]:
    """This process's environment for a child Python that imports the project (`examples`, `tests`): the checkout
    appended to PYTHONPATH, keeping what is already there (`make test-min` puts Transformers 5.17 in front)."""
    python_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    return dict(os.environ, PYTHONPATH=python_path, **variables)


class TinyBundle(Bundle):
    """The repository's bundle, with tiny configs and models built from it."""

    def config(self, **overrides):
        return self.Config(**tiny_config_kwargs(**overrides))

    def model(self, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return self.ForConditionalGeneration(self.config(**overrides)).eval()


@pytest.fixture(scope="session")
def bundle() -> TinyBundle:
    return TinyBundle(ROOT)


def make_chat_bundle(bundle: Bundle, folder: Path, seed: int = 0, max_patches: int = 4, **overrides) -> Path:
    """A tiny model saved with its trained tokenizer, image processor and processor, as a Hub folder holds them."""
    from devtools.tokenizer import build_tokenizer

    prepare_tokenizer = bundle.load("processing_internvl_x.prepare_tokenizer")
    tokenizer = build_tokenizer(prepare_tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text.update(overrides.pop("text", {}))
    config = bundle.config(text=text, **overrides)
    prepare_tokenizer(tokenizer, config)
    torch.manual_seed(seed)
    model = bundle.ForConditionalGeneration(config)
    image_processor = bundle.load("image_processing_internvl_x.InternVLXImageProcessor")(
        image_size=config.tile_size, max_patches=max_patches
    )
    processor = bundle.load("processing_internvl_x.InternVLXProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.tokens_per_tile
    )
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_dir(bundle, tmp_path_factory) -> Path:
    return make_chat_bundle(bundle, tmp_path_factory.mktemp("chat_bundle"))


def pytest_report_header(config):
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__} ({transformers.__file__})"
