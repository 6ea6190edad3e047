"""The source checkpoint's tokenizer as a fast (`tokenizer.json`) Transformers tokenizer, without remote code.

InternLM2 checkpoints ship a sentencepiece `tokenizer.model` and a remote `InternLM2Tokenizer`; it is rebuilt here
with the `tokenizers` library from the sentencepiece model itself (normalization, byte fallback, merges, control and
user-defined pieces), plus the added tokens listed in `tokenizer_config.json`, so it encodes and decodes exactly as
the sentencepiece model does. Checkpoints that already have a fast tokenizer (Qwen2, Llama, native InternVL) load
with `AutoTokenizer`.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece piece types


class TokenizerConversionError(RuntimeError):
    pass


def bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE vocabulary: every split of a piece into two pieces, ranked by the piece's id."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def sentencepiece_to_tokenizers(model_file: Path) -> tuple[Tokenizer, dict]:
    """A `tokenizers.Tokenizer` that reproduces the sentencepiece BPE model in `model_file`."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != 2:
        raise TokenizerConversionError("only sentencepiece BPE models are supported (InternLM2 uses BPE)")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
    unk_piece = proto.trainer_spec.unk_piece
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=bpe_merges(mergeable),
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )

    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decoding = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decoding.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decoding)

    # Control and unknown pieces are special; user-defined pieces are atomic but ordinary text.
    atomic = [
        AddedToken(p.piece, special=p.type in (CONTROL, UNKNOWN), normalized=False)
        for p in pieces
        if p.type in (CONTROL, UNKNOWN, USER_DEFINED)
    ]
    tokenizer.add_tokens([t for t in atomic if not t.special])
    tokenizer.add_special_tokens([t for t in atomic if t.special])
    specials = {
        "unk_token": unk_piece,
        "bos_token": pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None,
        "eos_token": pieces[proto.trainer_spec.eos_id].piece if proto.trainer_spec.eos_id >= 0 else None,
    }
    return tokenizer, specials


def add_configured_tokens(tokenizer: Tokenizer, tokenizer_config: dict) -> None:
    """Add `added_tokens_decoder` entries in id order, checking each lands on its recorded id."""
    entries = sorted((int(i), t) for i, t in (tokenizer_config.get("added_tokens_decoder") or {}).items())
    for token_id, entry in entries:
        existing = tokenizer.token_to_id(entry["content"])
        if existing is None:
            token = AddedToken(
                entry["content"],
                special=entry.get("special", True),
                normalized=False,
                lstrip=entry.get("lstrip", False),
                rstrip=entry.get("rstrip", False),
            )
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
            existing = tokenizer.token_to_id(entry["content"])
        elif entry.get("special", True):
            tokenizer.add_special_tokens([AddedToken(entry["content"], special=True, normalized=False)])
        if existing != token_id:
            raise TokenizerConversionError(
                f"added token {entry['content']!r} should have id {token_id} but the sentencepiece vocabulary puts it "
                f"at {existing}"
            )


def build_fast_tokenizer(src: Path) -> PreTrainedTokenizerFast:
    """The source's tokenizer, fast, with its special tokens; remote tokenizer code is never run."""
    config_file = src / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    remote = "AutoTokenizer" in (tokenizer_config.get("auto_map") or {}) or str(
        tokenizer_config.get("tokenizer_class", "")
    ).startswith("InternLM2")
    if not remote:
        return AutoTokenizer.from_pretrained(src)
    if not (src / "tokenizer.model").exists():
        raise TokenizerConversionError(f"{src} has a remote-code tokenizer but no sentencepiece tokenizer.model")
    tokenizer, specials = sentencepiece_to_tokenizers(src / "tokenizer.model")
    add_configured_tokens(tokenizer, tokenizer_config)
    map_file = src / "special_tokens_map.json"
    special_map = json.loads(map_file.read_text()) if map_file.exists() else {}

    def content(name: str):
        value = special_map.get(name, tokenizer_config.get(name, specials.get(name)))
        return value["content"] if isinstance(value, dict) else value

    bos = content("bos_token")
    if tokenizer_config.get("add_bos_token", True) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=content("eos_token"),
        unk_token=content("unk_token"),
        pad_token=content("pad_token") or content("eos_token"),
        clean_up_tokenization_spaces=False,
        model_max_length=tokenizer_config.get("model_max_length", 32768),
    )
