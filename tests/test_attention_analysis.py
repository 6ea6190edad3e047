"""The digits scripts of the FastV issue: `examples/attention_analysis.py` (the paper's Fig. 4 on our models) computes
its statistics right and records the model's own attention in each LVTC phase's layout; `evaluate_with` (FastV rows of
`examples/compare_digits.py`) really prunes while it evaluates and leaves the model as it was."""

import pytest
import torch

from examples.attention_analysis import AttentionRecorder, layer_masks, layer_statistics
from tests.utils.tiny import IMG_CONTEXT, image_span, prompt, tiles

LENGTH = 12
VISUAL = torch.arange(LENGTH).ge(2) & torch.arange(LENGTH).lt(8)  # 6 visual tokens at 2..7
QUERIES = torch.arange(LENGTH).ge(9)  # text after the image: 9, 10, 11


def causal_uniform(length: int) -> torch.Tensor:
    weights = torch.ones(length, length).tril()
    return weights / weights.sum(1, keepdim=True)


def test_uniform_attention_is_half_way_into_the_image_and_exactly_at_the_uniform_share():
    stats = layer_statistics(causal_uniform(LENGTH), VISUAL, QUERIES, threshold=0.5)
    assert stats["visual_share"] == pytest.approx((6 / 10 + 6 / 11 + 6 / 12) / 3, rel=1e-6)
    assert stats["distance_into_image"] == pytest.approx(0.5, abs=1e-6)
    assert stats["visual_tokens"] == 6
    assert stats["active_visual_tokens"] == 1.0  # every visual token gets 1× the uniform share, above 0.5×
    assert layer_statistics(causal_uniform(LENGTH), VISUAL, QUERIES, threshold=1.5)["active_visual_tokens"] == 0.0


@pytest.mark.parametrize("looked_at, distance", [(7, 0.0), (2, 1.0), (4, 0.6)])
def test_attention_on_one_visual_token_gives_its_distance_from_the_image_end(looked_at, distance):
    weights = torch.zeros(LENGTH, LENGTH)
    weights[:, looked_at] = 0.25
    weights[torch.arange(LENGTH), torch.arange(LENGTH)] += 0.75  # the rest on the query itself
    stats = layer_statistics(weights, VISUAL, QUERIES, threshold=1.0)
    assert stats["visual_share"] == pytest.approx(0.25)
    assert stats["distance_into_image"] == pytest.approx(distance, abs=1e-6)
    assert stats["active_visual_tokens"] == pytest.approx(1 / 6)  # only that token, at 0.25 · (q + 1) > 1


def test_the_recorder_keeps_the_language_model_s_own_attention(bundle):
    model = bundle.model(seed=1, attn_implementation="eager")
    ids = torch.tensor([prompt(2, image_span(2, 4), 5, seed=1)])
    recorder = AttentionRecorder(model)
    with torch.no_grad():
        outputs = model(input_ids=ids, pixel_values=tiles(2, seed=2), output_attentions=True)
    recorder.remove()
    assert sorted(recorder.weights) == list(range(model.config.text_config.num_hidden_layers))
    for index, attentions in enumerate(outputs.attentions):
        torch.testing.assert_close(recorder.weights[index], attentions[0].float().mean(0))


def test_lvtc_layers_are_read_in_the_expanded_layout(bundle):
    model = bundle.model(
        seed=2,
        attn_implementation="eager",
        text=dict(num_hidden_layers=4),
        lvtc_enabled=True,
        lvtc_expand_layer=3,
        lvtc_num_lr_projectors=1,
    )
    short, long = model.config.tokens_per_tile, model.config.lvtc_expanded_tokens_per_tile
    ids = prompt(3, image_span(2, short), 2, image_span(1, short), 4, seed=3)
    input_ids = torch.tensor(ids)
    recorder = AttentionRecorder(model)
    with torch.no_grad():
        model(input_ids=input_ids[None], pixel_values=tiles(3, seed=4))
    recorder.remove()
    for index, weights in recorder.weights.items():
        visual, queries = layer_masks(model, input_ids, weights.shape[-1])
        expanded = index >= 3
        assert weights.shape[-1] == len(ids) + (3 * (long - short) if expanded else 0)
        assert int(visual.sum()) == 3 * (long if expanded else short)
        assert int(queries.sum()) == 4  # the text after the last image, in either layout
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))
    # the expanded visual positions are where the model's own LVTC layout puts each tile's N2² tokens
    layout = bundle.load("modeling_internvl_x.build_lvtc_layout")(
        (input_ids == IMG_CONTEXT)[None], None, torch.arange(len(ids))[None], short, long
    )
    visual, _ = layer_masks(model, input_ids, len(ids) + 3 * (long - short))
    assert visual.nonzero()[:, 0].tolist() == sorted(layout.tile_long.flatten().tolist())


def test_evaluate_with_prunes_during_the_call_and_restores_the_model(bundle, chat_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from examples.train_digits_demo import evaluate_with, held_out

    processor = AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(chat_dir, trust_remote_code=True).eval()
    last = model.model.language_model.layers[-1]
    lengths, visual = [], int(model.config.tokens_per_tile)
    handle = last.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    samples = held_out(2)
    plain = evaluate_with(model, processor, samples)
    plain_prefill = lengths[0]
    lengths.clear()
    pruned = evaluate_with(model, processor, samples, fastv_layer=1, fastv_ratio=0.5)
    handle.remove()
    assert lengths[0] < plain_prefill  # the last layer ran on the pruned prompt
    assert pruned["visual_token_layers_per_tile"] < plain["visual_token_layers_per_tile"]
    assert plain["visual_token_layers_per_tile"] == visual * model.config.text_config.num_hidden_layers
    assert model.config.fastv_layer is None and model.config.fastv_ratio == 0.0
    with pytest.raises(ValueError, match="fastv_layer 9"):
        evaluate_with(model, processor, samples, fastv_layer=9, fastv_ratio=0.5)
    assert model.config.fastv_layer is None
