"""Convert the authors' released InternVL-X checkpoints (Transformers 4.37-era `InternVLChatModel`) to this bundle.

    python conversion/convert_official_internvl_x.py --src InternVL-X-2B --dst InternVL-X-2B-hf [--dtype bfloat16]

The released layout: `vision_model.*` (InternViT, fused qkv), `language_model.*` (InternLM2, fused wqkv) and the
PVTC projector under `projector.*` (`mlp1` local, `mlp2` CLS, `mlp3` key/value MLPs as RMSNorm + Linear, `cls_scale`,
`attn_local` / `attn_global` blocks). Every tensor is mapped; a checkpoint whose keys or shapes do not match is
refused with the full list.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conversion.common import (  # noqa: E402
    DTYPES,
    ConversionError,
    KeyMapper,
    ShardWriter,
    bundle_classes,
    check_arguments,
    convert_tensors,
    expected_shapes,
    fail,
    has_tokenizer,
    internlm2_rules,
    internlm2_to_llama_config,
    internvit_rules,
    internvit_to_vision_config,
    main_with_clear_errors,
    read_json,
    refuse_other_family,
    source_shards,
    staged_destination,
    write_chat_files,
)
from conversion.tokenizer import build_fast_tokenizer  # noqa: E402

BLOCK_PARTS = {
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
INPUT_MLPS = {"mlp1": "local_mlp", "mlp2": "cls_mlp", "mlp3": "kv_mlp"}


def pvtc_rules(mapper: KeyMapper, src: str = "projector", dst: str = "model.multi_modal_projector") -> None:
    """Released PVTC names → ours. `attn_local.*` is block 0; a layer index (`attn_local.1.*`) selects block 1."""
    mapper.add(
        rf"{src}\.(mlp[123])\.([01])\.weight",
        lambda m, t: [(f"{dst}.{INPUT_MLPS[m.group(1)]}.{'norm' if m.group(2) == '0' else 'linear'}.weight", t)],
    )
    mapper.add(rf"{src}\.cls_scale", rf"{dst}.cls_scale")
    parts = "|".join(re.escape(p) for p in BLOCK_PARTS)

    def block(match: re.Match, tensor: torch.Tensor):
        path, index, part = match.group(1), match.group(2) or "0", match.group(3)
        return [(f"{dst}.{path}_blocks.{index}.{BLOCK_PARTS[part]}.weight", tensor)]

    mapper.add(rf"{src}\.attn_(local|global)\.(?:(\d+)\.)?({parts})\.weight", block)


def pvtc_layout(shards_keys: list[str]) -> dict:
    """PVTC switches implied by which released tensors exist."""
    layers = {int(m.group(1)) for k in shards_keys if (m := re.search(r"attn_local\.(\d+)\.", k))}
    return dict(
        pvtc_use_local=any(".attn_local." in k for k in shards_keys),
        pvtc_use_global=any(".attn_global." in k for k in shards_keys),
        pvtc_learnable_cls_scale=any(k.endswith("projector.cls_scale") for k in shards_keys),
        pvtc_num_layers=max(layers) + 1 if layers else 1,
    )


def target_config(src_config: dict, keys: list[str], num_heads: int) -> dict:
    llm = src_config["llm_config"]
    if "InternLM2ForCausalLM" not in (llm.get("architectures") or ["InternLM2ForCausalLM"]):
        raise ConversionError(f"the released InternVL-X models use InternLM2; got {llm.get('architectures')}")
    return dict(
        vision_config=internvit_to_vision_config(src_config["vision_config"]),
        text_config=internlm2_to_llama_config(llm),
        downsample_ratio=src_config.get("downsample_ratio", 0.5),
        vision_feature_layer=src_config.get("select_layer", -1),
        projector_type="pvtc",
        pvtc_num_heads=num_heads,
        architectures=["InternVLXForConditionalGeneration"],
        **pvtc_layout(keys),
    )


def convert(args) -> Path:
    """Convert `args.src` into `args.dst`, written in a staging folder and moved into place once complete."""
    check_arguments(args)
    src, dst = Path(args.src), Path(args.dst)
    with staged_destination(args.dst, args.overwrite, src) as out:
        config, count = write_bundle(args, src, out)
    print(
        f"converted {count} tensors into {dst} (PVTC: {config.pvtc_num_layers} layer(s), "
        f"{config.pvtc_num_heads} heads, {config.tokens_per_tile} tokens per tile)"
    )
    return dst


def write_bundle(args, src: Path, dst: Path):
    """Every file of the converted checkpoint, written into `dst`; returns its config and the tensor count."""
    from safetensors import safe_open

    src_config = read_json(src / "config.json")
    shards = source_shards(src)
    keys = []
    for shard in shards:
        with safe_open(shard, framework="pt") as reader:
            keys += list(reader.keys())
    refuse_other_family(keys, ("internvl-x",), src)
    if not has_tokenizer(src):
        raise ConversionError(
            f"{src} has no tokenizer (tokenizer.model or tokenizer.json): the released checkpoints ship InternLM2's, "
            "and the converted one needs it for its processor and to end chat turns at <|im_end|>."
        )
    tokenizer = build_fast_tokenizer(src)
    from devtools.bundle import Bundle

    token_ids = Bundle().load("processing_internvl_x.prepare_tokenizer")(tokenizer)
    config_class, model_class = bundle_classes()
    config = config_class(**target_config(src_config, keys, args.pvtc_num_heads))
    config.image_token_id = token_ids["<IMG_CONTEXT>"]
    config.image_start_token_id = token_ids["<img>"]
    config.image_end_token_id = token_ids["</img>"]
    mapper = KeyMapper()
    internvit_rules(mapper)
    internlm2_rules(mapper, src_config["llm_config"])
    pvtc_rules(mapper)
    writer = ShardWriter(dst, int(args.max_shard_size_gb * 2**30), DTYPES[args.dtype] if args.dtype else None)
    report = convert_tensors(shards, mapper, expected_shapes(model_class, config), writer)
    if report.problems():
        fail(report.problems())
    if args.dtype:
        config.dtype = args.dtype
    config.save_pretrained(dst)
    write_chat_files(dst, tokenizer, config, args.max_patches, args.slicing)
    return config, len(keys)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder of the released checkpoint")
    parser.add_argument("--dst", required=True, help="empty folder for the converted bundle")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--pvtc-num-heads", type=int, default=16, help="heads of the released PVTC blocks")
    parser.add_argument("--slicing", choices=["ratio", "area", "edge"], default="edge")
    parser.add_argument("--max-patches", type=int, default=6)
    parser.add_argument("--max-shard-size-gb", type=float, default=2.0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    args = parser.parse_args(argv)
    main_with_clear_errors(lambda: convert(args), Path(args.dst))


if __name__ == "__main__":
    main()
