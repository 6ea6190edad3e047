"""Round trip through save_pretrained and the Auto classes with trust_remote_code, as users load the bundle."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from tests.conftest import ROOT
from tests.utils.tiny import image_span, prompt, tiles

MODEL_FILES = ("configuration_internvl_x.py", "modeling_internvl_x.py")  # what a model's save_pretrained copies


def test_repo_root_config_loads_with_auto_config():
    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    assert config.model_type == "internvl_x"
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    assert config.text_config.hidden_size == 2048 and config.text_config.num_key_value_heads == 8
    assert config.text_config.vocab_size == 92553
    assert config.projector_type == "pvtc" and config.tokens_per_tile == 256
    assert config.lvtc_enabled and config.lvtc_expand_layer == 18 and config.lvtc_expanded_tokens_per_tile == 1024
    assert config.lvtc_inject_layers == [12]
    assert set(config.auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}


def test_repo_root_image_processor_loads_with_auto_image_processor():
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(ROOT, trust_remote_code=True)
    assert type(processor).__name__ == "InternVLXImageProcessor"
    assert processor.image_size == 448 and processor.max_patches == 1


@pytest.mark.compat
def test_save_and_reload_through_auto_classes(bundle, tmp_path):
    model = bundle.model(seed=8)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for name in MODEL_FILES:
        assert (tmp_path / name).exists(), f"{name} not copied next to the weights"

    inputs = dict(input_ids=torch.tensor([prompt(2, image_span(2, 4), 5)]), pixel_values=tiles(2))
    with torch.no_grad():
        expected = model(**inputs)
        for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
            reloaded = auto.from_pretrained(tmp_path, trust_remote_code=True).eval()
            assert type(reloaded).__name__ == "InternVLXForConditionalGeneration"
            assert torch.equal(reloaded(**inputs).logits, expected.logits)
        # AutoModel gives the model that chats, as InternVL's remote code does; its `model` is the base model.
        chat_model = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
        assert type(chat_model).__name__ == "InternVLXChatModel"
        assert torch.equal(chat_model(**inputs).logits, expected.logits)
        assert torch.equal(chat_model.model(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)


def test_resave_of_loaded_model_keeps_the_bundle(bundle, tmp_path):
    bundle.model(seed=9).save_pretrained(tmp_path / "a")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "a", trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "b")
    for name in MODEL_FILES:
        assert (tmp_path / "b" / name).exists()
    config = AutoConfig.from_pretrained(tmp_path / "b", trust_remote_code=True)
    assert config.auto_map["AutoModel"] == "modeling_internvl_x.InternVLXChatModel"
