"""KV-cached generation equals recomputation; batches equal their samples run alone."""

import pytest
import torch
from transformers import GenerationConfig

from tests.tiny import IMG_CONTEXT, IMG_END, IMG_START, PAD, image_span, left_pad, prompt, tiles

TOKENS = 4
NEW_TOKENS = 10
# A random model may emit image tokens; a prompt containing a stray <IMG_CONTEXT> is invalid, so both paths ban them.
IMAGE_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT]


def greedy(max_new_tokens=NEW_TOKENS, **kwargs):
    # No EOS: every run produces exactly max_new_tokens, so sequences can be compared position by position.
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=PAD,
        suppress_tokens=IMAGE_TOKENS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def model(bundle):
    return bundle.model(seed=3)


def recompute_greedy(model, input_ids, pixel_values, steps):
    """Greedy decoding by re-running the whole sequence at every step, without any cache."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits[:, -1:]
            logits[..., IMAGE_TOKENS] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1)], dim=1)
    return ids


def test_cached_greedy_equals_recomputation(model):
    ids = torch.tensor([prompt(3, image_span(3, TOKENS), 5)])
    pixel_values = tiles(3, seed=5)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy())
    assert cached.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(cached, recompute_greedy(model, ids, pixel_values, NEW_TOKENS))


def test_generate_without_cache_equals_cached(model):
    ids = torch.tensor([prompt(4, image_span(1, TOKENS), 2)])
    pixel_values = tiles(1, seed=6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy())
        uncached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy(use_cache=False))
    assert torch.equal(cached, uncached)


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
            assert torch.equal(batched[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])


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
            assert torch.equal(batched[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])
        sampling = GenerationConfig(do_sample=True, top_k=5, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                    pad_token_id=PAD, suppress_tokens=IMAGE_TOKENS)  # fmt: skip
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixel_values),
                                       generation_config=sampling))  # fmt: skip
    assert runs[0].shape == (2, ids.shape[1] + NEW_TOKENS) and torch.equal(runs[0], runs[1])
