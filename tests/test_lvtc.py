"""LVTC (paper §3.2, Algorithm 1): identities, closed forms, injection, cached and batched decoding."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from tests.utils.compat import CHECKPOINTING, enable_checkpointing
from tests.utils.decoding import LVTC, assert_greedy_matches_recomputation, assert_same_greedy, sdpa_masks
from tests.utils.tiny import IMG_CONTEXT, IMG_END, IMG_START, PAD, image_span, left_pad, prompt, tiles

N1SQ, N2SQ = 4, 16  # tiny geometry: S = 4 patches per side, M1 = 2, M2 = 1
LAYERS = 4
IMAGE_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT]


def lvtc(bundle, seed=0, **overrides):
    settings = dict(
        text=dict(num_hidden_layers=LAYERS),
        lvtc_enabled=True,
        lvtc_expand_layer=3,
        lvtc_num_lr_projectors=2,
        lvtc_inject_start=1,
    )
    settings.update(overrides)
    return bundle.model(seed=seed, **settings)


def with_weights_of(target, source, extra_in_source: str = "-"):
    """Load `source`'s weights into `target`; only names starting with `extra_in_source` may be left over."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert all(name.startswith(extra_in_source) for name in result.unexpected_keys)
    return target, result.missing_keys


def test_visual_token_schedule(bundle):
    model = lvtc(bundle)
    assert model.model.visual_token_schedule(3) == [3 * N1SQ] * 3 + [3 * N2SQ]
    plain = bundle.model(text=dict(num_hidden_layers=LAYERS))
    assert plain.model.visual_token_schedule(2) == [2 * N1SQ] * LAYERS


@pytest.mark.compat
def test_never_expanding_with_one_projector_is_the_plain_model(bundle):
    model = lvtc(bundle, seed=1, lvtc_expand_layer=LAYERS, lvtc_num_lr_projectors=1)
    plain, missing = with_weights_of(bundle.model(seed=2, text=dict(num_hidden_layers=LAYERS)), model)
    assert missing == []
    ids, mask = left_pad([prompt(2, image_span(2, N1SQ), 3, seed=1), prompt(5, image_span(1, N1SQ), 1, seed=2)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=tiles(3))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits, rtol=0, atol=1e-6)


def test_an_edit_that_needs_modules_the_model_lacks_is_refused_by_name(bundle):
    """A model built never expanding (k = L) has no HR projector; moving k to a layer on the built model would expand
    without the HR tokens, silently. The edit is refused at the next call, naming the module and the load that builds
    it; edits the built modules serve (back to "never", or FastV on a plain model) still take effect."""
    never = bundle.model(seed=3, **{**LVTC, "lvtc_expand_layer": 4})
    inputs = dict(input_ids=torch.tensor([prompt(3, image_span(2, 4), 5)]), pixel_values=tiles(2))
    never.config.lvtc_expand_layer = 3
    with pytest.raises(
        ValueError,
        match=r"lvtc_expand_layer 4 → 3\) makes LVTC need \['lvtc_hr_projector'\], .* "
        r"from_pretrained\(path, lvtc_expand_layer=3\)",
    ):
        never(**inputs)
    plain = bundle.model(seed=3, text=dict(num_hidden_layers=4))
    plain.config.lvtc_enabled, plain.config.lvtc_expand_layer, plain.config.lvtc_inject_start = True, 3, 1
    with pytest.raises(ValueError, match=r"makes LVTC need \['lvtc_hr_projector', 'lvtc_lr_projectors'\]"):
        plain(**inputs)
    expanding = bundle.model(seed=3, **LVTC)
    expanding.config.lvtc_expand_layer = 4
    assert expanding.model.visual_token_schedule(2) == [8, 8, 8, 8]


def test_expanding_at_layer_zero_feeds_the_repeated_tokens(bundle):
    """k = 0, T = 1, HR zeroed, nearest: layer 0 sees each N1² span repeated M1/M2 times per axis."""
    model = lvtc(bundle, seed=3, lvtc_expand_layer=0, lvtc_num_lr_projectors=1)
    for parameter in model.model.lvtc_hr_projector.parameters():
        torch.nn.init.zeros_(parameter)
    ids = torch.tensor([prompt(3, image_span(2, N1SQ), 4)])
    pixel_values = tiles(2, seed=4)
    with torch.no_grad():
        out = model.model(input_ids=ids, pixel_values=pixel_values).last_hidden_state

        # Reference: build the expanded sequence by hand and run the plain language model on it.
        embeds = model.get_input_embeddings()(ids)
        visual = model.model.get_image_features(pixel_values).pooler_output  # (2, N1², D)
        repeated = visual.view(2, 2, 2, -1).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, N2SQ, -1)
        start = ids[0].tolist().index(IMG_CONTEXT)
        long_embeds = torch.cat(
            [embeds[0, :start], repeated.reshape(-1, embeds.shape[-1]), embeds[0, start + 2 * N1SQ :]]
        )
        reference = model.model.language_model(inputs_embeds=long_embeds[None]).last_hidden_state[0]
    end_long = start + 2 * N2SQ
    torch.testing.assert_close(out[0, :start], reference[:start], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0, start + 2 * N1SQ :], reference[end_long:], rtol=0, atol=1e-5)
    pooled = F.avg_pool2d(reference[start:end_long].view(2, 4, 4, -1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(out[0, start : start + 2 * N1SQ], pooled.reshape(2 * N1SQ, -1), rtol=0, atol=1e-5)


def test_an_injected_lr_projector_adds_its_tokens_before_its_layer(bundle):
    ids = torch.tensor([prompt(2, image_span(2, N1SQ), 5)])
    inputs = dict(input_ids=ids, pixel_values=tiles(2, seed=5), output_hidden_states=True)
    two = lvtc(bundle, seed=6, lvtc_inject_start=2)
    one, missing = with_weights_of(lvtc(bundle, seed=7, lvtc_num_lr_projectors=1), two, "model.lvtc_lr_projectors.")
    assert missing == []
    with torch.no_grad():
        reference = one(**inputs)
        injected = two(**inputs)
        for i in range(2):  # inputs of layers 0 and 1 come before the injection at s = 2
            torch.testing.assert_close(injected.hidden_states[i], reference.hidden_states[i], rtol=0, atol=0)
        assert (injected.hidden_states[2] - reference.hidden_states[2]).abs().max() > 1e-3
        assert (injected.logits - reference.logits).abs().max() > 1e-4
        projector = two.model.lvtc_lr_projectors[0]
        torch.nn.init.zeros_(projector.linear_2.weight)
        torch.nn.init.zeros_(projector.linear_2.bias)
        torch.testing.assert_close(two(**inputs).logits, reference.logits, rtol=0, atol=0)


def greedy(**kwargs):
    settings = dict(output_logits=True, output_scores=True, return_dict_in_generate=True)
    settings.update(kwargs)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=20,
        eos_token_id=None,
        pad_token_id=PAD,
        suppress_tokens=IMAGE_TOKENS,
        **settings,
    )


@pytest.mark.compat
def test_cached_greedy_decoding_equals_recomputation_at_every_step(bundle):
    model = lvtc(bundle, seed=8)
    ids = torch.tensor([prompt(3, image_span(3, N1SQ), 4)])
    pixel_values = tiles(3, seed=9)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy())
        uncached = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=greedy(use_cache=False))
    assert_greedy_matches_recomputation(model, cached, pixel_values=pixel_values)
    assert_same_greedy(uncached, cached)


@pytest.mark.compat
def test_left_padded_batch_with_1_3_and_7_tiles_equals_each_prompt_alone(bundle):
    model = lvtc(bundle, seed=10)
    counts = [1, 3, 7]
    prompts = [prompt(2 + i, image_span(n, N1SQ), 3, seed=i) for i, n in enumerate(counts)]
    pixel_values = [tiles(n, seed=20 + n) for n in counts]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched_logits = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixel_values)).logits
        batched = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixel_values), generation_config=greedy()
        )
        for row, (p, pv) in enumerate(zip(prompts, pixel_values)):
            alone_logits = model(input_ids=torch.tensor([p]), pixel_values=pv).logits[0]
            torch.testing.assert_close(batched_logits[row, -len(p) :], alone_logits, rtol=0, atol=1e-4)
            alone = model.generate(input_ids=torch.tensor([p]), pixel_values=pv, generation_config=greedy())
            assert_same_greedy(batched, alone, rows=[(row, 0)])


@pytest.mark.parametrize("padded", [True, False], ids=["padded-batch", "one-prompt"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_sdpa_and_eager_agree(bundle, mode, padded):
    """Padded: explicit masks in both kernels. One prompt: sdpa runs its causal kernel with no mask at all."""
    if padded:
        ids, mask = left_pad([prompt(2, image_span(2, N1SQ), 3, seed=1), prompt(6, seed=2)])
    else:
        ids, mask = left_pad([prompt(2, image_span(2, N1SQ), 3, seed=1)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=tiles(2))
    with torch.no_grad():
        logits = [
            lvtc(bundle, seed=11, lvtc_upsample_mode=mode, attn_implementation=impl)(**inputs).logits
            for impl in ("sdpa", "eager")
        ]
    real = mask.bool()  # padding positions carry no meaning and differ between kernels
    torch.testing.assert_close(logits[0][real], logits[1][real], rtol=0, atol=1e-5)


def test_every_layer_runs_sdpa_s_causal_kernel_only_where_no_row_is_padded(bundle):
    """The fast path, seen from sdpa: an unpadded prompt and its decoded tokens (dynamic cache) reach every decoder
    layer of both phases with no mask, so sdpa runs its causal kernel; a padded batch gives every layer a mask."""
    model = lvtc(bundle, seed=4)
    vision_layers = model.config.vision_config.num_hidden_layers  # the vision tower's sdpa calls come first
    ids = torch.tensor([prompt(2, image_span(2, N1SQ), 3, seed=1)] * 2)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=tiles(4))
    with torch.no_grad(), sdpa_masks() as calls:
        model.generate(**inputs, generation_config=greedy(), max_new_tokens=3)
    decoder_calls = calls[vision_layers:]
    assert decoder_calls == [False] * (3 * LAYERS)  # the prompt, then two decoded tokens
    padded, mask = left_pad([prompt(2, image_span(2, N1SQ), 3, seed=1), prompt(6, seed=2)])
    with torch.no_grad(), sdpa_masks() as calls:
        model(input_ids=padded, attention_mask=mask, pixel_values=tiles(2))
    assert calls[vision_layers:] == [True] * LAYERS


def test_gradient_checkpointing_gives_the_same_gradients(bundle):
    model = lvtc(bundle, seed=12).train()
    ids, mask = left_pad([prompt(2, image_span(2, N1SQ), 6, seed=1), prompt(3, image_span(1, N1SQ), 2, seed=2)])
    labels = ids.masked_fill((mask == 0) | (ids == IMG_CONTEXT), -100)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=tiles(3), labels=labels)

    def grads():
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, reference = grads()
    assert reference["model.lvtc_hr_projector.linear_1.weight"].abs().sum() > 0
    assert reference["model.lvtc_lr_projectors.0.linear_1.weight"].abs().sum() > 0
    enable_checkpointing(model)
    loss_ckpt, checkpointed = grads()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


SLIDING_WINDOW_QWEN2 = dict(
    model_type="qwen2", num_hidden_layers=LAYERS, use_sliding_window=True, sliding_window=8, max_window_layers=2
)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lvtc_expand_layer=5), r"lvtc_expand_layer 5 must be in \[0, 4\]"),
        (dict(lvtc_inject_start=3), r"injected before layers \[3\].*expansion layer k=3"),
        (dict(lvtc_num_lr_projectors=3, lvtc_inject_start=1, lvtc_inject_interval=2), r"layers \[1, 3\]"),
        (dict(lvtc_num_lr_projectors=0), "lvtc_num_lr_projectors must be ≥ 1"),
        (dict(lvtc_upsample_mode="bicubic"), "lvtc_upsample_mode"),
        (dict(lvtc_hr_downsample_ratio=1 / 3), "lvtc_hr_downsample_ratio must be 1/M2"),
        (dict(lvtc_hr_downsample_ratio=0.25, downsample_ratio=0.5), "M2 = 4 must divide M1 = 2"),
        (dict(text=SLIDING_WINDOW_QWEN2), r"layers \[2, 3\] use \['sliding_attention'\]"),
    ],
)
def test_invalid_lvtc_configs_are_refused(bundle, overrides, message):
    settings = dict(text=dict(num_hidden_layers=LAYERS), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1)
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        bundle.config(**settings)


class SyntheticImageQA(torch.utils.data.Dataset):
    """Tiles whose mean brightness decides the answer token: learnable only through the visual tokens."""

    def __init__(self, size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(size):
            num_tiles = 1 + i % 2
            bright = i % 3 == 0
            pixel_values = torch.randn(num_tiles, 3, 56, 56, generator=generator) * 0.1 + (1.0 if bright else -1.0)
            ids = prompt(2, image_span(num_tiles, N1SQ), 1, seed=i) + [50 if bright else 60, 2]
            labels = [-100] * (len(ids) - 2) + ids[-2:]
            self.items.append(dict(input_ids=ids, labels=labels, pixel_values=pixel_values))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(samples):
    """Right-pad ids and labels; concatenate every sample's tiles in order."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), PAD)
    labels = torch.full((len(samples), longest), -100)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = (
            torch.tensor(sample["input_ids"]),
            torch.tensor(sample["labels"]),
            1,
        )
    pixel_values = torch.cat([s["pixel_values"] for s in samples])
    return dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=pixel_values)


def test_trainer_lowers_the_loss_in_30_steps(bundle, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lvtc(bundle, seed=13).train()
    dataset = SyntheticImageQA(24)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        lr_scheduler_type="constant",
        **{CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    eval_batch = collate([dataset[i] for i in range(8)])
    with torch.no_grad():
        before = model.eval()(**eval_batch).loss.item()
    trainer.train()
    with torch.no_grad():
        after = model.eval()(**eval_batch).loss.item()
    assert after < 0.5 * before, (before, after)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
