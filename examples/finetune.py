"""Fine-tune InternVL-X with the stock `transformers.Trainer` on InternVL's chat data format.

    python examples/finetune.py --model_name_or_path DIR --meta_path meta.json --output_dir out \\
        --stage 2 [--lora_rank 16] [--freeze_vision] [--bf16] [--gradient_checkpointing] ...
    torchrun --nproc_per_node 8 examples/finetune.py ...        # DDP; also `accelerate launch examples/finetune.py`

`--meta_path` names the data: `{"name": {"annotation": "data.jsonl", "root": "images/"}, ...}` (paths relative to the
meta file unless absolute). Each JSONL line is `{"image": path | [paths], "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`; lines without `image` are text-only. Labels are
-100 everywhere except the assistant replies and their `<|im_end|>`. Tiling (`slicing`, `max_patches`) comes from the
processor config.

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
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from torch.utils.data import Dataset
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

logger = logging.getLogger(__name__)
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "model.lvtc_lr_projectors.", "model.lvtc_hr_projector.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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


def read_meta(meta_path: str) -> list[tuple[dict, Path]]:
    """All JSONL records of a meta file, each with the folder its image paths are relative to."""
    meta_file = Path(meta_path)
    records = []
    for name, entry in json.loads(meta_file.read_text()).items():
        annotation = Path(entry["annotation"])
        annotation = annotation if annotation.is_absolute() else meta_file.parent / annotation
        root = Path(entry.get("root", "."))
        root = root if root.is_absolute() else meta_file.parent / root
        lines = [line for line in annotation.read_text().splitlines() if line.strip()]
        records += [(json.loads(line), root) for line in lines]
        logger.info("%s: %d samples from %s", name, len(lines), annotation)
    return records


class ChatDataset(Dataset):
    """InternVL chat records → `input_ids`, `labels` (assistant replies only), `pixel_values`, `num_patches`."""

    def __init__(self, records: list[tuple[dict, Path]], processor, max_length: int = 4096):
        self.records, self.processor, self.max_length = records, processor, max_length
        self.tokenizer = processor.tokenizer
        bundle = importlib.import_module(type(processor).__module__)  # the processor's own bundle module
        self.expand_image_placeholders = bundle.expand_image_placeholders

    def __len__(self) -> int:
        return len(self.records)

    def build(self, conversations: list[dict], num_patches: list[int]) -> tuple[list[int], list[int]]:
        """Tokens of the processor's chat template applied to the conversation, and labels that keep only what the
        template marks as the assistant's (each reply and its `<|im_end|>`)."""
        messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]
        if num_patches and not any("<image>" in m["content"] for m in messages if m["role"] == "user"):
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = "<image>\n" * len(num_patches) + first["content"]
        contents = self.expand_image_placeholders([m["content"] for m in messages], num_patches,
                                                  self.processor.image_seq_length)  # fmt: skip
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

    def __getitem__(self, index: int) -> dict:
        record, root = self.records[index]
        paths = record.get("image") or []
        paths = paths if isinstance(paths, list) else [paths]
        # paths relative to the root; in-memory PIL images (generated data) are used as they are
        images = [p.convert("RGB") if isinstance(p, PIL.Image.Image) else PIL.Image.open(root / p).convert("RGB")
                  for p in paths]  # fmt: skip
        sample = {}
        num_patches = []
        if images:
            image_inputs = self.processor.image_processor(images, return_tensors="pt")
            sample["pixel_values"] = image_inputs["pixel_values"]
            num_patches = image_inputs["num_patches"].tolist()
            sample["num_patches"] = image_inputs["num_patches"]
        input_ids, labels = self.build(record["conversations"], num_patches)
        if len(input_ids) > self.max_length:
            image_token = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
            if image_token in input_ids[self.max_length :]:
                raise ValueError(
                    f"sample {index} has {len(input_ids)} tokens; cutting it to max_length={self.max_length} would "
                    f"cut through its image tokens. Raise --max_length or lower max_patches."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        sample["input_ids"] = torch.tensor(input_ids)
        sample["labels"] = torch.tensor(labels)
        return sample


@dataclass
class ChatCollator:
    """Pads `input_ids` (with `pad_token_id`) and `labels` (with -100) on `padding_side`, concatenates every sample's
    tiles into `pixel_values` and their counts into `num_patches`; batches without images carry neither."""

    pad_token_id: int
    padding_side: str = "right"

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
        return batch


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


def main(argv=None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # every sample has its own number of tiles
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True  # text-only batches leave the projectors unused
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)

    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=True, dtype=dtype if dtype != torch.float16 else torch.float32
    )
    model = configure_trainable(model, model_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d of %d", trainable, sum(p.numel() for p in model.parameters()))

    train_dataset = ChatDataset(read_meta(data_args.meta_path), processor, data_args.max_length)
    eval_dataset = (
        ChatDataset(read_meta(data_args.eval_meta_path), processor, data_args.max_length)
        if data_args.eval_meta_path
        else None
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=ChatCollator(processor.tokenizer.pad_token_id),
    )
    trainer.train(resume_from_checkpoint=resume_point(training_args.resume_from_checkpoint, training_args.output_dir))
    trainer.save_model()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        if model_args.lora_rank:
            merged_dir = Path(training_args.output_dir) / "merged"
            model.merge_and_unload().save_pretrained(merged_dir)
            processor.save_pretrained(merged_dir)
            logger.info("merged LoRA model written to %s", merged_dir)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank waits for the saves, then the process group is closed: a rank that exits with it open can be
        # aborted by gloo's threads ("terminate called without an active exception"), failing the whole launch.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
