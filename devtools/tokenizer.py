"""The tokenizer of the tiny test and benchmark checkpoints: `examples/tiny_tokenizer.py` trained on a small
multilingual corpus."""

from examples.tiny_tokenizer import train_tokenizer

CORPUS = [
    "What digit is in the top-left? Read the digits left to right.",
    "The image shows a cat sitting on a red chair next to a window.",
    "Describe the picture in detail, including specific numbers.",
    "你好，世界。这是一张图片。请描述图像中的内容。",
    "0123456789 3.14159 2026-11-22   multiple   spaces\tand tabs\nnew lines",
] * 20


def build_tokenizer(prepare_tokenizer):
    return train_tokenizer(CORPUS, prepare_tokenizer)
