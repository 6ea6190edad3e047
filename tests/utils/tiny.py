"""Tiny InternVL-X geometry used across the tests, and helpers that build prompts and the native reference."""

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

VOCAB_SIZE = 128
PAD, BOS, EOS = 0, 1, 2
IMG_START, IMG_END, IMG_CONTEXT = 118, 119, 120
IMAGE_SIZE, PATCH_SIZE = 56, 14  # S = 4 patches per side; with M = 2 each tile gives 4 visual tokens


def tiny_config_kwargs(vision=None, text=None, **overrides) -> dict:
    vision_config = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        attention_bias=True,
        layer_norm_eps=1e-6,
    )
    text_config = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        rope_theta=10000.0,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    vision_config.update(vision or {})
    text_config.update(text or {})
    kwargs = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMG_CONTEXT,
        image_start_token_id=IMG_START,
        image_end_token_id=IMG_END,
        downsample_ratio=0.5,
    )
    kwargs.update(overrides)
    return kwargs


def image_span(num_tiles: int, tokens_per_tile: int) -> list[int]:
    return [IMG_START] + [IMG_CONTEXT] * (num_tiles * tokens_per_tile) + [IMG_END]


def prompt(*parts, seed: int = 0) -> list[int]:
    """Concatenate parts: an int n gives n random text tokens, a list is inserted as is."""
    generator = torch.Generator().manual_seed(seed)
    ids = [BOS]
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(3, IMG_START, (part,), generator=generator).tolist()
        else:
            ids += list(part)
    return ids


def left_pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a batch: `(input_ids, attention_mask)`, both `(batch, longest)`."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, longest - len(seq) :] = torch.tensor(seq)
        attention_mask[row, longest - len(seq) :] = 1
    return input_ids, attention_mask


def tiles(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def native_reference(model) -> InternVLForConditionalGeneration:
    """`transformers.InternVLForConditionalGeneration` holding `model`'s weights (pixel-shuffle projector)."""
    config = model.config
    native_config = InternVLConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=config.vision_feature_layer,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    native = InternVLForConditionalGeneration(native_config).eval()
    result = native.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return native


# InternVL2's default system message, written out: the oracle the chat template is compared with.
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
