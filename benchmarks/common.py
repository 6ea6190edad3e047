"""Helpers shared by the benchmark suites: the bundle's classes and the InternVL-X-2B geometry."""

from pathlib import Path
from types import SimpleNamespace

from transformers.dynamic_module_utils import get_class_from_dynamic_module

ROOT = Path(__file__).resolve().parents[1]


def bundle_classes() -> SimpleNamespace:
    """The bundle's classes, loaded from the repository folder the way `trust_remote_code` loads them."""
    return SimpleNamespace(
        Config=get_class_from_dynamic_module("configuration_internvl_x.InternVLXConfig", ROOT),
        ForConditionalGeneration=get_class_from_dynamic_module(
            "modeling_internvl_x.InternVLXForConditionalGeneration", ROOT
        ),
    )


def geometry(device: str, quick: bool = False, **overrides) -> dict:
    """InternVL-X-2B geometry: 448px tiles, patch 14 (1024 patches + CLS), 256 visual tokens per tile, 24 LLM layers.

    On a GPU the widths are the real ones (ViT 1024, LLM 2048). On the CPU the widths are reduced (ViT 256, LLM 512)
    while every sequence length and layer count stays the 2B one, so token-count ratios carry over. `quick` also cuts
    the layer counts, for smoke runs only.
    """
    full = device == "cuda"
    vision = dict(
        hidden_size=1024 if full else 256,
        num_attention_heads=16 if full else 4,
        intermediate_size=4096 if full else 1024,
        num_hidden_layers=2 if quick else 24,
        image_size=448,
        patch_size=14,
        attention_bias=True,
    )
    text = dict(
        model_type="llama",
        hidden_size=2048 if full else 512,
        intermediate_size=8192 if full else 2048,
        num_attention_heads=16 if full else 8,
        num_key_value_heads=8 if full else 4,
        head_dim=128 if full else 64,
        num_hidden_layers=4 if quick else 24,
        vocab_size=92553,
        rope_theta=1e6,
        tie_word_embeddings=False,
        pad_token_id=2,
        eos_token_id=2,
    )
    return dict(vision_config=vision, text_config=text, **overrides)
