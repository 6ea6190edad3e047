"""Transformers' `ModelTesterMixin` and `ConfigTester` against InternVL-X: plain, PVTC and LVTC models, with a tester
built like native InternVL's (one image of one tile per row, its visual tokens first)."""

import unittest

import torch
from bundle import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXModel, skip
from transformers.testing_utils import torch_device
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, _config_zero_init, floats_tensor, ids_tensor

# Skips of this bundle's own, each for a deliberate refusal; what the test would check is tested in tests/.
REFUSES_UNFILLED_IMAGE_TOKENS = skip(
    "Its input_ids hold image tokens that no tile fills (random ids padding a batch of 7, or random ids without "
    "pixel_values): refused by design, since the answer would silently ignore the image. sdpa against eager is tested "
    "in tests/test_baseline_equivalence.py and tests/test_lvtc.py; RoPE scaling is the language model's own.",
    "test_eager_matches_sdpa_inference",
    "test_model_rope_scaling_from_config",
)


class InternVLXModelTester:
    def __init__(self, parent, batch_size=3, text_length=7, image_size=32, patch_size=4, image_token_id=1, **extra):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = 3
        self.image_token_id = image_token_id
        self.is_training = True
        self.text_config = dict(
            model_type="qwen2",
            vocab_size=99,
            hidden_size=64,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_act="silu",
            max_position_embeddings=512,
            rope_theta=10000,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        self.vision_config = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=3,
            hidden_act="quick_gelu",
        )
        self.extra = extra
        self.image_seq_length = (image_size // patch_size // 2) ** 2
        self.seq_length = text_length + self.image_seq_length
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_attention_heads = self.text_config["num_attention_heads"]

    def get_config(self):
        return InternVLXConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=self.image_token_id,
            image_start_token_id=2,
            image_end_token_id=3,
            **self.extra,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_ids[input_ids == self.image_token_id] = self.text_config["pad_token_id"]
        input_ids[:, : self.image_seq_length] = self.image_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=torch_device)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


@REFUSES_UNFILLED_IMAGE_TOKENS
class InternVLXModelTestBase(ModelTesterMixin):
    all_model_classes = (InternVLXForConditionalGeneration, InternVLXModel)
    # `generate` is tested by this project's own suite (tests/test_generation.py, test_fast_decoding.py, ...):
    # Transformers' GenerationTesterMixin ships only in its repository, not in the sdist these mixins come from.
    all_generative_model_classes = ()
    # The image goes with the text in every forward the mixins build from the main input alone (`input_ids`).
    additional_model_inputs = ["pixel_values"]
    pipeline_model_mapping = {}
    _is_composite = True  # a vision tower and a language model, each with its own config
    test_headmasking = False
    test_pruning = False
    variant: dict = {}

    def setUp(self):
        self.model_tester = InternVLXModelTester(self, **self.variant)
        self.config_tester = ConfigTester(self, config_class=InternVLXConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_initialization(self):
        """As native InternVL's: every trainable parameter of a zero-initialised config is 0 or 1 on average."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        configs_no_init = _config_zero_init(config)
        for model_class in self.all_model_classes:
            model = model_class(config=configs_no_init)
            for name, param in model.named_parameters():
                if param.requires_grad:
                    self.assertIn(((param.data.mean() * 1e9).round() / 1e9).item(), [0.0, 1.0], msg=name)

    # Native InternVL overrides these two to drop `pixel_values`; here the image stays with the text, so the
    # `<IMG_CONTEXT>` embeddings in `inputs_embeds` are found and filled as with `input_ids`.
    def test_inputs_embeds(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).to(torch_device).eval()
            inputs = self._prepare_for_class(inputs_dict, model_class)
            input_ids = inputs.pop("input_ids")
            inputs["inputs_embeds"] = model.get_input_embeddings()(input_ids)
            with torch.no_grad():
                output = model(**inputs)[0]
            # one state (or logit row) per input position, the images' included, all finite
            self.assertEqual(tuple(output.shape[:2]), tuple(input_ids.shape))
            self.assertTrue(bool(torch.isfinite(output).all()))

    def test_inputs_embeds_matches_input_ids(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).to(torch_device).eval()
            inputs = self._prepare_for_class(inputs_dict, model_class)
            input_ids = inputs.pop("input_ids")
            inputs_embeds = model.get_input_embeddings()(input_ids)
            with torch.no_grad():
                out_ids = model(input_ids=input_ids, **inputs)[0]
                out_embeds = model(inputs_embeds=inputs_embeds, **inputs)[0]
            torch.testing.assert_close(out_embeds, out_ids)

    @unittest.skip("FlashAttention only support fp16 and bf16 data type")
    def test_flash_attn_2_fp32_ln(self):
        pass

    @unittest.skip("Qwen2 flash attention does not support right padding")
    def test_flash_attn_2_inference_equivalence_right_padding(self):
        pass


class InternVLXPlainModelTest(InternVLXModelTestBase, unittest.TestCase):
    variant = {}


class InternVLXPVTCModelTest(InternVLXModelTestBase, unittest.TestCase):
    variant = dict(projector_type="pvtc", pvtc_num_heads=4)


class InternVLXLVTCModelTest(InternVLXModelTestBase, unittest.TestCase):
    variant = dict(lvtc_enabled=True, lvtc_expand_layer=1, lvtc_inject_start=0)


class InternVLXFastVModelTest(InternVLXModelTestBase, unittest.TestCase):
    variant = dict(fastv_layer=1, fastv_ratio=0.5)
