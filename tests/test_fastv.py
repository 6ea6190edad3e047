"""FastV (training-free visual-token pruning after layer K) on the same two-phase machinery as LVTC: identities, the
attention ranking against eager attention, a hand-built reference, cache, batching, sdpa, static cache."""

import json

import pytest
import torch

from tests.utils.compat import cache_of, with_cache
from tests.utils.decoding import assert_same_greedy
from tests.utils.decoding import greedy as greedy_settings
from tests.utils.tiny import IMG_CONTEXT, image_span, left_pad, prompt, tiles

LAYERS = 4
N1SQ = 4


def fastv(bundle, seed=0, layer=2, ratio=0.5, **overrides):
    text = dict(num_hidden_layers=LAYERS, **overrides.pop("text", {}))
    return bundle.model(seed=seed, text=text, fastv_layer=layer, fastv_ratio=ratio, **overrides)


def plain_twin(bundle, model, **overrides):
    """The same weights without pruning."""
    twin = bundle.model(seed=99, text=dict(num_hidden_layers=LAYERS), **overrides)
    twin.load_state_dict(model.state_dict())
    return twin


def batch():
    ids, mask = left_pad([prompt(2, image_span(3, N1SQ), 3, seed=1), prompt(5, image_span(1, N1SQ), 2, seed=2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=tiles(4, seed=3))


def greedy(**kwargs) -> dict:
    return greedy_settings(12, **kwargs)


def test_pruning_nothing_is_the_plain_model(bundle):
    model = fastv(bundle, seed=1, ratio=0.0)
    plain = plain_twin(bundle, model)
    inputs = batch()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], plain(**inputs).logits[real], rtol=0, atol=1e-5)


def test_layers_from_k_on_hold_the_kept_share_of_visual_tokens(bundle):
    model = fastv(bundle, ratio=0.75)
    assert model.model.visual_token_schedule(3) == [12, 12, 3, 3]  # floor(0.75 · 12) = 9 of 12 pruned


def test_settings_fastv_cannot_run_are_refused_by_name(bundle):
    with pytest.raises(ValueError, match="their combination is not defined"):
        bundle.config(
            text=dict(num_hidden_layers=LAYERS),
            fastv_layer=2,
            lvtc_enabled=True,
            lvtc_expand_layer=3,
            lvtc_inject_start=1,
        )
    with pytest.raises(ValueError, match=r"fastv_layer 0 must be in \[1, 3\]"):
        bundle.config(text=dict(num_hidden_layers=LAYERS), fastv_layer=0)
    with pytest.raises(ValueError, match=r"fastv_ratio must be in \[0, 1\), got 1.0"):
        bundle.config(text=dict(num_hidden_layers=LAYERS), fastv_layer=2, fastv_ratio=1.0)


def test_checkpoints_saved_under_the_former_names_load_with_fastv_on(bundle, tmp_path):
    """Until 2026-12 the fields were `visual_token_pruning_layer/_ratio`: such a config.json loads with FastV on, and
    the old names still read and set the new fields."""
    model = fastv(bundle, seed=4, layer=2, ratio=0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["visual_token_pruning_layer"], saved["visual_token_pruning_ratio"] = (
        saved.pop("fastv_layer"),
        saved.pop("fastv_ratio"),
    )
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = bundle.ForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.config.fastv_layer, loaded.config.fastv_ratio) == (2, 0.5)
    assert loaded.config.visual_token_pruning_layer == 2
    assert "visual_token_pruning_layer" not in loaded.config.to_dict()
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)
    loaded.config.visual_token_pruning_ratio = 0.75
    assert loaded.config.fastv_ratio == 0.75 and loaded.model.visual_token_schedule(1) == [4, 4, 1, 1]


def test_a_config_holding_both_names_uses_the_current_one_and_says_so(bundle, tmp_path, caplog):
    """A config.json with a stale former name beside the current one (a tool that added the new field and kept the
    old): the current name wins, with a warning naming both values, instead of the former silently turning FastV off."""
    model = fastv(bundle, seed=4, layer=2, ratio=0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(visual_token_pruning_layer=None, visual_token_pruning_ratio=0.5)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        loaded = bundle.ForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.config.fastv_layer, loaded.config.fastv_ratio) == (2, 0.5)
    assert "holds `fastv_layer`=2 and `visual_token_pruning_layer`=None; using `fastv_layer`" in caplog.text
    assert "visual_token_pruning_ratio" not in caplog.text  # the same value under both names: nothing to say


def test_fastv_switched_on_a_built_model_runs_from_the_next_call(bundle):
    """FastV needs no training, so it can be switched on a model already built (examples/train_digits_demo.py
    evaluates a trained model with it): the schedule follows the config."""
    pruned = fastv(bundle, seed=5, layer=2, ratio=0.5)
    model = plain_twin(bundle, pruned)
    inputs = batch()
    with torch.no_grad():
        plain_logits = model(**inputs).logits
        model.config.update(dict(fastv_layer=2, fastv_ratio=0.5))
        torch.testing.assert_close(model(**inputs).logits, pruned(**inputs).logits, rtol=0, atol=1e-6)
        model.config.fastv_layer = None
        torch.testing.assert_close(model(**inputs).logits, plain_logits, rtol=0, atol=1e-6)


def test_ties_go_to_the_earlier_token(bundle):
    keep = bundle.load("modeling_internvl_x.keep_top_visual_tokens")
    scores = torch.tensor([[0.9, 0.2, 0.2, 0.2, 0.5, 0.1]])
    image_mask = torch.tensor([[False, True, True, True, True, False]])
    # 4 visual tokens, ratio 0.5: keep 2 — the 0.5 and the first of the three tied 0.2s
    assert keep(scores, image_mask, 0.5).tolist() == [[True, True, False, False, True, True]]


def test_ranking_uses_the_last_prompt_token_s_attention_in_layer_k_minus_1(bundle):
    """The extra small computation equals eager attention's own weights (last query row, mean over heads)."""
    model = fastv(bundle, seed=2, layer=2, ratio=0.5)
    schedule = model.model.token_schedule
    eager = plain_twin(bundle, model, attn_implementation="eager")
    inputs = batch()
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True, output_hidden_states=True)
        expected = reference.attentions[1][:, :, -1, :].mean(1)
        layer_input = reference.hidden_states[1]
        positions = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        decoder = model.model.language_model
        scores = schedule.last_token_attention(
            decoder, decoder.layers[1], layer_input, inputs["attention_mask"], positions
        )
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


def test_logits_equal_a_hand_built_pruned_run(bundle):
    """Layers ≥ K see exactly the text tokens and the kept visual tokens, at their original positions."""
    model = fastv(bundle, seed=3, layer=2, ratio=0.5)
    keep = bundle.load("modeling_internvl_x.keep_top_visual_tokens")
    schedule = model.model.token_schedule
    ids = torch.tensor([prompt(3, image_span(2, N1SQ), 4, seed=5)])
    pixel_values = tiles(2, seed=6)
    decoder = model.model.language_model
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values).logits
        embeds = model.model.merge_image_features(
            decoder.embed_tokens(ids), ids == IMG_CONTEXT, model.model.get_image_features(pixel_values).pooler_output
        )
        states = decoder(inputs_embeds=embeds, output_hidden_states=True).hidden_states  # inputs of every layer
        positions = torch.arange(ids.shape[1])[None]
        scores = schedule.last_token_attention(decoder, decoder.layers[1], states[1], None, positions)
        kept = keep(scores, ids == IMG_CONTEXT, 0.5)[0]
        assert int(kept.sum()) == ids.shape[1] - 4  # half of the 8 visual tokens pruned
        hidden, kept_positions = states[2][:, kept], positions[:, kept]
        rotary = decoder.rotary_emb(hidden, kept_positions)
        for layer in decoder.layers[2:]:
            hidden = layer(hidden, attention_mask=None, position_ids=kept_positions, position_embeddings=rotary)
        reference = model.lm_head(decoder.norm(hidden))
    torch.testing.assert_close(out[:, kept], reference, rtol=0, atol=1e-5)
    # the text after the image (what generation reads) is among the kept positions
    assert kept[-4:].all()


@pytest.mark.compat
def test_cached_decoding_continues_the_prefill_s_pruning_and_batches_equal_their_rows(bundle):
    """With a cache the pruning is chosen once, at the prefill (FastV's KV-cache setting). Feeding the decoded tokens
    back in one continuation step gives the logits the step-by-step decoding had."""
    model = fastv(bundle, seed=4)
    inputs = batch()
    with torch.no_grad():
        batched = model.generate(**inputs, **greedy())
        decoded = batched.sequences[:, inputs["input_ids"].shape[1] :]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(decoded)], dim=1)
        all_positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers a left-padded batch
        prefill = model(**inputs, position_ids=all_positions[:, : inputs["input_ids"].shape[1]], use_cache=True)
        positions = all_positions[:, -decoded.shape[1] :]
        continued = model(
            input_ids=decoded[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            **with_cache(cache_of(prefill)),
            use_cache=True,
        ).logits
        stepwise = torch.stack(batched.logits[1:], dim=1)
        torch.testing.assert_close(continued, stepwise, rtol=0, atol=1e-4)
        start = 0
        for row, count in enumerate([3, 1]):
            real = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]
            alone = model.generate(
                input_ids=real, pixel_values=inputs["pixel_values"][start : start + count], **greedy()
            )
            assert_same_greedy(batched, alone, rows=[(row, 0)])
            start += count


def test_sdpa_and_eager_agree(bundle):
    inputs = batch()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        sdpa = fastv(bundle, seed=5)(**inputs).logits
        eager = fastv(bundle, seed=5, attn_implementation="eager")(**inputs).logits
    torch.testing.assert_close(sdpa[real], eager[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("text", [dict(), dict(model_type="qwen2")], ids=["llama", "qwen2"])
def test_static_cache_decodes_like_the_dynamic_cache(bundle, text):
    model = fastv(bundle, seed=6, text=text)
    inputs = batch()
    with torch.no_grad():
        dynamic = model.generate(**inputs, **greedy())
        static = model.generate(**inputs, **greedy(cache_implementation="static"))
    assert_same_greedy(static, dynamic)


def test_assisted_generation_is_refused_by_name(bundle):
    """Its first forward feeds candidates with the prompt: the ranking token would not be the prompt's last."""
    model = fastv(bundle, seed=7)
    inputs = dict(input_ids=torch.tensor([prompt(3, image_span(2, N1SQ), 4)]), pixel_values=tiles(2))
    with pytest.raises(ValueError, match="assisted generation .* cannot run FastV pruning"):
        model.generate(**inputs, **greedy(prompt_lookup_num_tokens=3))


def test_a_converted_checkpoint_prunes_without_training(bundle, tmp_path):
    """FastV is switched on at load time, on any checkpoint of this bundle."""
    from transformers import AutoModelForImageTextToText

    plain = bundle.model(seed=8, text=dict(num_hidden_layers=LAYERS))
    plain.save_pretrained(tmp_path)
    pruned = AutoModelForImageTextToText.from_pretrained(
        tmp_path, trust_remote_code=True, fastv_layer=2, fastv_ratio=0.75
    ).eval()
    assert pruned.model.visual_token_schedule(1) == [4, 4, 1, 1]
    inputs = batch()
    with torch.no_grad():
        out = pruned.generate(**inputs, **greedy())
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 12)
