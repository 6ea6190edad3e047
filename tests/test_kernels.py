"""Hub kernels (`use_kernels`, and from Transformers 5.25 on by default unless `USE_HUB_KERNELS=0`).

What `kernelize` would swap in this bundle (Transformers 5.25's mapping, `integrations/hub_kernels.py`): on CUDA the
language model's `RMSNorm` (Liger), its `SiLU` and the projectors' `GELU` activations (inference only) and the
decoder's `apply_rotary_pos_emb`; on the CPU nothing (the mapping lists no CPU kernel). So on this machine a model
loaded with kernels must compute exactly what it computes without them, and where the `kernels` package is missing
(the package index here stops below 0.19.1) a request for them must be refused with Transformers' own reason rather
than fail somewhere inside the bundle. `tests/test_cuda.py` compares kernels on and off on a GPU.
"""

import pytest
import torch
from packaging.version import Version
from transformers import AutoModelForImageTextToText
from transformers.utils import is_kernels_available

from tests.utils.compat import TRANSFORMERS
from tests.utils.decoding import LVTC, assert_same_greedy, greedy
from tests.utils.tiny import image_span, left_pad, prompt, tiles

pytestmark = pytest.mark.compat
TOKENS = 4  # tokens per tile of the tiny geometry (LVTC: 4 → 16)
MODELS = {"lvtc": LVTC, "fastv": dict(text=dict(num_hidden_layers=4), fastv_layer=1, fastv_ratio=0.5)}
KERNELS_BY_DEFAULT = TRANSFORMERS >= Version("5.25.0.dev0")


def batch() -> dict:
    ids, mask = left_pad([prompt(3, image_span(2, TOKENS), 5, seed=1), prompt(2, image_span(1, TOKENS), 9, seed=2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=tiles(3))


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"kernels-{request.param}")
    model = bundle.model(seed=3, **MODELS[request.param])
    model.save_pretrained(folder)
    return model, folder


def load(folder, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


def test_with_kernels_off_the_model_loads_and_decodes_as_built(saved, monkeypatch):
    """`use_kernels=False` (and `USE_HUB_KERNELS=0`, what CI runs 5.25 with): the same greedy tokens and logits as the
    model the folder was saved from, dynamic and static cache."""
    model, folder = saved
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    loaded = load(folder, use_kernels=False)
    assert not getattr(loaded, "use_kernels", False)
    with torch.no_grad():
        for cache in (None, "static"):
            expected = model.generate(**batch(), **greedy(6, cache_implementation=cache))
            assert_same_greedy(loaded.generate(**batch(), **greedy(6, cache_implementation=cache)), expected, atol=1e-6)


def test_asking_for_kernels_works_or_is_refused_with_the_reason(saved, monkeypatch):
    """`use_kernels=True` with hub kernels allowed: where a `kernels` release Transformers accepts is installed, the
    model is kernelized (nothing on the CPU) and decodes as without kernels; where it is not, Transformers refuses at
    load, naming the package and the versions it needs."""
    model, folder = saved
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    if not is_kernels_available():
        with pytest.raises(ValueError, match=r"Kernels are not available.*kernels"):
            load(folder, use_kernels=True)
        return
    loaded = load(folder, use_kernels=True)
    with torch.no_grad():
        for cache in (None, "static"):
            expected = model.generate(**batch(), **greedy(6, cache_implementation=cache))
            assert_same_greedy(loaded.generate(**batch(), **greedy(6, cache_implementation=cache)), expected, atol=1e-6)


@pytest.mark.skipif(not KERNELS_BY_DEFAULT, reason="hub kernels became the default in Transformers 5.25")
def test_from_5_25_a_plain_load_asks_for_kernels_unless_the_environment_turns_them_off(saved, monkeypatch):
    """From 5.25 `from_pretrained` without `use_kernels` means `use_kernels=True`; `USE_HUB_KERNELS=0` turns it off."""
    _, folder = saved
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    if is_kernels_available():
        assert load(folder).use_kernels
    else:
        with pytest.raises(ValueError, match="Kernels are not available"):
            load(folder)
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    assert not load(folder).use_kernels
