# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""InternVL-X configuration."""

import transformers
from packaging.version import Version
from transformers import AutoConfig, InternVLVisionConfig, PretrainedConfig
from transformers.utils import logging

# The oldest and the newest Transformers release the whole test suite passed on (docs/compatibility.md; CI runs a
# subset on the newest patch of every minor in between, and on newer releases as they appear).
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")
# One logger for every copy of the bundle in a process (each checkpoint folder is a module of its own).
logger = logging.get_logger("transformers_modules.internvl_x")


def untested_transformers_message(installed: str) -> str | None:
    """What to tell a user whose Transformers lies outside `TESTED_TRANSFORMERS`, or None inside it."""
    oldest, newest = TESTED_TRANSFORMERS
    if Version(oldest) <= Version(installed) <= Version(newest):
        return None
    return (
        f"InternVL-X was tested with Transformers {oldest} to {newest}, and {installed} is installed. It may work; if "
        f"it does not, install a tested release: pip install 'transformers>={oldest},<={newest}'"
    )


def warn_if_untested_transformers() -> None:
    """Log one warning per process when the installed Transformers is outside the tested range."""
    message = untested_transformers_message(transformers.__version__)
    if message is not None:
        logger.warning_once(message)


warn_if_untested_transformers()

# The checkpoint's special tokens (their ids are the config's `*_token_id`): an image span is `<img>`, one
# `<IMG_CONTEXT>` per visual token, `</img>`; a chat turn ends with `<|im_end|>` (InternLM2's ChatML, which the
# processor's chat template writes).
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
CHAT_END_TOKEN = "<|im_end|>"
# InternVL2's default system message (InternLM2 chat), which its chat template writes unless a conversation gives one.
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

PROJECTOR_TYPES = ("pixel_shuffle", "pvtc")
# FastV's config fields under the names they had until 2026-12 (checkpoints saved before hold these).
FASTV_FORMER_NAMES = {"visual_token_pruning_layer": "fastv_layer", "visual_token_pruning_ratio": "fastv_ratio"}
FASTV_DEFAULTS = {"fastv_layer": None, "fastv_ratio": 0.0}
VISION_MODEL_TYPE = "internvl_vision"
# The types InternVL-X's own fields must have (`bool` is no integer here, a string no boolean).
FIELD_TYPES = {
    **dict.fromkeys(
        ("pvtc_use_local", "pvtc_use_global", "pvtc_learnable_cls_scale", "lvtc_enabled", "lvtc_use_hr_projector"),
        (bool,),
    ),
    **dict.fromkeys(
        (
            "pvtc_num_layers",
            "pvtc_num_heads",
            "lvtc_expand_layer",
            "lvtc_num_lr_projectors",
            "lvtc_inject_start",
            "lvtc_inject_interval",
            "vision_feature_layer",
            "image_token_id",
            "image_start_token_id",
            "image_end_token_id",
        ),
        (int,),
    ),
    **dict.fromkeys(
        ("downsample_ratio", "pvtc_drop_path_rate", "lvtc_hr_downsample_ratio", "fastv_ratio"), (int, float)
    ),
    "fastv_layer": (int, type(None)),
}

# Where the Auto classes find this bundle's classes; written into every saved config.json. `AutoModel` gives the model
# that chats, as InternVL's own remote code does (its `from_config` builds the base model, as for native models).
AUTO_MAP = {
    "AutoConfig": "configuration_internvl_x.InternVLXConfig",
    "AutoModel": "modeling_internvl_x.InternVLXChatModel",
    "AutoModelForCausalLM": "modeling_internvl_x.InternVLXForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_internvl_x.InternVLXForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_internvl_x.InternVLXForConditionalGeneration",  # the any-to-any pipeline
}

# InternLM2-chat-1.8B written as a Llama config (InternLM2 checkpoints are converted to Llama).
DEFAULT_TEXT_CONFIG = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "vocab_size": 92553,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}

# InternViT-300M-448px.
DEFAULT_VISION_CONFIG = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "attention_bias": True,
    "use_qk_norm": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "image_size": 448,
    "patch_size": 14,
    "use_mean_pooling": True,
}


def _square(size, name: str) -> int:
    """Return the side of a square `size` (int or pair), or raise if it is not square."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"InternVL-X needs a square vision `{name}`, got {tuple(size)}.")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"vision `{name}` must be a positive integer, got {size!r}.")
    return size


class InternVLXConfig(PretrainedConfig):
    r"""
    Configuration of an InternVL-X model: an InternViT vision tower, a projector that turns each 448×448 tile into a
    short sequence of visual tokens, and a decoder-only language model.

    Args:
        vision_config (`dict` or `InternVLVisionConfig`, *optional*):
            Vision tower (InternViT). Defaults to InternViT-300M-448px (24 layers, hidden 1024, patch 14, image 448).
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Language model; any decoder `AutoModel.from_config` builds (Llama, Qwen2, Qwen3, ...). A dict without
            `model_type` is read as Llama. Defaults to InternLM2-chat-1.8B written as Llama.
        image_token_id (`int`, *optional*, defaults to 92546):
            Id of `<IMG_CONTEXT>`, the placeholder each visual token replaces.
        image_start_token_id (`int`, *optional*, defaults to 92544):
            Id of `<img>`, which opens an image span.
        image_end_token_id (`int`, *optional*, defaults to 92545):
            Id of `</img>`, which closes an image span.
        downsample_ratio (`float`, *optional*, defaults to 0.5):
            Pixel-shuffle ratio 1/M of the projector: each M×M window of ViT patches becomes one visual token.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            ViT layer whose hidden state feeds the projector (-1: the last).
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            Which of that hidden state's tokens the projector reads, under the name Transformers' InternVL gives it
            (tools written for that interface read it). `"default"`: the projector's own reading (pixel shuffle
            drops CLS, as InternVL does; PVTC's global queries read CLS). `"full"` is refused: no InternVL-X projector
            takes CLS among its patch tokens.
        projector_type (`str`, *optional*, defaults to `"pixel_shuffle"`):
            `"pixel_shuffle"`: InternVL2's LayerNorm → Linear → GELU → Linear after a pixel shuffle.
            `"pvtc"`: the paper's Projector Visual Token Compressor (§3.1): local (pixel-shuffled window) and global
            (CLS) queries, each cross-attending only to its own M×M window of ViT tokens; output F_L + F_G.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the two linears of the pixel-shuffle projector.
        pvtc_num_layers (`int`, *optional*, defaults to 1):
            L, cross-attention blocks stacked on each PVTC path (the paper's Table 3 picks 1).
        pvtc_num_heads (`int`, *optional*, defaults to 16):
            Attention heads of the PVTC blocks; must divide the language model's hidden size.
        pvtc_use_local (`bool`, *optional*, defaults to `True`):
            Keep PVTC's local path (pixel-shuffled window queries). Ablation switch.
        pvtc_use_global (`bool`, *optional*, defaults to `True`):
            Keep PVTC's global path (CLS queries). Ablation switch; at least one path must stay.
        pvtc_learnable_cls_scale (`bool`, *optional*, defaults to `True`):
            Multiply the broadcast CLS query by a learnable `(1, N, N, D)` scale; `False` uses fixed ones.
        pvtc_drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic-depth rate on the residual branches of the PVTC blocks (identity in eval).
        lvtc_enabled (`bool`, *optional*, defaults to `False`):
            Layer-wise Visual Token Compression (paper §3.2): layers 0..k-1 see N1² visual tokens per tile, layer k
            onwards N2² (upsampled + HR projector), with extra LR projectors injected in between.
        lvtc_expand_layer (`int`, *optional*):
            k, the decoder layer before which each tile's span is expanded from N1² to N2² tokens. `num_hidden_layers`
            means never expand. Defaults to 3/4 of the depth (18 of 24 layers, the paper's 2B setting).
        lvtc_num_lr_projectors (`int`, *optional*, defaults to 2):
            T. Projector 0 is the main projector (`projector_type`); projectors 1..T-1 are pixel-shuffle MLPs at the
            same M1 whose tokens are added to the visual span before layers `s + i·j`, j = 0..T-2.
        lvtc_inject_start (`int`, *optional*):
            s, the layer of the first injection. Defaults to the middle layer.
        lvtc_inject_interval (`int`, *optional*, defaults to 1):
            i, layers between injections.
        lvtc_upsample_mode (`str`, *optional*, defaults to `"nearest"`):
            Upsampling of the N1×N1 span to N2×N2 at layer k: `"nearest"` or `"bilinear"`.
        lvtc_use_hr_projector (`bool`, *optional*, defaults to `True`):
            Add an HR projector's N2² tokens to the upsampled span at layer k.
        lvtc_hr_downsample_ratio (`float`, *optional*, defaults to 1.0):
            1/M2 of the HR projector (1.0: one token per ViT patch, N2 = S). N2 must be a multiple of N1.
        fastv_layer (`int`, *optional*):
            K of FastV, a training-free alternative to LVTC: from decoder layer K on, each row keeps only the top
            (1 − R) of its visual tokens, ranked by the attention the last prompt token pays them in layer K − 1.
            `None` (default) turns FastV off. Works on any checkpoint of this bundle; not together with LVTC.
            Formerly `visual_token_pruning_layer`, a name still read (with a deprecation warning) and still an alias.
        fastv_ratio (`float`, *optional*, defaults to 0.0):
            R, the share of each row's visual tokens pruned at layer K (floor(R · n) of n); 0 keeps them all.
            Formerly `visual_token_pruning_ratio`.
    """

    model_type = "internvl_x"
    # FastV's fields had other names before; configs that hold them load, and code that reads or sets them works.
    attribute_map = dict(FASTV_FORMER_NAMES)
    sub_configs = {"vision_config": InternVLVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_token_id: int = 92546,
        image_start_token_id: int = 92544,
        image_end_token_id: int = 92545,
        downsample_ratio: float = 0.5,
        vision_feature_layer: int = -1,
        vision_feature_select_strategy: str = "default",
        projector_type: str = "pixel_shuffle",
        projector_hidden_act: str = "gelu",
        pvtc_num_layers: int = 1,
        pvtc_num_heads: int = 16,
        pvtc_use_local: bool = True,
        pvtc_use_global: bool = True,
        pvtc_learnable_cls_scale: bool = True,
        pvtc_drop_path_rate: float = 0.0,
        lvtc_enabled: bool = False,
        lvtc_expand_layer: int | None = None,
        lvtc_num_lr_projectors: int = 2,
        lvtc_inject_start: int | None = None,
        lvtc_inject_interval: int = 1,
        lvtc_upsample_mode: str = "nearest",
        lvtc_use_hr_projector: bool = True,
        lvtc_hr_downsample_ratio: float = 1.0,
        fastv_layer: int | None = None,
        fastv_ratio: float = 0.0,
        **kwargs,
    ):
        current = {"fastv_layer": fastv_layer, "fastv_ratio": fastv_ratio}
        for former, name in FASTV_FORMER_NAMES.items():
            if former not in kwargs:
                continue
            value = kwargs.pop(former)
            if current[name] == FASTV_DEFAULTS[name]:  # only the former name is set: a config saved before 2026-12
                logger.warning_once(f"InternVL-X's config field `{former}` is now `{name}`; the old name still works.")
                current[name] = value
            elif value != current[name]:  # both are set: the current name is the one the bundle writes
                logger.warning(f"the config holds `{name}`={current[name]!r} and `{former}`={value!r}; using `{name}`.")
        fastv_layer, fastv_ratio = current["fastv_layer"], current["fastv_ratio"]
        if vision_config is None:
            vision_config = dict(DEFAULT_VISION_CONFIG)
        if isinstance(vision_config, dict):
            vision_type = vision_config.get("model_type", VISION_MODEL_TYPE)
            if vision_type != VISION_MODEL_TYPE:
                raise ValueError(
                    f"vision_config model_type {vision_type!r} is not InternViT's {VISION_MODEL_TYPE!r}: InternVL-X's "
                    "vision tower is Transformers' InternVLVisionModel."
                )
            vision_config = InternVLVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if text_config is None:
            text_config = dict(DEFAULT_TEXT_CONFIG)
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)

        self.vision_config = vision_config
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.image_start_token_id = image_start_token_id
        self.image_end_token_id = image_end_token_id
        self.downsample_ratio = downsample_ratio
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.projector_type = projector_type
        self.projector_hidden_act = projector_hidden_act
        self.pvtc_num_layers = pvtc_num_layers
        self.pvtc_num_heads = pvtc_num_heads
        self.pvtc_use_local = pvtc_use_local
        self.pvtc_use_global = pvtc_use_global
        self.pvtc_learnable_cls_scale = pvtc_learnable_cls_scale
        self.pvtc_drop_path_rate = pvtc_drop_path_rate
        num_layers = text_config.num_hidden_layers
        self.lvtc_enabled = lvtc_enabled
        self.lvtc_expand_layer = lvtc_expand_layer if lvtc_expand_layer is not None else (3 * num_layers) // 4
        self.lvtc_num_lr_projectors = lvtc_num_lr_projectors
        self.lvtc_inject_start = lvtc_inject_start if lvtc_inject_start is not None else num_layers // 2
        self.lvtc_inject_interval = lvtc_inject_interval
        self.lvtc_upsample_mode = lvtc_upsample_mode
        self.lvtc_use_hr_projector = lvtc_use_hr_projector
        self.lvtc_hr_downsample_ratio = lvtc_hr_downsample_ratio
        self.fastv_layer = fastv_layer
        self.fastv_ratio = fastv_ratio
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self._validate()

    def validate(self) -> None:
        """Transformers' validation of its own fields (`PreTrainedConfig.validate`, which it runs at init and at
        `save_pretrained`), then InternVL-X's: types, sizes and schedules, each refusal a `ValueError` naming the field.
        It runs however the config was made: built directly, loaded with keyword arguments (`from_pretrained(path,
        lvtc_expand_layer=...)`, which sets them after init), or edited afterwards (checked when a model is built)."""
        super().validate()
        self._validate()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate()  # the keyword arguments are set by now
        return result

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        """Pixels per side of a tile (the vision tower's square input)."""
        return _square(self.vision_config.image_size, "image_size")

    @property
    def patch_grid_size(self) -> int:
        """S: ViT patches per side of a tile."""
        return self.tile_size // _square(self.vision_config.patch_size, "patch_size")

    @property
    def downsample_factor(self) -> int:
        """M: patches per side merged into one visual token by the projector."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per tile that enter the language model (N² with N = S / M; N1² when LVTC is on)."""
        return (self.patch_grid_size // self.downsample_factor) ** 2

    @property
    def lvtc_hr_downsample_factor(self) -> int:
        """M2: patches per side merged into one token by LVTC's HR projector."""
        return round(1 / self.lvtc_hr_downsample_ratio)

    @property
    def lvtc_expanded_tokens_per_tile(self) -> int:
        """N2²: visual tokens per tile from LVTC's expansion layer on."""
        return (self.patch_grid_size // self.lvtc_hr_downsample_factor) ** 2

    @property
    def lvtc_inject_layers(self) -> list[int]:
        """Layers before which LR projectors 1..T-1 are added: s + i·j, j = 0..T-2."""
        return [self.lvtc_inject_start + self.lvtc_inject_interval * j for j in range(self.lvtc_num_lr_projectors - 1)]

    def _validate(self) -> None:
        self._validate_types()
        self._validate_sub_configs()
        image_size = self.tile_size
        patch_size = _square(self.vision_config.patch_size, "patch_size")
        if image_size % patch_size:
            raise ValueError(f"vision image_size {image_size} is not divisible by patch_size {patch_size}.")
        if not 0 < self.downsample_ratio <= 1 or abs(1 / self.downsample_ratio - self.downsample_factor) > 1e-6:
            raise ValueError(f"downsample_ratio must be 1/M for an integer M ≥ 1, got {self.downsample_ratio}.")
        if self.patch_grid_size % self.downsample_factor:
            raise ValueError(
                f"the {self.patch_grid_size}×{self.patch_grid_size} patch grid is not divisible by the downsample "
                f"factor M = 1/downsample_ratio = {self.downsample_factor}."
            )
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' (the projector's own reading of the vision tower's "
                f"tokens), got {self.vision_feature_select_strategy!r}: no InternVL-X projector takes CLS among its "
                "patch tokens."
            )
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}.")
        if self.projector_type == "pvtc":
            self._validate_pvtc()
        if self.lvtc_enabled:
            self._validate_lvtc()
        if self.fastv_layer is not None:
            self._validate_fastv()
        num_layers = self.vision_config.num_hidden_layers
        if not -num_layers <= self.vision_feature_layer <= num_layers:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is outside the vision tower's "
                f"{num_layers} layers (valid: -{num_layers}..{num_layers})."
            )

    def _validate_sub_configs(self) -> None:
        """The towers' sizes are positive, their activations exist, and the language model is a decoder."""
        from transformers.activations import ACT2FN

        for where, config, names in (
            (
                "vision",
                self.vision_config,
                ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
            ),
            ("text", self.text_config, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")),
        ):
            for name in names:
                value = getattr(config, name, None)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{where}_config.{name} must be a positive integer, got {value!r}.")
        for where, activation in (
            ("vision_config.hidden_act", getattr(self.vision_config, "hidden_act", None)),
            ("text_config.hidden_act", getattr(self.text_config, "hidden_act", None)),
            ("projector_hidden_act", self.projector_hidden_act),
        ):
            if activation is not None and activation not in ACT2FN:
                raise ValueError(f"{where} {activation!r} is not an activation Transformers knows ({sorted(ACT2FN)}).")
        if getattr(self.text_config, "is_encoder_decoder", False):
            raise ValueError(
                f"the language model must be a decoder (Llama, Qwen2, Qwen3, ...); text_config is "
                f"{self.text_config.model_type!r}, an encoder-decoder."
            )

    def _validate_types(self) -> None:
        """Switches are booleans and counts integers: a string such as "false" from a command line or a YAML file would
        read as true. Each refusal names the field, its value and its type."""
        for name, kinds in FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                allowed = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
                raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__}).")

    def _validate_pvtc(self) -> None:
        hidden_size = self.text_config.hidden_size
        if self.pvtc_num_layers < 1:
            raise ValueError(f"pvtc_num_layers must be ≥ 1, got {self.pvtc_num_layers}.")
        if self.pvtc_num_heads < 1 or hidden_size % self.pvtc_num_heads:
            raise ValueError(
                f"pvtc_num_heads {self.pvtc_num_heads} must divide the language model's hidden size {hidden_size}."
            )
        if not (self.pvtc_use_local or self.pvtc_use_global):
            raise ValueError("PVTC needs at least one path: pvtc_use_local and pvtc_use_global are both False.")
        if not 0.0 <= self.pvtc_drop_path_rate < 1.0:
            raise ValueError(f"pvtc_drop_path_rate must be in [0, 1), got {self.pvtc_drop_path_rate}.")

    def _validate_lvtc(self) -> None:
        num_layers = self.text_config.num_hidden_layers
        k, s, i, t = (
            self.lvtc_expand_layer,
            self.lvtc_inject_start,
            self.lvtc_inject_interval,
            self.lvtc_num_lr_projectors,
        )
        if not 0 <= k <= num_layers:
            raise ValueError(f"lvtc_expand_layer {k} must be in [0, {num_layers}] ({num_layers}: never expand).")
        if t < 1:
            raise ValueError(f"lvtc_num_lr_projectors must be ≥ 1, got {t}.")
        if t > 1:
            if i < 1:
                raise ValueError(f"lvtc_inject_interval must be ≥ 1, got {i}.")
            layers = self.lvtc_inject_layers
            if s < 0 or layers[-1] >= k:
                raise ValueError(
                    f"LR projectors 1..{t - 1} are injected before layers {layers} (s={s}, i={i}); every injection "
                    f"must come before the expansion layer k={k}, which changes the visual span's length."
                )
        self._refuse_windowed_layers("LVTC", "set lvtc_enabled=False")
        if self.lvtc_upsample_mode not in ("nearest", "bilinear"):
            raise ValueError(f"lvtc_upsample_mode must be 'nearest' or 'bilinear', got {self.lvtc_upsample_mode!r}.")
        ratio = self.lvtc_hr_downsample_ratio
        factor = self.lvtc_hr_downsample_factor if 0 < ratio <= 1 else None
        if factor is None or abs(1 / ratio - factor) > 1e-6 or self.patch_grid_size % factor:
            raise ValueError(
                f"lvtc_hr_downsample_ratio must be 1/M2 with M2 dividing the {self.patch_grid_size}-patch grid, "
                f"got {ratio}."
            )
        if self.downsample_factor % factor:
            raise ValueError(
                f"N2 = {self.patch_grid_size // factor} must be a multiple of N1 = "
                f"{self.patch_grid_size // self.downsample_factor}: M2 = {factor} must divide M1 = "
                f"{self.downsample_factor}."
            )

    def _validate_fastv(self) -> None:
        num_layers, k, ratio = self.text_config.num_hidden_layers, self.fastv_layer, self.fastv_ratio
        if self.lvtc_enabled:
            raise ValueError(
                "fastv_layer (FastV) and lvtc_enabled both change the visual tokens per layer, and "
                "their combination is not defined here; use one of them."
            )
        if not 1 <= k < num_layers:
            raise ValueError(
                f"fastv_layer {k} must be in [1, {num_layers - 1}]: the tokens are ranked by the "
                "attention of the layer before it, and some layer must run on the pruned sequence."
            )
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"fastv_ratio must be in [0, 1), got {ratio}.")
        self._refuse_windowed_layers("FastV pruning", "set fastv_layer=None")

    def _refuse_windowed_layers(self, method: str, remedy: str) -> None:
        layer_types = getattr(self.text_config, "layer_types", None) or []
        windowed = [index for index, kind in enumerate(layer_types) if kind != "full_attention"]
        if windowed:
            raise ValueError(
                f"{method} runs full causal attention in every decoder layer, but the language model's layers "
                f"{windowed} use {sorted({layer_types[index] for index in windowed})}; turn the window off (e.g. "
                f"Qwen2's use_sliding_window=False) or {remedy}."
            )


InternVLXConfig.register_for_auto_class()

__all__ = ["InternVLXConfig", "TESTED_TRANSFORMERS"]
