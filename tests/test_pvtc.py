"""PVTC (paper §3.1): shapes, window locality, a loop-and-softmax reference, and closed-form wiring checks."""

import pytest
import torch

from tests.utils.references import pvtc_reference
from tests.utils.tiny import image_span, prompt, tiles

C, D, HEADS = 16, 32, 4  # ViT width, LLM width, PVTC heads


def pvtc_config(bundle, side: int, factor: int, **overrides):
    """A config whose tile has `side`×`side` patches, merged by `factor` (patch size 2 keeps images small)."""
    return bundle.config(
        vision=dict(hidden_size=C, num_attention_heads=2, image_size=2 * side, patch_size=2),
        text=dict(hidden_size=D, num_attention_heads=4, head_dim=8),
        downsample_ratio=1 / factor,
        projector_type="pvtc",
        pvtc_num_heads=HEADS,
        **overrides,
    )


def projector(bundle, side=8, factor=2, seed=0, **overrides):
    torch.manual_seed(seed)
    module = bundle.load("modeling_internvl_x.InternVLXPVTCProjector")(pvtc_config(bundle, side, factor, **overrides))
    for parameter in module.parameters():  # random norms and scales, so no weight is a silent identity
        torch.nn.init.normal_(parameter, mean=1.0 if parameter.dim() == 1 else 0.0, std=0.2)
    return module.eval()


def features(tiles_count, side, seed=0):
    return torch.randn(tiles_count, 1 + side * side, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("side,factor", [(32, 2), (32, 4), (16, 1), (16, 8)])
@pytest.mark.parametrize("layers", [1, 2])
def test_shapes_and_gradients_reach_every_parameter(bundle, side, factor, layers):
    module = projector(bundle, side, factor, pvtc_num_layers=layers).train()
    out = module(features(2, side))
    grid = side // factor
    assert out.shape == (2, grid * grid, D)
    assert len(module.local_blocks) == len(module.global_blocks) == layers
    out.square().mean().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        if factor == 1 and any(f".attention.{part}." in name for part in ("q_proj", "k_proj", "query_norm")):
            # A 1×1 window has one key: its softmax weight is 1 whatever the scores, so in exact arithmetic they get
            # no gradient. The softmax backward p·(g - Σp·g) rounds to float32 epsilon times |g|, which depends on the
            # CPU's kernels: compare with the gradient of the same block's values, which does flow.
            values = module.get_parameter(name.rsplit(".attention.", 1)[0] + ".attention.v_proj.weight")
            assert parameter.grad.abs().max() <= 1e-5 * values.grad.abs().max(), name
        else:
            assert parameter.grad.abs().sum() > 0, name


def window_slice(side, factor, row, col):
    """Indices (CLS included at 0) of the ViT tokens of window (row, col)."""
    return [1 + (row * factor + r) * side + col * factor + c for r in range(factor) for c in range(factor)]


@pytest.mark.parametrize("path", ["local", "global"])
def test_changing_one_window_changes_only_that_output_token(bundle, path):
    side, factor = 8, 2
    module = projector(bundle, side, factor, pvtc_use_local=path == "local", pvtc_use_global=path == "global")
    x = features(1, side)
    y = x.clone()
    y[0, window_slice(side, factor, 1, 2)] += torch.randn(factor * factor, C)
    with torch.no_grad():
        delta = (module(y) - module(x)).abs().amax(-1)[0]  # (N²,)
    changed = (delta > 1e-6).nonzero().flatten().tolist()
    assert changed == [1 * (side // factor) + 2]


def test_cls_changes_every_output_through_the_global_path_only(bundle):
    side = 8
    x = features(1, side)
    y = x.clone()
    y[0, 0] += torch.randn(C)
    both = projector(bundle, side, seed=1)
    local_only = projector(bundle, side, seed=1, pvtc_use_global=False)
    with torch.no_grad():
        assert ((both(y) - both(x)).abs().amax(-1) > 1e-6).all()
        assert torch.equal(local_only(y), local_only(x))


def released_names(module):
    """`w(name)`: the module's weights under the released checkpoints' names (the test's own table)."""
    table = {"mlp1": module.local_mlp, "mlp2": module.cls_mlp, "mlp3": module.kv_mlp}
    parts = {
        "attn.norm1": "attention.query_norm",
        "attn.norm2": "attention.key_value_norm",
        "attn.q": "attention.q_proj",
        "attn.k": "attention.k_proj",
        "attn.v": "attention.v_proj",
        "attn.proj": "attention.o_proj",
        "mlp.norm": "mlp.norm",
        "mlp.w1": "mlp.gate_proj",
        "mlp.w3": "mlp.up_proj",
        "mlp.w2": "mlp.down_proj",
    }

    def w(name):
        if name == "cls_scale":
            return module.cls_scale
        head, _, rest = name.partition(".")
        if head in table:
            return (table[head].norm if rest == "0" else table[head].linear).weight
        path = head.removeprefix("attn_")
        index, _, part = rest.partition(".") if rest[0].isdigit() else ("0", "", rest)
        blocks = module.local_blocks if path == "local" else module.global_blocks
        return blocks[int(index)].get_submodule(parts[part]).weight

    return w


@pytest.mark.parametrize("side,factor,layers", [(8, 2, 1), (8, 4, 2), (4, 1, 1)])
def test_vectorised_module_equals_loop_reference(bundle, side, factor, layers):
    module = projector(bundle, side, factor, seed=2, pvtc_num_layers=layers)
    x = features(2, side, seed=3)
    with torch.no_grad():
        out = module(x)
        for tile in range(2):
            expected = pvtc_reference(released_names(module), x[tile], side, factor, HEADS, layers)
            torch.testing.assert_close(out[tile], expected, rtol=0, atol=1e-5)


def test_local_only_with_zeroed_outputs_is_local_mlp_of_pixel_shuffle(bundle):
    side, factor = 8, 2
    module = projector(bundle, side, factor, seed=4, pvtc_use_global=False, pvtc_num_layers=2)
    for block in module.local_blocks:
        torch.nn.init.zeros_(block.attention.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
    pixel_shuffle = bundle.load("modeling_internvl_x.pixel_shuffle")
    x = features(3, side, seed=5)
    with torch.no_grad():
        expected = module.local_mlp(pixel_shuffle(x[:, 1:].reshape(3, side, side, C), factor)).reshape(3, -1, D)
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)


def test_fixed_cls_scale_has_no_parameter(bundle):
    module = projector(bundle, pvtc_learnable_cls_scale=False)
    assert not any("cls_scale" in name for name, _ in module.named_parameters())


def test_drop_path_is_identity_in_eval_and_random_in_training(bundle):
    module = projector(bundle, seed=6, pvtc_drop_path_rate=0.5)
    x = features(4, 8)
    with torch.no_grad():
        assert torch.equal(module(x), module(x))
        module.train()
        torch.manual_seed(0)
        a = module(x)
        torch.manual_seed(1)
        assert not torch.equal(a, module(x))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(pvtc_num_heads=5), "pvtc_num_heads 5 must divide the language model's hidden size 64"),
        (dict(pvtc_use_local=False, pvtc_use_global=False), "at least one path"),
        (dict(pvtc_num_layers=0), "pvtc_num_layers must be ≥ 1"),
    ],
)
def test_invalid_pvtc_configs_are_refused(bundle, overrides, message):
    with pytest.raises(ValueError, match=message):
        bundle.config(projector_type="pvtc", **overrides)


@pytest.mark.compat
def test_pvtc_model_generates_and_round_trips(bundle, tmp_path):
    from transformers import AutoModelForImageTextToText

    model = bundle.model(seed=7, projector_type="pvtc", pvtc_num_heads=4)
    inputs = dict(input_ids=torch.tensor([prompt(3, image_span(2, 4), 4)]), pixel_values=tiles(2))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
        out = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    cls_scale = reloaded.model.multi_modal_projector.cls_scale
    assert cls_scale.shape == (1, 2, 2, 64) and torch.equal(cls_scale, model.model.multi_modal_projector.cls_scale)


def test_pixel_shuffle_puts_each_window_in_row_major_order(bundle):
    pixel_shuffle = bundle.load("modeling_internvl_x.pixel_shuffle")
    grid = torch.arange(16.0).reshape(1, 4, 4, 1)
    expected = torch.tensor([[[0.0, 1, 4, 5], [2, 3, 6, 7]], [[8, 9, 12, 13], [10, 11, 14, 15]]])
    assert torch.equal(pixel_shuffle(grid, 2)[0], expected)
