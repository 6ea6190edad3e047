"""A small visual task built from real handwritten digits (scikit-learn's `load_digits`, 1797 8×8 scans).

Each image is a canvas of varied size and aspect ratio holding digits at varied sizes:
- single images: one digit, asked "What digit is this?" (it teaches the vision tower the digits first);
- grid images: four digits in the quadrants, asked "What digit is in the top-left?" (or another corner);
- row images: two to four digits in a row, asked "Read the digits left to right." (answer "4 0 9").
Digit scans are split once into a training and a held-out pool, so held-out images show unseen handwriting.

The video task (`make_clip`): a clip of 64×64 frames in which two to four digits appear one after another, each for an
equal run of frames and drifting a little from frame to frame, asked "Read the digits in the order they appear." (no
digit twice in a row, so every change of digit is visible).
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


VIDEO_QUESTION = "Read the digits in the order they appear."


def make_clip(pool: DigitPool, rng: random.Random, frames: int = 8, side: int = 64) -> dict:
    """A clip of `frames` frames (`(frames, side, side, 3)` uint8) with its question and answer: `{"video",
    "question", "answer"}`. Each of its 2–4 digits (at most one per two frames) holds the screen for an equal run
    of frames at one size, starting at a random place and drifting by up to 3 pixels a frame."""
    count = rng.randint(2, min(4, frames // 2))
    labels, digits = [], []
    while len(labels) < count:
        digit, label = pool.sample(rng)
        if not labels or label != labels[-1]:
            labels.append(label)
            digits.append(digit)
    clip = np.zeros((frames, side, side, 3), np.uint8)
    bounds = [round(i * frames / count) for i in range(count + 1)]
    for digit, start, end in zip(digits, bounds, bounds[1:]):
        size = rng.randint(side * 3 // 8, side * 7 // 8)
        scaled = np.asarray(digit.resize((size, size), PIL.Image.BILINEAR))
        x, y = rng.randint(0, side - size), rng.randint(0, side - size)
        for frame in range(start, end):
            clip[frame, y : y + size, x : x + size] = scaled[..., None]
            x = min(max(0, x + rng.randint(-3, 3)), side - size)
            y = min(max(0, y + rng.randint(-3, 3)), side - size)
    return {"video": clip, "question": VIDEO_QUESTION, "answer": " ".join(map(str, labels))}


def as_record(sample: dict) -> dict:
    """The sample (an image or a clip) in InternVL's chat format (for `examples/finetune.py`'s `ChatDataset`)."""
    kind = "video" if "video" in sample else "image"
    return {
        kind: sample[kind],
        "conversations": [
            {"from": "human", "value": f"<{kind}>\n{sample['question']}"},
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
