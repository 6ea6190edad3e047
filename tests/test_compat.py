"""Living with Transformers releases: the private Transformers names the bundle relies on (each check names what
changed and in which release), the cache's two names, and no deprecation warning from the bundle's own code.

A failure here on a new Transformers means the compatibility section of `modeling_internvl_x.py` (or the function the
message names) must follow that release; docs/compatibility.md ("The private surface") lists the same names.
"""

import inspect
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationMixin, StaticLayer

from tests.conftest import ROOT
from tests.utils.compat import CACHE, cache_of, with_cache
from tests.utils.decoding import VARIANTS, assert_same_greedy, greedy
from tests.utils.tiny import image_span, left_pad, prompt, tiles

pytestmark = pytest.mark.compat
N1SQ = 4


def changed(name: str, detail: str) -> str:
    return (
        f"Transformers {transformers.__version__} changed {name}: {detail}. Follow it in the compatibility section of "
        "modeling_internvl_x.py and in docs/compatibility.md's table of the private surface."
    )


def parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def test_the_cache_goes_by_the_installed_release_s_name(bundle):
    name = bundle.load("modeling_internvl_x.CACHE_NAME")
    assert name == CACHE, changed("the cache's name (`past_key_values` up to 5.23, `cache` from 5.24)", name)
    fields = set(transformers.modeling_outputs.BaseModelOutputWithPast.__dataclass_fields__)
    assert CACHE in fields, changed("BaseModelOutputWithPast's cache field", f"fields are {sorted(fields)}")


def test_private_helpers_the_bundle_imports_still_exist():
    from transformers.utils.deprecation import deprecate_kwarg
    from transformers.utils.generic import can_return_tuple

    assert {"old_name", "version", "new_name"} <= parameters(deprecate_kwarg), changed(
        "transformers.utils.deprecation.deprecate_kwarg", f"its parameters are {parameters(deprecate_kwarg)}"
    )

    class Returning(torch.nn.Module):  # what the bundle's forwards and get_image_features rely on
        config = transformers.PretrainedConfig(return_dict=False)

        @can_return_tuple
        def forward(self):
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=torch.ones(1))

    turned = Returning()(), Returning()(return_dict=True)
    assert isinstance(turned[0], tuple) and not isinstance(turned[1], tuple), changed(
        "transformers.utils.generic.can_return_tuple", "it no longer turns outputs into tuples by return_dict"
    )


def test_generate_s_default_length_is_where_the_bundle_reads_it(bundle):
    """`generate` with no length from the call or the generation config adds `default_new_tokens()` new tokens: the
    bundle reads that default to fit a call to the context (a checkpoint whose generation config sets no length)."""
    from transformers import GenerationConfig

    defaults = GenerationConfig._get_default_generation_params()
    assert isinstance(defaults.get("max_length"), int), changed(
        "transformers.GenerationConfig._get_default_generation_params", f"it gives {defaults}"
    )
    model = bundle.model(seed=3)
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0)
    prompt_ids = torch.tensor([prompt(6)])
    with torch.no_grad():
        generated = model.generate(input_ids=prompt_ids, do_sample=False).shape[1] - prompt_ids.shape[1]
    assert generated == bundle.load("modeling_internvl_x.default_new_tokens")() == defaults["max_length"]


def test_create_causal_mask_takes_the_arguments_the_bundle_passes():
    from transformers.masking_utils import create_causal_mask

    needed = {"config", "inputs_embeds", "attention_mask", "position_ids", CACHE}
    assert needed <= parameters(create_causal_mask), changed(
        "transformers.masking_utils.create_causal_mask", f"it takes {sorted(parameters(create_causal_mask))}"
    )


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_decoder_layers_follow_the_call_convention_the_phased_decoder_uses(bundle, model_type):
    """`run_decoder_layer`'s keywords, and the modules LVTC and FastV reach into, for every supported decoder."""
    model = bundle.model(text=dict(model_type=model_type))
    decoder = model.model.language_model
    layer = decoder.layers[0]
    needed = {"hidden_states", "attention_mask", "position_ids", "position_embeddings", CACHE, "use_cache"}
    assert needed <= parameters(layer.forward), changed(
        f"{type(layer).__name__}.forward", f"it takes {sorted(parameters(layer.forward))}"
    )
    for owner, names in (
        (decoder, ("layers", "rotary_emb", "norm")),
        (layer, ("self_attn", "input_layernorm")),
        (layer.self_attn, ("q_proj", "k_proj", "head_dim", "scaling")),
    ):
        missing = [name for name in names if not hasattr(owner, name)]
        assert not missing, changed(type(owner).__name__, f"it has no {missing}")
    assert model.config.text_config._attn_implementation == "sdpa", changed(
        "PretrainedConfig._attn_implementation", "it no longer says which attention kernel a config runs with"
    )


def test_fastv_rotary_equals_the_language_model_s_own(bundle):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 2, 4, 5, 16, generator=generator)
    model = bundle.model()
    positions = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.model.language_model.rotary_emb(query, positions)
    expected_query, expected_key = apply_rotary_pos_emb(query, key, cos, sin)
    apply_rotary = bundle.load("modeling_internvl_x.apply_rotary")
    torch.testing.assert_close(apply_rotary(query, cos, sin), expected_query, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rotary(key, cos, sin), expected_key, rtol=0, atol=1e-6)


def test_static_layer_internals_the_static_cache_path_uses(bundle):
    """`static_capacity` / `set_static_capacity`: a static layer resized after allocation allocates again."""
    set_static_capacity = bundle.load("modeling_internvl_x.set_static_capacity")
    layer = StaticLayer(max_cache_len=4)
    states = torch.randn(1, 2, 3, 8)
    layer.update(states, states)
    for name in ("max_cache_len", "is_initialized", "keys", "values", "cumulative_length"):
        assert hasattr(layer, name), changed("StaticLayer", f"it has no `{name}`")
    assert layer.keys.shape[2] == 4
    set_static_capacity(layer, 6)
    layer.update(states, states)
    assert layer.keys.shape[2] == 6, changed("StaticLayer", "clearing `is_initialized` no longer reallocates it")


def test_the_generation_methods_the_bundle_overrides_keep_their_signatures():
    """(`_expand_inputs_for_generation` is a static method up to 5.17, a method after: both are called on the model.)"""
    expected = {
        "_prepare_cache_for_generation": [
            "generation_config",
            "model_kwargs",
            "generation_mode",
            "batch_size",
            "max_cache_length",
        ],
        "_expand_inputs_for_generation": ["expand_size", "is_encoder_decoder", "input_ids", "model_kwargs"],
    }
    for name, names in expected.items():
        actual = [p for p in inspect.signature(getattr(GenerationMixin, name)).parameters if p != "self"]
        assert actual == names, changed(f"GenerationMixin.{name}", f"its parameters are {actual}")


@pytest.mark.parametrize("variant", ["plain", "lvtc"])
def test_a_user_s_past_key_values_still_works_and_the_output_answers_to_both_names(bundle, variant):
    """As for native models: up to 5.23 `past_key_values` is the name; from 5.24 `cache`, and `past_key_values=`
    still works with a FutureWarning that names `cache`."""
    model = bundle.model(seed=2, **VARIANTS[variant])
    ids = torch.tensor([prompt(2, image_span(2, N1SQ), 3)])
    with torch.no_grad():
        prefill = model(input_ids=ids, pixel_values=tiles(2), use_cache=True)
        reference_prefill = model(input_ids=ids, pixel_values=tiles(2), use_cache=True)
        step = torch.tensor([[7]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old_name = model(input_ids=step, past_key_values=cache_of(prefill), use_cache=True)
        new_name = model(input_ids=step, **with_cache(cache_of(reference_prefill)), use_cache=True)
    torch.testing.assert_close(old_name.logits, new_name.logits, rtol=0, atol=1e-6)
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    if CACHE == "cache":
        assert any("`past_key_values` is deprecated" in m and "`cache`" in m for m in future), future
        assert new_name["past_key_values"] is new_name.cache is cache_of(new_name)
    else:
        assert not future, future
    assert new_name.past_key_values is cache_of(new_name) and cache_of(new_name) is not None


@pytest.mark.parametrize("variant", ["plain", "pvtc", "lvtc"])
def test_generate_from_inputs_embeds_equals_generate_from_input_ids(bundle, variant):
    """`generate(inputs_embeds=...)`, as for native InternVL: the `<IMG_CONTEXT>` embeddings mark the visual tokens."""
    model = bundle.model(seed=4, **VARIANTS[variant])
    ids, mask = left_pad([prompt(2, image_span(1, N1SQ), 3, seed=1), prompt(1, image_span(2, N1SQ), 5, seed=2)])
    pixel_values = tiles(3, seed=5)
    with torch.no_grad():
        from_ids = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **greedy(6))
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, pixel_values=pixel_values, **greedy(6))
    assert from_embeds.sequences.shape == (2, 6)  # only the new tokens, as for every model given inputs_embeds
    assert_same_greedy(from_embeds, from_ids)


def test_the_bundle_emits_no_deprecation_warning(chat_dir, bundle, tmp_path):
    """Forward with loss, dynamic and static `generate`, beams, `chat()`, the processor and chat template, saving and
    loading, and one Trainer step, on plain, PVTC and LVTC models: no FutureWarning or DeprecationWarning, and no
    Transformers log line about something deprecated."""
    from transformers import Trainer, TrainingArguments

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logging.Logger.warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            processor = AutoProcessor.from_pretrained(chat_dir, trust_remote_code=True)
            model = AutoModelForImageTextToText.from_pretrained(chat_dir, trust_remote_code=True).eval()
            image = torch.rand(3, 80, 120)
            messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}]
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
                model.chat(processor, processor.load_image(image), "What?", dict(max_new_tokens=3, do_sample=False))
            model.save_pretrained(tmp_path / "saved")
            AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", trust_remote_code=True)
            for variant in ("plain", "pvtc", "lvtc"):
                model = bundle.model(seed=1, **VARIANTS[variant])
                ids = torch.tensor([prompt(2, image_span(2, N1SQ), 4)])
                model(input_ids=ids, pixel_values=tiles(2), labels=ids).loss.backward()
                with torch.no_grad():
                    for settings in ({}, {"cache_implementation": "static"}, {"num_beams": 2}):
                        model.generate(
                            input_ids=ids,
                            pixel_values=tiles(2),
                            max_new_tokens=3,
                            do_sample=False,
                            pad_token_id=0,
                            **settings,
                        )
            sample = dict(input_ids=ids[0], labels=ids[0], pixel_values=tiles(2))
            args = TrainingArguments(
                output_dir=str(tmp_path / "trainer"),
                max_steps=1,
                per_device_train_batch_size=1,
                report_to=[],
                use_cpu=True,
                save_strategy="no",
            )
            Trainer(model=model.train(), args=args, train_dataset=[sample], data_collator=collate_one).train()
    finally:
        transformers_logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
    deprecations = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    deprecations += [message for message in records if "deprecat" in message.lower()]
    assert not deprecations, "\n".join(deprecations)


def collate_one(samples: list[dict]) -> dict:
    (sample,) = samples
    return dict(input_ids=sample["input_ids"][None], labels=sample["labels"][None], pixel_values=sample["pixel_values"])


def test_an_untested_transformers_gets_one_warning_at_import(bundle, chat_dir, tmp_path):
    message = bundle.load("configuration_internvl_x.untested_transformers_message")
    oldest, newest = bundle.load("configuration_internvl_x.TESTED_TRANSFORMERS")
    assert message(oldest) is None and message(newest) is None
    for installed in ("5.16.1", "5.99.0", f"{newest}.post1", "6.0.0.dev0"):
        text = message(installed)
        assert installed in text and oldest in text and newest in text
        assert f"pip install 'transformers>={oldest},<={newest}'" in text

    # A user on a release outside the range, loading config, processor and model: one warning in all.
    script = f"""
import sys
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
sys.modules["transformers"].__version__ = "5.99.0"  # the module the bundle's `import transformers` gets
AutoConfig.from_pretrained({str(chat_dir)!r}, trust_remote_code=True)
AutoProcessor.from_pretrained({str(chat_dir)!r}, trust_remote_code=True)
AutoModelForImageTextToText.from_pretrained({str(chat_dir)!r}, trust_remote_code=True)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("InternVL-X was tested with Transformers") == 1, result.stderr
    assert "5.99.0 is installed" in result.stderr


def test_the_tested_range_is_what_the_requirements_install(bundle):
    """The range the import warning names is the one CI tests: the oldest pin (`make test-min`), the upper bound of
    `requirements.txt` and the model card's front matter. The lock file (`make test`) installs a release in that range:
    the newest one whose dependencies the package index has, which `requirements.txt` names (5.25 needs `kernels`
    0.19, which the index here lacks)."""
    oldest, newest = bundle.load("configuration_internvl_x.TESTED_TRANSFORMERS")
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(rf"^transformers=={re.escape(oldest)}$", (ROOT / "requirements-min.txt").read_text(), re.M)
    assert re.search(rf"^transformers>=[\d.]+,<={re.escape(newest)}\b", requirements, re.M)
    (locked,) = re.findall(r"^transformers==(\S+)$", (ROOT / "requirements-lock.txt").read_text(), re.M)
    assert Version(oldest) <= Version(locked) <= Version(newest)
    assert locked == newest or f"({locked};" in requirements, "requirements.txt must say why the lock is older"
    assert f'tested_transformers: ">={oldest},<={newest}"' in (ROOT / "README.md").read_text()


def test_the_matrix_takes_each_minor_s_newest_patch_and_a_newer_pre_release():
    from devtools.compat_matrix import versions_to_test

    published = [Version(v) for v in ("5.16.1", "5.17.0", "5.18.0rc1", "5.18.0", "5.18.1", "5.19.0", "5.20.0.dev0")]
    assert versions_to_test(published, Version("5.17")) == [Version(v) for v in ("5.17.0", "5.18.1", "5.19.0")]
    published.append(Version("5.20.0rc2"))
    assert versions_to_test(published, Version("5.17"))[-1] == Version("5.20.0rc2")
    published.append(Version("5.20.0"))  # the release came out: its release candidate is no longer newer
    assert versions_to_test(published, Version("5.17"))[-2:] == [Version("5.19.0"), Version("5.20.0")]
    # the releases the whole suite runs on (the oldest, the locked one) are left to it
    whole_suite = {Version("5.17.0"), Version("5.19.0")}
    assert versions_to_test(published, Version("5.17"), whole_suite) == [Version("5.18.1"), Version("5.20.0")]


def test_the_processor_hooks_the_bundle_relies_on_are_there():
    """The processor runs on `ProcessorMixin.__call__`: it fills `replace_image_token`, merges options with
    `_merge_kwargs(kwargs class, tokenizer_init_kwargs=...)`, reports counts in a `MultiModalData`; the image processor
    reads string images itself (`fetch_images` is the hook that would otherwise load them)."""
    from transformers.image_processing_utils import BaseImageProcessor
    from transformers.processing_utils import MultiModalData, ProcessorMixin

    for name in ("replace_image_token", "get_text_with_replacements", "_merge_kwargs", "create_mm_token_type_ids"):
        assert hasattr(ProcessorMixin, name), changed("ProcessorMixin", f"it has no `{name}`")
    merge = list(inspect.signature(ProcessorMixin._merge_kwargs).parameters)
    assert merge[:3] == ["self", "ModelProcessorKwargs", "tokenizer_init_kwargs"], changed(
        "ProcessorMixin._merge_kwargs", f"its parameters are {merge}"
    )
    assert {"num_image_tokens", "num_image_patches"} <= set(MultiModalData.__dataclass_fields__), changed(
        "MultiModalData", f"its fields are {sorted(MultiModalData.__dataclass_fields__)}"
    )
    assert hasattr(BaseImageProcessor, "fetch_images"), changed("BaseImageProcessor", "it has no `fetch_images`")
