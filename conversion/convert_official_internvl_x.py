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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.common import (  # noqa: E402
    DTYPES,
    ConversionError,
    KeyMapper,
    ShardWriter,
    bundle_classes,
    convert_tensors,
    copy_bundle_files,
    copy_tokenizer_files,
    expected_shapes,
    fail,
    internlm2_rules,
    internlm2_to_llama_config,
    internvit_rules,
    internvit_to_vision_config,
    prepare_destination,
    read_json,
    source_shards,
)

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
    mapper.add(rf"{src}\.(mlp[123])\.([01])\.weight", lambda m, t: [(
        f"{dst}.{INPUT_MLPS[m.group(1)]}.{'norm' if m.group(2) == '0' else 'linear'}.weight", t)])  # fmt: skip
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


def convert(src: Path, dst: Path, dtype: str | None, num_heads: int, max_shard_gb: float, overwrite: bool) -> None:
    from safetensors import safe_open

    prepare_destination(dst, overwrite, src)
    src_config = read_json(src / "config.json")
    shards = source_shards(src)
    keys = []
    for shard in shards:
        with safe_open(shard, framework="pt") as reader:
            keys += list(reader.keys())

    config_class, model_class = bundle_classes()
    config = config_class(**target_config(src_config, keys, num_heads))
    mapper = KeyMapper()
    internvit_rules(mapper)
    internlm2_rules(mapper, src_config["llm_config"])
    pvtc_rules(mapper)
    writer = ShardWriter(dst, int(max_shard_gb * 2**30), DTYPES[dtype] if dtype else None)
    report = convert_tensors(shards, mapper, expected_shapes(model_class, config), writer)
    if report.problems():
        fail(report.problems())

    if dtype:
        config.dtype = dtype
    config.save_pretrained(dst)
    copy_bundle_files(dst)
    copied = copy_tokenizer_files(src, dst)
    print(
        f"converted {len(keys)} tensors into {dst} (PVTC: {config.pvtc_num_layers} layer(s), "
        f"{config.pvtc_num_heads} heads, {config.tokens_per_tile} tokens per tile); tokenizer files: {copied}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder of the released checkpoint")
    parser.add_argument("--dst", type=Path, required=True, help="empty folder for the converted bundle")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--pvtc-num-heads", type=int, default=16, help="heads of the released PVTC blocks")
    parser.add_argument("--max-shard-size-gb", type=float, default=2.0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.dtype, args.pvtc_num_heads, args.max_shard_size_gb, args.overwrite)
    except ConversionError as error:
        fail([str(error)])


if __name__ == "__main__":
    main()
