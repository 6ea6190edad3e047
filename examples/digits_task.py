"""A small visual task built from real handwritten digits (scikit-learn's `load_digits`, 1797 8×8 scans).

Each image is a canvas of varied size and aspect ratio holding digits at varied sizes:
- single images: one digit, asked "What digit is this?" (it teaches the vision tower the digits first);
- grid images: four digits in the quadrants, asked "What digit is in the top-left?" (or another corner);
- row images: two to four digits in a row, asked "Read the digits left to right." (answer "4 0 9").
Digit scans are split once into a training and a held-out pool, so held-out images show unseen handwriting.
"""

import random

import numpy as np
import PIL.Image

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
KINDS = ("single", "single", "grid", "row")
CANVASES = ((64, 64), (96, 64), (128, 64), (64, 96), (128, 96), (96, 96), (128, 128), (192, 64), (192, 96))


class DigitPool:
    """The 8×8 digit scans of one split, as white-on-black uint8 images with their labels."""

    def __init__(self, split: str, held_out_fraction: float = 0.2):
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        cut = int(len(order) * (1 - held_out_fraction))
        chosen = order[:cut] if split == "train" else order[cut:]
        self.images = (digits.images[chosen] / 16.0 * 255).astype(np.uint8)
        self.labels = digits.target[chosen]

    def sample(self, rng: random.Random) -> tuple[PIL.Image.Image, int]:
        index = rng.randrange(len(self.labels))
        return PIL.Image.fromarray(self.images[index]), int(self.labels[index])


def place(canvas: PIL.Image.Image, digit: PIL.Image.Image, box: tuple[int, int, int, int], rng: random.Random):
    """Paste `digit` scaled to a random size inside `box` (left, top, right, bottom), at a random offset."""
    left, top, right, bottom = box
    size = rng.randint(max(10, min(right - left, bottom - top) // 2), min(right - left, bottom - top))
    scaled = digit.resize((size, size), PIL.Image.BILINEAR)
    x = rng.randint(left, right - size)
    y = rng.randint(top, bottom - size)
    canvas.paste(scaled, (x, y))


def make_sample(pool: DigitPool, rng: random.Random, kind: str | None = None, canvas=None) -> dict:
    """One image with a question and its answer: `{"image", "question", "answer"}` (`canvas`: a fixed (W, H))."""
    kind = kind or rng.choice(KINDS)
    width, height = canvas or rng.choice(CANVASES)
    canvas = PIL.Image.new("L", (width, height), 0)
    if kind == "single":
        digit, label = pool.sample(rng)
        side = min(width, height)
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        place(canvas, digit, (x, y, x + side, y + side), rng)
        question, answer = "What digit is this?", str(label)
    elif kind == "grid":
        labels = []
        for row in range(2):
            for column in range(2):
                digit, label = pool.sample(rng)
                box = (column * width // 2, row * height // 2, (column + 1) * width // 2, (row + 1) * height // 2)
                place(canvas, digit, box, rng)
                labels.append(label)
        corner = rng.randrange(4)
        question, answer = f"What digit is in the {CORNERS[corner]}?", str(labels[corner])
    else:
        count = rng.randint(2, 4)
        labels = []
        for i in range(count):
            digit, label = pool.sample(rng)
            place(canvas, digit, (i * width // count, 0, (i + 1) * width // count, height), rng)
            labels.append(label)
        question, answer = "Read the digits left to right.", " ".join(map(str, labels))
    return {"image": canvas.convert("RGB"), "question": question, "answer": answer}


def as_record(sample: dict) -> dict:
    """The sample in InternVL's chat format (for `examples/finetune.py`'s `ChatDataset`)."""
    return {
        "image": sample["image"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample['question']}"},
            {"from": "gpt", "value": sample["answer"]},
        ],
    }


def corpus(system_message: str = "") -> list[str]:
    """Text the demo tokenizer is trained on: every question and answer form of the task and the system message."""
    lines = [f"What digit is in the {corner}?" for corner in CORNERS] + [
        "Read the digits left to right.",
        system_message,
    ]
    lines += [" ".join(str(d) for d in range(10)), "0 1 2 3 4 5 6 7 8 9"]
    return lines * 50
