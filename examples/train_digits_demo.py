"""Train a small InternVL-X from scratch on the digits task (`digits_task.py`) with the stock `Trainer`.

    python examples/train_digits_demo.py --variant demo --curriculum-steps 800 --steps 5000 --batch-size 64 \
        --workers 4 --eval-samples 600 --output examples/digits-demo      # the shipped checkpoint, 337 s on an H100

Variants (same widths; they differ only in how visual tokens reach the language model):
- `demo`: PVTC projector + LVTC (16 → 64 tokens per tile, HR + one extra LR projector) — the shipped checkpoint;
- `pixel_shuffle` (16 tokens), `pvtc` (16 tokens): the paper's Table 3 in miniature;
- `lvtc` (pixel-shuffle projector, 16 → 64), `hr_only` (64 tokens): with `pixel_shuffle` as LR-only, Table 4.
RVTC (`slicing="edge"`, up to 4 tiles of 64 px + thumbnail) tiles every image. Training runs on the GPU when one is
visible (`--cpu` forces the CPU); a saved checkpoint's `metrics.json` records its settings and held-out accuracy.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.digits_task import DigitPool, as_record, corpus, make_sample  # noqa: E402
from examples.finetune import ChatCollator, ChatDataset, parse_row  # noqa: E402
from examples.tiny_tokenizer import train_tokenizer  # noqa: E402

VARIANTS = {
    "demo": dict(projector_type="pvtc", lvtc_enabled=True),
    "pixel_shuffle": dict(projector_type="pixel_shuffle"),
    "pvtc": dict(projector_type="pvtc"),
    "lvtc": dict(projector_type="pixel_shuffle", lvtc_enabled=True),
    "hr_only": dict(projector_type="pixel_shuffle", downsample_ratio=1.0),
}


def bundle(name: str):
    from devtools.bundle import Bundle

    return Bundle().load(name)


def build(variant: str, seed: int):
    """Tokenizer, processor and a freshly initialised model of `variant`."""
    system_message = bundle("processing_internvl_x.DEFAULT_SYSTEM_MESSAGE")
    tokenizer = train_tokenizer(corpus(system_message), bundle("processing_internvl_x.prepare_tokenizer"), 600)
    config = bundle("configuration_internvl_x.InternVLXConfig")(
        vision_config=dict(
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=384,
            image_size=64,
            patch_size=8,
            attention_bias=True,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        pvtc_num_heads=4,
        lvtc_expand_layer=3,
        lvtc_num_lr_projectors=2,
        lvtc_inject_start=1,
        **VARIANTS[variant],
    )
    bundle("processing_internvl_x.prepare_tokenizer")(tokenizer, config)
    torch.manual_seed(seed)
    model = bundle("modeling_internvl_x.InternVLXForConditionalGeneration")(config)
    model.generation_config.update(**bundle("processing_internvl_x.chat_generation_defaults")(tokenizer))
    bundle("processing_internvl_x.make_turn_end_the_eos")(tokenizer)
    image_processor = bundle("image_processing_internvl_x.InternVLXImageProcessor")(
        image_size=64, max_patches=4, slicing="edge"
    )
    processor = bundle("processing_internvl_x.InternVLXProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.tokens_per_tile
    )
    return model, processor


class GeneratedRecords:
    """`size` task samples generated on demand from `pool`, the same for the same `seed` and index; with `single`,
    only single digits on one 64-pixel tile (the curriculum that first teaches the vision tower the digits)."""

    def __init__(self, pool: DigitPool, size: int, seed: int, single: bool = False):
        self.pool, self.size, self.seed, self.single = pool, size, seed, single

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        rng = random.Random(self.seed * 1_000_003 + index)
        sample = make_sample(self.pool, rng, "single", canvas=(64, 64)) if self.single else make_sample(self.pool, rng)
        return parse_row(as_record(sample), Path("."), f"generated sample {index}")


def chat_inputs(processor, samples: list[dict]):
    """The processor's inputs for `samples` asked as user turns (the image, then the question), left-padded, ready
    for the assistant's answer."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}],
            add_generation_prompt=True,
        )
        for s in samples
    ]
    return processor(images=[s["image"] for s in samples], text=texts, add_special_tokens=False, return_tensors="pt")


def load_checkpoint(folder: Path, **model_kwargs):
    """`(model in eval mode, processor)` of a checkpoint folder of this bundle, loaded as users load it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, **model_kwargs)
    return model.eval(), processor


def schedule_metrics(model) -> dict:
    """Visual tokens per tile entering the language model, in its last layer, and summed over its layers (the cost)."""
    schedule = model.model.visual_token_schedule(1)
    return dict(
        visual_tokens_per_tile=model.config.tokens_per_tile,
        visual_tokens_per_tile_last_layer=schedule[-1],
        visual_token_layers_per_tile=sum(schedule),
    )


def greedy_answers(model, processor, inputs) -> list[str]:
    """The greedy answers (up to 10 tokens, ending at `<|im_end|>`) to the processor's `inputs`, one per row, stripped:
    how the demo, its evaluations and the video demo's ask."""
    with torch.no_grad():
        output = model.generate(
            **inputs.to(model.device),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def evaluate(model, processor, samples: list[dict], batch_size: int = 64) -> dict:
    """Exact-match accuracy of greedy answers, overall and per question kind."""
    model.eval()
    correct = {"single": [], "grid": [], "row": []}
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        answers = greedy_answers(model, processor, chat_inputs(processor, batch))
        for sample, answer in zip(batch, answers):
            kind = (
                "row" if sample["question"].startswith("Read") else "single" if "this" in sample["question"] else "grid"
            )
            correct[kind].append(answer == sample["answer"])
    every = correct["single"] + correct["grid"] + correct["row"]
    return {
        "accuracy": sum(every) / len(every),
        "single_accuracy": sum(correct["single"]) / max(1, len(correct["single"])),
        "grid_accuracy": sum(correct["grid"]) / max(1, len(correct["grid"])),
        "row_accuracy": sum(correct["row"]) / max(1, len(correct["row"])),
        "samples": len(every),
    }


def evaluate_with(model, processor, samples: list[dict], **overrides) -> dict:
    """`evaluate` with the model's config changed for this call only, e.g. FastV pruning switched on without training
    (`fastv_layer=1, fastv_ratio=0.75`); the changed config is validated first."""
    type(model.config).from_dict(model.config.to_dict() | overrides)  # raises on a setting the model cannot run
    previous = {key: getattr(model.config, key) for key in overrides}
    model.config.update(overrides)
    try:
        return evaluate(model, processor, samples) | schedule_metrics(model)
    finally:
        model.config.update(previous)


def held_out(count: int, seed: int = 12345) -> list[dict]:
    pool, rng = DigitPool("test"), random.Random(seed)
    return [make_sample(pool, rng) for _ in range(count)]


def train(
    variant: str,
    seed: int,
    steps: int,
    output: Path | None,
    batch_size: int = 8,
    lr: float = 1e-3,
    eval_samples: int = 300,
    warmup_steps: int = 0,
    workers: int = 0,
    cpu: bool = False,
    callbacks: list | None = None,
    also_evaluate: dict[str, dict] | None = None,
    example_images: bool = True,
) -> dict:
    """Train `variant` from scratch: `warmup_steps` on single digits (one tile), then `steps` on the full task.

    `also_evaluate` maps a name to config overrides the trained model is evaluated with too, on the same held-out
    questions (e.g. FastV settings); their metrics go under `metrics["also"][name]`. With `output`, the checkpoint is
    saved there (with example images picked for the model card unless `example_images` is False)."""
    from transformers import Trainer, TrainingArguments

    cpu = cpu or not torch.cuda.is_available()
    model, processor = build(variant, seed)
    work = Path(output or f"/tmp/digits-{variant}-{seed}")
    collator = ChatCollator(processor.tokenizer.pad_token_id)

    def trainer_for(records: GeneratedRecords, max_steps: int, schedule: str) -> Trainer:
        args = TrainingArguments(
            output_dir=str(work / "trainer"),
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type=schedule,
            warmup_steps=min(200, max_steps // 10),
            weight_decay=0.01,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            use_cpu=cpu,
            seed=seed,
            remove_unused_columns=False,
            dataloader_num_workers=workers,
            disable_tqdm=True,
        )
        return Trainer(
            model=model,
            args=args,
            train_dataset=ChatDataset(records, processor),
            data_collator=collator,
            callbacks=callbacks,
        )

    pool = DigitPool("train")
    start = time.perf_counter()
    if warmup_steps:  # curriculum: single digits on one tile first
        trainer_for(
            GeneratedRecords(pool, warmup_steps * batch_size, seed + 1, single=True),
            warmup_steps,
            "constant_with_warmup",
        ).train()
    trainer = trainer_for(GeneratedRecords(pool, steps * batch_size, seed), steps, "cosine")
    trainer.train()
    seconds = time.perf_counter() - start
    questions = held_out(eval_samples)
    metrics = evaluate(model, processor, questions)
    if also_evaluate:
        metrics["also"] = {
            name: evaluate_with(model, processor, questions, **overrides) for name, overrides in also_evaluate.items()
        }
    metrics.update(
        variant=variant,
        seed=seed,
        steps=steps,
        curriculum_steps=warmup_steps,
        batch_size=batch_size,
        learning_rate=lr,
        device=str(model.device),
        train_seconds=seconds,
        **schedule_metrics(model),
        final_loss=trainer.state.log_history[-1].get("train_loss"),
    )
    if output is not None:
        model.save_pretrained(output)
        processor.save_pretrained(output)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if example_images:
            write_examples(output)
    return metrics


CHANCE = {"single": 0.1, "grid": 0.1, "row": 0.001}


def write_examples(folder: Path, per_kind: int = 2, seed: int = 777) -> None:
    """Ship `per_kind` held-out images per question kind with `examples.json`: the first ones the trained checkpoint
    in `folder` answers correctly, for the kinds it answers at more than twice chance (per `metrics.json`), so a lucky
    guess is never shown as the model reading."""
    model, processor = load_checkpoint(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    pool, rng = DigitPool("test"), random.Random(seed)
    chosen, tried = [], 0
    for kind in [k for k, chance in CHANCE.items() if metrics[f"{k}_accuracy"] > 2 * chance]:
        found = attempts = 0
        while found < per_kind and attempts < 100:
            sample = make_sample(pool, rng, kind)
            tried, attempts = tried + 1, attempts + 1
            if evaluate(model, processor, [sample])["accuracy"] == 1.0:
                name = f"example-{kind}-{found}.png"
                sample["image"].save(folder / name)
                chosen.append({"image": name, "question": sample["question"], "answer": sample["answer"]})
                found += 1
    (folder / "examples.json").write_text(json.dumps(chosen, indent=2))
    print(f"shipped {len(chosen)} examples, the first answered correctly among {tried} held-out samples")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="demo")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="where to save the trained checkpoint")
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--curriculum-steps", type=int, default=0, help="first steps on single digits, one tile")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is visible")
    parser.add_argument("--write-examples", type=Path, default=None, help="only pick example images for a checkpoint")
    args = parser.parse_args(argv)
    if args.write_examples:
        return write_examples(args.write_examples)
    metrics = train(
        args.variant,
        args.seed,
        args.steps,
        args.output,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_samples=args.eval_samples,
        warmup_steps=args.curriculum_steps,
        workers=args.workers,
        cpu=args.cpu,
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
