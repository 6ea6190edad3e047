"""Helpers shared by the benchmark suites: the bundle's classes and the InternVL-X-2B geometry."""

from pathlib import Path

from devtools.bundle import ROOT, Bundle


def bundle_classes() -> Bundle:
    """The bundle's classes (`Config`, `ForConditionalGeneration`, ...), loaded from the repository folder."""
    return Bundle()


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
        max_position_embeddings=32768,  # InternLM2-chat-1.8B's
        rope_theta=1e6,
        tie_word_embeddings=False,
        pad_token_id=2,
        eos_token_id=2,
    )
    return dict(vision_config=vision, text_config=text, **overrides)


PEAK_RSS_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from conversion import convert_internvl2_to_internvl_x as script
from conversion.common import bundle_classes
import sentencepiece, tokenizers, safetensors  # noqa: F401  (imported before measuring)
bundle_classes()

def kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
before = kb("VmRSS")
script.main({argv!r})
print(json.dumps({{"rss_before_mb": before / 1024, "peak_mb": kb("VmHWM") / 1024,
                  "peak_growth_mb": (kb("VmHWM") - before) / 1024}}))
"""


def conversion_peak_rss(argv: list[str]) -> dict:
    """Run `convert_internvl2_to_internvl_x.py argv` in a fresh process and report its resident memory: the RSS once
    Python, torch and the converter are imported, and how far the conversion raised the high-water mark above it."""
    import json
    import subprocess
    import sys

    code = PEAK_RSS_PROBE.format(root=str(ROOT), argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def wide_internvl2_checkpoint(folder: Path, layers: int, intermediate: int, shards: int) -> list[int]:
    """A tiny-width InternVL2 checkpoint (OpenGVLab layout, InternLM2) made large by a wide MLP and many layers;
    returns the shard sizes in bytes."""
    from devtools.checkpoints import (
        INTERNLM2,
        VISION,
        RandomTensors,
        internlm2_tensors,
        internvit_tensors,
        mlp1_tensors,
        train_sentencepiece,
        write_checkpoint,
    )

    vocab = train_sentencepiece(folder)
    llm = dict(INTERNLM2, vocab_size=vocab, num_hidden_layers=layers, intermediate_size=intermediate)
    tensors = RandomTensors(0)
    internvit_tensors(tensors)
    internlm2_tensors(tensors, llm)
    mlp1_tensors(tensors, VISION["hidden_size"], llm["hidden_size"])
    config = dict(
        architectures=["InternVLChatModel"],
        vision_config=VISION,
        llm_config=llm,
        downsample_ratio=0.5,
        select_layer=-1,
        template="internlm2-chat",
    )
    write_checkpoint(folder, tensors, config, shards)
    return sorted(p.stat().st_size for p in folder.glob("model-*.safetensors"))
