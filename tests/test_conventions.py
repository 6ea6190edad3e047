"""What Transformers' own models do, this bundle does on every variant: the defects Transformers' common tests found,
each with a test named after it (get_image_features' output object, config defaults and hidden-state selection under
the two-phase decoder, a cache from a forward without use_cache, input_data_format, output_attentions under LVTC),
and what the bundle declares it supports."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, child_env
from tests.utils.compat import cache_of, with_cache
from tests.utils.decoding import VARIANTS
from tests.utils.tiny import image_span, prompt, tiles

N1SQ = 4
VARIANTS = {**VARIANTS, "fastv": dict(text=dict(num_hidden_layers=4), fastv_layer=2, fastv_ratio=0.5)}
PHASED = ["lvtc", "fastv"]


def inputs(num_tiles: int = 2, seed: int = 0) -> dict:
    return dict(
        input_ids=torch.tensor([prompt(3, image_span(num_tiles, N1SQ), 4, seed=seed)]),
        pixel_values=tiles(num_tiles, seed=seed),
    )


@pytest.mark.parametrize("variant", ["plain", "pvtc", "lvtc"])
def test_get_image_features_returns_an_output_with_pooler_output(bundle, variant):
    model = bundle.model(seed=1, **VARIANTS[variant])
    pixel_values = tiles(3)
    with torch.no_grad():
        output = model.get_image_features(pixel_values)
        forward = model(**inputs(3), output_hidden_states=False)
        with_states = model.get_image_features(pixel_values, output_hidden_states=True)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    vision = model.config.vision_config
    assert output.last_hidden_state.shape == (3, 1 + model.config.patch_grid_size**2, vision.hidden_size)
    assert output.pooler_output.shape == (3, N1SQ, model.config.text_config.hidden_size)
    # the tokens the forward put in the `<IMG_CONTEXT>` positions
    torch.testing.assert_close(output.pooler_output, forward.image_hidden_states, rtol=0, atol=1e-6)
    assert output.hidden_states is None and len(with_states.hidden_states) == vision.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output.last_hidden_state)
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model.get_image_features(pixel_values), tuple)


@pytest.mark.parametrize("variant", PHASED)
def test_config_output_hidden_states_is_honoured_under_the_phased_decoder(bundle, variant):
    model = bundle.model(seed=2, **VARIANTS[variant])
    with torch.no_grad():
        asked = model(**inputs(), output_hidden_states=True).hidden_states
        model.config.text_config.output_hidden_states = True
        from_config = model(**inputs()).hidden_states
    layers = model.config.text_config.num_hidden_layers
    assert asked is not None and from_config is not None and len(from_config) == len(asked) == layers + 1
    for ours, reference in zip(from_config, asked):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("variant", PHASED)
def test_output_hidden_states_selects_layers_as_transformers_decoders_do(bundle, variant):
    """`output_hidden_states=[0, -1]` gives the entries the plain decoder gives (which are None follows the installed
    Transformers' rule), each equal to the same entry of a full capture."""
    model, plain = bundle.model(seed=3, **VARIANTS[variant]), bundle.model(seed=3, **VARIANTS["plain"])
    with torch.no_grad():
        everything = model(**inputs(), output_hidden_states=True).hidden_states
        chosen = model(**inputs(), output_hidden_states=[0, -1]).hidden_states
        reference = plain(**inputs(), output_hidden_states=[0, -1]).hidden_states
    assert [state is None for state in chosen] == [state is None for state in reference]
    assert len([state for state in chosen if state is not None]) < len(everything)
    kept = [state for state in chosen if state is not None]
    for state in kept:
        assert any(state.shape == full.shape and torch.equal(state, full) for full in everything)


@pytest.mark.parametrize("variant", PHASED)
def test_a_forward_without_use_cache_returns_a_cache_as_the_config_says(bundle, variant):
    """A hand-written decode loop: the prompt's forward (no `use_cache` given; the config says True) returns a cache,
    and the next token run on it continues that prefill: for LVTC it equals running the whole sequence again (FastV's
    pruning was chosen by the prompt's last token, so for it, it equals continuing an explicitly cached prefill)."""
    model = bundle.model(seed=4, **VARIANTS[variant])
    prompt_inputs, next_token = inputs(), torch.tensor([[7]])
    with torch.no_grad():
        out = model(**prompt_inputs)
        assert cache_of(out) is not None
        step = model(input_ids=next_token, **with_cache(cache_of(out))).logits[:, -1]
        if variant == "lvtc":
            whole = torch.cat([prompt_inputs["input_ids"], next_token], dim=1)
            reference = model(input_ids=whole, pixel_values=prompt_inputs["pixel_values"], use_cache=False)
        else:
            explicit = cache_of(model(**prompt_inputs, use_cache=True))
            reference = model(input_ids=next_token, **with_cache(explicit))
        assert cache_of(model(**prompt_inputs, use_cache=False)) is None
    torch.testing.assert_close(step, reference.logits[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", PHASED)
def test_output_attentions_under_the_phased_decoder_gives_each_layer_its_own_length(bundle, variant):
    model = bundle.model(seed=5, attn_implementation="eager", **VARIANTS[variant])
    with torch.no_grad():
        attentions = model(**inputs(), output_attentions=True).attentions
    layers = model.config.text_config.num_hidden_layers
    switch = model.config.lvtc_expand_layer if variant == "lvtc" else model.config.fastv_layer
    length = inputs()["input_ids"].shape[1]
    assert len(attentions) == layers
    assert all(a.shape[-2:] == (length, length) for a in attentions[:switch])
    assert all(a.shape[-1] != length for a in attentions[switch:])  # LVTC: longer; FastV: shorter
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones_like(attentions[0].sum(-1)), rtol=0, atol=1e-5)


def test_the_image_processor_takes_input_data_format(bundle):
    processor = bundle.load("image_processing_internvl_x.InternVLXImageProcessor")(image_size=28)
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    reference = processor(hwc)["pixel_values"]
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    torch.testing.assert_close(processor(chw, input_data_format="channels_first")["pixel_values"], reference)
    torch.testing.assert_close(processor(hwc, input_data_format="channels_last")["pixel_values"], reference)
    # A 3×…×3 array could be either: Transformers' rule reads channels first, and says so.
    ambiguous = rng.integers(0, 256, (3, 50, 3), dtype=np.uint8)
    with warnings.catch_warnings(record=True):
        assert (
            processor(ambiguous)["pixel_values"].shape
            == processor(ambiguous, input_data_format="channels_first")["pixel_values"].shape
        )


def test_loading_the_model_imports_neither_processor_file():
    """As for native models, the modeling file imports only the configuration: a model loaded for training or serving
    does not import the processor, the image processor or the image libraries they read with (`chat` imports the
    processor's chat format when it is first called)."""
    code = (
        "import json, sys\n"
        "from transformers.dynamic_module_utils import get_class_from_dynamic_module\n"
        "get_class_from_dynamic_module('modeling_internvl_x.InternVLXForConditionalGeneration', sys.argv[1])\n"
        "print(json.dumps([name for name in sys.modules if name.endswith('internvl_x')]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=child_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = {name.rsplit(".", 1)[-1] for name in json.loads(result.stdout.strip().splitlines()[-1])}
    assert loaded == {"configuration_internvl_x", "modeling_internvl_x"}, loaded


def test_device_map_auto_keeps_each_no_split_module_whole(bundle):
    """`infer_auto_device_map` (what `device_map="auto"` runs) with too little room for the model on one device:
    every vision and decoder layer lands whole on one device."""
    from accelerate import infer_auto_device_map

    model = bundle.model(**VARIANTS["lvtc"])
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(
        model,
        max_memory={"cpu": size // 2, "disk": 10 * size},
        no_split_module_classes=model._no_split_modules,
    )
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    for name in [n for n, module in model.named_modules() if type(module).__name__ in model._no_split_modules]:
        placements = {device for key, device in device_map.items() if key == name or key.startswith(name + ".")}
        covering = {device for key, device in device_map.items() if name.startswith(key + ".")}
        assert len(placements | covering) == 1, (name, placements, covering)
