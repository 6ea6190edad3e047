"""Demo: build a tiny random-weight InternVL-X, save it as a bundle, load it back through trust_remote_code, generate.

The weights are random, so the generated ids mean nothing; the demo shows the path a user's checkpoint takes.
A trained demo checkpoint replaces this once the fine-tuning example lands.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText
from transformers.dynamic_module_utils import get_class_from_dynamic_module

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    config_class = get_class_from_dynamic_module("configuration_internvl_x.InternVLXConfig", ROOT)
    model_class = get_class_from_dynamic_module("modeling_internvl_x.InternVLXForConditionalGeneration", ROOT)
    config = config_class(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=112, patch_size=14),
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=256, pad_token_id=0, eos_token_id=2),
        image_token_id=250, image_start_token_id=248, image_end_token_id=249,
    )  # fmt: skip
    print(f"1. tiny InternVL-X: {config.tile_size}px tiles, {config.tokens_per_tile} visual tokens per tile")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model_class(config).save_pretrained(folder)
        print(f"2. saved as a bundle: {sorted(p.name for p in Path(folder).iterdir())}")
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        print(f"3. loaded back with trust_remote_code as {type(model).__name__}")

    pixel_values = torch.rand(2, 3, config.tile_size, config.tile_size)  # two tiles of one image
    image = [config.image_start_token_id] + [config.image_token_id] * (2 * config.tokens_per_tile)
    input_ids = torch.tensor([[1, 17, 42] + image + [config.image_end_token_id, 99, 7]])
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)
    new_ids = output[0, input_ids.shape[1] :].tolist()
    print(f"4. prompt of {input_ids.shape[1]} tokens with 2 tiles → generated ids {new_ids}")


if __name__ == "__main__":
    main()
