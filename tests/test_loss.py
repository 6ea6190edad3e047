"""Training signal: the loss is the shifted cross entropy; gradients reach every part; checkpointing changes nothing."""

import pytest
import torch
import torch.nn.functional as F

from tests.utils.compat import CHECKPOINTING, enable_checkpointing
from tests.utils.tiny import IMG_CONTEXT, image_span, left_pad, prompt, tiles

TOKENS = 4


def batch():
    ids, mask = left_pad([prompt(3, image_span(2, TOKENS), 6, seed=1), prompt(4, image_span(1, TOKENS), 8, seed=2)])
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, : ids.shape[1] - 5] = -100  # supervise only the last 5 positions (the "answer")
    assert not (labels == IMG_CONTEXT).any()
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=tiles(3, seed=3))


@pytest.mark.compat
def test_loss_is_shifted_cross_entropy(bundle):
    model = bundle.model(seed=4)
    inputs = batch()
    out = model(**inputs)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = F.cross_entropy(logits, inputs["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)


def loss_and_grads(model):
    model.zero_grad()
    loss = model(**batch()).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_vision_tower_projector_and_language_model(bundle):
    model = bundle.model(seed=5).train()
    _, grads = loss_and_grads(model)
    for prefix in (
        "model.vision_tower.embeddings.patch_embeddings.projection.weight",
        "model.vision_tower.encoder.layer.0.attention",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.layer_norm.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.embed_tokens.weight",
        "lm_head.weight",
    ):
        names = [n for n in grads if n.startswith(prefix)]
        assert names, f"no gradient for {prefix}"
        assert all(grads[n].abs().sum() > 0 for n in names), f"zero gradient in {prefix}"


def test_gradient_checkpointing_gives_same_loss_and_gradients(bundle):
    model = bundle.model(seed=6).train()
    loss, grads = loss_and_grads(model)
    enable_checkpointing(model)
    assert getattr(model, f"is_{CHECKPOINTING}")
    loss_ckpt, grads_ckpt = loss_and_grads(model)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
