"""On a CUDA GPU: bfloat16 and sdpa kernels, device placement, `device_map="auto"` and bf16 fine-tuning.

The CPU suite checks the same logic in float32; these tests run only where `torch.cuda.is_available()` (the
README says which GPU they last ran on). bfloat16 results are compared with a float32 reference through their
error, never through exact equality: ours in bf16 must be as close to float32 as native InternVL in bf16 is.
"""

import copy

import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from examples import finetune
from tests.conftest import make_chat_bundle
from tests.utils.decoding import assert_greedy_matches_recomputation, assert_same_greedy
from tests.utils.finetune import common_args, write_dataset
from tests.utils.tiny import IMG_CONTEXT, IMG_END, IMG_START, PAD, image_span, left_pad, native_reference, prompt, tiles

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKENS = 4  # tokens per tile of the tiny geometry (LVTC: 4 → 16)
LVTC = dict(text=dict(num_hidden_layers=4), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1)
IMAGE_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT]


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on the GPU must be float32: cuDNN convolutions (the ViT patch embedding) default to TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def batch(device: str) -> dict:
    ids, mask = left_pad([prompt(3, image_span(2, TOKENS), 5, seed=1), prompt(2, image_span(3, TOKENS), 9, seed=2)])
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=tiles(5).to(device))


def logits(model, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Logits of `batch` at its real (unpadded) positions, in float32 on the CPU (`model` itself is left as is: a
    bf16 round trip would round its weights)."""
    inputs = batch(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        out = copy.deepcopy(model).to(device, dtype)(**inputs).logits
    return out[inputs["attention_mask"].bool()].float().cpu()


def decoding_settings(**kwargs) -> dict:
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=None,
        pad_token_id=PAD,
        suppress_tokens=IMAGE_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return dict(generation_config=config, **kwargs)


def test_bf16_on_cuda_is_as_close_to_float32_as_native_internvl(bundle):
    ours = bundle.model(seed=1, attn_implementation="sdpa")
    native = native_reference(ours)
    reference = logits(ours, "cpu", torch.float32)
    ours_error = (logits(ours, "cuda", torch.bfloat16) - reference).abs().max()
    native_error = (logits(native, "cuda", torch.bfloat16) - reference).abs().max()
    assert ours_error <= 1.5 * native_error + 1e-3, (ours_error, native_error)
    torch.testing.assert_close(logits(ours, "cuda", torch.float32), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("projector_type", ["pixel_shuffle", "pvtc"])
def test_lvtc_in_bf16_on_cuda_stays_close_to_float32(bundle, projector_type):
    model = bundle.model(seed=2, projector_type=projector_type, **LVTC)
    reference = logits(model, "cpu", torch.float32)
    bf16 = logits(model, "cuda", torch.bfloat16)
    scale = reference.abs().max()
    assert (bf16 - reference).abs().max() <= 0.05 * scale
    torch.testing.assert_close(logits(model, "cuda", torch.float32), reference, rtol=0, atol=1e-4)


def test_lvtc_cached_greedy_decoding_on_cuda_equals_recomputation_and_batching(bundle):
    model = bundle.model(seed=3, **LVTC).to("cuda")
    inputs = batch("cuda")
    with torch.no_grad():
        batched = model.generate(**inputs, **decoding_settings(output_scores=True))
        uncached = model.generate(**inputs, **decoding_settings(use_cache=False))
        assert_same_greedy(uncached, batched)
        assert_greedy_matches_recomputation(model, batched, **inputs)
        counts, start = [2, 3], 0
        for row, count in enumerate(counts):
            real = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]
            pixel_values = inputs["pixel_values"][start : start + count]
            alone = model.generate(input_ids=real, pixel_values=pixel_values, **decoding_settings())
            assert_same_greedy(batched, alone, rows=[(row, 0)])
            start += count


def test_pvtc_and_lvtc_train_in_bf16_on_cuda(bundle):
    model = bundle.model(seed=4, projector_type="pvtc", **LVTC).to("cuda", torch.bfloat16).train()
    inputs = batch("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill((mask == 0) | (ids == IMG_CONTEXT), -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        if name.startswith(("model.multi_modal_projector.", "model.lvtc_")):
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_device_map_auto_places_the_model_on_the_gpu_and_generates_the_same(bundle, tmp_path):
    folder = make_chat_bundle(bundle, tmp_path, **LVTC)
    placed = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, device_map="auto")
    moved = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).to("cuda")
    assert {p.device.type for p in placed.parameters()} == {"cuda"}
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = PIL.Image.new("RGB", (120, 60), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to("cuda")
    with torch.no_grad():
        a = placed.generate(**inputs, max_new_tokens=8, do_sample=False)
        b = moved.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_finetune_in_bf16_on_cuda_lowers_the_loss_and_reloads(bundle, tmp_path):
    folder = make_chat_bundle(bundle, tmp_path / "model", **LVTC)
    data = write_dataset(tmp_path / "data")
    args = [a for a in common_args(folder, data, tmp_path / "out", 30) if a != "--use_cpu"]
    finetune.main([str(a) for a in args + ["--stage", 2, "--bf16", "--lr_scheduler_type", "constant"]])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    samples = finetune.ChatDataset(finetune.read_meta(data), processor)
    inputs = finetune.ChatCollator(processor.tokenizer.pad_token_id)([samples[i] for i in range(8)])
    original = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        trained_loss = model.to("cuda")(**{k: v.to("cuda") for k, v in inputs.items()}).loss.float()
        original_loss = original(**inputs).loss
    assert trained_loss.item() < 0.5 * original_loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lvtc_compiled_static_decoding_on_cuda_equals_eager(bundle, dtype):
    """Transformers' own fast path: static cache, decode step compiled whole with CUDA graphs (reduce-overhead)."""
    model = bundle.model(seed=5, **LVTC).to("cuda", dtype)
    inputs = batch("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        eager = model.generate(**inputs, **decoding_settings())
        compiled = model.generate(**inputs, **decoding_settings(cache_implementation="static"))
        assert model._compiled_call is not None
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * max(step.abs().max().item() for step in eager.logits)
    assert_same_greedy(compiled, eager, atol=tolerance)


@pytest.mark.parametrize("implementation", ["offloaded", "offloaded_static"])
def test_lvtc_offloaded_caches_on_cuda_decode_like_the_dynamic_cache(bundle, implementation):
    """Offloading streams each layer's cache through the CPU (needs a CUDA stream), long layers included."""
    model = bundle.model(seed=6, **LVTC).to("cuda")
    inputs = batch("cuda")
    with torch.no_grad():
        dynamic = model.generate(**inputs, **decoding_settings())
        offloaded = model.generate(**inputs, **decoding_settings(cache_implementation=implementation))
    assert_same_greedy(offloaded, dynamic)


@pytest.mark.parametrize("variant", ["lvtc", "fastv"])
def test_hub_kernels_on_cuda_decode_like_the_torch_layers(bundle, tmp_path, monkeypatch, variant):
    """Transformers ≥ 5.25 kernelizes at load (RMSNorm, SiLU/GELU, rotary on CUDA): LVTC's two phases and FastV's
    ranking (its own rotary of the last prompt token) must decode as with the torch layers, dynamic and static cache."""
    from transformers.utils import is_kernels_available

    if not is_kernels_available():
        pytest.skip("needs the kernels package at the versions Transformers accepts (and Hub access for its kernels)")
    overrides = LVTC if variant == "lvtc" else dict(text=dict(num_hidden_layers=4), fastv_layer=1, fastv_ratio=0.5)
    bundle.model(seed=7, **overrides).save_pretrained(tmp_path)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    # kernelize picks kernels for the device the model is on at load, so both load onto the GPU.
    load = dict(trust_remote_code=True, device_map="cuda")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path, use_kernels=False, **load).eval()
    kernelized = AutoModelForImageTextToText.from_pretrained(tmp_path, use_kernels=True, **load).eval()
    assert kernelized.use_kernels
    inputs = batch("cuda")
    with torch.no_grad():
        for cache in (None, "static"):
            expected = plain.generate(**inputs, **decoding_settings(cache_implementation=cache))
            actual = kernelized.generate(**inputs, **decoding_settings(cache_implementation=cache))
            assert_same_greedy(actual, expected, atol=1e-4)
