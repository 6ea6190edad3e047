"""Tiny source checkpoints written in the layouts the converters read (OpenGVLab InternViT / InternLM2, the authors'
released InternVL-X PVTC), with random tensors under the source names and shapes."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=56,
    patch_size=14,
    qkv_bias=True,
    qk_normalization=False,
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    initializer_factor=0.1,
    hidden_act="gelu",
)
INTERNLM2 = dict(
    architectures=["InternLM2ForCausalLM"],
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=512,
    bias=False,
    tie_word_embeddings=False,
    rope_scaling={"type": "dynamic", "factor": 2.0},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


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
    """A tiny checkpoint in the authors' released InternVL-X layout, with its InternLM2 tokenizer; returns its
    tensors."""
    t = RandomTensors(seed)
    llm = dict(INTERNLM2, vocab_size=train_sentencepiece(folder))
    internvit_tensors(t)
    internlm2_tensors(t, llm)
    side = VISION["image_size"] // VISION["patch_size"]
    released_pvtc_tensors(t, VISION["hidden_size"], llm["hidden_size"], 2, side // 2, pvtc_layers)
    config = dict(
        architectures=["InternVLChatModel"],
        vision_config=VISION,
        llm_config=llm,
        downsample_ratio=0.5,
        select_layer=-1,
        ps_version="v2",
        template="internlm2-chat",
    )
    write_checkpoint(folder, t, config, shards)
    return dict(t)


INTERNLM2_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
SAMPLE_TEXT = [
    "What digit is in the top-left? Read the digits left to right.",
    "你好，世界。这是一张图片。请描述图像中的内容。",
    "0123456789 3.14159 2026-11-22",
    "multiple   spaces\tand tabs\n\nnew lines  ",
    "Mixed 中文 and English 42 ✓ émoji 🙂",
]


def train_sentencepiece(
    folder: Path, add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False, normalization: str = "identity"
) -> int:
    """Train a small BPE sentencepiece model with byte fallback (as InternLM2's) and write InternLM2-style tokenizer
    files: `tokenizer.model`, `tokenizer_config.json` (remote tokenizer class, added tokens) and the special-token map.
    Returns the vocabulary size including the added tokens."""
    import io

    import sentencepiece as spm

    corpus = SAMPLE_TEXT * 30 + ["The image shows a cat on a red chair next to a window."] * 30
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["<|im_end|>", "<|im_start|>"],
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra_whitespaces,
        split_digits=True,
        normalization_rule_name=normalization,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    size = processor.get_piece_size()
    added = {str(processor.piece_to_id(t)): {"content": t, "special": True} for t in ("<|im_end|>", "<|im_start|>")}
    added.update({str(size + i): {"content": t, "special": True} for i, t in enumerate(INTERNLM2_SPECIALS)})
    tokenizer_config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False))
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return size + len(INTERNLM2_SPECIALS)


QWEN2 = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    use_sliding_window=False,
)


def qwen2_tensors(t: RandomTensors, llm: dict, prefix: str = "language_model") -> None:
    h, inter, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    head_dim = h // llm["num_attention_heads"]
    kv = llm["num_key_value_heads"] * head_dim
    t.put(f"{prefix}.model.embed_tokens.weight", vocab, h)
    for i in range(llm["num_hidden_layers"]):
        layer = f"{prefix}.model.layers.{i}"
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            t.put(f"{layer}.self_attn.{name}.weight", rows, h)
            t.put(f"{layer}.self_attn.{name}.bias", rows)
        t.put(f"{layer}.self_attn.o_proj.weight", h, h)
        t.put(f"{layer}.mlp.gate_proj.weight", inter, h)
        t.put(f"{layer}.mlp.up_proj.weight", inter, h)
        t.put(f"{layer}.mlp.down_proj.weight", h, inter)
        t.put(f"{layer}.input_layernorm.weight", h, mean=1.0)
        t.put(f"{layer}.post_attention_layernorm.weight", h, mean=1.0)
    t.put(f"{prefix}.model.norm.weight", h, mean=1.0)
    if not llm.get("tie_word_embeddings"):
        t.put(f"{prefix}.lm_head.weight", vocab, h)


def mlp1_tensors(t: RandomTensors, c: int, d: int, factor: int = 2) -> None:
    width = c * factor * factor
    t.put("mlp1.0.weight", width, mean=1.0)
    t.put("mlp1.0.bias", width)
    t.put("mlp1.1.weight", d, width)
    t.put("mlp1.1.bias", d)
    t.put("mlp1.3.weight", d, d)
    t.put("mlp1.3.bias", d)


def internvl2_checkpoint(folder: Path, llm: str = "internlm2", seed: int = 0, shards: int = 3, **tokenizer_options):
    """A tiny OpenGVLab-format InternVL2 checkpoint (InternViT + mlp1 + InternLM2 or Qwen2) with its tokenizer."""
    t = RandomTensors(seed)
    if llm == "internlm2":
        vocab = train_sentencepiece(folder, **tokenizer_options)
        llm_config = dict(INTERNLM2, vocab_size=vocab)
        internlm2_tensors(t, llm_config)
        template = "internlm2-chat"
    else:
        from devtools.bundle import Bundle
        from devtools.tokenizer import build_tokenizer

        prepare = Bundle().load("processing_internvl_x.prepare_tokenizer")
        tokenizer = build_tokenizer(prepare)
        tokenizer.save_pretrained(folder)
        llm_config = dict(
            QWEN2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
        qwen2_tensors(t, llm_config)
        template = "Hermes-2"
    internvit_tensors(t)
    mlp1_tensors(t, VISION["hidden_size"], llm_config["hidden_size"])
    config = dict(
        architectures=["InternVLChatModel"],
        vision_config=VISION,
        llm_config=llm_config,
        downsample_ratio=0.5,
        select_layer=-1,
        ps_version="v2",
        template=template,
    )
    write_checkpoint(folder, t, config, shards)
    return dict(t), config
