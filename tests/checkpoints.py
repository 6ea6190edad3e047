"""Tiny source checkpoints written in the layouts the converters read (OpenGVLab InternViT / InternLM2, the authors'
released InternVL-X PVTC), with random tensors under the source names and shapes."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
              patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
              initializer_factor=0.1, hidden_act="gelu")  # fmt: skip
INTERNLM2 = dict(architectures=["InternLM2ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                 max_position_embeddings=512, bias=False, tie_word_embeddings=False,
                 rope_scaling={"type": "dynamic", "factor": 2.0}, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)  # fmt: skip


class RandomTensors(dict):
    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def put(self, name: str, *shape: int, mean: float = 0.0) -> None:
        self[name] = mean + 0.2 * torch.randn(*shape, generator=self.generator)


def internvit_tensors(t: RandomTensors, v: dict = VISION, prefix: str = "vision_model") -> None:
    c, inter, side = v["hidden_size"], v["intermediate_size"], v["image_size"] // v["patch_size"]
    t.put(f"{prefix}.embeddings.class_embedding", 1, 1, c)
    t.put(f"{prefix}.embeddings.position_embedding", 1, 1 + side * side, c)
    t.put(f"{prefix}.embeddings.patch_embedding.weight", c, 3, v["patch_size"], v["patch_size"])
    t.put(f"{prefix}.embeddings.patch_embedding.bias", c)
    for i in range(v["num_hidden_layers"]):
        layer = f"{prefix}.encoder.layers.{i}"
        t.put(f"{layer}.attn.qkv.weight", 3 * c, c)
        t.put(f"{layer}.attn.qkv.bias", 3 * c)
        t.put(f"{layer}.attn.proj.weight", c, c)
        t.put(f"{layer}.attn.proj.bias", c)
        t.put(f"{layer}.ls1", c, mean=0.5)
        t.put(f"{layer}.ls2", c, mean=0.5)
        for norm in ("norm1", "norm2"):
            t.put(f"{layer}.{norm}.weight", c, mean=1.0)
            t.put(f"{layer}.{norm}.bias", c)
        t.put(f"{layer}.mlp.fc1.weight", inter, c)
        t.put(f"{layer}.mlp.fc1.bias", inter)
        t.put(f"{layer}.mlp.fc2.weight", c, inter)
        t.put(f"{layer}.mlp.fc2.bias", c)


def internlm2_tensors(t: RandomTensors, llm: dict = INTERNLM2, prefix: str = "language_model") -> None:
    h, inter, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    head_dim = h // llm["num_attention_heads"]
    qkv_rows = (llm["num_attention_heads"] + 2 * llm["num_key_value_heads"]) * head_dim
    t.put(f"{prefix}.model.tok_embeddings.weight", vocab, h)
    for i in range(llm["num_hidden_layers"]):
        layer = f"{prefix}.model.layers.{i}"
        t.put(f"{layer}.attention.wqkv.weight", qkv_rows, h)
        t.put(f"{layer}.attention.wo.weight", h, h)
        t.put(f"{layer}.feed_forward.w1.weight", inter, h)
        t.put(f"{layer}.feed_forward.w3.weight", inter, h)
        t.put(f"{layer}.feed_forward.w2.weight", h, inter)
        t.put(f"{layer}.attention_norm.weight", h, mean=1.0)
        t.put(f"{layer}.ffn_norm.weight", h, mean=1.0)
    t.put(f"{prefix}.model.norm.weight", h, mean=1.0)
    t.put(f"{prefix}.output.weight", vocab, h)


def released_pvtc_tensors(t: RandomTensors, c: int, d: int, factor: int, grid: int, layers: int = 1) -> None:
    for mlp, width in (("mlp1", c * factor * factor), ("mlp2", c), ("mlp3", c)):
        t.put(f"projector.{mlp}.0.weight", width, mean=1.0)
        t.put(f"projector.{mlp}.1.weight", d, width)
    t.put("projector.cls_scale", 1, grid, grid, d, mean=1.0)
    for path in ("local", "global"):
        for i in range(layers):
            block = f"projector.attn_{path}" + (f".{i}" if layers > 1 else "")
            for norm in ("attn.norm1", "attn.norm2", "mlp.norm"):
                t.put(f"{block}.{norm}.weight", d, mean=1.0)
            for proj in ("q", "k", "v", "proj"):
                t.put(f"{block}.attn.{proj}.weight", d, d)
            t.put(f"{block}.mlp.w1.weight", 4 * d, d)
            t.put(f"{block}.mlp.w3.weight", 4 * d, d)
            t.put(f"{block}.mlp.w2.weight", d, 4 * d)


def write_checkpoint(folder: Path, tensors: dict, config: dict, shards: int = 1) -> None:
    """Save `tensors` as `shards` safetensors files (with an index when more than one) and `config.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        chunk = names[i * per_shard : (i + 1) * per_shard]
        file = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    if shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def released_internvl_x(folder: Path, seed: int = 0, pvtc_layers: int = 1, shards: int = 2) -> dict:
    """A tiny checkpoint in the authors' released InternVL-X layout; returns its tensors."""
    t = RandomTensors(seed)
    internvit_tensors(t)
    internlm2_tensors(t)
    side = VISION["image_size"] // VISION["patch_size"]
    released_pvtc_tensors(t, VISION["hidden_size"], INTERNLM2["hidden_size"], 2, side // 2, pvtc_layers)
    config = dict(architectures=["InternVLChatModel"], vision_config=VISION, llm_config=INTERNLM2,
                  downsample_ratio=0.5, select_layer=-1, ps_version="v2", template="internlm2-chat")  # fmt: skip
    write_checkpoint(folder, t, config, shards)
    return dict(t)
