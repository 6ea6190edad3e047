"""Packed rows, as padding-free collators (TRL's `padding_free=True` and `packing=True`) write them: several sequences
concatenated in one row, `position_ids` restarting at 0 for each, no attention mask, no cache. Transformers' decoders
keep such sequences apart; so must every path here (plain, PVTC, LVTC, FastV; sdpa and eager): each sequence's logits
are its logits alone. LVTC and FastV build their second phase per row, so packed rows with images are refused there by
name; the context check counts each packed sequence, not the row."""

import pytest
import torch

from tests.utils.decoding import LVTC
from tests.utils.tiny import image_span, prompt, tiles

TOKENS = 4  # tokens per tile of the tiny geometry
PATHS = {
    "plain": dict(text=dict(num_hidden_layers=4)),
    "pvtc": dict(text=dict(num_hidden_layers=4), projector_type="pvtc", pvtc_num_heads=4),
    "lvtc": LVTC,
    "fastv": dict(text=dict(num_hidden_layers=4), fastv_layer=1, fastv_ratio=0.5),
}
SEQUENCES = [prompt(7, seed=1), prompt(5, seed=2), prompt(9, seed=3)]


def pack(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of the sequences back to back, and positions restarting at 0 for each."""
    ids = torch.tensor([[token for sequence in sequences for token in sequence]])
    positions = torch.tensor([[p for sequence in sequences for p in range(len(sequence))]])
    return ids, positions


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("path", list(PATHS))
def test_packed_text_rows_give_each_sequence_its_logits_alone(bundle, path, attention):
    model = bundle.model(seed=4, **PATHS[path])
    model.set_attn_implementation(attention)
    ids, positions = pack(SEQUENCES)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        # flash-attention-style keywords (what TRL's collator adds for it) change nothing on sdpa and eager
        lengths = torch.tensor([0] + [len(s) for s in SEQUENCES]).cumsum(0).int()
        flash_kwargs = dict(cu_seq_lens_q=lengths, cu_seq_lens_k=lengths, max_length_q=9, max_length_k=9)
        with_kwargs = model(input_ids=ids, position_ids=positions, use_cache=False, **flash_kwargs).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in SEQUENCES])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_kwargs, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["lvtc", "fastv"])
def test_packed_text_rows_train_to_the_losses_of_the_padded_batch(bundle, path):
    """The loss of a packed row (labels with -100 at each sequence's first token, as TRL's collator writes them) equals
    the padded batch's, and so do the gradients."""
    losses, grads = {}, {}
    for layout in ("packed", "padded"):
        model = bundle.model(seed=5, **PATHS[path]).train()
        if layout == "packed":
            ids, positions = pack(SEQUENCES)
            labels = ids.clone()
            starts = torch.tensor([0] + [len(s) for s in SEQUENCES[:-1]]).cumsum(0)
            labels[0, starts] = -100
            inputs = dict(input_ids=ids, position_ids=positions, labels=labels)
        else:
            longest = max(len(s) for s in SEQUENCES)
            ids = torch.tensor([s + [0] * (longest - len(s)) for s in SEQUENCES])
            mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in SEQUENCES])
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, 0] = -100
            inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        losses[layout] = loss.item()
        grads[layout] = model.lm_head.weight.grad.clone()
    # the packed loss shifts across sequence boundaries: the label after each boundary is -100, so the terms are
    # the padded batch's
    assert losses["packed"] == pytest.approx(losses["padded"], abs=1e-5)
    torch.testing.assert_close(grads["packed"], grads["padded"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["plain", "pvtc"])
def test_packed_rows_with_images_keep_apart_where_the_decoder_is_transformers_own(bundle, path):
    model = bundle.model(seed=6, **PATHS[path])
    with_image = prompt(3, image_span(2, TOKENS), 4, seed=7)
    sequences = [SEQUENCES[0], with_image, SEQUENCES[1]]
    ids, positions = pack(sequences)
    pixel_values = tiles(2)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, pixel_values=pixel_values, use_cache=False).logits[0]
        alone = [
            model(input_ids=torch.tensor([s]), pixel_values=pixel_values if s is with_image else None).logits[0]
            for s in sequences
        ]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["lvtc", "fastv"])
def test_packed_rows_with_images_are_refused_by_lvtc_and_fastv(bundle, path):
    model = bundle.model(seed=6, **PATHS[path])
    ids, positions = pack([SEQUENCES[0], prompt(3, image_span(2, TOKENS), 4, seed=7)])
    name = "LVTC" if path == "lvtc" else "FastV"
    refusal = rf"{name} cannot keep packed sequences apart .* \[2\] sequences .* 8 image"
    for use_cache in (False, None, True):  # None: the config's default, True in eval and in train()
        for training in (False, True):
            model.train(training)
            with pytest.raises(ValueError, match=refusal):
                model(input_ids=ids, position_ids=positions, pixel_values=tiles(2), use_cache=use_cache)


@pytest.mark.parametrize("path", ["plain", "lvtc"])
def test_the_context_check_counts_each_packed_sequence(bundle, path):
    """Three sequences of 200 tokens in one row of 600 fit a model of 256 positions; one of 300 does not."""
    settings = {**PATHS[path], "text": {**PATHS[path]["text"], "max_position_embeddings": 256}}
    model = bundle.model(seed=7, **settings)
    sequences = [prompt(199, seed=i) for i in range(3)]
    ids, positions = pack(sequences)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions, use_cache=False)
    ids, positions = pack([prompt(299, seed=4)])
    with pytest.raises(ValueError, match="this input needs 300 positions.* max_position_embeddings = 256"):
        model(input_ids=ids, position_ids=positions, use_cache=False)
