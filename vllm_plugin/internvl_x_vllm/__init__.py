"""vLLM plugin serving InternVL-X checkpoints: plain, PVTC and LVTC, exactly, with vLLM's continuous batching.

Installed with `pip install ./vllm_plugin`; vLLM calls `register` in each of its processes (entry point group
`vllm.general_plugins`). The model reads the checkpoint's own bundle files (`trust_remote_code`) for the vision tower,
the projectors, the tiling and LVTC's geometry. docs/serving.md (vLLM) says what it serves, how, and what it refuses.
"""

ARCHITECTURE = "InternVLXForConditionalGeneration"


def register() -> None:
    """Register InternVL-X's model (and its multimodal processor, with the model class) and its config hook."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import InternVLXConfigHook

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "internvl_x_vllm.model:InternVLXForVLLM")
    MODELS_CONFIG_MAP[ARCHITECTURE] = InternVLXConfigHook
