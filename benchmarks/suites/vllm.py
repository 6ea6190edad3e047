"""vLLM (CPU build) vs Transformers `generate`, on the same prompts, one engine after the other."""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import suite
from devtools.bundle import ROOT


@suite("vllm")
def vllm_suite(args) -> dict:
    """vLLM (its Transformers backend, `model_impl="transformers"`) against Transformers' `generate` on the same batch:
    the digits demo with LVTC off (PVTC, what vLLM can serve), its 6 questions 16 times over (96 requests, one image
    each), greedy, 64 new tokens each (end of turn ignored, so both generate the same count), both on the same number
    of threads (vLLM alone would drop to one on this CPU). Run with the Python of `.venv-vllm` (`make test-vllm` makes
    it). Seconds are the median of `--repeats` runs of the batch after a warm-up: vLLM's
    `generate` call (engine start excluded), Transformers' batched `generate` (left-padded; model load excluded). One
    run of the suite, one engine after the other (vLLM in a child process, as devtools/vllm_runs.py runs it)."""
    import importlib.metadata
    import subprocess
    import tempfile

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    demo = ROOT / "examples" / "digits-demo"
    examples = json.loads((demo / "examples.json").read_text()) * (1 if args.quick else 16)
    new_tokens = 8 if args.quick else 64
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pvtc"
        model = AutoModelForImageTextToText.from_pretrained(demo, trust_remote_code=True, lvtc_enabled=False)
        model.save_pretrained(path)
        processor = AutoProcessor.from_pretrained(demo, trust_remote_code=True)
        processor.save_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["question"]}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for example in examples
        ]
        images = [Image.open(demo / example["image"]).convert("RGB") for example in examples]
        inputs = processor(images=images, text=prompts, return_tensors="pt")
        timings = []
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                timings.append(time.perf_counter() - start)
        transformers_seconds = statistics.median(timings)
        generated = (output.shape[1] - inputs["input_ids"].shape[1]) * len(examples)
        spec = {
            "model": str(path),
            "max_tokens": new_tokens,
            "ignore_eos": True,
            "max_num_seqs": len(examples),
            "warm_up": True,
            "repeats": args.repeats,
            "requests": [
                {"prompt": prompt.removeprefix(processor.tokenizer.bos_token), "images": [str(demo / example["image"])]}
                for prompt, example in zip(prompts, examples)
            ],
        }
        (Path(folder) / "spec.json").write_text(json.dumps(spec))
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "devtools" / "vllm_runs.py"),
                str(Path(folder) / "spec.json"),
                str(Path(folder) / "out.json"),
            ],
            check=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())},
        )
        result = json.loads((Path(folder) / "out.json").read_text())
    vllm_tokens = sum(len(r["token_ids"]) for r in result["results"])
    rows = [
        {
            "engine": "Transformers generate (batched)",
            "requests": len(examples),
            "new tokens": generated,
            "seconds": transformers_seconds,
            "tokens/s": generated / transformers_seconds,
        },
        {
            "engine": "vLLM (Transformers backend)",
            "requests": len(examples),
            "new tokens": vllm_tokens,
            "seconds": result["seconds"],
            "tokens/s": vllm_tokens / result["seconds"],
        },
    ]
    ratios = {"vllm_over_generate_tokens_per_s": rows[1]["tokens/s"] / rows[0]["tokens/s"]}
    shapes = {
        "model": "digits demo, lvtc_enabled=False",
        "requests": len(examples),
        "new_tokens": new_tokens,
        "dtype": "float32",
        "vllm": importlib.metadata.version("vllm-cpu"),
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes}
