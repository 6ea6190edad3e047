"""Bad input is refused with a ValueError that names what was wrong and the numbers involved."""

import re

import pytest
import torch

from tests.utils.tiny import IMAGE_SIZE, image_span, prompt, tiles


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
        (dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy must be 'default'"),
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
    model = bundle.model(
        seed=12,
        text=dict(num_hidden_layers=4, max_position_embeddings=40),
        lvtc_enabled=True,
        lvtc_expand_layer=3,
        lvtc_inject_start=1,
    )
    ids = torch.tensor([prompt(10, image_span(2, 4), 5)])  # 1 + 10 + 10 + 5 = 26 tokens, 26 + 2 · 12 = 50 positions
    with pytest.raises(ValueError, match="needs 50 positions .* max_position_embeddings = 40"):
        model(input_ids=ids, pixel_values=tiles(2))
    shorter = torch.tensor([prompt(1, image_span(2, 4), 1)])  # 13 tokens, 37 positions: fits
    assert model(input_ids=shorter, pixel_values=tiles(2)).logits.shape[1] == 13


def test_pixel_values_must_be_finite_floats(model):
    ids = torch.tensor([prompt(2, image_span(1, 4))])
    with pytest.raises(ValueError, match=r"pixel_values must be floating point .* got torch.uint8"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8))
    broken = tiles(1)
    broken[0, 1, 2, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with pytest.raises(ValueError, match=rf"pixel_values holds 3 NaN or infinite values \(of {broken.numel()}\)"):
        model(input_ids=ids, pixel_values=broken)


@pytest.mark.parametrize("num_patches", [[3, -1], [0, 2], [1, 2]], ids=["negative", "zero", "wrong-sum"])
def test_num_patches_must_be_positive_and_add_up(model, num_patches):
    ids = torch.tensor([prompt(2, image_span(1, 4), image_span(1, 4))])
    message = f"num_patches {num_patches} must be at least 1 per image and add up to the 2 tiles"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(input_ids=ids, pixel_values=tiles(2), num_patches=torch.tensor(num_patches))


def test_num_patches_must_follow_the_images_in_order(model):
    """The sum alone matches (1 + 2 = 2 + 1): the swap would put one image's tiles into another's tokens."""
    ids = torch.tensor([prompt(2, image_span(1, 4), 3, image_span(2, 4))])
    with pytest.raises(ValueError, match=r"image spans take \[1, 2\] tiles, row by row, but num_patches says \[2, 1\]"):
        model(input_ids=ids, pixel_values=tiles(3), num_patches=torch.tensor([2, 1]))
    assert model(input_ids=ids, pixel_values=tiles(3), num_patches=torch.tensor([1, 2])).logits.shape[1] == ids.shape[1]


def test_image_spans_must_hold_whole_tiles(model):
    """8 image tokens for 2 tiles, but split 6 + 2 across two spans."""
    ids = torch.tensor([prompt(2, [120] * 6, 2, [120] * 2)])
    with pytest.raises(ValueError, match=r"image spans hold \[6, 2\] `<IMG_CONTEXT>` tokens, not whole tiles of 4"):
        model(input_ids=ids, pixel_values=tiles(2))


def test_images_written_back_to_back_share_one_span(model):
    """Without separators two images are one run of tokens: num_patches [1, 2] still fits a run of 3 tiles."""
    ids = torch.tensor([prompt(2, [120] * 12, 2)])
    out = model(input_ids=ids, pixel_values=tiles(3), num_patches=torch.tensor([1, 2]))
    assert out.logits.shape[1] == ids.shape[1]


@pytest.mark.parametrize(
    "overrides,schedule",
    [
        (dict(text=dict(num_hidden_layers=4), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1), "LVTC"),
        (dict(text=dict(num_hidden_layers=4), fastv_layer=2, fastv_ratio=0.5), "FastV"),
    ],
)
def test_lvtc_and_fastv_are_refused_under_vllm_attention_when_the_model_is_built(bundle, overrides, schedule):
    """vLLM's Transformers backend builds the model with `_attn_implementation = "vllm"` (tests/test_vllm.py runs the
    engine); a paged KV cache holds the same token count in every layer, which LVTC and FastV change."""
    config = bundle.config(**overrides)
    config.text_config._attn_implementation = "vllm"
    with pytest.raises(ValueError, match=rf"uses {schedule}, whose decoder layers hold different numbers of tokens"):
        bundle.Model(config)
    refuse = bundle.load("modeling_internvl_x.refuse_paged_engines")
    build = bundle.load("modeling_internvl_x.build_token_schedule")
    plain = bundle.config(**{**overrides, "lvtc_enabled": False, "fastv_layer": None})
    plain.text_config._attn_implementation = "vllm"
    assert build(plain) is None and refuse(plain, build(plain)) is None  # PVTC, pixel shuffle: tests/test_vllm.py
    config.text_config._attn_implementation = "sdpa"
    assert refuse(config, build(config)) is None


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda ids, pixels: (ids[0], pixels), r"input_ids must be \(batch, seq\), got shape \(\d+,\); add the batch"),
        (lambda ids, pixels: (ids.tolist(), pixels), "input_ids must be a torch.Tensor, got list"),
        (lambda ids, pixels: (ids.float(), pixels), "input_ids must hold integer token ids, got torch.float32"),
        (lambda ids, pixels: (ids, pixels.tolist()), "pixel_values must be a torch.Tensor, got list"),
        (lambda ids, pixels: (ids, pixels.numpy()), "pixel_values must be a torch.Tensor, got ndarray"),
        (lambda ids, pixels: (ids, pixels[0]), r"pixel_values must have shape \(num_tiles, 3, 56, 56\), got \(3,"),
    ],
    ids=["1-D ids", "ids as a list", "float ids", "tiles as a list", "tiles as an array", "one tile without its axis"],
)
def test_inputs_of_the_wrong_kind_are_refused_by_forward_and_generate(bundle, change, message):
    """Each crashed inside torch or Transformers (AttributeError, IndexError, an embedding's dtype error) before."""
    model = bundle.model(seed=1)
    input_ids, pixel_values = change(torch.tensor([prompt(3, image_span(1, 4), 2)]), tiles(1))
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=2)


def test_image_flags_as_a_list_are_refused_by_name(bundle):
    """`image_flags` must be a tensor, as InternVL's training data gives it; a list crashed in `.flatten()` before."""
    model = bundle.model(seed=1)
    inputs = dict(input_ids=torch.tensor([prompt(3, image_span(1, 4), 2)]), pixel_values=tiles(1))
    with pytest.raises(ValueError, match="image_flags must be a torch.Tensor, got list"):
        model(**inputs, image_flags=[1])
    assert model(**inputs, image_flags=torch.tensor([1])).logits.shape[1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize(
    "overrides,name",
    [
        (dict(text=dict(num_hidden_layers=4), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1), "LVTC"),
        (dict(text=dict(num_hidden_layers=4), fastv_layer=2, fastv_ratio=0.5), "FastV"),
    ],
)
def test_schedules_refuse_inputs_embeds_that_may_hide_image_features(bundle, overrides, name):
    """ms-swift merges image features into `inputs_embeds` itself and calls the model without `input_ids` or
    `pixel_values`; LVTC then ran as the plain model, silently (the last logits moved by up to 6.4 on the demo). With
    `input_ids`, or with `pixel_values` (the image token's embedding marks the tiles), the schedule finds the images;
    the plain model takes `inputs_embeds` alone."""
    model = bundle.model(seed=13, **overrides)
    ids = torch.tensor([prompt(3, image_span(1, 4), 2)])
    embeds = model.get_input_embeddings()(ids)
    features = model.get_image_features(tiles(1)).pooler_output.reshape(-1, embeds.shape[-1])
    merged = embeds.masked_scatter((ids == model.config.image_token_id)[..., None], features)
    with pytest.raises(ValueError, match=rf"{name} \(.*\) must know where the visual tokens are.*inputs_embeds"):
        model(inputs_embeds=merged)
    reference = model(input_ids=ids, pixel_values=tiles(1)).logits
    torch.testing.assert_close(model(inputs_embeds=embeds, pixel_values=tiles(1)).logits, reference)
    plain = bundle.model(seed=13)
    assert plain(inputs_embeds=plain.get_input_embeddings()(ids)).logits.shape[1] == ids.shape[1]


def test_a_tile_of_another_size_names_the_checkpoint_s_size_and_the_remedy(model):
    """InternVL's `load_image` and the harnesses built on it cut 448-px tiles unless told otherwise."""
    with pytest.raises(ValueError, match=rf"tiles are {IMAGE_SIZE} px .* these are 448 px.*input_size={IMAGE_SIZE}"):
        model(input_ids=torch.tensor([prompt(2, image_span(1, 4))]), pixel_values=torch.zeros(1, 3, 448, 448))
