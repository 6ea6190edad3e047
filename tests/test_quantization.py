"""Quantized loading (`from_pretrained(..., quantization_config=...)`) on the CPU, for plain, PVTC and LVTC checkpoints
whose widths are multiples of 128: bitsandbytes 8-bit and NF4, torchao int8 weight-only and quanto int8. Which parts
are quantized, logits against an fp32 copy holding the dequantized weights, greedy tokens with every cache, saving and
reloading where the library supports it, and the digits demo's answers.

A library that does not import here is skipped by name: its loading, its modules and its logits go untested then."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, QuantoConfig, TorchAoConfig

from tests.conftest import ROOT
from tests.utils.decoding import assert_same_greedy, greedy
from tests.utils.tiny import image_span, left_pad, prompt, tiles

N1SQ = 4
WIDE = dict(
    vision=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4),
    text=dict(
        hidden_size=128,
        intermediate_size=256,
        head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
    ),
)
VARIANTS = {
    "plain": {},
    "pvtc": dict(projector_type="pvtc", pvtc_num_heads=4),
    "lvtc": dict(projector_type="pvtc", pvtc_num_heads=4, lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1),
}
# Library, how close its logits come to an fp32 model holding its dequantized weights. torchao and quanto compute with
# those weights (to float rounding); bitsandbytes 8-bit also rounds the activations to int8, and its 4-bit kernels
# take their own path.
LIBRARIES = {"bnb-8bit": 0.05, "bnb-nf4": 0.05, "torchao-int8": 1e-4, "quanto-int8": 1e-4}


def quantization_config(library: str):
    if library.startswith("bnb"):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes does not import: its 8-bit and NF4 loading untested")
        if library == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if library == "torchao-int8":
        quantization = pytest.importorskip("torchao.quantization", reason="torchao does not import: int8 untested")
        return TorchAoConfig(quantization.Int8WeightOnlyConfig())
    pytest.importorskip("optimum.quanto", reason="optimum-quanto does not import: quanto int8 untested")
    return QuantoConfig(weights="int8")


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The fp32 weight a quantized Linear stands for, or None for a Linear left in full precision."""
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Int8Params":
        import bitsandbytes.functional as bnb

        return bnb.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb

        return bnb.dequantize_4bit(weight.data, weight.quant_state).float()
    if hasattr(weight, "dequantize") and type(weight) is not torch.nn.Parameter:
        return weight.dequantize().float()
    return None


def linears(model):
    """`(name, module)` of every Linear, quantized or not (each library's quantized Linear is an `nn.Linear`)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def part(name: str) -> str:
    return "lm_head" if name == "lm_head" else name.split(".")[1]


@pytest.fixture(scope="module")
def checkpoints(bundle, tmp_path_factory) -> dict:
    folders = {}
    for variant, settings in VARIANTS.items():
        torch.manual_seed(0)
        model = bundle.ForConditionalGeneration(bundle.config(**WIDE, **settings))
        folders[variant] = tmp_path_factory.mktemp(variant)
        model.save_pretrained(folders[variant])
    return folders


def batch() -> dict:
    ids, mask = left_pad([prompt(2, image_span(1, N1SQ), 3, seed=1), prompt(1, image_span(2, N1SQ), 5, seed=2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=tiles(3, seed=4))


def load(folder, library):
    config = quantization_config(library)
    return AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, device_map="cpu", quantization_config=config
    ).eval()


@pytest.mark.parametrize("library", sorted(LIBRARIES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_part_but_the_lm_head_is_quantized_and_logits_match_the_dequantized_weights(
    checkpoints, variant, library
):
    model = load(checkpoints[variant], library)
    reference = AutoModelForImageTextToText.from_pretrained(checkpoints[variant], trust_remote_code=True).eval()
    quantized = {}
    for name, module in linears(model):
        quantized.setdefault(part(name), set()).add(dequantized_weight(module) is not None)
    expected = {"vision_tower", "multi_modal_projector", "language_model"}
    expected |= {"lvtc_lr_projectors", "lvtc_hr_projector"} if variant == "lvtc" else set()
    # every Linear of the vision tower, the projectors and the language model, as for native InternVL; the LM head
    # stays in full precision (Transformers' default for every library)
    assert {name for name, kinds in quantized.items() if kinds == {True}} == expected, quantized
    assert quantized["lm_head"] == {False}

    with torch.no_grad():
        for name, module in linears(model):
            weight = dequantized_weight(module)
            if weight is not None:
                reference.get_submodule(name).weight.copy_(weight)
        inputs = batch()
        logits, expected_logits = model(**inputs).logits, reference(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected_logits[real], rtol=0, atol=LIBRARIES[library])


@pytest.mark.parametrize("library", ["torchao-int8", "quanto-int8", "bnb-8bit"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_are_the_same_with_every_cache(checkpoints, variant, library):
    model = load(checkpoints[variant], library)
    with torch.no_grad():
        dynamic = model.generate(**batch(), **greedy(6))
        static = model.generate(**batch(), **greedy(6, cache_implementation="static"))
        uncached = model.generate(**batch(), **greedy(6, use_cache=False))
    assert_same_greedy(static, dynamic, atol=1e-3)
    assert_same_greedy(uncached, dynamic, atol=1e-3)


@pytest.mark.parametrize("library", ["torchao-int8", "bnb-8bit", "bnb-nf4"])
def test_saving_and_reloading_a_quantized_checkpoint(checkpoints, library, tmp_path):
    model = load(checkpoints["lvtc"], library)
    model.save_pretrained(tmp_path, safe_serialization=library != "torchao-int8")
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    again = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True, device_map="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("library", ["torchao-int8", "quanto-int8"])
def test_the_demo_answers_its_examples_quantized(library):
    from PIL import Image

    from examples.demo import answer

    demo = ROOT / "examples" / "digits-demo"
    processor = AutoProcessor.from_pretrained(demo, trust_remote_code=True)
    model = load(demo, library)
    for example in json.loads((demo / "examples.json").read_text()):
        assert answer(model, processor, Image.open(demo / example["image"]), example["question"]) == example["answer"]


PROJECTORS = ["model.multi_modal_projector", "model.lvtc_lr_projectors", "model.lvtc_hr_projector"]


@pytest.mark.parametrize("library", ["bnb-8bit", "torchao-int8", "quanto-int8"])
def test_full_module_paths_keep_the_projectors_in_full_precision(checkpoints, library):
    """The skip list takes full module paths (what docs/loading.md says); a bare name or a class name matches
    nothing nested, so the projectors stay quantized with those."""

    def quantized_parts(skip: list[str]) -> set[str]:
        config = quantization_config(library)
        key = "llm_int8_skip_modules" if library.startswith("bnb") else "modules_to_not_convert"
        setattr(config, key, ["lm_head", *skip])
        model = AutoModelForImageTextToText.from_pretrained(
            checkpoints["lvtc"], trust_remote_code=True, device_map="cpu", quantization_config=config
        )
        return {part(name) for name, module in linears(model) if dequantized_weight(module) is not None}

    assert quantized_parts(PROJECTORS) == {"vision_tower", "language_model"}
    everything = {"vision_tower", "language_model", "multi_modal_projector", "lvtc_lr_projectors", "lvtc_hr_projector"}
    assert quantized_parts([path.removeprefix("model.") for path in PROJECTORS]) == everything
    assert quantized_parts(["InternVLXPVTCProjector", "InternVLXPixelShuffleProjector"]) == everything


def test_torchao_int8_decodes_compiled_like_eager(checkpoints):
    """torchao is the library whose models `generate` compiles (Transformers' `is_compileable`); the compiled static
    decode step of the LVTC model gives eager's tokens."""
    from transformers import CompileConfig

    model = load(checkpoints["lvtc"], "torchao-int8")
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # Transformers compiles on accelerators only unless told
    with torch.no_grad():
        eager = model.generate(**batch(), **greedy(5, cache_implementation="static"))
        compiled = model.generate(**batch(), **greedy(5, cache_implementation="static", compile_config=compile_config))
    assert model._compiled_call is not None  # the decode step did run compiled
    assert_same_greedy(compiled, eager, atol=1e-3)
