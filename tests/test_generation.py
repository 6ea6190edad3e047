"""KV-cached generation equals recomputation; batches equal their samples run alone."""

import pytest
import torch
from transformers import GenerationConfig

from tests.utils.decoding import assert_greedy_matches_recomputation, assert_same_greedy
from tests.utils.tiny import IMG_CONTEXT, IMG_END, IMG_START, PAD, image_span, left_pad, prompt, tiles

TOKENS = 4
NEW_TOKENS = 10
# A random model may emit image tokens; a prompt containing a stray <IMG_CONTEXT> is invalid, so both paths ban them.
IMAGE_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT]


def greedy(max_new_tokens=NEW_TOKENS, **kwargs):
    # No EOS: every run produces exactly max_new_tokens, so sequences can be compared position by position.
    settings = dict(output_logits=True, output_scores=True, return_dict_in_generate=True)
    settings.update(kwargs)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=PAD,
        suppress_tokens=IMAGE_TOKENS,
        **settings,
    )


@pytest.fixture(scope="module")
def model(bundle):
    return bundle.model(seed=3)


@pytest.mark.compat
def test_cached_greedy_equals_recomputation(model):
    ids = torch.tensor([prompt(3, image_span(3, TOKENS), 5)])
    pixel_values = tiles(3, seed=5)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy())
    assert cached.sequences.shape[1] == ids.shape[1] + NEW_TOKENS
    assert_greedy_matches_recomputation(model, cached, pixel_values=pixel_values)


def test_generate_without_cache_equals_cached(model):
    ids = torch.tensor([prompt(4, image_span(1, TOKENS), 2)])
    pixel_values = tiles(1, seed=6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy())
        uncached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy(use_cache=False))
    assert_same_greedy(uncached, cached)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [prompt(2, image_span(1, TOKENS), 7, seed=1), prompt(5, image_span(3, TOKENS), 1, seed=2)]
    pixel_values = [tiles(1, seed=7), tiles(3, seed=8)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixel_values), generation_config=greedy()
        )
        for row, (p, pv) in enumerate(zip(prompts, pixel_values)):
            alone = model.generate(input_ids=torch.tensor([p]), pixel_values=pv, generation_config=greedy())
            assert_same_greedy(batched, alone, rows=[(row, 0)])


def test_left_padded_batch_logits_equal_each_prompt_alone(model):
    prompts = [prompt(2, image_span(2, TOKENS), 3, seed=3), prompt(9, seed=4)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=tiles(2, seed=9)).logits
        alone = [
            model(input_ids=torch.tensor([prompts[0]]), pixel_values=tiles(2, seed=9)).logits,
            model(input_ids=torch.tensor([prompts[1]])).logits,
        ]
    for row, logits in enumerate(alone):
        assert (batched[row, -logits.shape[1] :] - logits[0]).abs().max().item() <= 1e-5


@pytest.mark.compat
def test_beam_search_batch_equals_each_prompt_alone_and_sampling_runs(model):
    prompts = [prompt(2, image_span(1, TOKENS), 3, seed=5), prompt(4, image_span(2, TOKENS), 1, seed=6)]
    pixel_values = [tiles(1, seed=10), tiles(2, seed=11)]
    ids, mask = left_pad(prompts)
    beams = greedy(num_beams=3)
    with torch.no_grad():
        batched = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixel_values), generation_config=beams
        )
        for row, (p, pv) in enumerate(zip(prompts, pixel_values)):
            alone = model.generate(input_ids=torch.tensor([p]), pixel_values=pv, generation_config=beams)
            # Beams rank sums of log-probabilities: the best beam is the same unless two are tied to rounding.
            torch.testing.assert_close(batched.sequences_scores[row], alone.sequences_scores[0], rtol=0, atol=1e-5)
            assert torch.equal(batched.sequences[row, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
        sampling = GenerationConfig(
            do_sample=True,
            top_k=5,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=PAD,
            suppress_tokens=IMAGE_TOKENS,
        )
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(
                model.generate(
                    input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixel_values), generation_config=sampling
                )
            )
    assert runs[0].shape == (2, ids.shape[1] + NEW_TOKENS) and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=2),
        dict(num_beams=2, num_return_sequences=2),
        dict(do_sample=True, top_k=1, num_return_sequences=2),
    ],
    ids=["beams", "beams-returning-2", "sampling-returning-2"],
)
def test_beams_and_returned_sequences_take_each_row_s_images_with_it(settings):
    """The processor's batch of two images of 3 and 5 tiles (with `num_patches`): every copy of a row keeps its own
    image, so each row's sequences are those of the row alone."""
    import PIL.Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.conftest import ROOT

    demo = ROOT / "examples" / "digits-demo"
    processor = AutoProcessor.from_pretrained(demo, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(demo, trust_remote_code=True).eval()
    images = [PIL.Image.open(demo / name) for name in ("example-single-0.png", "example-row-0.png")]
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the digits."}]}]
    text = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text, text], images=images, return_tensors="pt")
    assert batch["num_patches"].tolist() == [3, 5]
    copies = settings.get("num_return_sequences", 1)
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=6, **settings)[:, batch["input_ids"].shape[1] :]
        for row, image in enumerate(images):
            alone = processor(text=[text], images=[image], return_tensors="pt")
            expected = model.generate(**alone, max_new_tokens=6, **settings)[:, alone["input_ids"].shape[1] :]
            assert together[row * copies : (row + 1) * copies].tolist() == expected.tolist()


@pytest.mark.parametrize("asked", [dict(max_new_tokens=100), dict(max_length=200)])
def test_decoding_stops_at_the_last_position_lvtc_s_expansion_included(bundle, asked, caplog):
    """64 positions; the prompt's 26 tokens take 50 with LVTC's expanded tiles: 14 new tokens, and a warning that says
    so. A prompt that takes every position leaves no room and is refused."""
    import logging

    from transformers.utils import logging as transformers_logging

    from tests.utils.decoding import LVTC

    model = bundle.model(seed=1, **{**LVTC, "text": {**LVTC["text"], "max_position_embeddings": 64}})
    ids = torch.tensor([prompt(10, image_span(2, 4), 5)])
    logging.Logger.warning_once.cache_clear()
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"), torch.no_grad():
            out = model.generate(
                input_ids=ids, pixel_values=tiles(2), do_sample=False, eos_token_id=None, pad_token_id=PAD, **asked
            )
    finally:
        transformers_logging.disable_propagation()
    assert out.shape[1] - ids.shape[1] == 14
    assert "generating at most 14 new tokens" in caplog.text and "takes 50 of" in caplog.text
    full = torch.tensor([prompt(38, image_span(2, 4), 1)])  # 50 tokens, 74 positions with LVTC: over the limit
    with pytest.raises(ValueError, match="needs 74 positions"):
        model.generate(input_ids=full, pixel_values=tiles(2), max_new_tokens=5)
    exact = torch.tensor([prompt(28, image_span(2, 4), 1)])  # 40 tokens, 64 positions: nothing left
    with pytest.raises(ValueError, match="takes 64 positions .* no room for a new token"):
        model.generate(input_ids=exact, pixel_values=tiles(2), max_new_tokens=5)
