"""Fine-tune InternVL-X with the stock `transformers.Trainer` on InternVL's chat data format.

    python examples/finetune.py --model_name_or_path DIR --meta_path meta.json --output_dir out \\
        --stage 2 [--lora_rank 16] [--freeze_vision] [--bf16] [--gradient_checkpointing] ...
    torchrun --nproc_per_node 8 examples/finetune.py ...        # DDP; also `accelerate launch examples/finetune.py`

`--meta_path` names the data: `{"name": {"annotation": "data.jsonl", "root": "images/", "repeat_time": 2}, ...}`
(paths relative to the meta file unless absolute; `repeat_time` as in InternVL: whole copies, then a seeded sample of
the fraction). Each JSONL line is either InternVL's `{"image": path | [paths], "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}` or the `messages` format of Transformers' chat
templates and TRL: `{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
{"role": "assistant", "content": "..."}], "images": [paths]}` (an image item may also carry its own `image`, `url` or
`path`). Lines without images are text-only; images without a placeholder go at the start of the first user turn.
Videos likewise: InternVL's `{"video": path, "conversations": [{"from": "human", "value": "<video>\\n..."}, ...]}` or
`{"type": "video", "video" | "path" | "url": ...}` items (or a `videos` column); each video becomes `--num_frames`
frames (uniform, one tile each) written `Frame1: <image>\\nFrame2: ...` as InternVL2 trains and the processor infers.
A line the Trainer could not use is refused when the data is read, naming its file and line; lines without a reply
to learn from are left out and counted. Labels are -100 everywhere except the assistant replies and their
`<|im_end|>`. Images are read by the processor's own loader, as at inference (EXIF orientation, 16-bit images);
tiling (`slicing`, `max_patches`) comes from the processor config.

Stages (the paper trains stage 1 then stage 2, 1 epoch each, AdamW, cosine, lr 4e-5):
- `--stage 1`: only the projectors (the main projector and LVTC's LR / HR projectors) train;
- `--stage 2`: everything, or LoRA adapters on the language model (`--lora_rank R`, `--lora_vision` adds the ViT)
  with the projectors fully trained; `--freeze_vision` keeps the ViT fixed. With LoRA the adapters are merged into
  a full model saved under `OUTPUT_DIR/merged` that loads with `trust_remote_code`.

Everything else is a `TrainingArguments` flag (`--bf16`, `--gradient_checkpointing`, `--save_total_limit`,
`--eval_strategy steps` with `--eval_meta_path`, DeepSpeed / FSDP configs from this folder).
`--resume_from_checkpoint` takes a checkpoint folder, or `last` for the newest complete one in `--output_dir`: a
checkpoint that a killed run left half-written is skipped (with a warning), or refused by name when given.
`remove_unused_columns` is forced off because every sample carries its own number of image tiles.
"""

import importlib
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import is_deepspeed_zero3_enabled

logger = logging.getLogger(__name__)
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "model.lvtc_lr_projectors.", "model.lvtc_hr_projector.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_SPAN_TOKENS = ("<IMG_CONTEXT>", "<img>", "</img>")  # written by the processor, never by the data


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "InternVL-X folder or Hub id (trust_remote_code)."})
    stage: int = field(default=2, metadata={"help": "1: projectors only; 2: everything (or LoRA)."})
    lora_rank: int = field(default=0, metadata={"help": "stage 2: LoRA rank on the language model (0: full)."})
    lora_alpha: int = field(default=0, metadata={"help": "LoRA alpha (default 2 × rank)."})
    lora_vision: bool = field(default=False, metadata={"help": "also put LoRA adapters on the vision tower."})
    freeze_vision: bool = field(default=False, metadata={"help": "keep the vision tower fixed."})


@dataclass
class DataArguments:
    meta_path: str = field(metadata={"help": "JSON naming the training JSONL files and their image roots."})
    eval_meta_path: str | None = field(default=None, metadata={"help": "same format, for evaluation."})
    max_length: int = field(default=4096, metadata={"help": "longest tokenized sample; longer text is cut."})
    num_frames: int = field(default=8, metadata={"help": "frames taken from each video (uniformly; one tile each)."})


@dataclass
class Row:
    """One training conversation: chat messages with text content (each image an `<image>` placeholder where it
    goes), its images (local paths, URLs, base64 or in-memory images) and `where` it came from (file and line)."""

    messages: list[dict]
    images: list
    where: str
    videos: list = field(default_factory=list)

    @property
    def learns(self) -> bool:
        """Whether the row has a reply to learn from (a row without one would train at loss 0)."""
        return any(m["role"] == "assistant" and m["content"].strip() for m in self.messages)


def image_source(item, root: Path, where: str, kind: str = "image"):
    """A row's image (or video: `kind`) as the processor reads it: a path relative to the data root (it must exist),
    or a URL, base64 payload or in-memory image or frames as it is."""
    if not isinstance(item, str):
        return item
    if item.startswith(("http://", "https://", "data:")) or len(item) > 1024:
        return item
    path = Path(item) if Path(item).is_absolute() else root / item
    if not path.is_file():
        raise ValueError(f"{where}: {kind} {item!r} not found (looked for {path})")
    return str(path)


def with_sources(carried: list, listed, kind: str, where: str) -> list:
    """A row's images or videos: those its content items carry, an item without a source taking the row's next
    listed one (TRL's `images` column), then the listed ones left."""
    if not isinstance(listed, list):
        listed = [] if listed is None or (isinstance(listed, str) and not listed) else [listed]
    listed_iter = iter(listed)
    sources = [item if item is not None else next(listed_iter, None) for item in carried] + list(listed_iter)
    missing = sum(source is None for source in sources)
    if missing:
        raise ValueError(f"{where}: {missing} {kind} items have no {kind} (no source and none listed left)")
    return sources


def place_placeholders(messages: list[dict], sources: list, placeholder: str, where: str) -> None:
    """Check the row's `placeholder`s (`<image>` or `<video>`) against its sources; with none written, put one per
    source at the start of the first user turn. An assistant turn may hold none."""
    kind = placeholder.strip("<>")
    for message in messages:
        if message["role"] == "assistant" and placeholder in message["content"]:
            raise ValueError(
                f"{where}: an assistant turn holds an {kind}; the model would be trained to emit {kind} tokens. Put "
                f"{kind}s in user turns"
            )
    placeholders = sum(m["content"].count(placeholder) for m in messages)
    if sources and not placeholders:
        users = [m for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError(f"{where}: the row has {len(sources)} {kind}s but no user turn to put them in")
        users[0]["content"] = f"{placeholder}\n" * len(sources) + users[0]["content"]
    elif placeholders != len(sources):
        raise ValueError(
            f"{where}: the text has {placeholders} `{placeholder}` placeholders but the row has {len(sources)} {kind}s"
        )


def row_messages(record: dict, where: str) -> tuple[list[dict], list, list]:
    """The row's messages with text content, and the images and videos its content items carry, from either format:
    InternVL's `conversations` (`from` / `value`) or Transformers' and TRL's `messages` (`role` / `content`, content a
    string or a list of `{"type": "text" | "image" | "video", ...}` items)."""
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
            raise ValueError(f"{where}: `conversations` must be a list of {{'from': ..., 'value': ...}} turns")
        messages = [{"role": t["from"], "content": t["value"]} for t in turns]
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"{where}: `messages` must be a list of {{'role': ..., 'content': ...}} messages")
    else:
        raise ValueError(
            f"{where}: a row needs `conversations` (InternVL: from / value) or `messages` (role / content); it has "
            f"{sorted(record)}"
        )
    texts, carried, carried_videos = [], [], []
    for message in messages:
        role = ROLES.get(message["role"]) if isinstance(message["role"], str) else None
        if role is None:
            raise ValueError(f"{where}: unknown role {message['role']!r} (known: {sorted(ROLES)})")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for item in content:
                if not isinstance(item, dict):
                    raise ValueError(f"{where}: a content item must be an object with a `type`, got {item!r:.100}")
                if item.get("type") == "text":
                    if not isinstance(item.get("text"), str):
                        raise ValueError(f"{where}: a text item needs a string `text`, got {item.get('text')!r:.100}")
                    parts.append(item["text"])
                elif item.get("type") in ("image", "image_url"):
                    parts.append("<image>\n")
                    source = item.get("image") or item.get("url") or item.get("path") or item.get("image_url")
                    carried.append(source.get("url") if isinstance(source, dict) else source)
                elif item.get("type") in ("video", "video_url"):
                    parts.append("<video>\n")
                    source = item.get("video") or item.get("url") or item.get("path") or item.get("video_url")
                    carried_videos.append(source.get("url") if isinstance(source, dict) else source)
                else:
                    raise ValueError(f"{where}: content item of unknown type {item.get('type')!r}")
            content = "".join(parts)
        if not isinstance(content, str):
            raise ValueError(f"{where}: a {role} turn's content must be text or a list of items, got {content!r}")
        texts.append({"role": role, "content": content})
    return texts, carried, carried_videos


def parse_row(record, root: Path, where: str) -> Row:
    """A data row checked once, at load: refused with `where` when the Trainer could not use it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    messages, carried, carried_videos = row_messages(record, where)
    images = with_sources(carried, record.get("image", record.get("images")), "image", where)
    videos = with_sources(carried_videos, record.get("video", record.get("videos")), "video", where)
    for message in messages:
        spans = [token for token in IMAGE_SPAN_TOKENS if token in message["content"]]
        if spans:
            raise ValueError(
                f"{where}: a {message['role']} turn holds {spans}, the tokens the processor writes for images; mark "
                "each image with `<image>` (or an image item) instead"
            )
    place_placeholders(messages, images, "<image>", where)
    place_placeholders(messages, videos, "<video>", where)
    return Row(
        messages,
        [image_source(image, root, where) for image in images],
        where,
        [image_source(video, root, where, "video") for video in videos],
    )


def check_video_lengths(rows: list[Row], processor, num_frames: int) -> None:
    """Refuse, when the data is read, a row whose video is shorter than `num_frames` (counted from each file's
    container by the processor's own media reader, nothing decoded): training would stop at it otherwise."""
    bundle = importlib.import_module(type(processor).__module__)  # the processor's own bundle module
    video_frame_count = importlib.import_module(f"{bundle.__package__}.media_internvl_x").video_frame_count
    for row in rows:
        for number, video in enumerate(row.videos):
            try:
                frames = video_frame_count(video, number)
            except ValueError as error:
                raise ValueError(f"{row.where}: {error}") from None
            if frames < num_frames:
                raise ValueError(
                    f"{row.where}: video {number} has {frames} frames, fewer than --num_frames {num_frames}."
                )


def repeated(rows: list[Row], times: float, seed: int = 0) -> list[Row]:
    """InternVL's `repeat_time`: the whole list `int(times)` times, then a seeded sample of the fraction left."""
    if not math.isfinite(times) or times < 0:
        raise ValueError(f"repeat_time must be a finite number ≥ 0, got {times}")
    whole, fraction = int(times), times - int(times)
    return rows * whole + random.Random(seed).sample(rows, round(fraction * len(rows)))


def read_meta_entries(meta_file: Path) -> dict[str, dict]:
    """The meta file's datasets, `{name: {"annotation": ..., ...}}`, refused by name when the file is not that: not
    JSON, not an object, a dataset without an `annotation` path, or a name given twice (JSON keeps only the last)."""

    def refuse_repeated_names(pairs):
        names = [name for name, _ in pairs]
        repeated_names = sorted({name for name in names if names.count(name) > 1})
        if repeated_names:
            raise ValueError(f"{meta_file}: dataset names {repeated_names} are given more than once")
        return dict(pairs)

    try:
        entries = json.loads(meta_file.read_text(), object_pairs_hook=refuse_repeated_names)
    except FileNotFoundError:
        raise ValueError(f"no meta file {meta_file}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_file}: not JSON ({error})") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{meta_file}: must be an object of datasets, {{name: {{'annotation': file.jsonl}}}}")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise ValueError(f"{meta_file}: dataset {name!r} needs an `annotation` path (a JSONL file), got {entry!r}")
    return entries


def read_meta(meta_path: str) -> list[Row]:
    """Every usable row of a meta file, `repeat_time` applied. A row the Trainer could not use is refused naming its
    file and line; rows with no reply to learn from are left out and counted in a warning."""
    meta_file = Path(meta_path)
    rows = []
    for name, entry in read_meta_entries(meta_file).items():
        annotation = Path(entry["annotation"])
        annotation = annotation if annotation.is_absolute() else meta_file.parent / annotation
        root = Path(entry.get("root", "."))
        root = root if root.is_absolute() else meta_file.parent / root
        if not annotation.is_file():
            raise ValueError(f"{meta_file}: dataset {name!r} names the annotation file {annotation}, which is missing")
        found = []
        for number, line in enumerate(annotation.read_text().splitlines(), start=1):
            if line.strip():
                where = f"{annotation}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not a JSON object ({error})") from None
                found.append(parse_row(record, root, where))
        try:
            chosen = repeated(found, float(entry.get("repeat_time", 1)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{meta_file}: dataset {name!r}: {error}") from None
        logger.info(
            "%s: %d rows from %s, %d used (repeat_time %s)",
            name,
            len(found),
            annotation,
            len(chosen),
            entry.get("repeat_time", 1),
        )
        rows += chosen
    idle = [row.where for row in rows if not row.learns]
    if idle:
        logger.warning(
            "%d rows have no assistant reply to learn from and are left out: %s%s",
            len(idle),
            ", ".join(idle[:5]),
            ", ..." if len(idle) > 5 else "",
        )
    return [row for row in rows if row.learns]


class ChatDataset(Dataset):
    """Rows (`read_meta`) → `input_ids`, `labels` (assistant replies only), `pixel_values`, `num_patches`."""

    def __init__(self, rows: list[Row], processor, max_length: int = 4096, num_frames: int = 8):
        for name, value in (("--max_length", max_length), ("--num_frames", num_frames)):
            if value is None and name == "--num_frames":  # frames given as frames: all of them
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        self.rows, self.processor, self.max_length, self.num_frames = rows, processor, max_length, num_frames
        self.tokenizer = processor.tokenizer
        bundle = importlib.import_module(type(processor).__module__)  # the processor's own bundle module
        self.expand_image_placeholders = bundle.expand_image_placeholders

    def __len__(self) -> int:
        return len(self.rows)

    def build(self, row: Row, num_patches: list[int]) -> tuple[list[int], list[int]]:
        """Tokens of the processor's chat template applied to the conversation, and labels that keep only what the
        template marks as the assistant's (each reply and its `<|im_end|>`)."""
        messages = [dict(message) for message in row.messages]
        contents = self.expand_image_placeholders(
            [m["content"] for m in messages], num_patches, self.processor.image_seq_length
        )
        for message, content in zip(messages, contents):
            message["content"] = content
        encoded = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.processor.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        input_ids = list(encoded["input_ids"])
        labels = [token if keep else -100 for token, keep in zip(input_ids, encoded["assistant_masks"])]
        replies = sum(message["role"] == "assistant" for message in messages)
        if replies and all(label == -100 for label in labels):
            raise ValueError(
                f"the processor's chat template marked none of this sample's {replies} assistant replies: it needs "
                "`{% generation %}` blocks around them (re-save the processor with this bundle's template)."
            )
        return input_ids, labels

    def with_video_frames(self, row: Row) -> tuple[list[dict], list, list[bool]]:
        """The row's messages with each `<video>` written as one `FrameN: <image>` line per frame, its images and
        video frames in the order of their placeholders, and which are frames: the processor's own reading and
        expansion of videos (`num_frames` per video, uniformly)."""
        contents = [message["content"] for message in row.messages]
        clips = self.processor.read_videos(row.videos, contents, num_frames=self.num_frames)
        contents, images, frames = self.processor.expand_videos(contents, row.images, clips, "<image>")
        return [{**m, "content": c} for m, c in zip(row.messages, contents)], images, frames

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        sample = {}
        num_patches = []
        messages, images, frames = row.messages, row.images, [False] * len(row.images)
        if row.images or row.videos:
            try:  # read as inference reads them (the processor's one loader: EXIF, 16-bit images, video frames ...)
                if row.videos:
                    messages, images, frames = self.with_video_frames(row)
                image_inputs = self.processor.image_processor(images, return_tensors="pt", video_frames=frames)
            except ValueError as error:
                raise ValueError(f"{row.where}: {error}") from error
            sample["pixel_values"] = image_inputs["pixel_values"]
            num_patches = image_inputs["num_patches"].tolist()
            sample["num_patches"] = image_inputs["num_patches"]
        row = Row(messages, images, row.where)
        input_ids, labels = self.build(row, num_patches)
        if len(input_ids) > self.max_length:
            image_token = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
            if image_token in input_ids[self.max_length :]:
                raise ValueError(
                    f"{row.where} has {len(input_ids)} tokens; cutting it to max_length={self.max_length} would "
                    f"cut through its image tokens. Raise --max_length or lower max_patches."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if all(label == -100 for label in labels):
                raise ValueError(
                    f"{row.where} has {len(input_ids)} tokens; max_length={self.max_length} cuts off every reply, "
                    "leaving nothing to learn. Raise --max_length."
                )
        sample["input_ids"] = torch.tensor(input_ids)
        sample["labels"] = torch.tensor(labels)
        return sample


@dataclass
class ChatCollator:
    """Pads `input_ids` (with `pad_token_id`) and `labels` (with -100) on `padding_side`, concatenates every sample's
    tiles into `pixel_values` and their counts into `num_patches`. A batch without images carries no tiles, or, with
    `padding_tile` (its `(channels, height, width)`), one black padding tile marked `image_flags = [0]`: the model
    then runs its vision tower and projectors on it and adds nothing, so every step runs the same modules whatever
    the batch holds. DeepSpeed ZeRO needs that when each process trains on its own batch: it gathers and reduces
    each module's parameters as the module runs, and a process that skips the vision tower while another runs it
    stops the run."""

    pad_token_id: int
    padding_side: str = "right"
    padding_tile: tuple[int, int, int] | None = None

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            span = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            input_ids[row, span], labels[row, span] = sample["input_ids"], sample["labels"]
            attention_mask[row, span] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        with_images = [s for s in samples if "pixel_values" in s]
        if with_images:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            batch["num_patches"] = torch.cat([s["num_patches"] for s in with_images])
        elif self.padding_tile:
            batch["pixel_values"] = torch.zeros(1, *self.padding_tile)
            batch["image_flags"] = torch.zeros(1, dtype=torch.long)
        return batch


def padding_tile(config) -> tuple[int, int, int]:
    """`(channels, height, width)` of one tile of the model's vision tower."""
    return (config.vision_config.num_channels, config.tile_size, config.tile_size)


def configure_trainable(model, args: ModelArguments):
    """Freeze / adapt parameters for the stage; returns the model to train (a PEFT model with LoRA)."""
    if args.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {args.stage}")
    if args.stage == 1:
        if args.lora_rank:
            raise ValueError("stage 1 trains the projectors fully; --lora_rank is for stage 2")
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(PROJECTOR_PREFIXES)
        return model
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        scope = r"model\.(language_model|vision_tower)" if args.lora_vision else r"model\.language_model"
        targets = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|projection_layer|fc1|fc2)"
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha or 2 * args.lora_rank,
            target_modules=rf"{scope}\..*\.{targets}",
            modules_to_save=projector_modules(model),
        )
        model = get_peft_model(model, config)
    if args.freeze_vision:
        for name, parameter in model.named_parameters():
            if ".vision_tower." in f".{name}" and "lora_" not in name:
                parameter.requires_grad = False
    return model


def projector_modules(model) -> list[str]:
    """Names of the projector modules (LVTC's LR projectors one by one: PEFT wraps modules, not lists)."""
    names = []
    for name, _ in model.named_modules():
        if name in ("model.multi_modal_projector", "model.lvtc_hr_projector") or (
            name.startswith("model.lvtc_lr_projectors.") and name.count(".") == 2
        ):
            names.append(name)
    return names


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")


def checkpoint_problems(folder: Path) -> list[str]:
    """What a Trainer checkpoint folder lacks to be resumed from. The Trainer writes `trainer_state.json` last
    (after the weights, optimizer, scheduler and RNG states), so a run killed while saving leaves it out."""
    problems = []
    if not any((folder / name).exists() for name in WEIGHT_FILES):
        problems.append(f"model weights (one of {', '.join(WEIGHT_FILES)})")
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        problems.append("trainer_state.json")
    except json.JSONDecodeError:
        problems.append("a complete trainer_state.json (it is cut off)")
    return problems


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter; under ZeRO-3 a parameter holds only this process's part, `ds_numel` the whole."""
    return getattr(parameter, "ds_numel", parameter.numel())


def gathered_parameters(model):
    """A context in which every parameter is whole on every process (ZeRO-3 gathers them; read-only: changes are
    not written back); without ZeRO-3 it does nothing. LoRA's merge reads the whole base weights."""
    import contextlib

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def expected_tensor_names(model) -> set[str]:
    """The tensor names a checkpoint of `model` holds: its state dict's, less the second name of tied weights."""
    duplicates = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    duplicates -= {name for name, _ in model.named_parameters()}
    return set(model.state_dict()) - duplicates


def saved_tensor_names(folder: Path) -> set[str]:
    """Tensor names of the safetensors checkpoint in `folder` (one file or an index of shards)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(folder / "model.safetensors", framework="pt") as reader:
        return set(reader.keys())


def name_differences(folder: Path, expected: set[str]) -> str | None:
    """How the tensor names of the checkpoint in `folder` differ from `expected`, in words, or None if they do not."""
    saved = saved_tensor_names(folder)
    if saved == expected:
        return None
    unexpected, missing = sorted(saved - expected), sorted(expected - saved)
    return (
        f"holds {len(unexpected)} tensor names the model does not have (e.g. {unexpected[:3]}) and lacks "
        f"{len(missing)} of its own (e.g. {missing[:3]})"
    )


def check_saved_names(folder: Path, expected: set[str]) -> None:
    """Fail loudly if a checkpoint's tensor names are not the model's own (it would load with random weights)."""
    differences = name_differences(folder, expected)
    if differences:
        raise RuntimeError(
            f"the checkpoint written to {folder} {differences}; it would load with random weights. Save with this "
            "bundle's save_pretrained (it keeps the model's own names)."
        )


class CheckSavedNames(TrainerCallback):
    """Checks each checkpoint the Trainer writes (`check_saved_names`), on the main process."""

    def __init__(self, model):
        self.expected = expected_tensor_names(model)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            check_saved_names(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.expected)


def resume_point(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `last` for the newest complete one in `--output_dir`
    (incomplete ones, e.g. from a run killed while saving, are skipped with a warning naming them)."""
    if value is None:
        return None
    if value.lower() not in ("last", "true"):
        problems = checkpoint_problems(Path(value))
        if problems:
            raise ValueError(
                f"cannot resume from {value}: it lacks {', '.join(problems)} (was the run killed while saving it?); "
                "pass another checkpoint, or `last` for the newest complete one."
            )
        return value
    folders = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for folder in folders:
        problems = checkpoint_problems(folder)
        if not problems:
            return str(folder)
        logger.warning("skipping %s: it lacks %s (a run killed while saving it?)", folder, ", ".join(problems))
    raise ValueError(f"no complete checkpoint in {output_dir} to resume from (looked at {len(folders)}).")


def check_output_dir(model_path: str, output_dir: str, resuming: bool) -> None:
    """Training writes only where it may: never into the model folder it reads (or a folder inside it), and, unless it
    resumes, not into a folder that holds another run's `checkpoint-*` folders, which checkpoint rotation
    (`--save_total_limit`) would delete and new checkpoints of the same step would overwrite."""
    out = Path(output_dir).resolve()
    source = Path(model_path)
    if source.is_dir() and (out == source.resolve() or source.resolve() in out.parents):
        raise ValueError(
            f"--output_dir {output_dir} is the model folder {model_path} or inside it: training would overwrite the "
            "weights it starts from. Choose another folder."
        )
    existing = sorted(path.name for path in Path(output_dir).glob("checkpoint-*") if path.is_dir())
    if existing and not resuming:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise ValueError(
            f"--output_dir {output_dir} already holds {len(existing)} checkpoint folders ({shown}) that this run did "
            "not write: checkpoint rotation would delete them and new checkpoints could overwrite them. Resume that "
            "run (--resume_from_checkpoint last) or choose an empty folder."
        )


def check_resumable(checkpoint: str, model) -> None:
    """Refuse, naming the checkpoint and what differs, one written by another model or stage: its tensor names (a
    full checkpoint) and the number of parameters its optimizer state holds against what this run trains."""
    folder = Path(checkpoint)
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        differences = name_differences(folder, expected_tensor_names(model))
        if differences:
            raise ValueError(f"cannot resume from {checkpoint}: it {differences}; it was written for another model.")
    optimizer_file = folder / "optimizer.pt"
    if optimizer_file.exists():
        state = torch.load(optimizer_file, map_location="cpu", mmap=True, weights_only=True)
        groups = state.get("param_groups", []) if isinstance(state, dict) else []
        held = sum(len(group.get("params", [])) for group in groups)
        trained = sum(1 for parameter in model.parameters() if parameter.requires_grad)
        if groups and held != trained:
            raise ValueError(
                f"cannot resume from {checkpoint}: its optimizer state holds {held} parameters but this run trains "
                f"{trained}; it was written with another --stage, --lora_rank, --lora_vision or --freeze_vision."
            )


def join_deepspeed_to_the_process_group(training_args: TrainingArguments) -> None:
    """Have DeepSpeed's communication use the process group the Trainer's arguments set up, before the model is
    built: ZeRO-3 partitions parameters as `from_pretrained` creates them and reads the world size then. On a
    CPU (`--use_cpu`) Accelerate starts a gloo group that DeepSpeed does not know of, and it would count 1 process."""
    import deepspeed

    training_args.device  # noqa: B018 (sets up the process group)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def main(argv=None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # every sample has its own number of tiles
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True  # text-only batches leave the projectors unused
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    if training_args.deepspeed:
        join_deepspeed_to_the_process_group(training_args)
    resuming = training_args.resume_from_checkpoint is not None
    check_output_dir(model_args.model_name_or_path, training_args.output_dir, resuming)

    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=True, dtype=dtype if dtype != torch.float16 else torch.float32
    )
    model = configure_trainable(model, model_args)
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d of %d", trainable, sum(parameter_count(p) for p in model.parameters()))

    datasets = []
    for meta_path in (data_args.meta_path, data_args.eval_meta_path):
        rows = read_meta(meta_path) if meta_path else None
        if rows is not None:
            check_video_lengths(rows, processor, data_args.num_frames)
        dataset = ChatDataset(rows, processor, data_args.max_length, data_args.num_frames) if rows is not None else None
        datasets.append(dataset)
    train_dataset, eval_dataset = datasets
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=ChatCollator(processor.tokenizer.pad_token_id, padding_tile=padding_tile(model.config)),
        callbacks=[CheckSavedNames(model)] if not model_args.lora_rank else None,
    )
    checkpoint = resume_point(training_args.resume_from_checkpoint, training_args.output_dir)
    if checkpoint is not None and not is_deepspeed_zero3_enabled():  # ZeRO-3 checkpoints hold partitioned states
        check_resumable(checkpoint, model)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        if not model_args.lora_rank:
            check_saved_names(Path(training_args.output_dir), expected_tensor_names(model))
    if model_args.lora_rank:
        merged_dir = Path(training_args.output_dir) / "merged"
        with gathered_parameters(model):  # every rank enters: under ZeRO-3 gathering is collective
            if trainer.is_world_process_zero():
                merged = model.merge_and_unload()
                merged.save_pretrained(merged_dir)
                processor.save_pretrained(merged_dir)
                check_saved_names(merged_dir, expected_tensor_names(merged))
                logger.info("merged LoRA model written to %s", merged_dir)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank waits for the saves
        torch.distributed.destroy_process_group()


def exit_before_interpreter_teardown(status: int = 0) -> None:
    """End a distributed run once everything is written, without Python's interpreter teardown.

    `destroy_process_group` does not stop gloo's worker threads here (C++ still holds its backends, nothing Python
    reaches), and a worker that touches a tensor while the interpreter is finalizing needs the GIL, which ends the
    thread inside a noexcept frame: "terminate called without an active exception", SIGABRT, and torchrun reports the
    whole run as failed after it finished. Seen on 2 of 4 ZeRO-3 launches of one CI run, never in 30 launches since; and
    in `tp_generate.py` on Transformers 5.17 (1 run in about 30), which ends the same way. So: the `atexit` handlers run
    (loggers such as wandb finish there), the streams are flushed, then the process ends with `os._exit`."""
    import atexit

    atexit._run_exitfuncs()  # CPython's runner of the registered handlers, as at a normal exit
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_before_interpreter_teardown()
