"""`make demo`: the committed digits checkpoint answers questions about images of handwritten digits, offline.

    python examples/demo.py [--seed N]

The checkpoint (`examples/digits-demo/`) is a small InternVL-X (PVTC + LVTC, RVTC edge slicing) trained from scratch
by `examples/train_digits_demo.py` on images composed of real handwritten digits from scikit-learn (held-out
accuracy in its metrics.json and the README). The demo answers the shipped example images (exit status 1 if one is
answered wrongly), then images it composes now from held-out handwriting (`--seed` picks them; shown, not checked).
Then the video demo (`examples/digits-video-demo/`, the same checkpoint taught to read clips by
`examples/train_digits_video.py`) reads the digits of its shipped clips in the order they appear (checked the same
way), and of a clip it composes now.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import PIL.Image
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.digits_task import DigitPool, make_clip, make_sample  # noqa: E402
from examples.train_digits_demo import greedy_answers  # noqa: E402
from examples.train_digits_video import answer_clip  # noqa: E402

FOLDER = Path(__file__).resolve().parent / "digits-demo"
VIDEO_FOLDER = Path(__file__).resolve().parent / "digits-video-demo"


def answer(model, processor, image: PIL.Image.Image, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return greedy_answers(model, processor, inputs)[0]


def show(model, processor, image: PIL.Image.Image, name: str, question: str, expected: str) -> bool:
    tiles = processor.image_processor.get_number_of_image_patches(image.height, image.width)
    got = answer(model, processor, image, question)
    tile_word = "tile" if tiles == 1 else "tiles"
    print(
        f"{name} ({image.width}×{image.height}, {tiles} {tile_word}) — {question}\n"
        f"  model: {got!r}   expected: {expected!r}   {'✓' if got == expected else '✗'}"
    )
    return got == expected


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="which freshly composed images to ask about")
    args = parser.parse_args(argv)
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(FOLDER, trust_remote_code=True).eval()
    config = model.config
    metrics = json.loads((FOLDER / "metrics.json").read_text())
    print(
        f"InternVL-X digits demo ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters): "
        f"{config.projector_type} projector, LVTC {config.tokens_per_tile} → {config.lvtc_expanded_tokens_per_tile} "
        f"tokens per tile from layer {config.lvtc_expand_layer}, {processor.image_processor.slicing} slicing; "
        f"held-out exact match on {metrics['samples']} questions: single digit {metrics['single_accuracy']:.0%}, "
        f"corner {metrics['grid_accuracy']:.0%}, left-to-right {metrics['row_accuracy']:.0%} (chance ≈ 10 %, 10 %, "
        f"< 1 %)"
    )
    examples = json.loads((FOLDER / "examples.json").read_text())
    correct = sum(
        show(model, processor, PIL.Image.open(FOLDER / e["image"]), e["image"], e["question"], e["answer"])
        for e in examples
    )
    print(f"shipped examples: {correct}/{len(examples)} correct\n")

    pool, rng = DigitPool("test"), random.Random(args.seed)
    fresh = [make_sample(pool, rng, kind) for kind in ("grid", "row")]
    fresh_correct = sum(
        show(model, processor, s["image"], f"new image {i}", s["question"], s["answer"]) for i, s in enumerate(fresh)
    )
    print(f"new images (seed {args.seed}): {fresh_correct}/{len(fresh)} correct\n")
    if not video_demo(args.seed) or correct < len(examples):
        sys.exit(1)


def video_demo(seed: int) -> bool:
    """The video checkpoint on its shipped clips (checked) and on a clip composed now (shown); whether every shipped
    clip was read correctly."""
    processor = AutoProcessor.from_pretrained(VIDEO_FOLDER, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(VIDEO_FOLDER, trust_remote_code=True).eval()
    metrics = json.loads((VIDEO_FOLDER / "metrics.json").read_text())
    print(
        f"InternVL-X digits video demo: every frame one tile, LVTC {model.config.tokens_per_tile} → "
        f"{metrics['visual_tokens_per_frame_last_layer']} tokens per frame; held-out exact match on "
        f"{metrics['eval_samples']} clips: {metrics['video_accuracy_8_frames']:.0%} at 8 frames, "
        f"{metrics['video_accuracy_16_frames']:.0%} at 16 (chance < 1 %)"
    )
    examples = json.loads((VIDEO_FOLDER / "examples.json").read_text())
    correct = 0
    for example in examples:
        got = answer_clip(model, processor, str(VIDEO_FOLDER / example["video"]), example["question"], 8)
        correct += got == example["answer"]
        print(
            f"{example['video']} (8 frames of the clip, one tile each) — {example['question']}\n"
            f"  model: {got!r}   expected: {example['answer']!r}   {'✓' if got == example['answer'] else '✗'}"
        )
    print(f"shipped clips: {correct}/{len(examples)} correct")
    clip = make_clip(DigitPool("test"), random.Random(seed), 8)
    got = answer_clip(model, processor, clip["video"], clip["question"])
    print(
        f"new clip (seed {seed}, 8 frames) — {clip['question']}\n"
        f"  model: {got!r}   expected: {clip['answer']!r}   {'✓' if got == clip['answer'] else '✗'}"
    )
    return correct == len(examples)


if __name__ == "__main__":
    main()
