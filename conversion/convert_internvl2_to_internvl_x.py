"""Turn an InternVL2-family checkpoint into a ready-to-train (or ready-to-chat) InternVL-X folder, offline.

    python conversion/convert_internvl2_to_internvl_x.py --src OpenGVLab/InternVL2-2B --dst InternVL-X-2B-init \\
        [--projector pvtc|pixel_shuffle] [--lvtc/--no-lvtc] [--slicing ratio|area|edge] [--max-patches N] \\
        [--dtype bfloat16|float16|float32] [--push-to-hub REPO]

Sources: the OpenGVLab remote-code format (`InternVLChatModel`: InternViT `vision_model.*`, projector `mlp1.*`,
`language_model.*` as InternLM2, Qwen2 or Llama) and Transformers-native InternVL folders
(`InternVLForConditionalGeneration`, e.g. InternVL3-1B-hf). `--src` may be a Hub repo id, resolved from the local Hub
cache with `huggingface_hub.snapshot_download` (works with `HF_HUB_OFFLINE=1`).

How new modules start (also written into the output README):
- `--projector pixel_shuffle`: InternVL2's projector is copied exactly, so with `--no-lvtc` the result is InternVL2.
- `--projector pvtc`: PVTC is freshly initialised (the stage-1 training target); the InternVL2 projector is used only
  to start LVTC's projectors.
- LVTC's extra LR projectors (same M1 as InternVL2) are copies of InternVL2's projector. The HR projector (one patch
  per token) starts as InternVL2's projector applied to a window whose patches all equal that patch: its LayerNorm
  and first Linear fold the window positions into one, the rest is copied.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.common import (  # noqa: E402
    DTYPES,
    ConversionError,
    KeyMapper,
    ShardWriter,
    bundle_classes,
    check_arguments,
    convert_tensors,
    fail,
    has_tokenizer,
    hf_decoder_rules,
    internlm2_rules,
    internlm2_to_llama_config,
    internvit_rules,
    internvit_to_vision_config,
    main_with_clear_errors,
    push_to_hub,
    read_json,
    refuse_other_family,
    source_shards,
    staged_destination,
    tensor_names,
    write_chat_files,
)
from conversion.tokenizer import build_fast_tokenizer  # noqa: E402

PROJECTOR_PARTS = (
    "layer_norm.weight",
    "layer_norm.bias",
    "linear_1.weight",
    "linear_1.bias",
    "linear_2.weight",
    "linear_2.bias",
)
MLP1_PARTS = {
    "0.weight": "layer_norm.weight",
    "0.bias": "layer_norm.bias",
    "1.weight": "linear_1.weight",
    "1.bias": "linear_1.bias",
    "3.weight": "linear_2.weight",
    "3.bias": "linear_2.bias",
}


def resolve_source(src: str) -> Path:
    """A local folder, or a Hub repo id resolved through the Hub cache (`HF_HUB_OFFLINE=1` works once cached)."""
    path = Path(src)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=src))


def source_kind(config: dict) -> str:
    if "llm_config" in config:
        return "opengvlab"
    if config.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in (
        config.get("architectures") or []
    ):
        return "native"
    raise ConversionError("--src is neither an OpenGVLab InternVL2 checkpoint (llm_config) nor a native InternVL one")


def llm_family(llm: dict) -> str:
    architectures = llm.get("architectures") or []
    if "InternLM2ForCausalLM" in architectures or llm.get("model_type") == "internlm2":
        return "internlm2"
    if llm.get("model_type") in ("qwen2", "llama", "qwen3") or any(
        a in architectures for a in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")
    ):
        return "hf"
    raise ConversionError(f"unsupported language model {architectures or llm.get('model_type')}")


def text_config_of(config: dict, kind: str) -> dict:
    if kind == "native":
        return dict(config["text_config"])
    llm = config["llm_config"]
    if llm_family(llm) == "internlm2":
        return internlm2_to_llama_config(llm)
    text = {
        k: v for k, v in llm.items() if k not in ("architectures", "auto_map", "_name_or_path", "transformers_version")
    }
    text.setdefault("model_type", "qwen2" if "Qwen2ForCausalLM" in (llm.get("architectures") or []) else "llama")
    return text


def vision_config_of(config: dict, kind: str) -> dict:
    if kind == "native":
        return {k: v for k, v in config["vision_config"].items() if k not in ("architectures", "_name_or_path")}
    return internvit_to_vision_config(config["vision_config"])


def target_config(src_config: dict, kind: str, args, token_ids: dict) -> dict:
    text = text_config_of(src_config, kind)
    layers = text["num_hidden_layers"]
    expand = (3 * layers) // 4  # the paper's k = 3/4 of the depth; the extra LR projector enters at the middle
    config = dict(
        vision_config=vision_config_of(src_config, kind),
        text_config=text,
        downsample_ratio=src_config.get("downsample_ratio", 0.5),
        vision_feature_layer=src_config.get("select_layer", src_config.get("vision_feature_layer", -1)),
        projector_type=args.projector,
        lvtc_enabled=args.lvtc,
        lvtc_expand_layer=expand,
        lvtc_num_lr_projectors=2 if expand >= 1 else 1,
        lvtc_inject_start=min(layers // 2, max(expand - 1, 0)),
        architectures=["InternVLXForConditionalGeneration"],
        **token_ids,
    )
    if args.projector == "pvtc":
        config["pvtc_num_heads"] = args.pvtc_num_heads
    return config


def projector_rules(mapper: KeyMapper, kind: str, captured: dict) -> None:
    """InternVL2's projector tensors are captured (they seed several target modules) and emitted at the end."""

    def capture(part: str):
        return lambda match, tensor: captured.__setitem__(part, tensor) or []

    if kind == "opengvlab":
        for source, part in MLP1_PARTS.items():
            mapper.add(re.escape(f"mlp1.{source}"), capture(part))
    else:
        for part in PROJECTOR_PARTS:
            mapper.add(rf"(?:model\.)?multi_modal_projector\.{re.escape(part)}", capture(part))


def native_rules(mapper: KeyMapper) -> None:
    """Transformers-native InternVL: current (`model.*`) and older (`language_model.model.*`) layouts."""
    mapper.add(r"model\.(vision_tower|language_model)\.(.+)", r"model.\1.\2")
    mapper.add(r"vision_tower\.(.+)", r"model.vision_tower.\1")
    mapper.add(r"language_model\.model\.(.+)", r"model.language_model.\1")
    mapper.add(r"(?:language_model\.)?lm_head\.weight", "lm_head.weight")


def hr_projector_from(projector: dict, channels: int, m1: int, m2: int) -> dict:
    """InternVL2's projector (M1×M1 windows) evaluated on windows whose patches repeat an M2×M2 window, as an
    M2 projector: the LayerNorm over the repeated vector has the same statistics, so its affine part and the first
    Linear fold the M1² window positions onto the M2² ones."""
    ln_w, ln_b = projector["layer_norm.weight"], projector["layer_norm.bias"]
    w1, b1 = projector["linear_1.weight"], projector["linear_1.bias"]
    out = w1.shape[0]
    weight = torch.zeros(out, channels * m2 * m2, dtype=torch.float64)
    bias = b1.double() + w1.double() @ ln_b.double()
    for r in range(m1):
        for c in range(m1):
            src = slice((r * m1 + c) * channels, (r * m1 + c + 1) * channels)
            dst_index = (r % m2) * m2 + (c % m2)
            dst = slice(dst_index * channels, (dst_index + 1) * channels)
            weight[:, dst] += w1[:, src].double() * ln_w[src].double()
    dtype = w1.dtype
    return {
        "layer_norm.weight": torch.ones(channels * m2 * m2, dtype=dtype),
        "layer_norm.bias": torch.zeros(channels * m2 * m2, dtype=dtype),
        "linear_1.weight": weight.to(dtype),
        "linear_1.bias": bias.to(dtype),
        "linear_2.weight": projector["linear_2.weight"],
        "linear_2.bias": projector["linear_2.bias"],
    }


def derived_tensors(config, captured: dict) -> dict[str, torch.Tensor]:
    """Target tensors computed from InternVL2's projector, by the rules in this file's docstring."""
    missing = [p for p in PROJECTOR_PARTS if p not in captured]
    if missing:
        raise ConversionError(f"the source projector lacks {missing}")
    out = {}  # every target gets its own copy: safetensors refuses tensors that share memory
    captured = {part: tensor.clone() for part, tensor in captured.items()}
    if config.projector_type == "pixel_shuffle":
        out.update({f"model.multi_modal_projector.{p}": t for p, t in captured.items()})
    if config.lvtc_enabled:
        for j in range(config.lvtc_num_lr_projectors - 1):
            out.update({f"model.lvtc_lr_projectors.{j}.{p}": t.clone() for p, t in captured.items()})
        if config.lvtc_use_hr_projector and config.lvtc_expand_layer < config.text_config.num_hidden_layers:
            hr = hr_projector_from(
                captured, config.vision_config.hidden_size, config.downsample_factor, config.lvtc_hr_downsample_factor
            )
            out.update({f"model.lvtc_hr_projector.{p}": t.clone() for p, t in hr.items()})
    return out


class FreshInit:
    """Initial values for modules the source does not have, with the model's own `_init_weights`, module by module."""

    def __init__(self, model_class, config, seed: int):
        with torch.device("meta"):
            self.model = model_class(config)
        self.seed, self.done = seed, {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.done:
            parts = name.split(".")
            top = ".".join(parts[:2]) if parts[0] == "model" else parts[0]  # e.g. model.multi_modal_projector
            module = self.model.get_submodule(top).to_empty(device="cpu")
            torch.manual_seed(self.seed)
            for submodule in module.modules():
                self.model._init_weights(submodule)
            for key, tensor in module.state_dict().items():
                self.done[f"{top}.{key}"] = tensor.detach().clone()
        return self.done[name]


MODEL_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [internvl, internvl-x, custom_code]
base_model: [{base}]
---

# {name}

InternVL-X converted from `{base}` by `conversion/convert_internvl2_to_internvl_x.py`
(projector: `{projector}`, LVTC: {lvtc}, slicing: `{slicing}`, max tiles {max_patches}).

Load with `trust_remote_code=True` (see the InternVL-X bundle's README for usage).

How the weights were initialised:
- vision tower and language model: copied from `{base}` ({llm});
{projector_note}
{lvtc_note}
"""


def write_model_card(dst: Path, base: str, config, args, llm: str, name: str) -> None:
    if config.projector_type == "pixel_shuffle":
        projector_note = "- projector: InternVL2's `mlp1`, copied exactly;"
    else:
        projector_note = "- projector: PVTC, freshly initialised (train it first: stage 1 of the paper);"
    if config.lvtc_enabled:
        lvtc_note = (
            f"- LVTC (k = {config.lvtc_expand_layer}, T = {config.lvtc_num_lr_projectors}, s = "
            f"{config.lvtc_inject_start}): extra LR projectors copied from InternVL2's projector; the HR "
            "projector starts as InternVL2's projector applied to windows of one repeated patch."
        )
    else:
        lvtc_note = "- LVTC: off."
    (dst / "README.md").write_text(
        MODEL_CARD.format(
            base=base,
            name=name,
            projector=config.projector_type,
            lvtc="on" if config.lvtc_enabled else "off",
            slicing=args.slicing,
            max_patches=args.max_patches,
            llm=llm,
            projector_note=projector_note,
            lvtc_note=lvtc_note,
        )
    )


def convert(args) -> Path:
    """Convert `args.src` into `args.dst`, written in a staging folder and moved into place once complete."""
    check_arguments(args)
    src = resolve_source(args.src)
    dst = Path(args.dst)
    with staged_destination(args.dst, args.overwrite, src) as out:
        config = write_bundle(args, src, out, dst.name)
    print(
        f"wrote {dst}: projector {config.projector_type}, LVTC {'on' if config.lvtc_enabled else 'off'}, "
        f"{config.tokens_per_tile} tokens per tile, slicing {args.slicing}"
    )
    if args.push_to_hub:
        push_to_hub(dst, args.push_to_hub)
    return dst


def write_bundle(args, src: Path, dst: Path, name: str):
    """Every file of the converted checkpoint, written into `dst`; returns its config. `name`: the checkpoint's."""
    src_config = read_json(src / "config.json")
    shards = source_shards(src)
    refuse_other_family(tensor_names(shards), ("internvl2", "native"), src)
    kind = source_kind(src_config)
    config_class, model_class = bundle_classes()
    if not has_tokenizer(src):
        raise ConversionError(
            f"{src} has no tokenizer (tokenizer.model or tokenizer.json): the converted checkpoint needs the source's "
            "for its processor and to end chat turns at <|im_end|>."
        )
    tokenizer = build_fast_tokenizer(src)
    from devtools.bundle import Bundle

    prepare_tokenizer = Bundle().load("processing_internvl_x.prepare_tokenizer")
    vocab_before = len(tokenizer)
    token_ids = prepare_tokenizer(tokenizer)
    if len(tokenizer) != vocab_before:
        raise ConversionError("the source tokenizer lacks InternVL's special tokens; is this an InternVL2 checkpoint?")
    config = config_class(
        **target_config(
            src_config,
            kind,
            args,
            {
                "image_token_id": token_ids["<IMG_CONTEXT>"],
                "image_start_token_id": token_ids["<img>"],
                "image_end_token_id": token_ids["</img>"],
            },
        )
    )

    mapper, captured = KeyMapper(), {}
    llm = (
        "InternLM2 → Llama (wqkv split)"
        if kind == "opengvlab" and llm_family(src_config["llm_config"]) == "internlm2"
        else "same layout"
    )
    if kind == "opengvlab":
        internvit_rules(mapper)
        if llm_family(src_config["llm_config"]) == "internlm2":
            internlm2_rules(mapper, src_config["llm_config"])
        else:
            hf_decoder_rules(mapper)
    else:
        native_rules(mapper)
    projector_rules(mapper, kind, captured)

    with torch.device("meta"):
        expected = {n: t.shape for n, t in model_class(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    fresh_init = FreshInit(model_class, config, args.seed)
    derived: dict = {}

    # Modules InternVL2 does not have, initialised here; every other tensor must come from the source.
    new_modules = ("model.lvtc_lr_projectors.", "model.lvtc_hr_projector.")
    new_modules += ("model.multi_modal_projector.",) if config.projector_type == "pvtc" else ()

    def fresh(name: str) -> torch.Tensor | None:
        if not derived:
            derived.update(derived_tensors(config, captured))
        if name in derived:
            return derived[name]
        return fresh_init(name) if name.startswith(new_modules) else None

    writer = ShardWriter(dst, int(args.max_shard_size_gb * 2**30), DTYPES[args.dtype] if args.dtype else None)
    report = convert_tensors(shards, mapper, expected, writer, fresh=fresh)
    if report.problems():
        fail(report.problems())

    if args.dtype:
        config.dtype = args.dtype
    config.save_pretrained(dst)
    write_chat_files(dst, tokenizer, config, args.max_patches, args.slicing)
    write_model_card(dst, args.src, config, args, llm, name)
    return config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="checkpoint folder or Hub repo id (resolved from the Hub cache)")
    parser.add_argument("--dst", required=True, help="empty folder for the InternVL-X bundle")
    parser.add_argument("--projector", choices=["pvtc", "pixel_shuffle"], default="pvtc")
    parser.add_argument("--lvtc", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--slicing", choices=["ratio", "area", "edge"], default="edge")
    parser.add_argument("--max-patches", type=int, default=6)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--pvtc-num-heads", type=int, default=16)
    parser.add_argument("--max-shard-size-gb", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of freshly initialised modules")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the result with huggingface_hub")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    main_with_clear_errors(lambda: convert(args), Path(args.dst))


if __name__ == "__main__":
    main()
