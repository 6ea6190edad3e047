"""Shared machinery of the checkpoint converters: key mappings, streaming shard I/O and verification.

A converter maps each source tensor to zero or more target tensors (`KeyMapper`), streams the source shard by shard,
writes target shards of bounded size with an index, and refuses to finish unless every source tensor was consumed and
every target tensor of the InternVL-X model was produced exactly once with the right shape.
"""

import contextlib
import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]

Tensors = list[tuple[str, torch.Tensor]]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConversionError(RuntimeError):
    """The source does not match what the converter expects; the message lists every mismatch."""


# ---- reading -----------------------------------------------------------------------------------------------------
def source_shards(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order when there is an index; each one must open as
    safetensors (a missing, truncated or foreign file is refused by name before anything is written)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index} is not a safetensors index ({type(error).__name__}: {error})") from None
        shards = [src / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise ConversionError(f"{index} names shards that are not in {src}: {', '.join(missing)}")
        left_out = unindexed_shards(src)
        if left_out:
            raise ConversionError(
                f"{index} does not name {', '.join(left_out)}, which {src} holds: the index is incomplete (a shard "
                "left out), so that shard's tensors would be missing. Restore the index's entries for it."
            )
    elif (src / "model.safetensors").exists():
        shards = [src / "model.safetensors"]
    else:
        raise ConversionError(f"{src} holds no model.safetensors nor model.safetensors.index.json")
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as reader:
                reader.keys()
        except (SafetensorError, OSError) as error:
            size = shard.stat().st_size
            raise ConversionError(
                f"{shard} ({size} bytes) is not a readable safetensors file (truncated or not safetensors): {error}"
            ) from None
    return shards


def source_family(keys: list[str]) -> str | None:
    """Which checkpoint the tensor names say this is: "internvl-x" (the authors' release: a PVTC `projector.*`),
    "internvl2" (OpenGVLab's: an `mlp1.*` projector) or "native" (Transformers' InternVL), or None."""
    if any(key.startswith("projector.attn_") or key == "projector.cls_scale" for key in keys):
        return "internvl-x"
    if any(key.startswith("mlp1.") for key in keys):
        return "internvl2"
    if any("multi_modal_projector." in key for key in keys):
        return "native"
    return None


# What each family is, and the converter that takes it.
FAMILIES = {
    "internvl-x": ("the authors' InternVL-X release (a PVTC projector)", "conversion/convert_official_internvl_x.py"),
    "internvl2": (
        "an OpenGVLab InternVL2 checkpoint (an mlp1 projector)",
        "conversion/convert_internvl2_to_internvl_x.py",
    ),
    "native": ("a Transformers-native InternVL checkpoint", "conversion/convert_internvl2_to_internvl_x.py"),
}


def refuse_other_family(keys: list[str], accepted: tuple[str, ...], src: Path) -> None:
    """Refuse a source this converter does not take, naming what it is and the converter that takes it."""
    family = source_family(keys)
    if family is not None and family not in accepted:
        what, converter = FAMILIES[family]
        raise ConversionError(f"{src} holds {what}, by its tensor names: convert it with {converter}")


def unindexed_shards(src: Path) -> list[str]:
    """Shard files (`model-*-of-*.safetensors`) in `src` that its index does not name (a shard left out of it)."""
    index = src / "model.safetensors.index.json"
    if not index.exists():
        return []
    named = set(json.loads(index.read_text())["weight_map"].values())
    return sorted(path.name for path in src.glob("model-*-of-*.safetensors") if path.name not in named)


def tensor_names(shards: list[Path]) -> list[str]:
    names = []
    for shard in shards:
        with safe_open(shard, framework="pt") as reader:
            names += list(reader.keys())
    return names


def has_tokenizer(src: Path) -> bool:
    return (src / "tokenizer.model").exists() or (src / "tokenizer.json").exists()


def iter_source_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` one tensor at a time (memory-mapped), shard after shard."""
    for shard in shards:
        with safe_open(shard, framework="pt") as reader:
            for name in reader.keys():
                try:
                    tensor = reader.get_tensor(name)
                except (SafetensorError, OSError) as error:
                    raise ConversionError(f"{shard}: tensor {name} cannot be read (truncated file?): {error}") from None
                yield name, tensor


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- key mapping -------------------------------------------------------------------------------------------------
@dataclass
class Rule:
    """Source keys matching `pattern` become `convert(match, tensor) -> [(target_name, tensor), ...]`."""

    pattern: re.Pattern
    convert: Callable[[re.Match, torch.Tensor], Tensors]


@dataclass
class KeyMapper:
    rules: list[Rule] = field(default_factory=list)

    def add(self, pattern: str, convert: Callable[[re.Match, torch.Tensor], Tensors] | str) -> None:
        """Add a rule; a string `convert` is a `re` replacement template for a plain rename."""
        if isinstance(convert, str):
            template = convert
            convert = lambda m, t: [(m.expand(template), t)]  # noqa: E731
        self.rules.append(Rule(re.compile(pattern), convert))

    def __call__(self, name: str, tensor: torch.Tensor) -> Tensors | None:
        for rule in self.rules:
            match = rule.pattern.fullmatch(name)
            if match:
                return rule.convert(match, tensor)
        return None


def split_rows(tensor: torch.Tensor, sizes: list[int], name: str) -> list[torch.Tensor]:
    """`tensor` (the source's `name`) split into row blocks of `sizes`; refused by name when its rows differ."""
    if sum(sizes) != tensor.shape[0]:
        raise ConversionError(
            f"{name} has shape {tuple(tensor.shape)}: {tensor.shape[0]} rows, but the config's sizes need "
            f"{sum(sizes)} ({' + '.join(map(str, sizes))})"
        )
    return [part.contiguous() for part in torch.split(tensor, sizes, dim=0)]


def internvit_rules(mapper: KeyMapper, src: str = "vision_model", dst: str = "model.vision_tower") -> None:
    """OpenGVLab InternViT → `transformers.InternVLVisionModel` (fused qkv split into q, k, v)."""
    layer = rf"{src}\.encoder\.layers\.(\d+)\."
    out = rf"{dst}.encoder.layer.\1."

    def qkv(match: re.Match, tensor: torch.Tensor) -> Tensors:
        suffix = match.group(2)
        if tensor.shape[0] % 3:
            raise ConversionError(f"{match.group(0)} has {tensor.shape[0]} rows, not three equal blocks (q, k, v)")
        q, k, v = split_rows(tensor, [tensor.shape[0] // 3] * 3, match.group(0))
        base = f"{dst}.encoder.layer.{match.group(1)}.attention"
        return [(f"{base}.q_proj.{suffix}", q), (f"{base}.k_proj.{suffix}", k), (f"{base}.v_proj.{suffix}", v)]

    mapper.add(rf"{src}\.embeddings\.class_embedding", rf"{dst}.embeddings.cls_token")
    mapper.add(rf"{src}\.embeddings\.position_embedding", rf"{dst}.embeddings.position_embeddings")
    mapper.add(
        rf"{src}\.embeddings\.patch_embedding\.(weight|bias)", rf"{dst}.embeddings.patch_embeddings.projection.\1"
    )
    mapper.add(layer + r"attn\.qkv\.(weight|bias)", qkv)
    mapper.add(layer + r"attn\.proj\.(weight|bias)", out + r"attention.projection_layer.\2")
    mapper.add(layer + r"attn\.(q_norm|k_norm)\.(weight|bias)", out + r"attention.\2.\3")
    mapper.add(layer + r"ls([12])", out + r"lambda_\2")
    mapper.add(layer + r"norm1\.(weight|bias)", out + r"layernorm_before.\2")
    mapper.add(layer + r"norm2\.(weight|bias)", out + r"layernorm_after.\2")
    mapper.add(layer + r"mlp\.(fc[12])\.(weight|bias)", out + r"mlp.\2.\3")


def internlm2_rules(mapper: KeyMapper, llm: dict, src: str = "language_model", dst: str = "model.language_model"):
    """InternLM2 → Llama: split `wqkv` (rows grouped per KV head as [q × heads/kv_heads, k, v]) and rename."""
    heads, kv_heads = llm["num_attention_heads"], llm["num_key_value_heads"]
    head_dim = llm["hidden_size"] // heads
    groups = heads // kv_heads
    layer = rf"{src}\.model\.layers\.(\d+)\."
    out = rf"{dst}.layers.\1."

    def wqkv(match: re.Match, tensor: torch.Tensor) -> Tensors:
        suffix = match.group(2)
        rows = kv_heads * (groups + 2) * head_dim
        if tensor.shape[0] != rows:
            raise ConversionError(
                f"{match.group(0)} has shape {tuple(tensor.shape)}: {tensor.shape[0]} rows, but {kv_heads} KV heads × "
                f"({groups} queries + key + value) × head_dim {head_dim} = {rows}"
            )
        blocks = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
        q = blocks[:, :groups].reshape(heads * head_dim, *tensor.shape[1:]).contiguous()
        k = blocks[:, groups].reshape(kv_heads * head_dim, *tensor.shape[1:]).contiguous()
        v = blocks[:, groups + 1].reshape(kv_heads * head_dim, *tensor.shape[1:]).contiguous()
        base = f"{dst}.layers.{match.group(1)}.self_attn"
        return [(f"{base}.q_proj.{suffix}", q), (f"{base}.k_proj.{suffix}", k), (f"{base}.v_proj.{suffix}", v)]

    mapper.add(rf"{src}\.model\.tok_embeddings\.weight", rf"{dst}.embed_tokens.weight")
    mapper.add(layer + r"attention\.wqkv\.(weight|bias)", wqkv)
    mapper.add(layer + r"attention\.wo\.(weight|bias)", out + r"self_attn.o_proj.\2")
    mapper.add(layer + r"feed_forward\.w1\.weight", out + r"mlp.gate_proj.weight")
    mapper.add(layer + r"feed_forward\.w3\.weight", out + r"mlp.up_proj.weight")
    mapper.add(layer + r"feed_forward\.w2\.weight", out + r"mlp.down_proj.weight")
    mapper.add(layer + r"attention_norm\.weight", out + r"input_layernorm.weight")
    mapper.add(layer + r"ffn_norm\.weight", out + r"post_attention_layernorm.weight")
    mapper.add(rf"{src}\.model\.norm\.weight", rf"{dst}.norm.weight")
    mapper.add(rf"{src}\.output\.weight", "lm_head.weight")


def hf_decoder_rules(mapper: KeyMapper, src: str = "language_model", dst: str = "model.language_model") -> None:
    """A Transformers-layout decoder (Qwen2, Llama, ...) stored as `{src}.model.*` + `{src}.lm_head.weight`."""
    mapper.add(rf"{src}\.model\.(.+)", rf"{dst}.\1")
    mapper.add(rf"{src}\.lm_head\.weight", "lm_head.weight")


def internlm2_to_llama_config(llm: dict) -> dict:
    """An InternLM2 `llm_config` as a Llama `text_config` (same math after the `wqkv` split)."""
    heads = llm["num_attention_heads"]
    config = dict(
        model_type="llama",
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=llm.get("num_key_value_heads", heads),
        head_dim=llm["hidden_size"] // heads,
        hidden_act=llm.get("hidden_act", "silu"),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        vocab_size=llm["vocab_size"],
        max_position_embeddings=llm.get("max_position_embeddings", 32768),
        rope_theta=llm.get("rope_theta", 10000.0),
        attention_bias=bool(llm.get("bias", False)),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        bos_token_id=llm.get("bos_token_id", 1),
        eos_token_id=llm.get("eos_token_id", 2),
        pad_token_id=llm.get("pad_token_id", 2),
    )
    scaling = llm.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        config["rope_scaling"] = {"rope_type": rope_type, "factor": float(scaling["factor"])}
    return config


def internvit_to_vision_config(vision: dict) -> dict:
    """An OpenGVLab `InternVisionConfig` dict as `InternVLVisionConfig` kwargs."""
    return dict(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        hidden_act=vision.get("hidden_act", "gelu"),
        image_size=vision.get("image_size", 448),
        patch_size=vision.get("patch_size", 14),
        num_channels=vision.get("num_channels", 3),
        attention_bias=bool(vision.get("qkv_bias", True)),
        use_qk_norm=bool(vision.get("qk_normalization", False)),
        norm_type=vision.get("norm_type", "layer_norm"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        layer_scale_init_value=vision.get("initializer_factor", 0.1),
        use_mean_pooling=True,
    )


# ---- writing -----------------------------------------------------------------------------------------------------
class ShardWriter:
    """Collects target tensors and writes `model-XXXXX-of-YYYYY.safetensors` files of at most `max_shard_bytes`."""

    def __init__(self, dst: Path, max_shard_bytes: int, dtype: torch.dtype | None):
        self.dst, self.max_shard_bytes, self.dtype = dst, max_shard_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.written):05d}.tmp.safetensors"
        save_file(self.pending, self.dst / name, metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Flush, give the shards their final names and write the index."""
        self.flush()
        self.write_index(self.name_shards())

    def name_shards(self) -> dict[str, str]:
        """Rename the shards `model-XXXXX-of-YYYYY.safetensors` (or `model.safetensors`); returns the weight map."""
        count = len(self.written)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.written):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.dst / tmp).rename(self.dst / final)
            weight_map.update({n: final for n in names})
        return weight_map

    def write_index(self, weight_map: dict[str, str]) -> None:
        if len(self.written) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@dataclass
class ConversionReport:
    unexpected_source: list[str] = field(default_factory=list)  # source keys no rule consumed
    unknown_target: list[str] = field(default_factory=list)  # produced names the model does not have
    duplicate_target: list[str] = field(default_factory=list)
    misshaped: list[str] = field(default_factory=list)
    missing_target: list[str] = field(default_factory=list)  # model parameters nobody produced

    def problems(self) -> list[str]:
        lines = []
        for label, items in (
            ("source tensors no rule consumes (unexpected)", self.unexpected_source),
            ("target tensors the model does not have", self.unknown_target),
            ("target tensors produced twice", self.duplicate_target),
            ("mis-shaped tensors", self.misshaped),
            ("model tensors missing from the source", self.missing_target),
        ):
            if items:
                lines.append(f"{label} ({len(items)}):")
                lines += [f"  {item}" for item in items]
        return lines


def convert_tensors(
    shards: list[Path],
    mapper: KeyMapper,
    expected: dict[str, torch.Size],
    writer: ShardWriter,
    fresh: Callable[[str], torch.Tensor] | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Stream `shards` through `mapper` into `writer`, checking names and shapes against `expected`.

    `fresh(name)` supplies target tensors the source does not have (new modules), or None for one that the source
    should have had; without it, or for None, they are reported missing.
    """
    report = ConversionReport()
    produced: set[str] = set()

    def emit(name: str, tensor: torch.Tensor) -> None:
        if name not in expected:
            report.unknown_target.append(name)
        elif name in produced:
            report.duplicate_target.append(name)
        elif tuple(tensor.shape) != tuple(expected[name]):
            report.misshaped.append(f"{name}: got {tuple(tensor.shape)}, model needs {tuple(expected[name])}")
        else:
            produced.add(name)
            writer.add(name, tensor)

    total = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as reader:
            total += len(reader.keys())
    for name, tensor in tqdm(iter_source_tensors(shards), total=total, desc="converting", disable=not progress):
        targets = mapper(name, tensor)
        if targets is None:
            report.unexpected_source.append(name)
            continue
        for target_name, target_tensor in targets:
            emit(target_name, target_tensor)
    for name in sorted(set(expected) - produced):
        tensor = fresh(name) if fresh is not None else None  # None: not a module the converter may initialise
        if tensor is None:
            report.missing_target.append(name)
        else:
            emit(name, tensor)
    writer.close()
    return report


def staging_folder(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.incomplete"


def is_converted_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint these converters wrote: an InternVL-X config and its weights, and nothing
    but the files such a checkpoint has (so `--overwrite` never deletes anything else)."""
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    names = {path.name for path in folder.iterdir()}
    ours = re.compile(
        r"(config|generation_config|preprocessor_config|processor_config|tokenizer|tokenizer_config|"
        r"special_tokens_map|added_tokens|chat_template)\.(json|jinja)|model(-\d+-of-\d+)?\.safetensors|"
        r"model\.safetensors\.index\.json|tokenizer\.model|README\.md|\.gitattributes|.*_internvl_x\.py|handler\.py"
    )
    weights = any(name.startswith("model") and ".safetensors" in name for name in names)
    return model_type == "internvl_x" and weights and all(ours.fullmatch(name) for name in names)


def check_destination(dst_argument: str, src: Path, overwrite: bool) -> Path:
    """The folder `--dst` names, refused (one line naming it) if writing or replacing it could delete or overwrite
    anything but a checkpoint of this project: empty, the working directory or a folder above it, the source or a
    folder holding it or held by it (a symlink counts as where it points), a file, or, without `--overwrite`, a
    non-empty folder; with it, a folder that is not a converted checkpoint."""
    if not dst_argument or not dst_argument.strip():
        raise ConversionError(f"--dst {dst_argument!r} is empty: name the folder to write the checkpoint to")
    dst = Path(dst_argument)
    target, source, here = dst.resolve(), src.resolve(), Path.cwd().resolve()
    pointing = f" (a link to {target})" if dst.is_symlink() else ""
    if target == here or target in here.parents:
        raise ConversionError(
            f"--dst {dst_argument!r}{pointing} is the working directory or a folder above it: the checkpoint needs a "
            "folder of its own"
        )
    if target == source or target in source.parents or source in target.parents:
        raise ConversionError(
            f"--dst {dst_argument!r}{pointing} and --src {src} must not contain each other: the source is only read"
        )
    if target.exists() and not target.is_dir():
        raise ConversionError(f"--dst {dst_argument!r}{pointing} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"--dst {dst_argument!r}{pointing} is not empty; pass --overwrite to replace its contents"
            )
        if not is_converted_checkpoint(target):
            raise ConversionError(
                f"--dst {dst_argument!r}{pointing} holds files that are not a checkpoint these converters wrote; "
                "--overwrite replaces only such a checkpoint, so nothing was deleted: choose a new or empty folder"
            )
    return target


def check_arguments(args) -> None:
    """Refuse, before anything is read, an option no conversion can use: one line naming the option and its value."""
    checks = [("--max-patches", args.max_patches, 1, True), ("--pvtc-num-heads", args.pvtc_num_heads, 1, True)]
    for name, value, minimum, integer in checks:
        if not math.isfinite(value) or value < minimum or (integer and value != int(value)):
            raise ConversionError(f"{name} must be a whole number ≥ {minimum}, got {value}")
    shard = args.max_shard_size_gb
    if not math.isfinite(shard) or shard <= 0:
        raise ConversionError(f"--max-shard-size-gb must be a finite number of gigabytes above 0, got {shard}")
    if not 1 <= shard * 2**30 < math.inf:
        raise ConversionError(
            f"--max-shard-size-gb {shard} is {shard * 2**30} bytes: a shard must hold at least 1 byte and a "
            "finite number of them"
        )


@contextlib.contextmanager
def staged_destination(dst_argument: str, overwrite: bool, src: Path) -> Iterator[Path]:
    """Yield a staging folder beside `dst` to write the checkpoint into, and move it to `dst` only once it is
    complete. A conversion that fails, runs out of disk or is killed therefore never leaves a folder at `dst` that
    looks finished; with `--overwrite` the previous checkpoint at `dst` stays until the new one replaces it. A staging
    folder left by a killed run is removed by the next run. The source is only read; `--dst` (as given) passes
    `check_destination` first, and a link is followed to where it points."""
    dst = check_destination(dst_argument, src, overwrite)
    staging = staging_folder(dst)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    staging.rename(dst)


class UploadError(ConversionError):
    """The checkpoint was converted and written; only its upload failed."""


def push_to_hub(dst: Path, repo: str) -> None:
    """Upload the converted checkpoint; a failure (offline, no token, no access) is an `UploadError` that says the
    checkpoint is written and where."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(dst), repo_id=repo)
    except Exception as error:  # noqa: BLE001 (offline, authentication, network: the same report)
        raise UploadError(
            f"the converted checkpoint is complete in {dst}, but uploading it to {repo} failed: "
            f"{type(error).__name__}: {str(error)[:300]}. Upload it later with `hf upload {repo} {dst}`."
        ) from None
    print(f"uploaded to {repo}")


def main_with_clear_errors(convert: Callable[[], object], dst: Path) -> None:
    """Run `convert()`; report a refused source, or a failed write (full disk, file-size limit, ...), on stderr and
    exit with status 1. A failed upload after a complete conversion says that the checkpoint is written."""
    try:
        convert()
    except UploadError as error:
        print(f"converted, not uploaded: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ConversionError, ValueError) as error:  # ValueError: a setting the InternVL-X config refuses, by name
        fail([str(error)])
    except (OSError, SafetensorError) as error:
        detail = f"{error.strerror} ({error.filename})" if isinstance(error, OSError) and error.strerror else error
        fail([f"writing the converted checkpoint failed: {detail}", f"nothing was written to {dst}"])


def write_chat_files(dst: Path, tokenizer, config, max_patches: int, slicing: str) -> None:
    """The bundle files, the processor (tokenizer, tiling image processor, chat template) and a generation config that
    ends each turn at `<|im_end|>`, also the tokenizer's EOS: what a checkpoint needs besides its weights and config."""
    from transformers import GenerationConfig

    from devtools.bundle import Bundle

    bundle = Bundle()
    GenerationConfig(**bundle.load("processing_internvl_x.chat_generation_defaults")(tokenizer)).save_pretrained(dst)
    bundle.load("processing_internvl_x.make_turn_end_the_eos")(tokenizer)
    copy_bundle_files(dst)
    image_processor = bundle.load("image_processing_internvl_x.InternVLXImageProcessor")(
        image_size=config.tile_size, max_patches=max_patches, slicing=slicing
    )
    processor = bundle.load("processing_internvl_x.InternVLXProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.tokens_per_tile
    )
    processor.save_pretrained(dst)
    image_processor.save_pretrained(dst)  # preprocessor_config.json, for AutoImageProcessor on its own


def copy_bundle_files(dst: Path) -> None:
    from devtools.bundle import BUNDLE_FILES

    for name in BUNDLE_FILES:
        shutil.copy(ROOT / name, dst / name)


def bundle_classes():
    """The bundle's config and model classes, loaded from this repository as `trust_remote_code` loads them."""
    from devtools.bundle import Bundle

    bundle = Bundle()
    return bundle.Config, bundle.ForConditionalGeneration


def expected_shapes(model_class, config) -> dict[str, torch.Size]:
    """Every tensor of the InternVL-X state dict with its shape, without allocating weights (meta device)."""
    with torch.device("meta"):
        model = model_class(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def fail(lines: list[str]) -> None:
    print("conversion refused:", file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    raise SystemExit(1)
