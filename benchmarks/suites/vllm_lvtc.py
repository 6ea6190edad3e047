"""LVTC served by vLLM through our plugin (`vllm_plugin/`), against the HR-only model, plain serving and the bundle."""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import geometry
from benchmarks.harness import suite
from benchmarks.suites.lvtc import default_lvtc_settings
from devtools.bundle import ROOT, Bundle

DEMO = ROOT / "examples" / "digits-demo"
TILES = 7  # 6 tiles of a 3:2 image and its thumbnail
IMAGE_SIZE = (1344, 896)
QUESTION = "Describe the picture in detail, including specific numbers."


def checkpoint(folder: Path, tiles_per_image: int, **overrides) -> Path:
    """A random-weight checkpoint of the decode suite's reduced widths at the quick depth (ViT 2 layers, LLM 4), with
    the digits demo's tokenizer and chat template, and an image processor making `tiles_per_image` 448-px tiles of a
    3:2 image (thumbnail included)."""
    from transformers import AutoConfig, AutoProcessor

    demo = AutoConfig.from_pretrained(DEMO, trust_remote_code=True)
    bundle = Bundle()
    settings = geometry("cpu", quick=True, **overrides)
    ids = {name: getattr(demo.text_config, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    settings["text_config"].update(vocab_size=demo.text_config.vocab_size, **ids)
    for name in ("image_token_id", "image_start_token_id", "image_end_token_id"):
        settings[name] = getattr(demo, name)
    config = bundle.Config(**settings)
    torch.manual_seed(0)
    model = bundle.ForConditionalGeneration(config)
    config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForImageTextToText")
    model.save_pretrained(folder)
    processor = AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)
    processor.image_processor.image_size = config.tile_size
    processor.image_processor.max_patches = tiles_per_image - 1
    processor.image_seq_length = config.tokens_per_tile
    processor.save_pretrained(folder)
    return folder


def images(folder: Path, count: int) -> list[str]:
    """`count` different 3:2 images (noise, so that no cache of vLLM's serves one request from another's)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        pixels = torch.randint(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), generator=generator, dtype=torch.uint8)
        paths.append(str(folder / f"image-{index}.jpg"))
        Image.fromarray(pixels.numpy()).save(paths[-1], quality=90)
    return paths


def engine_run(folder: Path, model: Path, engine: dict, phases: list[dict]) -> dict:
    """One engine in a process of its own (devtools/vllm_scenarios.py) running `phases`."""
    import subprocess

    spec = {"engine": {"model": str(model), **engine}, "phases": phases}
    (folder / "spec.json").write_text(json.dumps(spec))
    threads = str(torch.get_num_threads())
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "6",
        "OMP_NUM_THREADS": threads,
        "PYTHONPATH": str(ROOT),
        # The engine in the process that calls it: on a CPU of few cores, vLLM's engine and front-end processes take
        # turns on the cores with the worker (a request alone took 3.25 s instead of 1.75 s here on 2 cores).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    command = [sys.executable, str(ROOT / "devtools" / "vllm_scenarios.py"), str(folder / "spec.json")]
    subprocess.run([*command, str(folder / "out.json")], check=True, env=env)
    return json.loads((folder / "out.json").read_text())


def bundle_generate_seconds(model_path: Path, requests: list[dict], batch: int, new_tokens: int) -> float:
    """Seconds the bundle's batched `generate` takes for `requests`, `batch` at a time (left-padded, greedy,
    `new_tokens` each); one untimed batch first."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, dtype=torch.float32).eval()

    def run(group: list[dict]) -> None:
        pictures = [Image.open(r["images"][0]).convert("RGB") for r in group]
        inputs = processor(images=pictures, text=[r["chat"] for r in group], return_tensors="pt", padding=True)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    run(requests[:batch])
    start = time.perf_counter()
    for first in range(0, len(requests), batch):
        run(requests[first : first + batch])
    return time.perf_counter() - start


@suite("vllm-lvtc")
def vllm_lvtc_suite(args) -> dict:
    """vLLM (CPU build) serving LVTC through the plugin, 7 tiles per request, against: the HR-only model through the
    plugin (k = L: N2² = 1024 tokens per tile in every layer; what LVTC's long layers hold); plain serving (the same
    checkpoint with LVTC off, N1² = 256 per tile) through the plugin and through vLLM's Transformers backend; and the
    bundle's batched `generate` of the LVTC model at batch 8. The decode suite's reduced widths (ViT 256, LLM 512,
    448-px tiles) at the quick depth (ViT 2 layers, LLM 4, LVTC k = 3: the 2B's 18 of 24 in proportion) and the
    demo's 432-token vocabulary (the 2B's 92,553 would make the LM head most of a step at these widths). Run with the
    Python of `.venv-vllm`. Each engine runs in a process of its own (vLLM's engine inside it, not in processes of
    its own: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), one after the other, on the same threads, in two rounds (the second
    in the reverse order; one with `--quick`): prefill is the median time of 3 requests alone (per round) with one new
    token; throughput is every request submitted at once (`--quick`: 8, else 64), 128 new tokens each (4 quick), end of
    turn ignored, the median over the rounds; each after a warm-up request. Prefix caching is off and every
    image differs (warm-ups included), so no request is served from another's cache. KV per request is the prompt's
    positions as vLLM counts them (its `prompt_token_ids`) plus the new tokens, times what a position holds in every
    layer."""
    import importlib.metadata

    requests_count, new_tokens = (8, 4) if args.quick else (64, 128)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {
            "LVTC": checkpoint(tmp / "lvtc", TILES, **default_lvtc_settings(4)),
            "HR-only": checkpoint(tmp / "hr", TILES, projector_type="pixel_shuffle", downsample_ratio=1.0),
            "plain": checkpoint(tmp / "plain", TILES, **{**default_lvtc_settings(4), "lvtc_enabled": False}),
        }
        from transformers import AutoProcessor

        pictures = images(tmp, requests_count + 5)
        chat = AutoProcessor.from_pretrained(paths["LVTC"], trust_remote_code=True).apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt = chat.removeprefix("<s>")  # vLLM's tokenizer adds the BOS
        warm_up = [{"prompt": prompt, "images": [path]} for path in pictures[:2]]
        solo = [{"prompt": prompt, "images": [path]} for path in pictures[2:5]]
        load = [{"prompt": prompt, "images": [path]} for path in pictures[5:]]
        phases = [
            {"kind": "timed", "alone": True, "requests": solo, "max_tokens": 1, "warm_up": warm_up[0]},
            {"kind": "timed", "requests": load, "max_tokens": new_tokens, "warm_up": warm_up[1]},
        ]
        engine = dict(
            max_model_len=8192,
            max_num_batched_tokens=8192,
            max_num_seqs=requests_count,
            enable_prefix_caching=False,
            limit_mm_per_prompt={"image": 1},
        )
        engines = {
            "LVTC (plugin)": ("LVTC", {}),
            "HR-only (plugin)": ("HR-only", {}),
            "plain (plugin)": ("plain", {}),
            "plain (Transformers backend)": ("plain", {"model_impl": "transformers"}),
        }
        # Two rounds, the second in the reverse order, so that a slow spell of the machine (runs of one engine vary by
        # about 10 % here) does not fall on one engine alone; each figure is the median over both rounds.
        runs = {name: [] for name in engines}
        bundle_seconds = []
        for round_ in range(1 if args.quick else 2):
            order = list(engines) + ["bundle"]
            for name in order if round_ == 0 else reversed(order):
                if name == "bundle":
                    bundle_seconds.append(
                        bundle_generate_seconds(
                            paths["LVTC"], [{"chat": chat, "images": r["images"]} for r in load], 8, new_tokens
                        )
                    )
                    continue
                model, extra = engines[name]
                folder = tmp / f"{name} {round_}"
                folder.mkdir()
                runs[name].append(engine_run(folder, paths[model], {**engine, **extra}, phases)["phases"])
        configs = {name: json.loads((path / "config.json").read_text()) for name, path in paths.items()}

    rows = []
    for name, rounds in runs.items():
        model = engines[name][0]
        text = configs[model]["text_config"]
        bytes_per_position = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 4
        load_run = rounds[0][1]
        positions = len(load_run["results"][0]["prompt_token_ids"]) + new_tokens
        generated = sum(len(r["token_ids"]) for r in load_run["results"])
        seconds = statistics.median(solo_load[1]["seconds"][0] for solo_load in rounds)
        rows.append(
            {
                "engine": name,
                "prefill s (1 request)": statistics.median(t for solo_load in rounds for t in solo_load[0]["seconds"]),
                "requests": len(load_run["results"]),
                "new tokens": generated,
                "seconds": seconds,
                "tokens/s": generated / seconds,
                "KV positions per request": positions,
                "KV MB per request": positions * bytes_per_position / 2**20,
            }
        )
    generated = requests_count * new_tokens
    rows.append(
        {
            "engine": "LVTC (bundle generate, batch 8)",
            "prefill s (1 request)": "—",
            "requests": requests_count,
            "new tokens": generated,
            "seconds": statistics.median(bundle_seconds),
            "tokens/s": generated / statistics.median(bundle_seconds),
            "KV positions per request": "—",
            "KV MB per request": "—",
        }
    )
    by = {row["engine"]: row for row in rows}
    ratios = {
        "lvtc_over_hr_only_prefill_s": by["LVTC (plugin)"]["prefill s (1 request)"]
        / by["HR-only (plugin)"]["prefill s (1 request)"],
        "lvtc_over_hr_only_tokens_per_s": by["LVTC (plugin)"]["tokens/s"] / by["HR-only (plugin)"]["tokens/s"],
        "plugin_over_transformers_backend_plain_tokens_per_s": by["plain (plugin)"]["tokens/s"]
        / by["plain (Transformers backend)"]["tokens/s"],
        "vllm_lvtc_over_bundle_batch_8_tokens_per_s": by["LVTC (plugin)"]["tokens/s"]
        / by["LVTC (bundle generate, batch 8)"]["tokens/s"],
        "lvtc_over_hr_only_kv_per_request": by["LVTC (plugin)"]["KV MB per request"]
        / by["HR-only (plugin)"]["KV MB per request"],
    }
    shapes = {
        "model": "reduced widths (ViT 256, LLM 512), ViT 2 layers, LLM 4 layers, LVTC k = 3, 448-px tiles",
        "tiles_per_request": TILES,
        "requests": requests_count,
        "new_tokens": new_tokens,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "vllm": importlib.metadata.version("vllm-cpu"),
        "rounds": len(bundle_seconds),
        "seconds_per_round": {name: [r[1]["seconds"][0] for r in rounds] for name, rounds in runs.items()}
        | {"LVTC (bundle generate, batch 8)": bundle_seconds},
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes}
