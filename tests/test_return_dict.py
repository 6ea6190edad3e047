"""`return_dict=False` (and `config.return_dict = False`) gives plain tuples on every path, as native models do."""

import pytest
import torch
from transformers import Cache

from tests.utils.compat import cache_of
from tests.utils.tiny import IMG_CONTEXT, image_span, left_pad, native_reference, prompt, tiles

LVTC = dict(text=dict(num_hidden_layers=4), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1)
VARIANTS = {"plain": {}, "pvtc": dict(projector_type="pvtc", pvtc_num_heads=4), "lvtc": LVTC}


def inputs(with_labels: bool) -> dict:
    ids, mask = left_pad([prompt(2, image_span(2, 4), 3, seed=1), prompt(4, image_span(1, 4), 2, seed=2)])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=tiles(3))
    if with_labels:
        batch["labels"] = ids.masked_fill((mask == 0) | (ids == IMG_CONTEXT), -100)
    return batch


def assert_same_fields(as_tuple, as_dataclass):
    """The tuple holds the dataclass's non-None fields, in their order (Transformers' `ModelOutput.to_tuple`)."""
    assert type(as_tuple) is tuple
    expected = as_dataclass.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected):
        if isinstance(want, Cache):
            assert isinstance(got, Cache) and int(got.get_seq_length()) == int(want.get_seq_length())
        elif isinstance(want, tuple):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_return_dict_false_gives_the_dataclass_fields_as_a_tuple(bundle, variant, with_labels, use_cache):
    model = bundle.model(seed=1, **VARIANTS[variant])
    batch = inputs(with_labels)
    with torch.no_grad():
        reference = model(**batch, use_cache=use_cache, output_hidden_states=True)
        outputs = model(**batch, use_cache=use_cache, output_hidden_states=True, return_dict=False)
        base_reference = model.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=use_cache)
        base = model.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=use_cache, return_dict=False)
    assert_same_fields(outputs, reference)
    assert_same_fields(base, base_reference)
    assert (reference.loss is not None) == with_labels and (cache_of(reference) is not None) == use_cache


@pytest.mark.compat
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_return_dict_false_gives_tuples_and_generate_still_works(bundle, variant):
    model = bundle.model(seed=2, **VARIANTS[variant])
    batch = inputs(False)
    with torch.no_grad():
        reference = model(**batch)
        model.config.return_dict = False
        outputs = model(**batch)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert_same_fields(outputs, reference)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)


def test_the_tuple_has_the_layout_of_native_internvl(bundle):
    """Tools written for `InternVLForConditionalGeneration` index the tuple: same length, logits first."""
    model = bundle.model(seed=3)
    native = native_reference(model)
    batch = inputs(True)
    with torch.no_grad():
        ours = model(**batch, return_dict=False)
        theirs = native(**{k: v for k, v in batch.items()}, return_dict=False)
    assert len(ours) == len(theirs)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)  # loss
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)  # logits
