"""Greedy generation with the model sharded by tensor parallelism: `from_pretrained(..., tp_plan="auto")`.

    torchrun --nproc_per_node 2 examples/tp_generate.py CHECKPOINT --out tokens.json   # CPU: gloo; GPUs: nccl

In your own code: `from_pretrained(path, trust_remote_code=True, distributed_config=DistributedConfig(tp_plan="auto"))`
under `torchrun` (the older `tp_plan="auto"` argument still works, with a deprecation warning).

The language model is split by its own plan (`text_config.base_model_tp_plan`, e.g. Llama's: attention heads and MLP
columns/rows across processes) and the LM head by the bundle's (`colwise_gather_output`); the vision tower and the
projectors (pixel shuffle, PVTC, LVTC's LR and HR projectors) are replicated, being a small share of the weights.
Every process runs the same prompts; rank 0 writes the new tokens, their logits and which parameters are sharded.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, DistributedConfig


def prompts(processor, count: int = 2) -> dict:
    """`count` chat prompts, each about a random image of its own size (seeded, the same in every process)."""
    generator = torch.Generator().manual_seed(0)
    images, texts = [], []
    for index in range(count):
        size = (64 + 32 * index, 48 + 16 * index)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
        images.append(Image.fromarray(pixels))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {index}?"}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    return processor(images=images, text=texts, return_tensors="pt")


def sharded_parameters(model) -> list[str]:
    return sorted(name for name, parameter in model.named_parameters() if type(parameter.data).__name__ == "DTensor")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes the new tokens to")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--single", action="store_true", help="load without tensor parallelism (the reference)")
    args = parser.parse_args(argv)
    processor = AutoProcessor.from_pretrained(args.checkpoint, trust_remote_code=True)
    plan = {} if args.single else {"distributed_config": DistributedConfig(tp_plan="auto")}
    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True, **plan).eval()
    inputs = prompts(processor).to(model.device)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        report = {
            "tokens": output.sequences[:, inputs["input_ids"].shape[1] :].tolist(),
            "logits": torch.stack(output.logits, dim=1).tolist(),  # (rows, steps, vocab)
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            "sharded": sharded_parameters(model),
        }
        Path(args.out).write_text(json.dumps(report))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's workers can abort the interpreter's teardown after finished work (finetune.py says why): skip it.
        from finetune import exit_before_interpreter_teardown  # this script's folder is on sys.path

        exit_before_interpreter_teardown()
