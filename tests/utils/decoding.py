"""Comparing decoded tokens of two computation paths without depending on the CPU's rounding.

Two paths that compute the same logits in a different order (batched vs alone, static vs dynamic cache, compiled vs
eager) agree to float rounding, not bit for bit. Greedy decoding turns that into integers, which are equal unless two
tokens were tied to within the rounding at some step: then either pick is right and the sequences may part there.
"""

import contextlib

import torch
from transformers import GenerationConfig

from tests.utils.tiny import IMG_CONTEXT, IMG_END, IMG_START, PAD

# A random model may emit image tokens; a prompt holding a stray <IMG_CONTEXT> is invalid, so decoding bans them.
IMAGE_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT]
# The tiny LVTC model the decoding tests share: 4 layers, expansion before layer 3, one extra LR projector at 1.
LVTC = dict(text=dict(num_hidden_layers=4), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1)
# Plain, PVTC and LVTC models of the same depth, for tests that run every kind of model.
VARIANTS = {
    "plain": dict(text=dict(num_hidden_layers=4)),
    "pvtc": dict(text=dict(num_hidden_layers=4), projector_type="pvtc", pvtc_num_heads=4),
    "lvtc": LVTC,
    "lvtc-3-lr-projectors": {**LVTC, "lvtc_num_lr_projectors": 3},
}

# Logit gap under which two tokens count as tied. The tiny float32 models here differ between paths by ≤ 1e-5.
TIE = 1e-4


def assert_same_greedy(actual, expected, atol: float = 1e-4, rows=None) -> None:
    """`actual` and `expected` are `generate(..., output_logits=True, return_dict_in_generate=True)` outputs of greedy
    decoding (or of sampling restricted to the top token). Their raw logits agree to `atol` at every step; their tokens
    are equal up to the first step where the two chosen tokens are tied (logit gap under `TIE`), and after it nothing
    is compared.

    `rows`: pairs `(row of actual, row of expected)`, every row by default. Sequences may differ in left padding.
    """
    steps = len(expected.logits)
    assert len(actual.logits) == steps, (len(actual.logits), steps)
    rows = rows if rows is not None else [(row, row) for row in range(expected.sequences.shape[0])]
    for row_a, row_e in rows:
        new_a, new_e = actual.sequences[row_a, -steps:], expected.sequences[row_e, -steps:]
        for step in range(steps):
            logits_a, logits_e = actual.logits[step][row_a], expected.logits[step][row_e]
            where = f"row {row_e} step {step}"
            torch.testing.assert_close(
                logits_a, logits_e, rtol=0, atol=atol, msg=lambda m, where=where: f"{where}: {m}"
            )
            token_a, token_e = int(new_a[step]), int(new_e[step])
            if token_a != token_e:
                gap = abs(float(logits_e[token_a] - logits_e[token_e]))
                assert gap < TIE, f"row {row_e} step {step}: token {token_a} vs {token_e}, logit gap {gap:.2e}"
                break  # a genuine tie: the paths may part here


def assert_greedy_matches_recomputation(model, output, atol: float = 1e-4, **inputs) -> None:
    """Each step of a cached greedy `output` (with `output_logits`) equals running the model without cache on the
    sequence so far: the same logits to `atol`, and a token that is their argmax or tied with it (`TIE`).

    `inputs`: the prompt's forward inputs (`pixel_values`, `attention_mask` of the prompt, ...; `input_ids` is taken
    from `output`).
    """
    inputs.pop("input_ids", None)
    steps = len(output.logits)
    prompt_length = output.sequences.shape[1] - steps
    attention_mask = inputs.pop("attention_mask", None)
    for step in range(steps):
        sequence = output.sequences[:, : prompt_length + step]
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], step)], dim=1)
        with torch.no_grad():
            logits = model(input_ids=sequence, attention_mask=mask, use_cache=False, **inputs).logits[:, -1]
        where = f"step {step}"
        torch.testing.assert_close(output.logits[step], logits, rtol=0, atol=atol, msg=lambda m, w=where: f"{w}: {m}")
        chosen = output.sequences[:, prompt_length + step]
        allowed = torch.isfinite(output.scores[step]) if output.scores is not None else torch.ones_like(logits).bool()
        best = logits.masked_fill(~allowed, -float("inf")).max(-1).values
        gap = best - logits.gather(1, chosen[:, None])[:, 0]
        assert (gap < TIE).all(), f"step {step}: chosen tokens {chosen.tolist()} trail the best by {gap.tolist()}"


def greedy(max_new_tokens: int, **generate_kwargs) -> dict:
    """`generate` arguments for greedy decoding of exactly `max_new_tokens` (no EOS), returning the scores and raw
    logits that `assert_same_greedy` compares, plus `generate_kwargs`."""
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=PAD,
        suppress_tokens=IMAGE_TOKENS,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return dict(generation_config=config, **generate_kwargs)


@contextlib.contextmanager
def sdpa_masks():
    """Record, for every sdpa call inside the block (the vision tower's layers, then one per decoder layer and step, in
    order), whether it got a mask. Without one, sdpa runs its causal kernel, the fast path for unpadded prompts."""
    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append(attn_mask is not None)
        return original(query, key, value, attn_mask, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
