"""Baseline: InternVL2-style plain model vs native InternVL, prefill time and memory side by side."""

import torch

from benchmarks.common import bundle_classes, geometry
from benchmarks.harness import built_on, interleaved_medians, peak_memory_mb, suite


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
