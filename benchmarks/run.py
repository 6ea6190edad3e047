"""One entry point for every measurement this project reports.

    python benchmarks/run.py --suite baseline [--device cpu|cuda] [--dtype float32|bfloat16] [--quick] --out FILE.json

Each suite prints a markdown table and writes JSON (device, dtype, shapes, versions, and each figure as the median
of ≥ 5 runs after warm-up). Models compared in one suite run side by side in the same process, interleaved, so the
ratios are meaningful on a noisy machine; absolute times are only meaningful on a GPU.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import bundle_classes, conversion_peak_rss, geometry, wide_internvl2_checkpoint  # noqa: E402

SUITES = {}


def suite(name):
    def register(fn):
        SUITES[name] = fn
        return fn

    return register


# ---- timing and memory -------------------------------------------------------------------------------------------
def built_on(device: str, dtype: torch.dtype, model_class, config):
    """`model_class(config)` initialised directly on `device` (seconds on a GPU for the 2B widths), cast, in eval."""
    with torch.device(device):
        model = model_class(config)
    return model.to(dtype).eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, warmup: int = 2, setup=None) -> float:
    """Median wall time of `fn()` in seconds; `setup()` runs untimed before each call and its result is passed in."""
    times = []
    for i in range(warmup + repeats):
        state = setup() if setup else None
        synchronize(device)
        start = time.perf_counter()
        fn(state) if setup else fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str, repeats: int, setups: dict | None = None) -> dict:
    """Median time of each callable, measured round-robin so drift of the machine hits every entry alike;
    `setups[name]()` (untimed) gives the argument of `fns[name]` before each call."""
    setups = setups or {}
    for name, fn in fns.items():  # warm-up
        for _ in range(2):
            fn(setups[name]()) if name in setups else fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(median_time(fn, device, repeats=1, warmup=0, setup=setups.get(name)))
    return {name: statistics.median(values) for name, values in samples.items()}


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(run, device: str) -> float:
    """Peak memory that `run()` adds on top of what is allocated before it, in MiB.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: growth of the resident-set high-water mark (Linux `VmHWM`, reset
    through `/proc/self/clear_refs` after returning freed heap pages to the system).
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _vm_kb("VmRSS")
    run()
    return (_vm_kb("VmHWM") - base) / 1024


# ---- suites ------------------------------------------------------------------------------------------------------
@suite("baseline")
def baseline_suite(args) -> dict:
    """Our pixel-shuffle model vs transformers.InternVLForConditionalGeneration, same weights, same inputs."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    classes = bundle_classes()
    config = classes.Config(**geometry(args.device, args.quick, projector_type="pixel_shuffle"))
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ours = built_on(args.device, dtype, classes.ForConditionalGeneration, config)
    native_config = InternVLConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        downsample_ratio=config.downsample_ratio,
        tie_word_embeddings=False,
    )
    native = built_on(args.device, dtype, InternVLForConditionalGeneration, native_config)
    native.load_state_dict(ours.state_dict(), strict=True)
    models = {"ours": ours, "native": native}

    prompt_tokens, decode_tokens = 64, 16
    tiles = args.tiles
    ids = [1] + [5] * (prompt_tokens // 2) + [config.image_start_token_id]
    ids += [config.image_token_id] * (tiles * config.tokens_per_tile) + [config.image_end_token_id]
    ids += [7] * (prompt_tokens - prompt_tokens // 2 - 2)
    input_ids = torch.tensor([ids], device=args.device)
    pixel_values = torch.randn(tiles, 3, config.tile_size, config.tile_size, device=args.device, dtype=dtype)

    def prefill(model):
        with torch.no_grad():
            return model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)

    def decode(model, cache):
        next_ids = torch.full((1, 1), 11, device=args.device)
        with torch.no_grad():
            for _ in range(decode_tokens):
                cache = model(input_ids=next_ids, past_key_values=cache, use_cache=True).past_key_values

    prefill_s = interleaved_medians({n: (lambda m=m: prefill(m)) for n, m in models.items()}, args.device, args.repeats)
    decode_s = interleaved_medians(
        {n: (lambda cache, m=m: decode(m, cache)) for n, m in models.items()},
        args.device,
        args.repeats,
        setups={n: (lambda m=m: prefill(m).past_key_values) for n, m in models.items()},
    )
    decode_s = {name: seconds / decode_tokens for name, seconds in decode_s.items()}
    memory = {}
    for name, model in models.items():
        memory[name] = peak_memory_mb(lambda m=model: prefill(m), args.device)

    rows = []
    for name in models:
        rows.append(
            {
                "model": name,
                "prefill_ms": prefill_s[name] * 1e3,
                "decode_ms_per_token": decode_s[name] * 1e3,
                "prefill_peak_mem_mb": memory[name],
            }
        )
    ratios = {
        "prefill_ours_over_native": prefill_s["ours"] / prefill_s["native"],
        "decode_ours_over_native": decode_s["ours"] / decode_s["native"],
        "memory_ours_over_native": memory["ours"] / memory["native"],
    }
    shapes = {
        "tiles": tiles,
        "prompt_text_tokens": prompt_tokens,
        "visual_tokens": tiles * config.tokens_per_tile,
        "sequence": input_ids.shape[1],
        "decode_tokens": decode_tokens,
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes, "config": config.to_diff_dict()}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def prefill_component_flops(config, classes, tiles: int, text_tokens: int) -> dict:
    """FLOPs of one prefill at the real widths, counted on the meta device (no weights allocated).

    The prefill is the vision tower on `tiles` tiles, the projector, the decoder on text + visual tokens and the LM
    head on the last position (`logits_to_keep=1`, as in `generate`). Writing visual tokens into the sequence is a
    copy, so these parts add up to the whole forward.
    """
    config._attn_implementation = "eager"  # attention as explicit matmuls, so every FLOP is counted alike
    with torch.device("meta"):
        model = classes.ForConditionalGeneration(config)
    pixel_values = torch.empty(tiles, 3, config.tile_size, config.tile_size, device="meta")
    sequence = text_tokens + tiles * config.tokens_per_tile
    embeds = torch.empty(1, sequence, config.text_config.hidden_size, device="meta")
    vision = model.model.get_image_features(pixel_values).vision_features
    flops = {
        "vision": count_flops(lambda: model.model.vision_tower(pixel_values=pixel_values)),
        "projector": count_flops(lambda: model.model.multi_modal_projector(vision)),
        "decoder": count_flops(lambda: model.model.language_model(inputs_embeds=embeds)),
        "lm_head": count_flops(lambda: model.lm_head(embeds[:, -1:])),
    }
    flops["prefill"] = sum(flops.values())
    return flops


@suite("pvtc")
def pvtc_suite(args) -> dict:
    """PVTC vs the pixel-shuffle projector: FLOPs (real 2B widths) and time, alone and as a share of a prefill."""
    classes = bundle_classes()
    tiles, text_tokens = args.tiles, 64
    flops = {
        kind: prefill_component_flops(
            classes.Config(**geometry("cuda", args.quick, projector_type=kind)), classes, tiles, text_tokens
        )
        for kind in ("pixel_shuffle", "pvtc")
    }

    dtype = getattr(torch, args.dtype)
    models = {}
    for kind in ("pixel_shuffle", "pvtc"):
        config = classes.Config(**geometry(args.device, args.quick, projector_type=kind))
        torch.manual_seed(0)
        models[kind] = built_on(args.device, dtype, classes.ForConditionalGeneration, config)
    config = models["pvtc"].config
    ids = [1] + [5] * (text_tokens // 2) + [config.image_start_token_id]
    ids += [config.image_token_id] * (tiles * config.tokens_per_tile) + [config.image_end_token_id]
    ids += [7] * (text_tokens - text_tokens // 2 - 2)
    input_ids = torch.tensor([ids], device=args.device)
    pixel_values = torch.randn(tiles, 3, config.tile_size, config.tile_size, device=args.device, dtype=dtype)
    vision = models["pvtc"].model.get_image_features(pixel_values).vision_features

    projector_s = interleaved_medians(
        {kind: (lambda m=m: m.model.multi_modal_projector(vision)) for kind, m in models.items()},
        args.device,
        args.repeats,
    )
    prefill_s = interleaved_medians(
        {
            kind: (lambda m=m: m(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1))
            for kind, m in models.items()
        },
        args.device,
        args.repeats,
    )
    rows = [
        {
            "projector": kind,
            "projector_gflops": flops[kind]["projector"] / 1e9,
            "prefill_gflops": flops[kind]["prefill"] / 1e9,
            "projector_share_of_prefill_flops_%": 100 * flops[kind]["projector"] / flops[kind]["prefill"],
            "projector_ms": projector_s[kind] * 1e3,
            "prefill_ms": prefill_s[kind] * 1e3,
            "projector_share_of_prefill_time_%": 100 * projector_s[kind] / prefill_s[kind],
        }
        for kind in models
    ]
    ratios = {
        "pvtc_added_prefill_flops_%": 100 * (flops["pvtc"]["prefill"] / flops["pixel_shuffle"]["prefill"] - 1),
        "pvtc_over_pixel_shuffle_projector_flops": flops["pvtc"]["projector"] / flops["pixel_shuffle"]["projector"],
        "pvtc_over_pixel_shuffle_prefill_time": prefill_s["pvtc"] / prefill_s["pixel_shuffle"],
    }
    shapes = {
        "tiles": tiles,
        "text_tokens": text_tokens,
        "visual_tokens": tiles * config.tokens_per_tile,
        "flops_widths": "real 2B (ViT 1024, LLM 2048)",
        "timing_widths": "real 2B" if args.device == "cuda" else "reduced (ViT 256, LLM 512)",
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes, "flops": flops}


LVTC_VARIANTS = {
    # name: (config overrides, visual tokens per tile in layers 0..k-1 → k..L-1)
    "LR-only (256)": dict(),
    "HR-only (1024)": dict(downsample_ratio=1.0),
    "LVTC 256→1024": dict(lvtc_enabled=True, lvtc_num_lr_projectors=1, lvtc_use_hr_projector=False),
    "LVTC + HR": dict(lvtc_enabled=True, lvtc_num_lr_projectors=1, lvtc_use_hr_projector=True),
    "LVTC + multi": dict(lvtc_enabled=True, lvtc_num_lr_projectors=2, lvtc_use_hr_projector=False),
    "LVTC + HR + multi": dict(lvtc_enabled=True, lvtc_num_lr_projectors=2, lvtc_use_hr_projector=True),
    # FastV, training-free, on the HR-only model (1024 tokens per tile), K = 2 as in the FastV paper
    "FastV K=2 R=50% (HR)": dict(downsample_ratio=1.0, fastv_layer=2, fastv_ratio=0.5),
    "FastV K=2 R=75% (HR)": dict(downsample_ratio=1.0, fastv_layer=2, fastv_ratio=0.75),
    "FastV K=2 at LVTC's budget (HR)": "matched",
}


def fastv_ratio_at_lvtc_budget(layers: int) -> float:
    """R for which FastV on the HR-only model (K = 2) gives the decoder as many visual token-layers as LVTC:
    k·N1² + (L − k)·N2² = K·N2² + (L − K)·(1 − R)·N2², with N1² = 256, N2² = 1024, k = 3L/4."""
    k, fastv_layer, short, long = (3 * layers) // 4, 2, 256, 1024
    return 1 - (k * short + (layers - k) * long - fastv_layer * long) / ((layers - fastv_layer) * long)


def lvtc_config(classes, device: str, quick: bool, overrides: dict | str):
    layers = 4 if quick else 24
    if overrides == "matched":
        overrides = dict(downsample_ratio=1.0, fastv_layer=2, fastv_ratio=round(fastv_ratio_at_lvtc_budget(layers), 3))
    return classes.Config(
        **geometry(
            device,
            quick,
            projector_type="pixel_shuffle",
            lvtc_expand_layer=(3 * layers) // 4,
            lvtc_inject_start=layers // 2,
            **overrides,
        )
    )


def prompt_ids(config, tiles: int, text_tokens: int) -> list[int]:
    ids = [1] + [5] * (text_tokens // 2 - 1) + [config.image_start_token_id]
    ids += [config.image_token_id] * (tiles * config.tokens_per_tile) + [config.image_end_token_id]
    return ids + [7] * (text_tokens - len(ids) + tiles * config.tokens_per_tile)


def full_width_flops(classes, quick: bool, overrides: dict, tiles: int, text_tokens: int, device: str) -> dict:
    """Prefill FLOPs at the real 2B widths: a forward on `device` with zero weights and eager attention under
    `FlopCounterMode` (LVTC's layout depends on the token ids, so it cannot run on the meta device)."""
    config = lvtc_config(classes, "cuda", quick, overrides)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = classes.ForConditionalGeneration(config)
    model = model.to_empty(device=device).eval()
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.data.zero_()
    for module in model.modules():  # rotary frequencies are buffers computed at init: recompute them
        if hasattr(module, "original_inv_freq") and hasattr(module, "rope_init_fn"):
            inv_freq, _ = module.rope_init_fn(module.config, device)
            module.inv_freq.copy_(inv_freq)
    input_ids = torch.tensor([prompt_ids(config, tiles, text_tokens)], device=device)
    pixel_values = torch.zeros(tiles, 3, config.tile_size, config.tile_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    decoder = sum(v for name, v in counts.items() if re.search(r"\.language_model\.layers\.\d+$", name))
    return {"prefill": counter.get_total_flops(), "decoder": decoder}


@suite("lvtc")
def lvtc_suite(args) -> dict:
    """LR-only, HR-only and LVTC variants: prefill FLOPs (real widths), prefill / train-step / decode time, memory."""
    classes = bundle_classes()
    tiles, text_tokens, decode_tokens = args.tiles, 64, 16
    flops = {
        name: full_width_flops(classes, args.quick, overrides, tiles, text_tokens, args.device)
        for name, overrides in LVTC_VARIANTS.items()
    }

    dtype = getattr(torch, args.dtype)
    models, inputs = {}, {}
    for name, overrides in LVTC_VARIANTS.items():
        config = lvtc_config(classes, args.device, args.quick, overrides)
        torch.manual_seed(0)
        models[name] = built_on(args.device, dtype, classes.ForConditionalGeneration, config)
        ids = torch.tensor([prompt_ids(config, tiles, text_tokens)], device=args.device)
        inputs[name] = dict(
            input_ids=ids,
            pixel_values=torch.randn(tiles, 3, config.tile_size, config.tile_size, device=args.device, dtype=dtype),
        )

    def prefill(name):
        with torch.no_grad():
            return models[name](**inputs[name], use_cache=True, logits_to_keep=1)

    def train_step(name):
        model = models[name]
        labels = inputs[name]["input_ids"].masked_fill(inputs[name]["input_ids"] == model.config.image_token_id, -100)
        with torch.enable_grad():
            model(**inputs[name], labels=labels, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    def decode(name, cache):
        next_ids = torch.full((1, 1), 11, device=args.device)
        with torch.no_grad():
            for _ in range(decode_tokens):
                cache = models[name](input_ids=next_ids, past_key_values=cache, use_cache=True).past_key_values

    names = list(models)
    prefill_s = interleaved_medians({n: (lambda n=n: prefill(n)) for n in names}, args.device, args.repeats)
    train_s = interleaved_medians({n: (lambda n=n: train_step(n)) for n in names}, args.device, args.repeats)
    decode_s = interleaved_medians(
        {n: (lambda cache, n=n: decode(n, cache)) for n in names},
        args.device,
        args.repeats,
        setups={n: (lambda n=n: prefill(n).past_key_values) for n in names},
    )
    decode_s = {n: seconds / decode_tokens for n, seconds in decode_s.items()}
    memory = {n: peak_memory_mb(lambda n=n: prefill(n), args.device) for n in names}

    hr = "HR-only (1024)"
    rows = []
    for n in names:
        schedule = models[n].model.visual_token_schedule(tiles)
        rows.append(
            {
                "variant": n,
                "visual tokens (first → last layer)": f"{schedule[0]} → {schedule[-1]}",
                "decoder TFLOPs": flops[n]["decoder"] / 1e12,
                "decoder FLOPs / HR-only": flops[n]["decoder"] / flops[hr]["decoder"],
                "prefill TFLOPs": flops[n]["prefill"] / 1e12,
                "prefill FLOPs / HR-only": flops[n]["prefill"] / flops[hr]["prefill"],
                "prefill ms": prefill_s[n] * 1e3,
                "prefill time / HR-only": prefill_s[n] / prefill_s[hr],
                "train step ms": train_s[n] * 1e3,
                "decode ms/token": decode_s[n] * 1e3,
                "prefill peak MB": memory[n],
            }
        )
    full = "LVTC + HR + multi"
    ratios = {
        "decoder_flops_lvtc_over_hr": flops[full]["decoder"] / flops[hr]["decoder"],
        "prefill_flops_lvtc_over_hr": flops[full]["prefill"] / flops[hr]["prefill"],
        "prefill_time_lvtc_over_hr": prefill_s[full] / prefill_s[hr],
        "decode_time_lvtc_over_lr": decode_s[full] / decode_s["LR-only (256)"],
        "train_step_lvtc_over_hr": train_s[full] / train_s[hr],
        "prefill_flops_fastv_at_lvtc_budget_over_lvtc": flops["FastV K=2 at LVTC's budget (HR)"]["prefill"]
        / flops[full]["prefill"],
        "prefill_time_fastv_at_lvtc_budget_over_lvtc": prefill_s["FastV K=2 at LVTC's budget (HR)"] / prefill_s[full],
    }
    shapes = {
        "tiles": tiles,
        "text_tokens": text_tokens,
        "decode_tokens": decode_tokens,
        "expand_layer": models[full].config.lvtc_expand_layer,
        "layers": models[full].config.text_config.num_hidden_layers,
        "flops_widths": "real 2B (ViT 1024, LLM 2048), eager attention",
        "timing_widths": "real 2B" if args.device == "cuda" else "reduced (ViT 256, LLM 512)",
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes, "flops": flops}


def default_lvtc_settings(layers: int) -> dict:
    """The LVTC settings of the root `config.json` (PVTC, k = 3/4 of the depth, T = 2 from the middle layer, HR),
    scaled to `layers` decoder layers."""
    config = json.loads((ROOT / "config.json").read_text())
    depth = config["text_config"]["num_hidden_layers"]
    settings = {key: value for key, value in config.items() if key.startswith(("lvtc_", "pvtc_", "projector_"))}
    settings["lvtc_expand_layer"] = config["lvtc_expand_layer"] * layers // depth
    settings["lvtc_inject_start"] = config["lvtc_inject_start"] * layers // depth
    return settings


class StepClock:
    """A logits processor that only reads the clock (after the device finishes), once per generated token."""

    def __init__(self, device: str):
        self.device, self.ticks = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.ticks.append(time.perf_counter())
        return scores


def bandwidth_gb_s(device: str, megabytes: int = 1024) -> float:
    """Memory bandwidth from a large device-to-device copy (each byte is read once and written once)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), device, repeats=10)
    return 2 * source.numel() / seconds / 1e9


@suite("decode")
def decode_suite(args) -> dict:
    """Decode speed of plain, PVTC and LVTC models with Transformers' dynamic cache and with its static cache and
    compiled decode step; against the bound set by reading the decoder's weights once per token."""
    from transformers import CompileConfig

    classes = bundle_classes()
    layers = 4 if args.quick else 24
    # Grouped-query attention with a mask (every static-cache step has one): Transformers repeats each key/value head
    # over the whole cache before sdpa (`repeat_kv`) unless told to let sdpa group the heads itself. On the CPU that
    # copy is most of a batched step over a long cache, and a compiled step allocates it afresh every time, so the
    # suite runs CPUs the way docs/decoding.md recommends unless `--cpu-gqa repeat` asks for Transformers' default.
    if args.device != "cuda" and args.cpu_gqa == "sdpa":
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    repeats = max(args.repeats, 5)
    variants = {
        "plain": dict(projector_type="pixel_shuffle"),
        "PVTC": dict(projector_type="pvtc"),
        "LVTC (config.json)": default_lvtc_settings(layers),
    }
    dtype = getattr(torch, args.dtype)
    models = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        models[name] = built_on(
            args.device,
            dtype,
            classes.ForConditionalGeneration,
            classes.Config(**geometry(args.device, args.quick, **overrides)),
        )
    config = models["plain"].config
    text_tokens, new_tokens = 64, (64 if args.device == "cuda" else 16)
    # The smaller first: Transformers' static caches only grow across calls (like LVTC's long layers for one size),
    # so each tile count runs at the capacity its own calls need, as a user's first call does.
    tile_counts = [1, 7]
    batches = [1, 8]
    # "static" compiles the decode step; "static eager" is what Transformers does with a static cache on a CPU unless
    # told to compile on every device.
    caches = {"dynamic": "dynamic", "static": "static + compile"}
    if args.device != "cuda":
        caches["static eager"] = "static, not compiled"
    compile_config = CompileConfig(fullgraph=True, **({} if args.device == "cuda" else {"mode": "default"}))
    compile_config._compile_all_devices = True  # Transformers compiles on accelerators only unless told otherwise
    max_cache_len = {tiles: text_tokens + tiles * config.tokens_per_tile + new_tokens + 2 for tiles in tile_counts}

    def inputs_for(tiles: int, batch: int) -> dict:
        ids = torch.tensor([prompt_ids(config, tiles, text_tokens)] * batch, device=args.device)
        pixel_values = torch.randn(
            batch * tiles, 3, config.tile_size, config.tile_size, device=args.device, dtype=dtype
        )
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values)

    def decode_seconds(model, inputs, cache: str, tokens: int = new_tokens) -> float:
        """Seconds per decoded token: the median time between consecutive steps' logits (the prefill is not
        counted, and a hiccup of the machine moves one interval, not the figure)."""
        clock = StepClock(args.device)
        settings = dict(
            max_new_tokens=1 + tokens,
            min_new_tokens=1 + tokens,
            do_sample=False,
            pad_token_id=2,
            logits_processor=[clock],
        )
        if cache != "dynamic":
            tiles = inputs["pixel_values"].shape[0] // inputs["input_ids"].shape[0]
            settings.update(cache_implementation="static", max_cache_len=max_cache_len[tiles])
            if cache == "static":
                settings.update(compile_config=compile_config)
            else:
                settings.update(disable_compile=True)
        with torch.no_grad():
            model.generate(**inputs, **settings)
        return statistics.median(later - earlier for earlier, later in zip(clock.ticks, clock.ticks[1:]))

    per_token, spread = {}, {}
    for tiles in tile_counts:
        for batch in batches:
            inputs = inputs_for(tiles, batch)
            runs = {(name, cache): (model, cache) for name, model in models.items() for cache in caches}
            for model, cache in runs.values():  # warm-up; it compiles the static runs' decode step
                decode_seconds(model, inputs, cache, tokens=3)
            samples = {key: [] for key in runs}
            for _ in range(repeats):  # interleaved, so drift of the machine hits every entry alike
                for key, (model, cache) in runs.items():
                    samples[key].append(decode_seconds(model, inputs, cache))
            for (name, cache), values in samples.items():
                per_token[(tiles, batch, name, cache)] = statistics.median(values)
                spread[(tiles, batch, name, cache)] = (min(values), max(values))
    lookup = prompt_lookup_rows(models, ["plain", "LVTC (config.json)"], inputs_for(1, 1), new_tokens, args)
    rows = []
    weight_bytes = {
        name: sum(p.numel() * p.element_size() for p in [*m.model.language_model.parameters(), m.lm_head.weight])
        for name, m in models.items()
    }
    bandwidth = bandwidth_gb_s(args.device)

    def kv_bytes_per_row(model, tiles: int, cache: str) -> int:
        """Keys and values one row's step reads, layer by layer: each layer's cache length (a static cache's
        capacity; a dynamic one's prompt and half the new tokens) × 2 × kv heads × head dim; LVTC's layers from k on
        hold each tile's N2² tokens, the earlier ones N1²."""
        text, itemsize = model.config.text_config, torch.finfo(dtype).bits // 8
        per_token_bytes = 2 * text.num_key_value_heads * text.head_dim * itemsize
        short = max_cache_len[tiles] if cache != "dynamic" else text_tokens + tiles * config.tokens_per_tile
        short += 0 if cache != "dynamic" else new_tokens // 2
        growth = 0
        if model.config.lvtc_enabled:
            growth = tiles * (model.config.lvtc_expanded_tokens_per_tile - model.config.tokens_per_tile)
        k = model.config.lvtc_expand_layer if model.config.lvtc_enabled else text.num_hidden_layers
        return per_token_bytes * (k * short + (text.num_hidden_layers - k) * (short + growth))

    for tiles in tile_counts:
        for name, model in models.items():
            for cache in caches:
                one, eight = per_token[(tiles, 1, name, cache)], per_token[(tiles, 8, name, cache)]
                low, high = spread[(tiles, 8, name, cache)]
                kv = kv_bytes_per_row(model, tiles, cache)
                bound = {b: (weight_bytes[name] + b * kv) / (bandwidth * 1e9) for b in (1, 8)}
                rows.append(
                    {
                        "tiles": tiles,
                        "model": name,
                        "cache": caches[cache],
                        "ms/token (batch 1)": one * 1e3,
                        "tokens/s (batch 8)": 8 / eight,
                        "batch 8 min–max tokens/s": f"{8 / high:.1f}–{8 / low:.1f}",
                        "step / traffic bound (batch 1)": one / bound[1],
                        "step / traffic bound (batch 8)": eight / bound[8],
                    }
                )
    lvtc, plain = "LVTC (config.json)", "plain"
    ratios = {}
    for tiles in tile_counts:
        ratios[f"lvtc_static_over_plain_static_ms_per_token_{tiles}_tiles"] = (
            per_token[(tiles, 1, lvtc, "static")] / per_token[(tiles, 1, plain, "static")]
        )
        ratios[f"lvtc_static_over_plain_static_tokens_per_s_batch8_{tiles}_tiles"] = (
            per_token[(tiles, 8, plain, "static")] / per_token[(tiles, 8, lvtc, "static")]
        )
        if "static eager" in caches:
            ratios[f"lvtc_static_eager_over_plain_static_eager_tokens_per_s_batch8_{tiles}_tiles"] = (
                per_token[(tiles, 8, plain, "static eager")] / per_token[(tiles, 8, lvtc, "static eager")]
            )
        ratios[f"plain_static_speedup_over_dynamic_{tiles}_tiles"] = (
            per_token[(tiles, 1, plain, "dynamic")] / per_token[(tiles, 1, plain, "static")]
        )
        if "static eager" in caches:
            for name, key in ((plain, "plain"), (lvtc, "lvtc")):
                ratios[f"{key}_compiled_over_not_compiled_tokens_per_s_batch8_{tiles}_tiles"] = (
                    per_token[(tiles, 8, name, "static eager")] / per_token[(tiles, 8, name, "static")]
                )
    ratios["bandwidth_bound_ms_per_token_plain"] = weight_bytes[plain] / (bandwidth * 1e9) * 1e3
    ratios["measured_bandwidth_gb_s"] = bandwidth
    shapes = {
        "text_tokens": text_tokens,
        "new_tokens": new_tokens,
        "tile_counts": tile_counts,
        "batches": batches,
        "max_cache_len": max_cache_len,
        "layers": layers,
        "decoder_weight_bytes": weight_bytes,
        "per_token": "median over runs of the median interval between consecutive steps' logits",
        "repeats": repeats,
        "grouped_query_attention": "sdpa's own (TRANSFORMERS_SDPA_FORCE_GQA=1)"
        if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == "1"
        else "Transformers' (repeat_kv under a mask)",
        "traffic_bound": "(decoder and LM-head weights + batch × each layer's cached keys and values) / measured "
        "bandwidth",
        "compile": compile_config.to_dict(),
        "widths": "real 2B" if args.device == "cuda" else "reduced (ViT 256, LLM 512)",
    }
    ratios.update({f"prompt_lookup_{row['model']}_speedup": row["speed-up"] for row in lookup})
    return {"rows": rows, "prompt_lookup_rows": lookup, "ratios": ratios, "shapes": shapes}


def prompt_lookup_rows(models: dict, names: list[str], inputs: dict, new_tokens: int, args) -> list[dict]:
    """Batch 1, dynamic cache: greedy vs `prompt_lookup_num_tokens=3` on a prompt whose text repeats itself, so the
    prompt has n-grams to propose. ms/token = (time of 1 + N tokens − time of 1 token) / N; acceptance = accepted
    candidates / proposed ones, counted from the token counts of the model's forward calls."""
    ids = inputs["input_ids"]
    phrase = ids[:, 1:17]
    reading = dict(inputs, input_ids=torch.cat([ids, phrase, phrase], dim=1))
    reading["attention_mask"] = torch.ones_like(reading["input_ids"])
    prompt_length = reading["input_ids"].shape[1]

    def run(model, tokens: int, lookup: bool):
        settings = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=2)
        if lookup:
            settings["prompt_lookup_num_tokens"] = 3
        with torch.no_grad():
            return model.generate(**reading, **settings)

    runs = {
        (name, tokens, lookup): (lambda m=models[name], t=tokens, k=lookup: run(m, t, k))
        for name in names
        for tokens in (1, 1 + new_tokens)
        for lookup in (False, True)
    }
    seconds = interleaved_medians(runs, args.device, args.repeats)
    rows = []
    for name in names:
        fed = []
        hook = models[name].register_forward_pre_hook(
            lambda _module, _args, kwargs, fed=fed: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
        try:
            run(models[name], 1 + new_tokens, True)
        finally:
            hook.remove()
        proposed = fed[0] - prompt_length + sum(count - 1 for count in fed[1:])
        accepted = 1 + new_tokens - len(fed)
        per_token = {
            lookup: (seconds[(name, 1 + new_tokens, lookup)] - seconds[(name, 1, lookup)]) / new_tokens
            for lookup in (False, True)
        }
        rows.append(
            {
                "model": name,
                "greedy ms/token": per_token[False] * 1e3,
                "prompt lookup ms/token": per_token[True] * 1e3,
                "speed-up": per_token[False] / per_token[True],
                "forward calls": len(fed),
                "acceptance": accepted / max(proposed, 1),
            }
        )
    return rows


PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)


def photographs() -> dict[str, list]:
    """Real photographs shipped with scikit-image: as they are, and as wide strips (full width, a quarter of the
    height) — the extreme aspect ratios for which the paper designed RVTC."""
    import os

    import PIL.Image
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    originals = [PIL.Image.open(os.path.join(folder, name)).convert("RGB") for name in PHOTOS]
    strips = [image.crop((0, 0, image.width, max(1, image.height // 4))) for image in originals]
    return {"photographs": originals, "strips": strips}


@suite("rvtc")
def rvtc_suite(args) -> dict:
    """Tiles per image for ratio / area / edge matching, and preprocessing throughput vs Transformers' InternVL
    image processor (`GotOcr2ImageProcessor` with `crop_to_patches`) in ratio mode."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    ours_class = get_class_from_dynamic_module("image_processing_internvl_x.InternVLXImageProcessor", ROOT)
    sets = photographs()
    max_patches, size = 6, 448
    rows = []
    for name, images in sets.items():
        row = {"images": f"{name} ({len(images)})"}
        for slicing in ("ratio", "area", "edge"):
            processor = ours_class(image_size=size, max_patches=max_patches, slicing=slicing)
            tiles = [processor.get_number_of_image_patches(im.height, im.width) for im in images]
            row[f"{slicing} tiles/image"] = sum(tiles) / len(tiles)
        row["area / ratio"] = row["area tiles/image"] / row["ratio tiles/image"]
        row["edge / ratio"] = row["edge tiles/image"] / row["ratio tiles/image"]
        rows.append(row)

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ours = ours_class(image_size=size, max_patches=max_patches, slicing="ratio", image_mean=mean, image_std=std)
    native = GotOcr2ImageProcessor(
        crop_to_patches=True,
        size={"height": size, "width": size},
        max_patches=max_patches,
        image_mean=mean,
        image_std=std,
    )
    images = sets["photographs"]
    seconds = interleaved_medians(
        {
            "ours": lambda: [ours(im) for im in images],
            "transformers": lambda: [native(im, return_tensors="pt") for im in images],
        },
        "cpu",
        args.repeats,
    )
    throughput = {name: len(images) / s for name, s in seconds.items()}
    ratios = {
        "throughput_ours_over_transformers": throughput["ours"] / throughput["transformers"],
        "photographs_area_over_ratio_tiles": rows[0]["area / ratio"],
        "photographs_edge_over_ratio_tiles": rows[0]["edge / ratio"],
        "ours_images_per_s": throughput["ours"],
        "transformers_images_per_s": throughput["transformers"],
    }
    shapes = {
        "tile": size,
        "max_patches": max_patches,
        "thumbnail": "counted when more than one tile",
        "photos": list(PHOTOS),
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes}


@suite("convert")
def convert_suite(args) -> dict:
    """Peak memory of converting a ~500 MB multi-shard InternVL2 checkpoint (tiny widths, wide MLPs, 4 shards)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / "src", Path(folder) / "dst"
        layers = 4 if args.quick else 40
        shard_bytes = wide_internvl2_checkpoint(src, layers=layers, intermediate=16384, shards=4)
        largest = shard_bytes[-1] / 2**20
        out_shard_gb = shard_bytes[-1] / 2 / 2**30
        for projector in ("pixel_shuffle", "pvtc"):
            start = time.perf_counter()
            memory = conversion_peak_rss(
                [
                    "--src",
                    str(src),
                    "--dst",
                    str(dst),
                    "--overwrite",
                    "--projector",
                    projector,
                    "--max-shard-size-gb",
                    f"{out_shard_gb:.6f}",
                ]
            )
            rows.append(
                {
                    "projector": projector,
                    "checkpoint MB": sum(shard_bytes) / 2**20,
                    "largest shard MB": largest,
                    "peak RSS growth MB": memory["peak_growth_mb"],
                    "growth / largest shard": memory["peak_growth_mb"] / largest,
                    "RSS before MB (python + torch)": memory["rss_before_mb"],
                    "seconds": time.perf_counter() - start,
                }
            )
    ratios = {"worst_growth_over_largest_shard": max(r["growth / largest shard"] for r in rows)}
    return {"rows": rows, "ratios": ratios, "shapes": {"layers": layers, "shards": 4, "output_shard": "½ source"}}


@suite("serve")
def serve_suite(args) -> dict:
    """Transformers' OpenAI-compatible server (`examples/serve.py`) on the digits checkpoint: requests per second
    answered for 1 client and for 8 concurrent clients (the `openai` client, base64 images, greedy, 20 tokens)."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    sys.path.insert(0, str(ROOT))
    from examples.serve import running

    demo = ROOT / "examples" / "digits-demo"
    examples = json.loads((demo / "examples.json").read_text())
    requests_per_round = 8 if args.quick else 48

    def ask(client, example) -> bool:
        image = base64.b64encode((demo / example["image"]).read_bytes()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": example["question"]},
        ]
        reply = client.chat.completions.create(
            model=str(demo.resolve()), max_tokens=20, temperature=0, messages=[{"role": "user", "content": content}]
        )
        return reply.choices[0].message.content.strip() == example["answer"]

    rows = []
    with running(demo, "--device", args.device) as base_url:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        for example in examples:  # warm-up
            ask(client, example)
        for clients in (1, 8):
            work = [examples[i % len(examples)] for i in range(requests_per_round)]
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                correct = sum(pool.map(lambda example: ask(client, example), work))
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "clients": clients,
                    "requests": len(work),
                    "correct": correct,
                    "seconds": seconds,
                    "requests/s": len(work) / seconds,
                }
            )
    ratios = {
        "requests_per_s_8_clients": rows[1]["requests/s"],
        "requests_per_s_1_client": rows[0]["requests/s"],
        "8_clients_over_1": rows[1]["requests/s"] / rows[0]["requests/s"],
    }
    shapes = {"model": "examples/digits-demo", "max_tokens": 20, "images": "one 64-px PNG per request (base64)"}
    return {"rows": rows, "ratios": ratios, "shapes": shapes}


def paper_models() -> dict[str, "torch.nn.Module"]:
    """InternVL-X-2B and -8B (PVTC + LVTC as in config.json; the 8B language model as FACTS.md gives it), built on
    the meta device: their parameters, no memory."""
    classes = bundle_classes()
    eight_b = dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )
    models = {}
    for name, overrides in {
        "InternVL-X-2B": {},
        "InternVL-X-8B": dict(text_config=eight_b, lvtc_expand_layer=23),
    }.items():
        config_dict = json.loads((ROOT / "config.json").read_text())
        config_dict["text_config"].update(overrides.pop("text_config", {}))
        config_dict.update(overrides)
        config = classes.Config(**{k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")})
        with torch.device("meta"):
            models[name] = classes.ForConditionalGeneration(config)
    return models


@suite("quantized-memory")
def quantized_memory_suite(args) -> dict:
    """Weight memory of InternVL-X-2B and -8B (PVTC + LVTC as in config.json) in bf16 and quantized, computed from
    parameter counts (meta device) and bits, not measured: every Linear but the LM head quantized (what Transformers
    does with each library here, tests/test_quantization.py), the rest kept in bf16. int8 stores a byte per weight and
    a 4-byte scale per output row (bitsandbytes' LLM.int8, torchao and quanto int8 weight-only alike); NF4 half a byte
    and a 4-byte absmax per block of 64."""
    rows = []
    for name, model in paper_models().items():
        linear_weights = sum(
            m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
        )
        linear_rows = sum(
            m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
        )
        total = sum(p.numel() for p in model.parameters())
        rest = total - linear_weights
        schemes = {
            "bf16": 2 * total,
            "int8 weights": linear_weights + 4 * linear_rows + 2 * rest,
            "NF4 weights": linear_weights * (0.5 + 4 / 64) + 2 * rest,
        }
        for scheme, size in schemes.items():
            rows.append(
                {
                    "model": name,
                    "parameters (B)": total / 1e9,
                    "weights": scheme,
                    "GB": size / 1e9,
                    "of bf16": size / schemes["bf16"],
                }
            )
    ratios = {f"{r['model']} {r['weights']} / bf16": r["of bf16"] for r in rows if r["weights"] != "bf16"}
    return {"rows": rows, "ratios": ratios, "shapes": {"computed": "from parameter counts and bits, not measured"}}


# Bytes per parameter of mixed-precision AdamW training (the ZeRO paper's accounting): bf16 weights (2) and
# gradients (2), and the optimizer's fp32 master weights, first and second moments (4 + 4 + 4).
WEIGHT_BYTES, GRADIENT_BYTES, OPTIMIZER_BYTES = 2, 2, 12


@suite("zero-memory")
def zero_memory_suite(args) -> dict:
    """Memory per GPU for full fine-tuning of InternVL-X-2B and -8B with bf16 AdamW under DDP, ZeRO-2, ZeRO-3 and
    ZeRO-3 with the optimizer on the CPU (examples/ds_zero*.json), on 8 GPUs: an estimate computed from the
    parameter count and the bytes each strategy keeps per parameter, not measured. Activations (batch, sequence
    length and tiles; gradient checkpointing), the CUDA context and DeepSpeed's buffers come on top."""
    gpus = 8
    rows = []
    for name, model in paper_models().items():
        psi = sum(p.numel() for p in model.parameters())
        states = WEIGHT_BYTES + GRADIENT_BYTES + OPTIMIZER_BYTES
        strategies = {
            "DDP": (states * psi, 0),
            "ZeRO-2 (examples/ds_zero2.json)": ((WEIGHT_BYTES + (GRADIENT_BYTES + OPTIMIZER_BYTES) / gpus) * psi, 0),
            "ZeRO-3 (examples/ds_zero3.json)": (states * psi / gpus, 0),
            "ZeRO-3, optimizer on CPU (examples/ds_zero3_offload.json)": (
                (WEIGHT_BYTES + GRADIENT_BYTES) * psi / gpus,
                OPTIMIZER_BYTES * psi / gpus,
            ),
        }
        for strategy, (gpu, cpu) in strategies.items():
            rows.append(
                {
                    "model": name,
                    "parameters (B)": psi / 1e9,
                    "strategy": strategy,
                    "GPUs": gpus,
                    "GB per GPU": gpu / 1e9,
                    "CPU GB per GPU": cpu / 1e9,
                }
            )
    ratios = {
        f"{r['model']} {r['strategy'].split(' (')[0]} / DDP": r["GB per GPU"] / rows[4 * (i // 4)]["GB per GPU"]
        for i, r in enumerate(rows)
        if not r["strategy"].startswith("DDP")
    }
    shapes = {
        "computed": "estimate from parameter count × bytes per parameter, not measured",
        "gpus": gpus,
        "bytes per parameter": {
            "weights": WEIGHT_BYTES,
            "gradients": GRADIENT_BYTES,
            "AdamW states (fp32 master, m, v)": OPTIMIZER_BYTES,
        },
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes}


@suite("vllm")
def vllm_suite(args) -> dict:
    """vLLM (its Transformers backend, `model_impl="transformers"`) against Transformers' `generate` on the same batch:
    the digits demo with LVTC off (PVTC, what vLLM can serve), its 6 questions 16 times over (96 requests, one image
    each), greedy, 64 new tokens each (end of turn ignored, so both generate the same count), both on the same number
    of threads (vLLM alone would drop to one on this CPU). Run with the Python of `.venv-vllm` (`make test-vllm` makes
    it). Seconds are the median of `--repeats` runs of the batch after a warm-up: vLLM's
    `generate` call (engine start excluded), Transformers' batched `generate` (left-padded; model load excluded). One
    run of the suite, one engine after the other (vLLM in a child process, as tests/vllm_runs.py runs it)."""
    import importlib.metadata
    import os
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
                str(ROOT / "tests" / "vllm_runs.py"),
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


# ---- reporting ---------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--quick", action="store_true", help="fewer layers and repeats: a smoke run, not a report")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (≥ 5 for a report)")
    parser.add_argument("--tiles", type=int, default=1, help="tiles of the prompt's image (baseline, pvtc, lvtc)")
    parser.add_argument(
        "--cpu-gqa",
        default="sdpa",
        choices=["sdpa", "repeat"],
        help="decode suite on a CPU: sdpa groups query heads itself (TRANSFORMERS_SDPA_FORCE_GQA=1, "
        "recommended) or Transformers' default repeats key/value heads (repeat_kv)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeats = args.repeats or (3 if args.quick else 7)
    torch.set_grad_enabled(False)

    result = SUITES[args.suite](args)
    report = {
        "suite": args.suite,
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "quick": args.quick,
        "repeats": args.repeats,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"## {args.suite} — {report['device']}, {args.dtype}{' (quick)' if args.quick else ''}\n")
    print(markdown_table(result["rows"]))
    for key, table in result.items():
        if key.endswith("_rows"):
            print(f"\n{key.removesuffix('_rows').replace('_', ' ')}:\n\n{markdown_table(table)}")
    print("\n" + "\n".join(f"- {k}: {v:.3f}" for k, v in result["ratios"].items()))
    print(f"\nshapes: {result['shapes']}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
