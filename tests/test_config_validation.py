"""One validation however the config is made: built directly, loaded with keyword arguments (config or model), or
edited after loading and checked when the model is built; the same `ValueError`, naming the field, every way. A
property-based test draws keyword arguments of every kind: each gives a model that runs or that `ValueError`."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForImageTextToText

from tests.utils.tiny import image_span, prompt, tiles

BAD = {
    "expansion past the last layer": (dict(lvtc_enabled=True, lvtc_expand_layer=99), "lvtc_expand_layer 99 must be in"),
    "FastV with LVTC": (
        dict(lvtc_enabled=True, fastv_layer=1, fastv_ratio=0.5),
        "fastv_layer \\(FastV\\) and lvtc_enabled",
    ),
    "PVTC heads that do not divide": (dict(projector_type="pvtc", pvtc_num_heads=3), "pvtc_num_heads 3 must divide"),
    "a boolean given as a string": (dict(lvtc_enabled="false"), "lvtc_enabled must be bool, got 'false' \\(str\\)"),
    "a count given as a string": (dict(pvtc_num_layers="2"), "pvtc_num_layers must be int, got '2' \\(str\\)"),
    "a boolean as a count": (dict(lvtc_inject_interval=True), "lvtc_inject_interval must be int, got True"),
}


@pytest.fixture(scope="module")
def saved(bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("validation")
    bundle.model(text=dict(num_hidden_layers=4)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_same_refusal_however_the_config_is_made(bundle, saved, case):
    overrides, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        bundle.config(text=dict(num_hidden_layers=4), **overrides)
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(saved, trust_remote_code=True, **overrides)
    with pytest.raises(ValueError, match=message):
        AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True, **overrides)
    config = AutoConfig.from_pretrained(saved, trust_remote_code=True)
    for name, value in overrides.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        AutoModelForImageTextToText.from_pretrained(saved, config=config, trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        bundle.ForConditionalGeneration(config)


def test_an_unknown_vision_model_type_is_refused_not_replaced(bundle):
    with pytest.raises(ValueError, match="vision_config model_type 'siglip_vision_model' is not InternViT's"):
        bundle.config(vision=dict(model_type="siglip_vision_model"))
    assert bundle.config(vision=dict(model_type="internvl_vision")).vision_config.model_type == "internvl_vision"


FIELDS = {
    "lvtc_enabled": st.one_of(st.booleans(), st.sampled_from(["false", "true", 0, 1, None])),
    "lvtc_expand_layer": st.one_of(st.integers(-2, 6), st.sampled_from(["2", 2.0, None])),
    "lvtc_inject_start": st.integers(-1, 5),
    "lvtc_num_lr_projectors": st.integers(0, 4),
    "lvtc_upsample_mode": st.sampled_from(["nearest", "bilinear", "bicubic", ""]),
    "lvtc_hr_downsample_ratio": st.sampled_from([1.0, 0.5, 0.25, 0.3, 0.0, -1.0, 2.0]),
    "downsample_ratio": st.sampled_from([0.5, 1.0, 0.25, 0.3, 0.0, 2.0]),
    "projector_type": st.sampled_from(["pixel_shuffle", "pvtc", "mlp"]),
    "pvtc_num_heads": st.integers(-1, 9),
    "pvtc_num_layers": st.integers(-1, 2),
    "pvtc_use_local": st.one_of(st.booleans(), st.just("no")),
    "fastv_layer": st.one_of(st.none(), st.integers(-1, 5)),
    "fastv_ratio": st.sampled_from([0.0, 0.5, 0.99, 1.0, -0.1]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.fixed_dictionaries({}, optional=FIELDS))
def test_any_keyword_arguments_give_a_model_that_runs_or_a_value_error_naming_a_field(bundle, overrides):
    try:
        config = bundle.config(text=dict(num_hidden_layers=4), **overrides)
    except ValueError as error:
        assert any(name in str(error) for name in (*FIELDS, "N2", "PVTC", "LR projectors")), error
        return
    model = bundle.ForConditionalGeneration(config).eval()
    ids = torch.tensor([prompt(2, image_span(1, config.tokens_per_tile), 3)])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=tiles(1)).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


SUB_CONFIGS = {
    "a patch size of zero": (dict(vision=dict(patch_size=0)), "vision `patch_size` must be a positive integer, got 0"),
    "a negative image size": (dict(vision=dict(image_size=-56)), "vision `image_size` must be a positive integer"),
    "a vision width of zero": (dict(vision=dict(hidden_size=0)), "vision_config.hidden_size must be a positive"),
    "a language model without layers": (dict(text=dict(num_hidden_layers=0)), "text_config.num_hidden_layers must be"),
    "an unknown vision activation": (dict(vision=dict(hidden_act="bogus")), "vision_config.hidden_act 'bogus' is not"),
    "an unknown projector activation": (dict(projector_hidden_act="bogus"), "projector_hidden_act 'bogus' is not"),
    "an encoder-decoder language model": (dict(text=dict(model_type="t5")), "'t5', an encoder-decoder"),
}


@pytest.mark.parametrize("case", sorted(SUB_CONFIGS))
def test_sizes_activations_and_the_kind_of_language_model_are_checked(bundle, case):
    """Each was accepted (and crashed deep inside, or built a model that ran wrongly) before."""
    overrides, message = SUB_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        bundle.model(**overrides)


def test_an_encoder_as_the_language_model_is_refused_naming_it(bundle):
    """BERT builds, but runs bidirectionally and lacks what the layer loop reads: refused when the model is built."""
    with pytest.raises(ValueError, match=r"the language model \(bert: BertModel\) is not a decoder .* lacks"):
        bundle.model(text=dict(model_type="bert"))
