"""Padding tiles (`image_flags` all 0): a batch without images runs the vision tower and every projector, as ZeRO
needs when each rank trains on its own batch, and that changes nothing: the loss and every gradient of the text path
equal the run without them exactly (they add a zero that depends on the projectors), and the vision modules get
zero gradients. Flags that mix padding and image tiles, or do not fit the tiles, are refused."""

import pytest
import torch

from tests.utils.tiny import image_span, left_pad, prompt, tiles

LVTC = dict(
    text=dict(num_hidden_layers=4),
    lvtc_enabled=True,
    lvtc_expand_layer=3,
    lvtc_inject_start=1,
    lvtc_num_lr_projectors=3,
    lvtc_inject_interval=1,
)
VARIANTS = {
    "plain": {},
    "pvtc": dict(projector_type="pvtc"),
    "lvtc": LVTC,
    "pvtc+lvtc": dict(projector_type="pvtc", **LVTC),
    "fastv": dict(text=dict(num_hidden_layers=4), fastv_layer=2, fastv_ratio=0.5),
}
VISION_PREFIXES = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.lvtc_lr_projectors.",
    "model.lvtc_hr_projector.",
)


def text_batch() -> dict:
    ids, mask = left_pad([prompt(9, seed=1), prompt(5, seed=2)])
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_padding_tiles_change_nothing_and_give_every_vision_module_a_zero_gradient(bundle, variant):
    model = bundle.model(seed=21, **variant).train()
    batch = text_batch()
    loss, grads = loss_and_grads(model, **batch)
    padded_loss, padded_grads = loss_and_grads(
        model, **batch, pixel_values=torch.zeros(1, *tiles(1).shape[1:]), image_flags=torch.zeros(1, dtype=torch.long)
    )
    torch.testing.assert_close(padded_loss, loss, rtol=0, atol=0)
    vision = [name for name in grads if name.startswith(VISION_PREFIXES)]
    assert vision and all(grads[name] is None for name in vision)  # without padding tiles: not in the graph
    for name, grad in padded_grads.items():
        if name.startswith(VISION_PREFIXES):
            assert grad is not None and not grad.any(), name  # in the graph, with a zero gradient
        else:
            torch.testing.assert_close(grad, grads[name], rtol=0, atol=0, msg=name)
    if model.config.lvtc_enabled:
        assert any(name.startswith("model.lvtc_lr_projectors.") for name in vision)


def test_padding_tiles_run_every_module_that_images_run_in_the_same_order(bundle):
    """What ZeRO-3 relies on: it gathers each module's parameters when the module runs, on every rank in turn."""
    model = bundle.model(seed=22, projector_type="pvtc", **LVTC).train()

    def order(**inputs) -> list[str]:
        calls = []
        hooks = [
            module.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
            for name, module in model.named_modules()
            if list(module.parameters(recurse=False))
        ]
        try:
            model(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return calls

    with_image = order(input_ids=torch.tensor([prompt(2, image_span(1, 4), 3)]), pixel_values=tiles(1))
    padded = order(
        input_ids=torch.tensor([prompt(8)]),
        pixel_values=torch.zeros(1, *tiles(1).shape[1:]),
        image_flags=torch.zeros(1, dtype=torch.long),
    )
    text_only = order(input_ids=torch.tensor([prompt(8)]))
    assert padded == with_image
    assert any(name.startswith("model.lvtc_hr_projector") for name in padded)
    assert text_only != with_image


def test_image_flags_all_one_are_the_images_as_without_flags(bundle):
    model = bundle.model(seed=23)
    ids = torch.tensor([prompt(2, image_span(2, 4), 3)])
    plain = model(input_ids=ids, pixel_values=tiles(2)).logits
    flagged = model(input_ids=ids, pixel_values=tiles(2), image_flags=torch.ones(2, dtype=torch.long)).logits
    torch.testing.assert_close(flagged, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ids,flags,message",
    [
        (prompt(2, image_span(2, 4)), [1, 0], r"marks 1 of 2 tiles as padding: .* cannot share a batch with images"),
        (prompt(8), [0], None),
        (prompt(2, image_span(2, 4)), [0, 0], "marks all 2 tiles as padding but the text has 8 image tokens"),
        (prompt(2, image_span(2, 4)), [1], r"a 0 or 1 for each of the 2 tiles of pixel_values, got \[1\] \(1 values\)"),
        (prompt(2, image_span(2, 4)), [1, 2], r"got \[1, 2\]"),
    ],
    ids=["mixed", "fine", "padding with image tokens", "too few", "not 0 or 1"],
)
def test_image_flags_that_do_not_fit_are_refused(bundle, ids, flags, message):
    model = bundle.model(seed=24)
    pixel_values = tiles(len(flags)) if message is None else tiles(2)
    inputs = dict(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_flags=torch.tensor(flags))
    if message is None:
        assert model(**inputs).logits.shape[1] == len(ids)
        return
    with pytest.raises(ValueError, match=message):
        model(**inputs)
