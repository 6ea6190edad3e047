"""The pixel-shuffle model is InternVL2: same logits as transformers.InternVLForConditionalGeneration."""

import pytest
import torch

from tests.utils.tiny import IMG_CONTEXT, image_span, left_pad, native_reference, prompt, tiles

TOKENS = 4  # tokens per tile of the tiny geometry


@pytest.fixture(scope="module")
def pair(bundle):
    ours = bundle.model(seed=1)
    return ours, native_reference(ours)


def assert_same_logits(ours, native, **inputs):
    with torch.no_grad():
        a = ours(**inputs).logits
        b = native(**inputs).logits
    assert a.shape == b.shape == (*inputs["input_ids"].shape, ours.config.text_config.vocab_size)
    assert (a - b).abs().max().item() <= 1e-5


def test_native_state_dict_loads_without_missing_or_unexpected_keys(bundle, pair):
    ours, native = pair
    fresh = bundle.model(seed=7)
    result = fresh.load_state_dict(native.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(fresh.state_dict()) == set(native.state_dict())


@pytest.mark.parametrize("num_tiles", [1, 5])
def test_one_image_gives_native_internvl_s_logits(pair, num_tiles):
    ids = torch.tensor([prompt(3, image_span(num_tiles, TOKENS), 6)])
    assert_same_logits(*pair, input_ids=ids, pixel_values=tiles(num_tiles))


@pytest.mark.compat
def test_two_images_in_one_prompt(pair):
    ids = torch.tensor([prompt(2, image_span(1, TOKENS), 3, image_span(3, TOKENS), 4)])
    assert_same_logits(*pair, input_ids=ids, pixel_values=tiles(4, seed=3))


@pytest.mark.compat
def test_left_padded_batch_mixing_image_and_text_only(pair):
    ids, mask = left_pad([prompt(3, image_span(2, TOKENS), 5, seed=1), prompt(6, seed=2)])
    assert (ids == IMG_CONTEXT).sum() == 2 * TOKENS
    assert_same_logits(*pair, input_ids=ids, attention_mask=mask, pixel_values=tiles(2, seed=4))


def test_a_text_without_images_gives_native_internvl_s_logits(pair):
    assert_same_logits(*pair, input_ids=torch.tensor([prompt(9)]))


def test_eager_and_sdpa_agree(bundle):
    ids = torch.tensor([prompt(3, image_span(2, TOKENS), 6)])
    with torch.no_grad():
        logits = [
            bundle.model(seed=2, attn_implementation=impl)(input_ids=ids, pixel_values=tiles(2)).logits
            for impl in ("eager", "sdpa")
        ]
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-5
