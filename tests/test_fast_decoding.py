"""Transformers' fast generation path: static cache, compiled decode step, and the other cache options, for plain,
PVTC and LVTC models (the fast-decoding issue)."""

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import CompileConfig, StaticCache

from tests.utils.compat import cache_of, with_cache
from tests.utils.decoding import LVTC, assert_same_greedy, sdpa_masks
from tests.utils.decoding import VARIANTS as SHARED_VARIANTS
from tests.utils.decoding import greedy as greedy_settings
from tests.utils.tiny import image_span, left_pad, prompt, tiles

N1SQ = 4
LAYERS = 4
NEW_TOKENS = 8

VARIANTS = {
    **SHARED_VARIANTS,
    "lvtc-pvtc-bilinear": {**LVTC, "projector_type": "pvtc", "pvtc_num_heads": 4, "lvtc_upsample_mode": "bilinear"},
    "lvtc-no-hr": {**LVTC, "lvtc_use_hr_projector": False},
    "lvtc-qwen2": {**LVTC, "text": dict(model_type="qwen2", num_hidden_layers=LAYERS)},
}


def greedy(**kwargs) -> dict:
    return greedy_settings(NEW_TOKENS, **kwargs)


def batch(counts=(1, 3, 7)) -> dict:
    """Left-padded prompts with `counts` tiles each, and their tiles."""
    prompts = [prompt(2 + i, image_span(n, N1SQ), 3, seed=i) for i, n in enumerate(counts)]
    ids, mask = left_pad(prompts)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([tiles(n, seed=20 + n) for n in counts]))


def growth_per_tile(model) -> int:
    """N2² − N1²: the slots one tile adds to LVTC's long layers."""
    return model.config.lvtc_expanded_tokens_per_tile - model.config.tokens_per_tile


def compile_on_cpu(**options) -> CompileConfig:
    """Transformers compiles the decode step only on accelerators unless told to compile on every device."""
    config = CompileConfig(fullgraph=True, mode="default", **options)
    config._compile_all_devices = True
    return config


@pytest.mark.compat
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_cache_decodes_like_the_dynamic_cache(bundle, variant):
    model = bundle.model(seed=1, **VARIANTS[variant])
    inputs = batch()
    with torch.no_grad():
        dynamic = model.generate(**inputs, **greedy())
        static = model.generate(**inputs, **greedy(cache_implementation="static"))
    assert cache_of(static).layers[0].keys.shape[2] == inputs["input_ids"].shape[1] + NEW_TOKENS - 1
    assert_same_greedy(static, dynamic)


@pytest.mark.parametrize("variant", ["plain", "lvtc"])
def test_static_cache_without_padding_decodes_like_the_dynamic_cache(bundle, variant):
    """Rows of one length: the prefill into the empty static cache runs sdpa's causal kernel with no mask (its
    top-left causal alignment never reaches the free slots); a mask that let them in would change the logits."""
    model = bundle.model(seed=3, **VARIANTS[variant])
    ids = torch.tensor([prompt(3, image_span(2, N1SQ), 4, seed=row) for row in range(2)])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=tiles(4, seed=9))
    with torch.no_grad():
        dynamic = model.generate(**inputs, **greedy())
        static = model.generate(**inputs, **greedy(cache_implementation="static"))
    assert_same_greedy(static, dynamic)


def test_a_static_cache_prefill_runs_sdpa_s_causal_kernel_only_without_padding(bundle):
    """Seen from sdpa: a prompt into an empty static cache needs no mask when no row is padded (sdpa's causal mask is
    aligned top-left, so the free slots after the prompt are never attended), but needs one when a row is padded, and
    every decode step into the static cache needs one (its free slots lie inside the key range)."""
    model = bundle.model(seed=3, **LVTC)
    ids = torch.tensor([prompt(3, image_span(2, N1SQ), 4, seed=row) for row in range(2)])
    padded, mask = left_pad([prompt(3, image_span(2, N1SQ), 4, seed=0), prompt(5, image_span(2, N1SQ), 1, seed=1)])
    for inputs, prompt_masked in (
        (dict(input_ids=ids, attention_mask=torch.ones_like(ids)), False),
        (dict(input_ids=padded, attention_mask=mask), True),
    ):
        with torch.no_grad(), sdpa_masks() as calls:
            model.generate(**inputs, pixel_values=tiles(4, seed=9), **greedy(cache_implementation="static"))
        decoder_calls = calls[model.config.vision_config.num_hidden_layers :]  # after the vision tower's
        assert decoder_calls[:LAYERS] == [prompt_masked] * LAYERS  # the prompt
        assert decoder_calls[LAYERS:] == [True] * (LAYERS * (NEW_TOKENS - 1))  # the decode steps


def test_static_cache_long_layers_hold_the_growth(bundle):
    """Long layers get `tiles · (N2² − N1²)` more slots per row than short ones (the longest row's tiles)."""
    model = bundle.model(seed=1, **LVTC)
    inputs = batch((1, 3, 7))
    with torch.no_grad():
        out = model.generate(**inputs, **greedy(cache_implementation="static"))
    capacities = [layer.keys.shape[2] for layer in cache_of(out).layers]
    short = inputs["input_ids"].shape[1] + NEW_TOKENS - 1
    assert capacities == [short] * 3 + [short + 7 * growth_per_tile(model)]


@pytest.mark.compat
@pytest.mark.parametrize("variant", ["plain", "lvtc"])
def test_static_cache_beam_search_equals_the_dynamic_cache(bundle, variant):
    model = bundle.model(seed=2, **VARIANTS[variant])
    inputs = batch((1, 3))
    beams = dict(num_beams=3, output_logits=False, output_scores=False)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **greedy(**beams))
        static = model.generate(**inputs, **greedy(cache_implementation="static", **beams))
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(static.sequences_scores, dynamic.sequences_scores, rtol=0, atol=1e-5)


def test_several_returned_sequences_each_see_their_own_tiles(bundle):
    """`num_return_sequences` repeats each row: its tiles must be repeated with it (top-k 1 sampling is greedy)."""
    model = bundle.model(seed=1, **LVTC)
    inputs = batch((2, 3))
    with torch.no_grad():
        alone = model.generate(**inputs, **greedy())
        repeated = model.generate(**inputs, **greedy(do_sample=True, top_k=1, num_return_sequences=3))
    assert_same_greedy(repeated, alone, rows=[(3 * row + copy, row) for row in range(2) for copy in range(3)])


def test_a_user_built_static_cache_is_reused_without_reallocation(bundle):
    model = bundle.model(seed=3, **LVTC)
    inputs = batch((3, 1))
    cache = StaticCache(config=model.config.text_config, max_cache_len=inputs["input_ids"].shape[1] + NEW_TOKENS)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **greedy())
        first = model.generate(**inputs, **with_cache(cache), **greedy())
        storage = [layer.keys.data_ptr() for layer in cache.layers]
        cache.reset()
        second = model.generate(**inputs, **with_cache(cache), **greedy())
    assert [layer.keys.data_ptr() for layer in cache.layers] == storage
    assert_same_greedy(first, dynamic)
    assert_same_greedy(second, dynamic)


def test_long_layer_capacity_only_grows_across_calls(bundle):
    """For one `max_cache_len`, a later call with fewer tiles keeps the earlier capacity, so compiled graphs keep
    their shapes; a call with another size reserves only what its own rows need."""
    model = bundle.model(seed=3, **LVTC)
    growth = growth_per_tile(model)
    settings = greedy(cache_implementation="static")
    settings["generation_config"].max_cache_len = 96
    other_size = greedy(cache_implementation="static")
    other_size["generation_config"].max_cache_len = 101  # larger: Transformers builds a new cache
    with torch.no_grad():
        big = cache_of(model.generate(**batch((7,)), **settings))
        small = cache_of(model.generate(**batch((1,)), **settings))
        other = cache_of(model.generate(**batch((1,)), **other_size))
    long_slots = [layer.keys.shape[2] for layer in (big.layers[3], small.layers[3], other.layers[3])]
    assert long_slots == [96 + 7 * growth, 96 + 7 * growth, 101 + growth]


def test_a_static_cache_too_small_is_refused_with_both_lengths(bundle):
    model = bundle.model(seed=4, **LVTC)
    inputs = batch((1, 3))
    needed = inputs["input_ids"].shape[1] + NEW_TOKENS - 1
    cache = StaticCache(config=model.config.text_config, max_cache_len=needed - 2)
    with pytest.raises(ValueError, match=f"holds {needed - 2} tokens per layer but this call needs {needed}"):
        model.generate(**inputs, **with_cache(cache), **greedy())
    # Called directly, a step that would overflow is refused before it writes.
    prompt_length = inputs["input_ids"].shape[1]
    cache = StaticCache(config=model.config.text_config, max_cache_len=prompt_length - 1)
    message = f"holds {prompt_length - 1} tokens per layer but already has 0 and this step adds {prompt_length}"
    with pytest.raises(ValueError, match=message):
        model(**inputs, **with_cache(cache), use_cache=True)


def test_compiled_decode_step_equals_eager_decoding(bundle):
    """`torch.compile(fullgraph=True)` of the whole decode step (inductor on the CPU): any graph break raises."""
    model = bundle.model(seed=5, **LVTC)
    inputs = batch((1, 3))
    with torch.no_grad():
        eager = model.generate(**inputs, **greedy())
        compiled = model.generate(**inputs, **greedy(cache_implementation="static", compile_config=compile_on_cpu()))
        assert model._compiled_call is not None
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # Another prompt and tile count with the same cache size: the compiled step is reused as it is.
        settings = greedy(cache_implementation="static", compile_config=compile_on_cpu())
        settings["generation_config"].max_cache_len = cache_of(compiled).layers[0].max_cache_len
        again = model.generate(**batch((2, 1)), **settings)
        reference = model.generate(**batch((2, 1)), **greedy())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert_same_greedy(compiled, eager)
    assert_same_greedy(again, reference)


@pytest.mark.compat
@pytest.mark.parametrize("variant", ["plain", "pvtc", "lvtc-3-lr-projectors", "lvtc-qwen2"])
def test_decode_step_traces_as_one_graph(bundle, variant):
    """Dynamo traces a decode step of every variant without a break (the eager backend skips code generation)."""
    model = bundle.model(seed=6, **VARIANTS[variant])
    inputs = batch((3, 1))
    with torch.no_grad():
        eager = model.generate(**inputs, **greedy())
        compiled = model.generate(
            **inputs, **greedy(cache_implementation="static", compile_config=compile_on_cpu(backend="eager"))
        )
    assert_same_greedy(compiled, eager)


def test_quantized_cache_decodes(bundle):
    """KV quantization is lossy: the prefill step is exact, later steps stay close to the dynamic cache."""
    from transformers.cache_utils import QuantizedCache

    model = bundle.model(seed=7, **LVTC)
    try:
        QuantizedCache(backend="fp8", config=model.config.text_config)
    except ValueError:
        pytest.skip("this Transformers has no dependency-free quantized cache backend (its fp8 backend came in 5.21)")
    inputs = batch((1, 3))
    with torch.no_grad():
        dynamic = model.generate(**inputs, **greedy())
        quantized = model.generate(
            **inputs, **greedy(cache_implementation="quantized", cache_config={"backend": "fp8"})
        )
    torch.testing.assert_close(quantized.scores[0], dynamic.scores[0], rtol=0, atol=1e-5)
    drift = max((q - d)[torch.isfinite(d)].abs().max().item() for q, d in zip(quantized.scores, dynamic.scores))
    assert drift < 0.1 * max(d[torch.isfinite(d)].abs().max().item() for d in dynamic.scores)


def test_chunked_prefill_is_refused_for_images_and_exact_for_text(bundle):
    model = bundle.model(seed=8, **LVTC)
    inputs = batch((1, 3))
    with pytest.raises(ValueError, match=r"prefill_chunk_size=8 would split the prompt of \d+ tokens"):
        model.generate(**inputs, **greedy(prefill_chunk_size=8))
    ids, mask = left_pad([prompt(14, seed=1), prompt(9, seed=2)])
    with torch.no_grad():
        whole = model.generate(input_ids=ids, attention_mask=mask, **greedy())
        chunked = model.generate(input_ids=ids, attention_mask=mask, **greedy(prefill_chunk_size=4))
    assert_same_greedy(chunked, whole)


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.23.0.dev0"),
    reason="Transformers reads TRANSFORMERS_SDPA_FORCE_GQA from 5.23",
)
@pytest.mark.parametrize("variant", ["plain", "lvtc", "fastv"])
def test_sdpa_s_own_grouped_query_attention_reads_the_cache_once_and_decodes_the_same(bundle, variant, monkeypatch):
    """The CPU setting docs/decoding.md recommends (`TRANSFORMERS_SDPA_FORCE_GQA=1`): with a mask, as every static
    step has, Transformers otherwise repeats each key/value head over the whole cache before sdpa, a copy of the
    cache per layer and step that made a compiled batched step slower than an eager one (benchmarks: decode suite).
    What it removes, counted: the keys sdpa receives keep the model's 2 key/value heads instead of its 4 query
    heads; and the two-phase masks (LVTC's, FastV's) decode the same with it, static and dynamic cache."""
    from torch.profiler import ProfilerActivity, profile

    overrides = {"fastv": dict(text=dict(num_hidden_layers=LAYERS), fastv_layer=1, fastv_ratio=0.5)}.get(
        variant, VARIANTS.get(variant)
    )
    model = bundle.model(seed=9, **overrides)
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads
    inputs = batch((1, 3))
    outputs, key_heads = {}, {}
    for setting in ("0", "1"):
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", setting)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace:
            outputs[setting] = model.generate(**inputs, **greedy(cache_implementation="static"))
        shapes = [event.input_shapes for event in trace.events() if event.name == "aten::scaled_dot_product_attention"]
        # the language model's calls (the vision tower's have its own head count)
        key_heads[setting] = {shape[1][1] for shape in shapes if shape[0][1] == text.num_attention_heads}
    assert key_heads["1"] == {text.num_key_value_heads}  # the cache is read as it is, never copied per query head
    assert key_heads["0"] == {text.num_attention_heads}  # Transformers' default: a copy of every head (if this
    # changes, Transformers groups the heads under a mask itself and the recommendation can go)
    assert_same_greedy(outputs["1"], outputs["0"], atol=1e-5)
