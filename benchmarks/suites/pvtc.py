"""PVTC vs the pixel-shuffle projector: FLOPs (real 2B widths) and time, alone and as a share of a prefill."""

import torch

from benchmarks.common import bundle_classes, geometry
from benchmarks.harness import built_on, count_flops, interleaved_medians, suite


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
