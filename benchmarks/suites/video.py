"""Video chat at 8, 16 and 32 frames (one 448-pixel tile each): visual tokens, prefill FLOPs (real 2B widths) and
prefill time for the pixel-shuffle projector, PVTC, PVTC + LVTC (the root config's settings) and HR-only."""

import torch

from benchmarks.common import bundle_classes, geometry
from benchmarks.harness import built_on, count_flops, interleaved_medians, suite
from benchmarks.suites.lvtc import default_lvtc_settings

FRAME_COUNTS = (8, 16, 32)
CONTEXT = 40960  # positions: InternLM2-1.8B's 32768 hold 31 frames at 1024 tokens, not 32
QUESTION_TOKENS = 24  # the question after the frames, and the chat turn around them
FRAME_LABEL_TOKENS = 4  # "FrameN: " before each frame's image span, and the newline after it


def variants(layers: int) -> dict[str, dict]:
    return {
        "pixel shuffle (256/frame)": dict(projector_type="pixel_shuffle"),
        "PVTC (256/frame)": dict(projector_type="pvtc"),
        "PVTC + LVTC (256→1024/frame)": default_lvtc_settings(layers),
        "HR-only (1024/frame)": dict(projector_type="pixel_shuffle", downsample_ratio=1.0),
    }


def video_prompt_ids(config, frames: int) -> list[int]:
    """A chat prompt holding one video: per frame a label (text tokens), `<img>`, its visual tokens and `</img>`,
    then the question."""
    ids = [1] + [5] * 8
    for _ in range(frames):
        ids += [6] * FRAME_LABEL_TOKENS + [config.image_start_token_id]
        ids += [config.image_token_id] * config.tokens_per_tile + [config.image_end_token_id]
    return ids + [7] * QUESTION_TOKENS


def prefill_flops(classes, config, frames: int) -> dict:
    """FLOPs of one video's prefill at `config`'s widths, counted on the meta device (nothing allocated; a 32-frame
    HR-only prefill at the real widths would not fit this machine's memory): the vision tower on the frames, the
    projectors (the main one and the schedule's own, e.g. LVTC's HR and extra LR projectors, each once), the decoder
    layers at the sequence length each one sees (LVTC's first k layers at N1² tokens per frame, the rest at N2²; the
    layers are identical, so each group is counted on a decoder of that many layers) and the LM head on the last
    position. Eager attention: every FLOP counted alike."""
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = classes.ForConditionalGeneration(config)
    pixel_values = torch.empty(frames, 3, config.tile_size, config.tile_size, device="meta")
    vision_features = model.model.get_image_features(pixel_values).vision_features
    schedule = model.model.token_schedule
    extra = []  # the schedule's own projectors, as the model holds them (LVTC: HR, extra LR)
    for name in schedule.trainable_modules() if schedule is not None else []:
        module = getattr(model.model, name)
        extra += list(module) if isinstance(module, torch.nn.ModuleList) else [module]

    def project():
        model.model.multi_modal_projector(vision_features)
        for module in extra:
            module(vision_features)

    flops = {
        "vision": count_flops(lambda: model.model.vision_tower(pixel_values=pixel_values)),
        "projectors": count_flops(project),
    }
    text_tokens = len(video_prompt_ids(config, frames)) - frames * config.tokens_per_tile
    per_layer = model.model.visual_token_schedule(frames)
    hidden = config.text_config.hidden_size
    decoder = 0

    def run(layers, embeds):
        return lambda: layers(inputs_embeds=embeds)

    for visual in sorted(set(per_layer)):
        text_config = config.text_config.__class__(
            **{**config.text_config.to_dict(), "num_hidden_layers": per_layer.count(visual)}
        )
        text_config._attn_implementation = "eager"
        with torch.device("meta"):
            layers = type(model.model.language_model)(text_config)
        embeds = torch.empty(1, text_tokens + visual, hidden, device="meta")
        decoder += count_flops(run(layers, embeds))
    flops["decoder"] = decoder
    flops["lm_head"] = count_flops(lambda: model.lm_head(torch.empty(1, 1, hidden, device="meta")))
    flops["prefill"] = sum(flops.values())
    return flops


@suite("video")
def video_suite(args) -> dict:
    """Visual tokens, prefill FLOPs (real widths) and prefill time per video, every variant side by side."""
    classes = bundle_classes()
    layers = 4 if args.quick else 24  # of the timed models
    dtype = getattr(torch, args.dtype)
    names = list(variants(layers))
    rows, flops, times, tokens = [], {}, {}, {}
    for frames in FRAME_COUNTS:
        models, inputs = {}, {}
        for name, overrides in variants(layers).items():
            # counted on the meta device, so always the whole 2B (24 + 24 layers, real widths)
            full = classes.Config(**geometry("cuda", **variants(24)[name]))
            flops[name, frames] = prefill_flops(classes, full, frames)
            config = classes.Config(**geometry(args.device, args.quick, **overrides))
            config.text_config.max_position_embeddings = CONTEXT
            torch.manual_seed(0)
            models[name] = built_on(args.device, dtype, classes.ForConditionalGeneration, config)
            schedule = models[name].model.visual_token_schedule(frames)
            tokens[name, frames] = (schedule[0], schedule[-1])
            inputs[name] = dict(
                input_ids=torch.tensor([video_prompt_ids(config, frames)], device=args.device),
                pixel_values=torch.randn(
                    frames, 3, config.tile_size, config.tile_size, device=args.device, dtype=dtype
                ),
            )

        def prefill(name, models=models, inputs=inputs):
            with torch.no_grad():
                return models[name](**inputs[name], use_cache=True, logits_to_keep=1)

        seconds = interleaved_medians({n: (lambda n=n: prefill(n)) for n in names}, args.device, args.repeats)
        times.update({(n, frames): s for n, s in seconds.items()})
        del models, inputs
    for frames in FRAME_COUNTS:
        base = "pixel shuffle (256/frame)"
        for name in names:
            first, last = tokens[name, frames]
            rows.append(
                {
                    "frames": frames,
                    "variant": name,
                    "visual tokens (first → last layer)": f"{first} → {last}",
                    "prefill TFLOPs": flops[name, frames]["prefill"] / 1e12,
                    "prefill FLOPs / pixel shuffle": flops[name, frames]["prefill"] / flops[base, frames]["prefill"],
                    "prefill ms": times[name, frames] * 1e3,
                    "prefill time / pixel shuffle": times[name, frames] / times[base, frames],
                }
            )
    lvtc, hr = "PVTC + LVTC (256→1024/frame)", "HR-only (1024/frame)"
    ratios = {
        f"{key}_{frames}_frames": value
        for frames in FRAME_COUNTS
        for key, value in {
            "prefill_flops_lvtc_over_hr": flops[lvtc, frames]["prefill"] / flops[hr, frames]["prefill"],
            "prefill_time_lvtc_over_hr": times[lvtc, frames] / times[hr, frames],
            "prefill_time_pvtc_over_pixel_shuffle": times["PVTC (256/frame)", frames]
            / times["pixel shuffle (256/frame)", frames],
        }.items()
    }
    shapes = {
        "frame_counts": FRAME_COUNTS,
        "tile": 448,
        "question_tokens": QUESTION_TOKENS,
        "layers": layers,
        "max_position_embeddings": f"{CONTEXT} (the 2B's 32768 cannot hold 32 frames at 1024 tokens each)",
        "flops_widths": "real 2B (ViT 1024 × 24 layers, LLM 2048 × 24 layers), eager attention, in every run",
        "timing_widths": "real 2B" if args.device == "cuda" else "reduced (ViT 256, LLM 512)",
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes}
