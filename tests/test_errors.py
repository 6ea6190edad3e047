"""Bad input is refused with a ValueError that names what was wrong and the numbers involved."""

import pytest
import torch

from tests.tiny import IMAGE_SIZE, image_span, prompt, tiles


@pytest.fixture(scope="module")
def model(bundle):
    return bundle.model(seed=10)


@pytest.mark.parametrize("num_tokens,message", [(9, "9 image tokens"), (7, "7 image tokens")])
def test_image_token_count_must_match_features(model, num_tokens, message):
    ids = torch.tensor([prompt(2, [120] * num_tokens, 3)])
    with pytest.raises(ValueError, match=rf"{message}.*2 tiles × 4 tokens = 8"):
        model(input_ids=ids, pixel_values=tiles(2))


def test_pixel_values_without_image_token(model):
    with pytest.raises(ValueError, match="3 tiles were given but the text has no image token"):
        model(input_ids=torch.tensor([prompt(6)]), pixel_values=tiles(3))


def test_image_tokens_without_pixel_values(model):
    with pytest.raises(ValueError, match="4 image tokens but no pixel_values"):
        model(input_ids=torch.tensor([prompt(2, image_span(1, 4))]))


@pytest.mark.parametrize(
    "shape", [(3, IMAGE_SIZE, IMAGE_SIZE), (1, 3, IMAGE_SIZE, 28), (1, 1, IMAGE_SIZE, IMAGE_SIZE), (1, 1, 3, 56, 56)]
)
def test_pixel_values_rank_and_size(model, shape):
    with pytest.raises(ValueError, match=rf"pixel_values must have shape \(num_tiles, 3, {IMAGE_SIZE}, {IMAGE_SIZE}\)"):
        model(input_ids=torch.tensor([prompt(2, image_span(1, 4))]), pixel_values=torch.zeros(shape))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(vision=dict(image_size=50)), "image_size 50 is not divisible by patch_size 14"),
        (dict(downsample_ratio=1 / 3), r"4×4 patch grid is not divisible by .* M = 1/downsample_ratio = 3"),
        (dict(downsample_ratio=0.3), "downsample_ratio must be 1/M"),
        (dict(projector_type="mlp"), "projector_type must be one of"),
        (dict(vision_feature_layer=5), "vision_feature_layer 5 is outside"),
    ],
)
def test_invalid_configs_are_refused(bundle, overrides, message):
    with pytest.raises(ValueError, match=message):
        bundle.config(**overrides)


@pytest.mark.parametrize("lvtc", [False, True], ids=["plain", "lvtc"])
def test_empty_input_ids_are_refused(bundle, lvtc):
    settings = dict(text=dict(num_hidden_layers=4), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1)
    model = bundle.model(seed=11, **(settings if lvtc else {}))
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"the input has no tokens \(shape \(1, 0\)\)"):
        model(input_ids=empty)
    with pytest.raises(ValueError, match="the input has no tokens"):
        model.generate(input_ids=empty, max_new_tokens=2)


def test_a_prompt_longer_than_the_positions_is_refused(bundle):
    """With LVTC the expanded tiles count: each of 2 tiles takes 16 positions from layer k on, not 4."""
    model = bundle.model(seed=12, text=dict(num_hidden_layers=4, max_position_embeddings=40), lvtc_enabled=True,
                         lvtc_expand_layer=3, lvtc_inject_start=1)  # fmt: skip
    ids = torch.tensor([prompt(10, image_span(2, 4), 5)])  # 1 + 10 + 10 + 5 = 26 tokens, 26 + 2 · 12 = 50 positions
    with pytest.raises(ValueError, match="needs 50 positions .* max_position_embeddings = 40"):
        model(input_ids=ids, pixel_values=tiles(2))
    shorter = torch.tensor([prompt(1, image_span(2, 4), 1)])  # 13 tokens, 37 positions: fits
    assert model(input_ids=shorter, pixel_values=tiles(2)).logits.shape[1] == 13
