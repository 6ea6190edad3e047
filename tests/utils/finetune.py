"""Helpers of the fine-tuning tests: a small data set in InternVL's format and `examples/finetune.py`'s arguments."""

import json

import numpy as np
import PIL.Image

from examples import finetune


def write_dataset(folder, samples: int = 12, seed: int = 0):
    """Images whose colour decides the answer, multi-turn lines and text-only lines, in InternVL's format."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(samples):
        red = i % 2 == 0
        size = (120, 60) if i % 3 else (60, 60)
        pixels = np.zeros((size[1], size[0], 3), np.uint8) + rng.integers(0, 30, (size[1], size[0], 3), dtype=np.uint8)
        pixels[..., 0 if red else 2] += 200
        PIL.Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        answer = "red" if red else "blue"
        if i % 4 == 3:
            lines.append(
                {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]}
            )
        elif i % 4 == 2:
            lines.append(
                {
                    "image": f"{i}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour?"},
                        {"from": "gpt", "value": answer},
                        {"from": "human", "value": "Sure?"},
                        {"from": "gpt", "value": f"yes, {answer}"},
                    ],
                }
            )
        else:
            lines.append(
                {
                    "image": f"{i}.png",
                    "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": answer}],
                }
            )
    (folder / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    (folder / "meta.json").write_text(json.dumps({"colours": {"annotation": "data.jsonl", "root": "images"}}))
    return folder / "meta.json"


def run(args):
    finetune.main([str(a) for a in args])


def common_args(model_dir, data, out, steps):
    return [
        "--model_name_or_path",
        model_dir,
        "--meta_path",
        data,
        "--output_dir",
        out,
        "--max_steps",
        steps,
        "--per_device_train_batch_size",
        4,
        "--learning_rate",
        3e-3,
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        1,
        "--seed",
        0,
    ]
