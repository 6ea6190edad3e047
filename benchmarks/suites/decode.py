"""Decoding: static cache and compiled decode steps, batched, for plain, PVTC and LVTC; prompt lookup."""

import os
import statistics

import torch

from benchmarks.common import bundle_classes, geometry
from benchmarks.harness import StepClock, bandwidth_gb_s, built_on, interleaved_medians, suite
from benchmarks.suites.lvtc import default_lvtc_settings, prompt_ids


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
