"""Teach the digits demo checkpoint to read videos (`digits_task.make_clip`) with the stock `Trainer`, and compare how
video frames reach the language model, at 8 and 16 frames.

    python examples/train_digits_video.py --variant lvtc --steps 300 --output examples/digits-video-demo
    python examples/train_digits_video.py --compare --steps 1000 --align-steps 1000 \\
        --out benchmarks/results/digits-video-cpu.json

Each variant starts from `examples/digits-demo` (its vision tower and language model read digits in 64-pixel tiles
already; its 1024 positions are raised to 2048 for 16 LVTC frames) and trains the same steps on clips of 8 or 16
frames (one tile each; "Read the digits in the order they appear.") mixed with the image task, so it keeps reading
images:
- `lvtc`: the demo as it is: PVTC projector, LVTC (16 → 64 tokens per frame from layer 3, HR + one extra LR projector);
- `pvtc`: LVTC switched off: 16 PVTC tokens per frame in every layer;
- `pixel_shuffle`: InternVL's pixel-shuffle projector (16 tokens per frame) in place of PVTC, LVTC off. The demo has
  no weights for it: with `--align-steps N` (as InternVL's first stage trains its MLP projector alone) the modules the
  demo has no weights for train alone on the image task for N steps first, the rest frozen, so every variant starts
  the shared schedule from a projector trained on the task.
Held-out clips and images use handwriting no training sample shows (`DigitPool("test")`).
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

from examples.digits_task import DigitPool, as_record, make_clip, make_sample  # noqa: E402
from examples.finetune import ChatCollator, ChatDataset, parse_row  # noqa: E402
from examples.train_digits_demo import evaluate, greedy_answers  # noqa: E402

DEMO = ROOT / "examples" / "digits-demo"
VARIANTS = {
    "lvtc": {},
    "pvtc": dict(lvtc_enabled=False),
    "pixel_shuffle": dict(projector_type="pixel_shuffle", lvtc_enabled=False),
}
FRAME_COUNTS = (8, 16)


class MixedRecords:
    """`size` training rows generated on demand: a clip of 8 or 16 frames with probability `video_share`, else an
    image of the image task; the same for the same `seed` and index."""

    def __init__(self, pool: DigitPool, size: int, seed: int, video_share: float = 0.75):
        self.pool, self.size, self.seed, self.video_share = pool, size, seed, video_share

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        rng = random.Random(self.seed * 1_000_003 + index)
        if rng.random() < self.video_share:
            sample = make_clip(self.pool, rng, rng.choice(FRAME_COUNTS))
        else:
            sample = make_sample(self.pool, rng)
        return parse_row(as_record(sample), Path("."), f"generated sample {index}")


CONTEXT = 2048  # positions: the demo's 1024 cannot hold 16 frames at LVTC's 64 tokens each


def load(variant: str, folder: Path = DEMO):
    """`(model, processor, new)` of `folder` with `variant`'s config changes and `CONTEXT` positions; `new` names the
    parameters `folder` has no weights for (freshly initialised; the unused ones of `folder` are left)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True, **VARIANTS[variant])
    config.text_config.max_position_embeddings = CONTEXT
    model, info = AutoModelForImageTextToText.from_pretrained(
        folder, config=config, trust_remote_code=True, output_loading_info=True
    )
    return model, processor, set(info["missing_keys"])


def held_out_clips(count: int, frames: int, seed: int = 4242) -> list[dict]:
    pool, rng = DigitPool("test"), random.Random(seed)
    return [make_clip(pool, rng, frames) for _ in range(count)]


def video_accuracy(model, processor, clips: list[dict], batch_size: int = 32) -> float:
    """Exact-match accuracy of greedy answers to held-out clips (every frame of each clip shown)."""
    model.eval()
    correct = 0
    for start in range(0, len(clips), batch_size):
        batch = clips[start : start + batch_size]
        conversations = [
            [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": c["video"]}, {"type": "text", "text": c["question"]}],
                }
            ]
            for c in batch
        ]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        answers = greedy_answers(model, processor, inputs)
        correct += sum(answer == clip["answer"] for answer, clip in zip(answers, batch))
    return correct / len(clips)


def trainer_for(model, processor, records, steps: int, batch_size: int, lr: float, seed: int, work: Path):
    """The stock `Trainer` on generated `records`: AdamW, cosine with a tenth of the steps warming up, no saving."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        weight_decay=0.01,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    dataset = ChatDataset(records, processor, num_frames=None)  # a generated clip holds the frames to show
    collator = ChatCollator(processor.tokenizer.pad_token_id)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def align_new_modules(model, processor, new: set[str], steps: int, train_options: dict) -> list[str]:
    """Train only the parameters named in `new` on the image task for `steps` steps, everything else frozen; returns
    their names (none when `steps` is 0 or nothing is new). Afterwards every parameter trains as before."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    aligned = [name for name in trainable if name in new]
    if not aligned or steps <= 0:
        return []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in new)
    try:
        images = MixedRecords(DigitPool("train"), steps * train_options["batch_size"], -1 - train_options["seed"], 0.0)
        trainer_for(model, processor, images, steps, **train_options).train()
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
    return aligned


def train(
    variant: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 5e-4,
    eval_samples: int = 200,
    output: Path | None = None,
    example_clips: bool = True,
    align_steps: int = 0,
) -> dict:
    model, processor, new = load(variant)
    torch.manual_seed(seed)
    options = dict(batch_size=batch_size, lr=lr, seed=seed, work=Path(output or f"/tmp/digits-video-{variant}-{seed}"))
    start = time.perf_counter()
    aligned = align_new_modules(model, processor, new, align_steps, options)
    align_seconds = time.perf_counter() - start if aligned else 0.0
    records = MixedRecords(DigitPool("train"), steps * batch_size, seed)
    trainer = trainer_for(model, processor, records, steps, **options)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = {"variant": variant, "steps": steps, "batch_size": batch_size, "learning_rate": lr, "seed": seed}
    metrics.update(
        align_steps=align_steps if aligned else 0, aligned_parameters=len(aligned), align_seconds=align_seconds
    )
    for frames in FRAME_COUNTS:
        metrics[f"video_accuracy_{frames}_frames"] = video_accuracy(
            model, processor, held_out_clips(eval_samples, frames)
        )
    pool, rng = DigitPool("test"), random.Random(12345)
    images = evaluate(model, processor, [make_sample(pool, rng) for _ in range(eval_samples)])
    metrics.update(
        image_accuracy=images["accuracy"],
        visual_tokens_per_frame=model.config.tokens_per_tile,
        visual_tokens_per_frame_last_layer=model.model.visual_token_schedule(1)[-1],
        eval_samples=eval_samples,
        train_seconds=seconds,
        device=str(model.device),
        final_loss=trainer.state.log_history[-1].get("train_loss"),
    )
    if output is not None:
        model.save_pretrained(output)
        processor.save_pretrained(output)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if example_clips:
            write_examples(output)
    return metrics


EXAMPLE_FRAMES, EXAMPLE_FPS = 32, 8  # the shipped clips: 4 s at 8 fps, asked about at 8 frames


def write_examples(folder: Path, count: int = 2, seed: int = 777) -> None:
    """Ship `count` held-out clips as lossless video files (FFV1 in Matroska) with `examples.json`: the first ones the
    checkpoint in `folder` answers correctly from the file at 8 frames, as the docs and `make demo` ask them."""
    import av
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    pool, rng = DigitPool("test"), random.Random(seed)
    chosen, tried = [], 0
    while len(chosen) < count and tried < 100:
        clip, tried = make_clip(pool, rng, EXAMPLE_FRAMES), tried + 1
        name = f"example-clip-{len(chosen)}.mkv"
        with av.open(str(folder / name), "w", format="matroska") as container:
            stream = container.add_stream("ffv1", rate=EXAMPLE_FPS)
            stream.height, stream.width, stream.pix_fmt = *clip["video"].shape[1:3], "bgr0"
            for frame in clip["video"]:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        if answer_clip(model, processor, str(folder / name), clip["question"]) == clip["answer"]:
            chosen.append({"video": name, "question": clip["question"], "answer": clip["answer"], "num_frames": 8})
        else:
            (folder / name).unlink()
    (folder / "examples.json").write_text(json.dumps(chosen, indent=2))
    print(f"shipped {len(chosen)} clips, the first answered correctly among {tried} held-out clips")


def answer_clip(model, processor, video, question: str, num_frames: int = 8) -> str:
    """The model's greedy answer to `question` about `video` (a file, or frames), `num_frames` frames of it."""
    messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"num_frames": num_frames},
    )
    return greedy_answers(model, processor, inputs)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="lvtc")
    parser.add_argument("--compare", action="store_true", help="train and evaluate every variant")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--align-steps", type=int, default=0, help="first train modules the demo has no weights for, alone, on images"
    )
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--output", type=Path, default=None, help="where to save the trained checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="where to write the comparison (JSON)")
    parser.add_argument(
        "--save-dir", type=Path, default=None, help="with --compare: keep each checkpoint in DIR/VARIANT"
    )
    parser.add_argument("--write-examples", type=Path, default=None, help="only pick example clips for a checkpoint")
    args = parser.parse_args(argv)
    if args.write_examples:
        return write_examples(args.write_examples)
    settings = dict(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_samples=args.eval_samples,
        align_steps=args.align_steps,
    )
    if not args.compare:
        print(json.dumps(train(args.variant, output=args.output, **settings), indent=2))
        return
    runs = []
    for variant in VARIANTS:
        runs.append(train(variant, output=args.save_dir / variant if args.save_dir else None, **settings))
        print(json.dumps(runs[-1], indent=2), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps({"settings": settings, "runs": runs}, indent=2))
    print("| variant | tokens per frame (first → last layer) | 8 frames | 16 frames | images |")
    print("| --- | --- | --- | --- | --- |")
    for run in runs:
        print(
            f"| {run['variant']} | {run['visual_tokens_per_frame']} → {run['visual_tokens_per_frame_last_layer']} | "
            f"{run['video_accuracy_8_frames']:.1%} | {run['video_accuracy_16_frames']:.1%} | "
            f"{run['image_accuracy']:.1%} |"
        )


if __name__ == "__main__":
    main()
