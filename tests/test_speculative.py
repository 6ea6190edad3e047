"""Speculative decoding (prompt lookup, assistant models) gives the greedy output for plain, PVTC and LVTC models;
LVTC's caches roll back rejected tokens in both phases."""

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache

from tests.utils.compat import TRANSFORMERS, with_cache
from tests.utils.decoding import LVTC, VARIANTS, assert_same_greedy
from tests.utils.decoding import greedy as greedy_settings
from tests.utils.tiny import image_span, left_pad, prompt, tiles

N1SQ = 4
LAYERS = 4
NEW_TOKENS = 12


def greedy(**kwargs) -> dict:
    return greedy_settings(NEW_TOKENS, **kwargs)


def reading_prompt(tiles_count: int = 2) -> dict:
    """A question whose text repeats itself, so prompt lookup finds n-grams to propose."""
    phrase = prompt(6, seed=4)[1:]
    ids = [1] + phrase + image_span(tiles_count, N1SQ) + phrase + phrase[:3]
    return dict(input_ids=torch.tensor([ids]), pixel_values=tiles(tiles_count, seed=5))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_lookup_gives_the_greedy_output(bundle, variant):
    model = bundle.model(seed=1, **VARIANTS[variant])
    inputs = reading_prompt()
    with torch.no_grad():
        reference = model.generate(**inputs, **greedy())
        lookup = model.generate(**inputs, **greedy(prompt_lookup_num_tokens=3))
    assert_same_greedy(lookup, reference)


@pytest.mark.parametrize("assistant", ["same model", "smaller plain model", "smaller LVTC model"])
@pytest.mark.parametrize("variant", ["plain", "lvtc"])
def test_an_assistant_model_gives_the_greedy_output(bundle, variant, assistant):
    """The assistant sees the images too (its prefill comes with `is_first_iteration=False`)."""
    model = bundle.model(seed=2, **VARIANTS[variant])
    small_lvtc = {**LVTC, "text": dict(num_hidden_layers=2), "lvtc_expand_layer": 1, "lvtc_num_lr_projectors": 1}
    helper = {
        "same model": lambda: model,
        "smaller plain model": lambda: bundle.model(seed=3, text=dict(num_hidden_layers=2)),
        "smaller LVTC model": lambda: bundle.model(seed=3, **small_lvtc),
    }[assistant]()
    inputs = reading_prompt(3)
    with torch.no_grad():
        reference = model.generate(**inputs, **greedy())
        assisted = model.generate(**inputs, **greedy(assistant_model=helper))
    assert_same_greedy(assisted, reference)


def test_batches_are_refused_by_name(bundle):
    """Transformers' assisted decoding runs one sequence at a time and says so."""
    model = bundle.model(seed=4, **LVTC)
    ids, mask = left_pad([prompt(3, image_span(1, N1SQ), 2, seed=1), prompt(5, image_span(2, N1SQ), 1, seed=2)])
    with pytest.raises(ValueError, match="only supported for batch_size = 1"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=tiles(3), **greedy(prompt_lookup_num_tokens=3))


def static_cache(bundle, model, length: int):
    return bundle.load("modeling_internvl_x.InternVLXStaticCache")(
        config=model.config.text_config, max_cache_len=length
    )


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("variant", ["plain", "lvtc", "lvtc-3-lr-projectors"])
def test_crop_then_decoding_equals_decoding_without_the_rejected_tokens(bundle, variant, cache_kind):
    """Prefill a left-padded batch (rows of 1 and 3 tiles: the long phase pads them differently), feed 3 speculated
    tokens, crop the last 2, feed another: its logits equal those of feeding the kept token and it alone."""
    model = bundle.model(seed=5, **VARIANTS[variant])
    ids, mask = left_pad([prompt(3, image_span(1, N1SQ), 2, seed=1), prompt(1, image_span(3, N1SQ), 2, seed=2)])
    pixel_values = tiles(4, seed=6)
    speculated, replacement = torch.tensor([[40, 41, 42], [50, 51, 52]]), torch.tensor([[43], [53]])

    def new_cache():
        return (
            DynamicCache(config=model.config.text_config)
            if cache_kind == "dynamic"
            else static_cache(bundle, model, 64)
        )

    def step(cache, tokens, full_mask):
        length = tokens.shape[1]
        return model(
            input_ids=tokens,
            attention_mask=full_mask,
            position_ids=positions(full_mask)[:, -length:],
            **with_cache(cache),
            use_cache=True,
        ).logits

    def extend(full_mask, count):
        return torch.cat([full_mask, full_mask.new_ones(2, count)], dim=1)

    with torch.no_grad():
        cache = new_cache()
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask),
            pixel_values=pixel_values,
            **with_cache(cache),
            use_cache=True,
        )
        step(cache, speculated, extend(mask, 3))
        cache.crop(-2)
        assert int(cache.get_seq_length()) == ids.shape[1] + 1
        growth = 3 * (16 - N1SQ) if model.config.lvtc_enabled else 0  # the longest row's 3 tiles, N1² → N2²
        assert int(cache.get_seq_length(LAYERS - 1)) == ids.shape[1] + growth + 1
        rolled_back = step(cache, replacement, extend(mask, 2))

        reference_cache = new_cache()
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask),
            pixel_values=pixel_values,
            **with_cache(reference_cache),
            use_cache=True,
        )
        step(reference_cache, speculated[:, :1], extend(mask, 1))
        reference = step(reference_cache, replacement, extend(mask, 2))
    torch.testing.assert_close(rolled_back, reference, rtol=0, atol=1e-5)
    for layer, reference_layer in zip(cache.layers, reference_cache.layers):
        assert int(layer.get_seq_length()) == int(reference_layer.get_seq_length())


@pytest.mark.compat
@pytest.mark.parametrize("variant", ["plain", "lvtc"])
def test_speculative_decoding_on_a_static_cache_that_can_crop(bundle, variant):
    """A croppable static cache passed by the user works for assisted decoding and gives the greedy output. Up to
    Transformers 5.23 `cache_implementation="static"` is refused for it by name; from 5.24 Transformers' own static
    layers crop, and that setting gives the greedy output too."""
    model = bundle.model(seed=7, **VARIANTS[variant])
    inputs = reading_prompt()
    length = inputs["input_ids"].shape[1] + NEW_TOKENS + 4
    with torch.no_grad():
        reference = model.generate(**inputs, **greedy())
        lookup = model.generate(
            **inputs, **with_cache(static_cache(bundle, model, length)), **greedy(prompt_lookup_num_tokens=3)
        )
        assert_same_greedy(lookup, reference)
        static_setting = greedy(prompt_lookup_num_tokens=3, cache_implementation="static")
        if TRANSFORMERS < Version("5.24.0.dev0"):
            with pytest.raises(ValueError, match="not supported with Static cache"):
                model.generate(**inputs, **static_setting)
        else:
            assert_same_greedy(model.generate(**inputs, **static_setting), reference)
