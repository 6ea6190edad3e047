"""`make demo`: the committed digits checkpoint answers questions about the shipped example images, offline.

The checkpoint (`examples/digits-demo/`) is a small InternVL-X (PVTC + LVTC, RVTC edge slicing) trained from scratch
on the CPU by `examples/train_digits_demo.py` on images of real handwritten digits from scikit-learn. It reads single
digits well above chance; its answers to position questions (corners, left to right) are still at chance, so the
shipped examples are single-digit ones (see metrics.json and the README).
"""

import json
from pathlib import Path

import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

FOLDER = Path(__file__).resolve().parent / "digits-demo"


def answer(model, processor, image: PIL.Image.Image, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=end,
                                pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(FOLDER, trust_remote_code=True).eval()
    config = model.config
    metrics = json.loads((FOLDER / "metrics.json").read_text())
    print(f"InternVL-X digits demo ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters): "
          f"{config.projector_type} projector, LVTC {config.tokens_per_tile} → {config.lvtc_expanded_tokens_per_tile} "
          f"tokens per tile from layer {config.lvtc_expand_layer}, {processor.image_processor.slicing} slicing; "
          f"held-out exact match on {metrics['samples']} questions: single digit {metrics['single_accuracy']:.0%}, "
          f"corner {metrics['grid_accuracy']:.0%}, left-to-right {metrics['row_accuracy']:.0%} (chance ≈ 10 %, 10 %, "
          f"< 1 %)")  # fmt: skip
    correct = 0
    examples = json.loads((FOLDER / "examples.json").read_text())
    for example in examples:
        image = PIL.Image.open(FOLDER / example["image"])
        tiles = processor.image_processor.get_number_of_image_patches(image.height, image.width)
        got = answer(model, processor, image, example["question"])
        correct += got == example["answer"]
        print(
            f"{example['image']} ({image.width}×{image.height}, {tiles} tiles) — {example['question']}\n"
            f"  model: {got!r}   expected: {example['answer']!r}   {'✓' if got == example['answer'] else '✗'}"
        )
    print(f"{correct}/{len(examples)} correct")


if __name__ == "__main__":
    main()
