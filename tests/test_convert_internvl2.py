"""conversion/convert_internvl2_to_internvl_x.py: OpenGVLab InternVL2 (InternLM2, Qwen2) and native InternVL folders
become InternVL-X bundles that load cleanly and keep InternVL2's numbers."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from conversion import convert_internvl2_to_internvl_x as convert_script
from devtools.bundle import BUNDLE_FILES, ROOT
from devtools.checkpoints import INTERNLM2, SAMPLE_TEXT, VISION, internvl2_checkpoint
from tests.utils.tiny import native_reference


def convert(src, dst, *flags):
    convert_script.main(["--src", str(src), "--dst", str(dst), *flags])


def load(folder):
    model, info = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("internvl2_internlm2")
    tensors, config = internvl2_checkpoint(folder / "src", llm="internlm2")
    dst = folder / "plain"
    convert(folder / "src", dst, "--projector", "pixel_shuffle", "--no-lvtc")
    return folder, tensors, config, load(dst)


def test_outputs_of_a_conversion(internlm2):
    folder, _, _, model = internlm2
    files = {p.name for p in (folder / "plain").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "README.md",
        *BUNDLE_FILES,
    } <= files
    processor = AutoProcessor.from_pretrained(folder / "plain", trust_remote_code=True)
    assert processor.image_seq_length == model.config.tokens_per_tile
    assert processor.image_processor.slicing == "edge" and processor.image_processor.max_patches == 6
    assert model.config.text_config.model_type == "llama"
    assert model.config.text_config.rope_parameters["rope_type"] == "dynamic"
    assert "copied exactly" in (folder / "plain" / "README.md").read_text()


def rope(x, positions, theta):
    """Rotary embedding on (L, heads, hd) with the rotate-half layout InternLM2 and Llama share."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[:, None].double() * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def internlm2_attention(x, wqkv, wo, heads, kv_heads, theta):
    """InternLM2 attention computed from the fused `wqkv` ([q × heads/kv_heads, k, v] per KV head), causal."""
    length, hidden = x.shape
    head_dim, groups = hidden // heads, heads // kv_heads
    qkv = (x @ wqkv.T).view(length, kv_heads, groups + 2, head_dim)
    q = qkv[:, :, :groups].reshape(length, heads, head_dim)
    k, v = qkv[:, :, groups], qkv[:, :, groups + 1]
    positions = torch.arange(length)
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    out = torch.empty(length, heads, head_dim, dtype=x.dtype)
    causal = torch.ones(length, length).tril().bool()
    for h in range(heads):
        scores = (q[:, h] @ k[:, h // groups].T) / math.sqrt(head_dim)
        out[:, h] = torch.softmax(scores.masked_fill(~causal, -math.inf), -1) @ v[:, h // groups]
    return out.reshape(length, hidden) @ wo.T


def test_llm_attention_equals_internlm2_from_fused_wqkv(internlm2):
    _, tensors, _, model = internlm2
    model = model.double()
    x = torch.randn(7, INTERNLM2["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lm = model.model.language_model
    position_embeddings = lm.rotary_emb(x[None], torch.arange(7)[None])
    ours, _ = lm.layers[1].self_attn(
        hidden_states=x[None], position_embeddings=position_embeddings, attention_mask=None
    )
    layer = "language_model.model.layers.1.attention"
    expected = internlm2_attention(
        x,
        tensors[f"{layer}.wqkv.weight"].double(),
        tensors[f"{layer}.wo.weight"].double(),
        INTERNLM2["num_attention_heads"],
        INTERNLM2["num_key_value_heads"],
        INTERNLM2["rope_theta"],
    )
    # float64 throughout except the model's rotary tables, which Transformers computes in float32
    torch.testing.assert_close(ours[0], expected, rtol=0, atol=1e-6)


def internvit_layer(x, t, prefix, heads):
    """One InternViT block from its OpenGVLab tensors: fused qkv, layer scales, pre-norms."""
    length, channels = x.shape
    ln = lambda v, n: F.layer_norm(v, (channels,), t[f"{prefix}.{n}.weight"], t[f"{prefix}.{n}.bias"], 1e-6)  # noqa: E731
    qkv = ln(x, "norm1") @ t[f"{prefix}.attn.qkv.weight"].T + t[f"{prefix}.attn.qkv.bias"]
    q, k, v = qkv.view(length, 3, heads, channels // heads).unbind(1)
    weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(channels // heads), -1)
    attended = torch.einsum("hqk,khd->qhd", weights, v).reshape(length, channels)
    x = x + t[f"{prefix}.ls1"] * (attended @ t[f"{prefix}.attn.proj.weight"].T + t[f"{prefix}.attn.proj.bias"])
    hidden = F.gelu(ln(x, "norm2") @ t[f"{prefix}.mlp.fc1.weight"].T + t[f"{prefix}.mlp.fc1.bias"])
    return x + t[f"{prefix}.ls2"] * (hidden @ t[f"{prefix}.mlp.fc2.weight"].T + t[f"{prefix}.mlp.fc2.bias"])


def test_vision_layer_equals_internvit_from_fused_qkv(internlm2):
    _, tensors, _, model = internlm2
    model = model.double()
    x = torch.randn(17, VISION["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = model.model.vision_tower.encoder.layer[1](x[None])[0]
    t = {k: v.double() for k, v in tensors.items()}
    expected = internvit_layer(x, t, "vision_model.encoder.layers.1", VISION["num_attention_heads"])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


def test_pixel_shuffle_conversion_equals_native_internvl(internlm2):
    _, _, _, model = internlm2
    model = model.float()
    native = native_reference(model)
    tokens = model.config.tokens_per_tile
    ids = torch.tensor(
        [
            [1, 40, 41]
            + [model.config.image_start_token_id]
            + [model.config.image_token_id] * (2 * tokens)
            + [model.config.image_end_token_id, 50, 51]
        ]
    )
    pixel_values = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, pixel_values=pixel_values).logits,
            native(input_ids=ids, pixel_values=pixel_values).logits,
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize(
    "dummy_prefix,strip_spaces,rule",
    [(True, False, "identity"), (False, False, "identity"), (True, True, "nmt_nfkc"), (False, False, "nfkc")],
)
def test_tokenizer_round_trips_like_sentencepiece(tmp_path, dummy_prefix, strip_spaces, rule):
    import sentencepiece as spm

    from conversion.tokenizer import build_fast_tokenizer
    from devtools.checkpoints import train_sentencepiece

    train_sentencepiece(
        tmp_path, add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=strip_spaces, normalization=rule
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    fast = build_fast_tokenizer(tmp_path)
    for text in SAMPLE_TEXT + ["", " leading space", "trailing space ", "tab\tsep", "ΑΒΓ кириллица 漢字かな"]:
        ids = sp.encode(text)
        assert fast(text, add_special_tokens=False)["input_ids"] == ids, text
        assert fast.decode(ids) == sp.decode(ids), text
        if rule == "identity" and not strip_spaces:
            assert fast.decode(ids) == text  # nothing normalized away: the exact text comes back
    for token in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"):
        ids = fast(f"a{token}b", add_special_tokens=False)["input_ids"]
        assert fast.convert_tokens_to_ids(token) in ids and len(fast.tokenize(token)) == 1
    assert fast("hi")["input_ids"][0] == fast.bos_token_id


def test_converted_tokenizer_round_trips(internlm2):
    folder, *_ = internlm2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "src" / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(folder / "plain")
    for text in SAMPLE_TEXT:
        assert fast(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
        assert fast.decode(sp.encode(text)) == text


def test_lvtc_projectors_start_from_internvl2(internlm2, tmp_path):
    folder, tensors, _, _ = internlm2
    convert(folder / "src", tmp_path / "x", "--projector", "pixel_shuffle", "--lvtc")
    model = load(tmp_path / "x").double()
    t = {k: v.double() for k, v in tensors.items()}
    lr = model.model.lvtc_lr_projectors[0]
    assert torch.equal(lr.linear_1.weight, t["mlp1.1.weight"]) and torch.equal(lr.layer_norm.bias, t["mlp1.0.bias"])
    side, channels = 4, VISION["hidden_size"]
    x = torch.randn(2, 1 + side * side, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hr = model.model.lvtc_hr_projector(x)  # (2, 16, D): one token per patch
    # InternVL2's projector on 2×2 windows whose four patches all equal the patch
    patches = x[:, 1:].reshape(2, side, side, channels)
    window = patches[..., None, :].expand(2, side, side, 4, channels).reshape(2, side * side, 4 * channels)
    hidden = F.layer_norm(window, (4 * channels,), t["mlp1.0.weight"], t["mlp1.0.bias"])
    expected = F.gelu(hidden @ t["mlp1.1.weight"].T + t["mlp1.1.bias"]) @ t["mlp1.3.weight"].T + t["mlp1.3.bias"]
    torch.testing.assert_close(hr, expected, rtol=0, atol=1e-5)  # the folded weights are stored in float32


def test_pvtc_is_freshly_initialised_and_reproducible(internlm2, tmp_path):
    folder, *_ = internlm2
    for name in ("a", "b"):
        convert(folder / "src", tmp_path / name, "--projector", "pvtc", "--pvtc-num-heads", "4", "--seed", "7")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(
        a["model.multi_modal_projector.cls_scale"], torch.ones_like(a["model.multi_modal_projector.cls_scale"])
    )
    assert 0.01 < a["model.multi_modal_projector.kv_mlp.linear.weight"].std() < 0.03
    assert "freshly initialised" in (tmp_path / "a" / "README.md").read_text()
    model = load(tmp_path / "a")
    assert model.config.projector_type == "pvtc" and model.config.lvtc_enabled


def test_qwen2_variant_with_tied_embeddings(tmp_path):
    tensors, config = internvl2_checkpoint(tmp_path / "src", llm="qwen2", shards=2)
    convert(tmp_path / "src", tmp_path / "dst", "--projector", "pixel_shuffle", "--no-lvtc", "--dtype", "bfloat16")
    model = load(tmp_path / "dst")
    assert model.config.text_config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    expected = tensors["language_model.model.layers.0.self_attn.q_proj.bias"].to(torch.bfloat16)
    assert torch.equal(model.model.language_model.layers[0].self_attn.q_proj.bias, expected)


def test_native_internvl_folder_converts_back(internlm2, tmp_path):
    """A Transformers-native InternVL checkpoint (what `InternVLForConditionalGeneration.save_pretrained` writes)."""
    folder, _, _, model = internlm2
    native = native_reference(model.float())
    native.save_pretrained(tmp_path / "native")
    AutoTokenizer.from_pretrained(folder / "plain").save_pretrained(tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "x", "--projector", "pixel_shuffle", "--no-lvtc")
    converted = load(tmp_path / "x")
    for name, tensor in native.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


def test_hub_repo_id_resolves_from_the_offline_cache(internlm2, tmp_path):
    folder, *_ = internlm2
    snapshot = tmp_path / "hub" / "models--OpenGVLab--InternVL2-tiny" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(folder / "src", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "conversion" / "convert_internvl2_to_internvl_x.py"),
            "--src",
            "OpenGVLab/InternVL2-tiny",
            "--dst",
            str(tmp_path / "dst"),
            "--projector",
            "pixel_shuffle",
            "--no-lvtc",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["model_type"] == "internvl_x"
    assert not any((tmp_path / "hub").rglob("*.incomplete"))


def test_bad_source_is_refused_with_the_list(internlm2, tmp_path, capsys):
    folder, *_ = internlm2
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(folder / "src", tmp_path / "src")
    shard = sorted((tmp_path / "src").glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)
    tensors["vision_model.extra.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    with pytest.raises(SystemExit) as exit_info:
        convert(tmp_path / "src", tmp_path / "dst", "--projector", "pixel_shuffle", "--no-lvtc")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "vision_model.extra.weight" in err and "mis-shaped" in err
