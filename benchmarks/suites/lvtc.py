"""LVTC vs LR-only and HR-only (and FastV at matched budgets): prefill FLOPs, time and memory."""

import json
import re

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import bundle_classes, geometry
from benchmarks.harness import built_on, interleaved_medians, peak_memory_mb, suite
from devtools.bundle import ROOT

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
    """Prefill FLOPs of an LVTC-suite variant at the real 2B widths (`counted_prefill_flops`)."""
    config = lvtc_config(classes, "cuda", quick, overrides)
    return counted_prefill_flops(classes, config, prompt_ids(config, tiles, text_tokens), tiles, device)


def counted_prefill_flops(classes, config, input_ids: list[int], tiles: int, device: str) -> dict:
    """Prefill FLOPs of `config` on `input_ids` with `tiles` tiles: a forward on `device` with zero weights and eager
    attention under `FlopCounterMode` (LVTC's layout depends on the token ids, so it cannot run on the meta device).
    Returns the whole prefill's and the decoder layers' FLOPs."""
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
    input_ids = torch.tensor([input_ids], device=device)
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
