# Copyright 2026 The InternVL-X for Transformers authors.
# Licensed under the Apache License, Version 2.0.
"""InternVL-X: InternVL2 with visual-token compression (PVTC, LVTC, RVTC)."""

import contextlib
import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, InternVLVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache, StaticLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import is_flash_attn_2_available, logging, output_capturing
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_internvl_x import (
    CHAT_END_TOKEN,
    DEFAULT_SYSTEM_MESSAGE,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    InternVLXConfig,
)

logger = logging.get_logger(__name__)


# ---- Transformers compatibility --------------------------------------------------------------------------------------
# The bundle runs on whatever Transformers its user has installed (tested: `TESTED_TRANSFORMERS` in the configuration
# file). The Transformers conventions and internals it relies on that are not stable public API are reached through
# this section: `can_return_tuple` and `deprecate_kwarg` (imported above), the cache's name, the mask and decoder-layer
# calls, hidden-state selection and attention recording, generate's per-layer-type mask dict, the static cache's
# internals, the two `GenerationMixin` methods it overrides, the reading of packed rows and sdpa's causal-kernel
# shortcut. Outside it, by design, only the decoder's own modules (`layers`, `rotary_emb`, `norm`,
# `gradient_checkpointing`, each layer's `input_layernorm` and `self_attn` projections, which the two-phase loop and
# FastV's ranking run), `PreTrainedModel`'s documented class attributes and hooks, and `_from_config`, which
# `InternVLXChatModel` overrides so that `AutoModel.from_config` builds the base model (InternVL2's surface, below).
# docs/compatibility.md lists every one of them; tests/test_compat.py checks each and names the release that changed
# it.

# The cache's keyword argument and output field: `past_key_values` up to 5.23, `cache` from 5.24.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
# From 5.24, Transformers' own models take `past_key_values=` for `cache=` with a FutureWarning until this release.
PAST_KEY_VALUES_REMOVAL = "5.40.0"
# How `output_hidden_states=[i, j]` selects a decoder's hidden states changed in 5.23 (see `select_hidden_states`).
SELECTS_AMONG_ALL_HIDDEN_STATES = hasattr(output_capturing, "selected_hidden_states")


def takes_cache_argument(method):
    """Let `method`, whose cache parameter is `cache`, be called the way the installed Transformers calls its own
    models: up to 5.23 as `past_key_values=` (the name its signature shows, which `generate` reads); from 5.24 as
    `cache=`, a user's `past_key_values=` still taken with the FutureWarning native models give."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", version=PAST_KEY_VALUES_REMOVAL, new_name="cache")(method)

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return method(*args, **kwargs)

    signature = inspect.signature(method)
    parameters = [p.replace(name=CACHE_NAME) if p.name == "cache" else p for p in signature.parameters.values()]
    wrapper.__signature__ = signature.replace(parameters=parameters)
    return wrapper


def named_cache(cache: Cache | None) -> dict:
    """`{name: cache}` under the installed release's name, for Transformers' calls and output classes."""
    return {CACHE_NAME: cache}


def output_cache(outputs) -> Cache | None:
    """The cache a Transformers model output carries."""
    return getattr(outputs, CACHE_NAME)


def attention_implementation(config) -> str:
    """The attention kernel a (text) config runs with, as `from_pretrained` set it."""
    return config._attn_implementation


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids):
    """Transformers' causal mask for the layers of `config` (None where sdpa's causal kernel does it)."""
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **named_cache(cache),
    )


def run_decoder_layer(layer, hidden_states, attention_mask, position_ids, position_embeddings, cache, **kwargs):
    """One decoder layer of a Transformers language model (Llama, Qwen2, Qwen3, ...), by its call convention."""
    return layer(
        hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
        **named_cache(cache),
        **kwargs,
    )


def select_hidden_states(states: list[torch.Tensor] | None, selection) -> tuple | None:
    """The per-layer states of a decoder (the input of each of its L layers, then the final normed state) that
    `output_hidden_states=selection` asks for, by the installed Transformers' rule for its own decoders. `True`: all
    L + 1. An index or a list of them: from 5.23 indices into those L + 1 (negative ones from the end), every other
    entry None; up to 5.22 only a list, of indices into the L layers' outputs (the initial state left out), every
    other entry None."""
    if states is None or isinstance(selection, bool) or selection is None:
        return tuple(states) if states is not None and selection else None
    if SELECTS_AMONG_ALL_HIDDEN_STATES:
        selection = [selection] if isinstance(selection, int) else selection
        chosen = {index % len(states) for index in selection if -len(states) <= index < len(states)}
        return tuple(state if index in chosen else None for index, state in enumerate(states))
    if isinstance(selection, int):
        return tuple(states)
    return tuple(state if index in set(selection) else None for index, state in enumerate(states[1:]))


@contextlib.contextmanager
def recorded_attention_weights(layer: nn.Module, weights: list | None):
    """While active, the attention weights `(B, heads, q, kv)` of `layer`'s attention module (the second of what its
    forward returns, present with eager attention) are appended to `weights`; nothing happens when it is None."""
    if weights is None:
        yield
        return
    handle = layer.self_attn.register_forward_hook(lambda module, args, output: weights.append(output[1]))
    try:
        yield
    finally:
        handle.remove()


def is_static_cache(cache: Cache | None) -> bool:
    """Whether `cache` pre-allocates its layers (`cache_implementation="static"`, `StaticCache`)."""
    return cache is not None and any(isinstance(layer, StaticLayer) for layer in cache.layers)


def static_capacity(cache: Cache, layer_index: int = 0) -> int:
    """Tokens a static cache's layer holds."""
    return cache.layers[layer_index].max_cache_len


def set_static_capacity(layer: StaticLayer, capacity: int) -> None:
    """Give a static layer `capacity` slots; one already allocated at another size is allocated again at its next
    update."""
    if layer.max_cache_len != capacity:
        layer.max_cache_len = capacity
        if layer.is_initialized:
            layer.is_initialized = False
            layer.keys = layer.values = None


class InternVLXStaticLayer(StaticLayer):
    """Transformers' static cache layer, plus `crop` (Transformers' own has it from 5.24): speculative decoding rolls
    back rejected tokens. Only the write position moves back; the dropped slots are hidden from attention by the
    causal mask until new tokens overwrite them, so no tensor is reallocated (compiled graphs keep their addresses)."""

    is_croppable = True

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a count ≤ 0, as for Transformers' caches)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}.")
        if self.is_initialized and tokens_to_remove:
            self.cumulative_length.sub_(-tokens_to_remove)


def default_new_tokens() -> int:
    """The new tokens `generate` adds when neither the call nor the generation config sets a length: its default
    `max_length`, which it counts past the prompt (`GenerationConfig._get_default_generation_params`)."""
    return GenerationConfig._get_default_generation_params()["max_length"]


class InternVLXGenerationMixin(GenerationMixin):
    """`GenerationMixin` with the two private methods this bundle overrides (same signatures 5.17–5.24), each handing
    over to a named method of the model: `repeat_images_per_row` and `check_generation_request`."""

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
    ) -> tuple[torch.LongTensor, dict]:
        images = self.repeat_images_per_row(expand_size, input_ids, model_kwargs)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(images)
        return input_ids, model_kwargs

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int, **kwargs
    ):
        self.check_generation_request(generation_config, model_kwargs, generation_mode)
        if generation_mode == "assisted_generation":
            # Verifying candidates writes past the max_length - 1 tokens Transformers sizes a static cache for (5.24
            # runs assisted decoding on its own static cache): up to max_length with an assistant model, and up to
            # max_length - 1 + prompt_lookup_num_tokens with prompt lookup, which bounds candidates by the input only.
            max_cache_length += generation_config.prompt_lookup_num_tokens or 1
        result = super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, **kwargs
        )
        self.check_cache_capacity(model_kwargs.get(CACHE_NAME), max_cache_length)
        return result


def packed_sequence_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """`(B, L)` the index of the sequence each token belongs to in rows that pack several sequences (positions
    restart, as padding-free collators write them), or None when every row holds one. Transformers' decoders read
    restarting positions this way when neither an attention mask nor a cache is given, and keep the sequences apart."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    ids = (step != 1).cumsum(-1)
    if not torch.compiler.is_compiling() and not bool(ids[:, -1].any()):
        return None
    return ids


def sdpa_causal_kernel_suffices(implementation: str, keys: torch.Tensor, query_length: int, past) -> bool:
    """Whether sdpa's own causal kernel computes a mask that lets query i (at key slot `past + i`) see the valid
    `keys (B, kv)` up to itself, so no mask need be built: with no padding, for one new token on a dynamic cache and
    for a prompt into an empty cache (sdpa aligns its causal mask top-left, so a static cache's free slots after the
    prompt are never attended), as Transformers' own mask functions decide."""
    kv_length = keys.shape[1]
    return (
        implementation == "sdpa"
        and not torch.compiler.is_compiling()
        and isinstance(past, int)
        and ((query_length == 1 and kv_length == past + 1) or (past == 0 and query_length > 1))
        and bool(keys[:, : past + query_length].all())
    )


def full_attention_mask(attention_mask):
    """The mask of the full-attention layers: generate hands compileable caches a `{layer type: 4D mask}` dict."""
    return attention_mask.get("full_attention") if isinstance(attention_mask, dict) else attention_mask


def key_validity(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`(batch, kv)` bool: the keys a sequence may attend to, from a 2D padding mask, or from a prepared 4D mask
    `(batch, 1, q, kv)` (bool, or additive with 0 where allowed), whose last query row sees every real key before it.
    None (no mask) means every key."""
    attention_mask = full_attention_mask(attention_mask)
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool()
    last_row = attention_mask[:, 0, -1, :]
    return last_row if last_row.dtype == torch.bool else last_row == 0


class InternVLXStaticCache(StaticCache):
    """`StaticCache` whose layers can `crop`, for speculative decoding on pre-allocated memory (e.g. an assistant
    model or prompt lookup in `generate(past_key_values=InternVLXStaticCache(...))`).

    With LVTC, its long layers get room for the prompt's growth at the prefill, like any static cache's.
    """

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.layers = [
            InternVLXStaticLayer(max_cache_len=layer.max_cache_len) if type(layer) is StaticLayer else layer
            for layer in self.layers
        ]


# ---- Projectors: InternVL's pixel shuffle and PVTC (paper §3.1) ------------------------------------------------------
def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge each `factor`×`factor` window of a patch grid into one token (InternVL's pixel shuffle).

    Output token (i, j) is window (i, j); its channels are the window's M² patches in row-major order, `C` each,
    exactly as in InternVL, so weights trained with InternVL2's projector apply unchanged.

    Args:
        features: `(batch, S, S, C)` patch grid, row-major.
        factor: M, patches per side merged into one token; must divide S.

    Returns:
        `(batch, S / M, S / M, C · M²)`.
    """
    batch, rows, cols, channels = features.shape
    if rows % factor or cols % factor:
        raise ValueError(f"a {rows}×{cols} patch grid cannot be pixel-shuffled by {factor}: {factor} must divide it.")
    features = features.reshape(batch, rows, cols // factor, channels * factor).transpose(1, 2)
    features = features.reshape(batch, cols // factor, rows // factor, channels * factor * factor)
    return features.transpose(1, 2).contiguous()


class InternVLXPixelShuffleProjector(nn.Module):
    """InternVL2's projector (`mlp1`): pixel shuffle by M, then LayerNorm → Linear → act → Linear.

    Parameter names equal `transformers.InternVLMultiModalProjector`'s.
    """

    def __init__(self, config: InternVLXConfig, downsample_factor: int | None = None):
        super().__init__()
        self.downsample_factor = downsample_factor or config.downsample_factor
        merged_size = config.vision_config.hidden_size * self.downsample_factor**2
        text_size = config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(merged_size)
        self.linear_1 = nn.Linear(merged_size, text_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        """`(tiles, 1 + S², C)` ViT states with CLS first → `(tiles, (S / M)², D)` visual tokens, row-major."""
        patches = vision_features[:, 1:]
        tiles, num_patches, channels = patches.shape
        side = int(num_patches**0.5)
        grid = pixel_shuffle(patches.reshape(tiles, side, side, channels), self.downsample_factor)
        hidden_states = self.layer_norm(grid.reshape(tiles, -1, grid.shape[-1]))
        return self.linear_2(self.act(self.linear_1(hidden_states)))


# Epsilon of every RMSNorm inside PVTC, as in the released InternVL-X checkpoints.
PVTC_NORM_EPS = 1e-6


class InternVLXRMSNorm(nn.Module):
    """RMSNorm computed in at least float32: `weight · x / sqrt(mean(x²) + eps)`."""

    def __init__(self, hidden_size: int, eps: float = PVTC_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(dtype, torch.float32))
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(dtype)


class InternVLXNormLinearSiLU(nn.Module):
    """RMSNorm → Linear (no bias) → SiLU: PVTC's input MLPs (local query, CLS query, key/value)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.norm = InternVLXRMSNorm(in_features)
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.silu(self.linear(self.norm(hidden_states)))


def drop_path(hidden_states: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole rows of the first dimension with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return hidden_states
    keep = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.dim() - 1)).bernoulli_(1 - rate)
    return hidden_states * keep / (1 - rate)


class InternVLXWindowAttention(nn.Module):
    """Point-to-region cross-attention: each window's query attends only to the M² tokens of its own window.

    Windows are the batch dimension of `F.scaled_dot_product_attention`, so no mask is needed.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query_norm = InternVLXRMSNorm(hidden_size)
        self.key_value_norm = InternVLXRMSNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        """`queries (windows, Q, D)`, `keys_values (windows, M², D)` → `(windows, Q, D)`."""
        windows, num_queries, hidden_size = queries.shape
        queries = self.query_norm(queries)
        keys_values = self.key_value_norm(keys_values)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(windows, -1, self.num_heads, self.head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(queries)), heads(self.k_proj(keys_values)), heads(self.v_proj(keys_values))
        )
        return self.o_proj(attended.transpose(1, 2).reshape(windows, num_queries, hidden_size))


class InternVLXGatedMLP(nn.Module):
    """RMSNorm → `down_proj(SiLU(gate_proj x) · up_proj x)`, hidden 4·D, no biases (the release's w1, w3, w2)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = InternVLXRMSNorm(hidden_size)
        self.gate_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.down_proj = nn.Linear(4 * hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm(hidden_states)
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class InternVLXWindowCrossAttentionBlock(nn.Module):
    """`x = q + Attn(norm(q), norm(kv))`, then `x = x + MLP(x)`, with optional stochastic depth on both branches."""

    def __init__(self, hidden_size: int, num_heads: int, drop_path_rate: float):
        super().__init__()
        self.attention = InternVLXWindowAttention(hidden_size, num_heads)
        self.mlp = InternVLXGatedMLP(hidden_size)
        self.drop_path_rate = drop_path_rate

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        """`queries (windows, Q, D)`, `keys_values (windows, M², D)` → `(windows, Q, D)`."""
        queries = queries + drop_path(self.attention(queries, keys_values), self.drop_path_rate, self.training)
        return queries + drop_path(self.mlp(queries), self.drop_path_rate, self.training)


class InternVLXPVTCProjector(nn.Module):
    """Projector Visual Token Compressor (paper §3.1).

    With S² ViT patches per tile, M = 1/downsample_ratio, N = S / M and D the language model's width:

    - keys/values: `kv_mlp` on every patch, grouped into the N² non-overlapping M×M windows;
    - local path: each window pixel-shuffled into one query (`local_mlp`), refined by `local_blocks`;
    - global path: the CLS token through `cls_mlp`, broadcast to the N×N grid, times `cls_scale`, refined by
      `global_blocks`;
    - every query attends only to the M² keys of its own window; the output is F_L + F_G, `(tiles, N², D)`.
    """

    def __init__(self, config: InternVLXConfig):
        super().__init__()
        vision_size = config.vision_config.hidden_size
        hidden_size = config.text_config.hidden_size
        self.downsample_factor = config.downsample_factor
        grid = config.patch_grid_size // self.downsample_factor

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(
                InternVLXWindowCrossAttentionBlock(hidden_size, config.pvtc_num_heads, config.pvtc_drop_path_rate)
                for _ in range(config.pvtc_num_layers)
            )

        self.kv_mlp = InternVLXNormLinearSiLU(vision_size, hidden_size)
        if config.pvtc_use_local:
            self.local_mlp = InternVLXNormLinearSiLU(vision_size * self.downsample_factor**2, hidden_size)
            self.local_blocks = blocks()
        if config.pvtc_use_global:
            self.cls_mlp = InternVLXNormLinearSiLU(vision_size, hidden_size)
            self.global_blocks = blocks()
            if config.pvtc_learnable_cls_scale:
                self.cls_scale = nn.Parameter(torch.ones(1, grid, grid, hidden_size))

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        """`(tiles, 1 + S², C)` ViT states with CLS first → `(tiles, N², D)` visual tokens, row-major."""
        cls_token, patches = vision_features[:, 0], vision_features[:, 1:]
        tiles, num_patches, channels = patches.shape
        side, factor = int(num_patches**0.5), self.downsample_factor
        grid = side // factor
        # The Linears see 3-D `(tiles, tokens, C)` inputs: quantized Linears (bitsandbytes 8-bit) take no more.
        keys_values = self.kv_mlp(patches)  # (tiles, S², D)
        hidden_size = keys_values.shape[-1]
        keys_values = keys_values.view(tiles, grid, factor, grid, factor, hidden_size).transpose(2, 3)
        keys_values = keys_values.reshape(tiles * grid * grid, factor * factor, hidden_size)

        output = 0
        if hasattr(self, "local_blocks"):
            windows = pixel_shuffle(patches.reshape(tiles, side, side, channels), factor).flatten(1, 2)
            local = self.local_mlp(windows).reshape(tiles * grid * grid, 1, hidden_size)
            for block in self.local_blocks:
                local = block(local, keys_values)
            output = output + local
        if hasattr(self, "global_blocks"):
            queries = self.cls_mlp(cls_token)[:, None, None, :].expand(tiles, grid, grid, hidden_size)
            if hasattr(self, "cls_scale"):
                queries = queries * self.cls_scale
            queries = queries.reshape(tiles * grid * grid, 1, hidden_size)
            for block in self.global_blocks:
                queries = block(queries, keys_values)
            output = output + queries
        return output.reshape(tiles, grid * grid, hidden_size)


PROJECTOR_CLASSES = {"pixel_shuffle": InternVLXPixelShuffleProjector, "pvtc": InternVLXPVTCProjector}


# ---- Token schedules: what LVTC (paper §3.2) and FastV change, layer by layer ----------------------------------------
class TokenSchedule:
    """A per-layer token schedule: layers 0..s-1 run on the input sequence, layers s.. on a sequence the schedule
    derives from it at layer s (LVTC expands every tile's visual span there, FastV prunes visual tokens).

    A schedule is built once with the model, from its config (`build_token_schedule`), and answers what it changes
    for the rest of the model (the questions below: tokens per layer, positions gained, the modules it trains, the
    generation modes and engines it cannot run under). The decoder loop (`PhasedDecoder`) runs it through four hooks:
    what is added to the visual span before first-phase layers (`first_phase_additions`), the second phase's sequence
    (`enter`), how final states map back to the input (`leave`) and, for batches without images, the modules `enter`
    runs (`second_phase_modules`). A schedule owns no parameters: its hooks get the model, as Transformers' attention
    functions get their module, and use the language model and the modules it named (`trainable_modules`).
    """

    name = "this token schedule"
    off_switch = ""  # the config setting that turns the schedule off
    positions_note = ""  # what error messages about positions add
    # Whether the tokens each layer holds follow from the prompt alone, as an engine that schedules tokens ahead of the
    # forward needs (LVTC: the tiles' sizes); FastV decides them from attention scores in the middle of the forward.
    decided_by_prompt = False

    def __init__(self, config: InternVLXConfig, switch_layer: int):
        self.config = config
        self.text_config = config.text_config
        self.switch_layer = switch_layer
        self.num_layers = self.text_config.num_hidden_layers

    # ---- questions -------------------------------------------------------------------------------------------------
    @property
    def layer_change(self) -> str:
        """How the schedule changes the tokens the decoder layers hold, in words."""
        return f"other tokens from layer {self.switch_layer} on"

    @property
    def switches(self) -> bool:
        """Whether any layer runs the second phase (a switch layer equal to the depth means never)."""
        return self.switch_layer < self.num_layers

    def second_phase_tokens(self, visual_tokens: int) -> int:
        """How many of a row's `visual_tokens` the layers from the switch layer on hold."""
        return visual_tokens

    def visual_tokens_per_layer(self, num_tiles: int) -> list[int]:
        """Visual tokens each decoder layer processes for `num_tiles` tiles."""
        tokens = num_tiles * self.config.tokens_per_tile
        second = self.second_phase_tokens(tokens) if self.switches else tokens
        return [tokens] * min(self.switch_layer, self.num_layers) + [second] * (self.num_layers - self.switch_layer)

    def positions_gained(self, tiles: torch.Tensor) -> torch.Tensor:
        """`(B,)` positions a row with `tiles (B,)` tiles needs beyond its tokens (LVTC's expansion); none here."""
        return torch.zeros_like(tiles)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules this schedule adds to the model, under the names its checkpoints hold them; none here."""
        return {}

    def check_generation_mode(self, generation_mode: str) -> None:
        """Refuse, by name, a generation mode this schedule cannot run under."""

    def refuse_paged_engine(self, engine: str) -> None:
        """Refuse `engine`, which keeps one paged KV cache with the same token count in every decoder layer of a
        request (vLLM's Transformers backend, Transformers' continuous batching; docs/serving.md says where)."""
        raise ValueError(
            f"this checkpoint uses {self.name}, whose decoder layers hold different numbers of tokens "
            f"({self.layer_change}), but {engine} keeps one paged KV cache with the same token count in every layer, "
            f"so it cannot run it. Serve a PVTC or pixel-shuffle checkpoint ({self.off_switch}, or a conversion with "
            "--no-lvtc) with it, or this one without it (`transformers serve` runs it one request at a time)."
        )

    # ---- hooks -----------------------------------------------------------------------------------------------------
    def first_phase_additions(
        self, model: "InternVLXModel", vision_features: torch.Tensor | None
    ) -> dict[int, torch.Tensor]:
        """`{layer: (visual tokens, D)}` added to the visual span before those layers (< s)."""
        return {}

    def enter(
        self,
        model: "InternVLXModel",
        hidden_states: torch.Tensor,
        image_mask: torch.Tensor,
        padding: torch.Tensor | None,
        position_ids: torch.Tensor,
        vision_features: torch.Tensor | None,
        last_input: torch.Tensor,
    ) -> "PhaseSwitch":
        """The second phase's sequence from the first phase's `(B, L, D)` output; `last_input` is layer s−1's input."""
        raise NotImplementedError

    def leave(
        self, model: "InternVLXModel", hidden_states: torch.Tensor, switch: "PhaseSwitch", image_mask: torch.Tensor
    ) -> torch.Tensor:
        """Final normed `(B, L2, D)` states → `(B, L, D)` aligned with the input."""
        raise NotImplementedError

    def second_phase_modules(self, model: "InternVLXModel", vision_features: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the modules `enter` runs on `vision_features` (LVTC's HR projector), for padding tiles."""
        return []


@dataclass
class PhaseSwitch:
    """The sequence a schedule hands the second-phase layers at the prefill, and what it needs to map back."""

    hidden_states: torch.Tensor  # (batch, L2, D)
    position_ids: torch.Tensor  # (batch, L2)
    key_mask: torch.Tensor  # (batch, L2) 1 for real tokens, 0 for padding
    growth: torch.Tensor  # (batch,) position offset of each row's later tokens in the second phase
    layout: object  # the schedule's own record, for `leave`


@dataclass
class LVTCLayout:
    """Where each token of a short (N1² per tile) sequence sits in the long (N2² per tile) one.

    Built once per prefill from the `<IMG_CONTEXT>` mask. Rows are left-padded to the longest expanded row.
    """

    text_rows: torch.Tensor  # (num_text,) row of each non-visual token
    text_short: torch.Tensor  # (num_text,) its short position
    text_long: torch.Tensor  # (num_text,) its long position
    tile_rows: torch.Tensor  # (tiles,) row of each tile
    tile_long: torch.Tensor  # (tiles, N2²) long positions of each tile's expanded span
    long_mask: torch.Tensor  # (batch, long_len) 1 for real tokens, 0 for padding
    long_position_ids: torch.Tensor  # (batch, long_len) renumbered positions
    growth: torch.Tensor  # (batch,) tokens each row gained: its decoded tokens' long position offset


def build_lvtc_layout(
    image_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    short_tokens: int,
    long_tokens: int,
) -> LVTCLayout:
    """Index the expansion of every tile's `short_tokens` span into `long_tokens` tokens, in place.

    Args:
        image_mask: `(batch, L)` `<IMG_CONTEXT>` positions; tile t is the t-th run of `short_tokens` of them.
        attention_mask: `(batch, L)` 1 for real tokens, or None.
        position_ids: `(batch, L)` short-phase positions.
    """
    batch, length = image_mask.shape
    extra = long_tokens - short_tokens
    image_mask = image_mask.bool()
    visual_before = image_mask.long().cumsum(1) - image_mask.long()  # visual tokens before each position
    visual_per_row = visual_before[:, -1] + image_mask[:, -1].long()
    coords = image_mask.nonzero()  # (visual, 2) row-major: tile t is rows t·N1² .. (t+1)·N1² - 1
    if coords.shape[0] % short_tokens:
        raise ValueError(f"{coords.shape[0]} image tokens are not a whole number of {short_tokens}-token tiles.")
    coords = coords.view(-1, short_tokens, 2)
    steps = torch.arange(short_tokens, device=coords.device)
    if not bool(((coords[..., 0] == coords[:, :1, 0]) & (coords[..., 1] == coords[:, :1, 1] + steps)).all()):
        raise ValueError(f"LVTC needs each tile's {short_tokens} `<IMG_CONTEXT>` tokens contiguous in one row.")
    if bool((visual_per_row % short_tokens).any()):
        raise ValueError(
            f"every row must hold whole tiles of {short_tokens} image tokens, got {visual_per_row.tolist()}"
        )

    growth = visual_per_row // short_tokens * extra
    long_length = length + int(growth.max())
    shift = (visual_before // short_tokens) * extra + (long_length - length - growth)[:, None]
    long_index = torch.arange(length, device=image_mask.device) + shift  # long position of each short position

    text_rows, text_short = (~image_mask).nonzero(as_tuple=True)
    tile_rows, tile_starts = coords[:, 0, 0], coords[:, 0, 1]
    long_steps = torch.arange(long_tokens, device=coords.device)
    tile_long = long_index[tile_rows, tile_starts][:, None] + long_steps

    real = torch.ones_like(image_mask) if attention_mask is None else attention_mask.bool()
    long_mask = image_mask.new_zeros(batch, long_length)
    long_mask[text_rows, long_index[text_rows, text_short]] = real[text_rows, text_short]
    long_mask[tile_rows[:, None], tile_long] = True
    long_position_ids = position_ids.new_zeros(batch, long_length)
    visual_shift = (visual_before // short_tokens) * extra
    long_position_ids[text_rows, long_index[text_rows, text_short]] = (position_ids + visual_shift)[
        text_rows, text_short
    ]
    tile_position = (position_ids + visual_shift)[tile_rows, tile_starts]
    long_position_ids[tile_rows[:, None], tile_long] = tile_position[:, None] + long_steps
    return LVTCLayout(
        text_rows=text_rows,
        text_short=text_short,
        text_long=long_index[text_rows, text_short],
        tile_rows=tile_rows,
        tile_long=tile_long,
        long_mask=long_mask.long(),
        long_position_ids=long_position_ids,
        growth=growth,
    )


class LVTCSchedule(TokenSchedule):
    """LVTC's per-layer token schedule (paper §3.2, Algorithm 1).

    Layers 0..k-1 run on the input sequence, N1² visual tokens per tile, with LR projectors 1..T-1 added to the visual
    span before layers s + i·j. Before layer k every tile's span is replaced in place by N2² tokens
    (`upsample2d(span) + HR_projector(vit)`); layers k.. run on that longer sequence, rows left-padded to the longest,
    positions renumbered contiguously, RoPE recomputed. The final states are mapped back: text tokens keep their own,
    each tile's N2² states are average-pooled to N1², so the output is `(B, L, D)` again. A static cache's layers from
    k on get `tiles · (N2² − N1²)` more slots per row.
    """

    name = "LVTC"
    off_switch = "lvtc_enabled=False"
    positions_note = " (LVTC's expanded tiles included)"
    decided_by_prompt = True

    def __init__(self, config: InternVLXConfig):
        super().__init__(config, config.lvtc_expand_layer)
        grid = config.patch_grid_size
        self.short_side = grid // config.downsample_factor
        self.long_side = grid // config.lvtc_hr_downsample_factor
        self.uses_hr_projector = config.lvtc_use_hr_projector and self.switches

    @property
    def layer_change(self) -> str:
        short, long = self.short_side**2, self.long_side**2
        return f"each tile {long} tokens from layer {self.switch_layer} on instead of {short}"

    def second_phase_tokens(self, visual_tokens: int) -> int:
        return visual_tokens // self.short_side**2 * self.long_side**2

    def positions_gained(self, tiles: torch.Tensor) -> torch.Tensor:
        """`(B,)`: each tile's N2² − N1² tokens from the expansion layer on."""
        return tiles * (self.long_side**2 - self.short_side**2) if self.switches else torch.zeros_like(tiles)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """LR projectors 1..T-1 (`lvtc_lr_projectors`) and, when the span is expanded, the HR projector."""
        config = self.config
        modules = {
            "lvtc_lr_projectors": nn.ModuleList(
                InternVLXPixelShuffleProjector(config) for _ in range(config.lvtc_num_lr_projectors - 1)
            )
        }
        if self.uses_hr_projector:
            modules["lvtc_hr_projector"] = InternVLXPixelShuffleProjector(config, config.lvtc_hr_downsample_factor)
        return modules

    def first_phase_additions(
        self, model: "InternVLXModel", vision_features: torch.Tensor | None
    ) -> dict[int, torch.Tensor]:
        """`{layer: (tiles · N1², D)}`: LR projectors 1..T-1, each added to the visual span before its layer."""
        if vision_features is None:
            return {}
        projectors = model.lvtc_lr_projectors
        return {
            layer: projector(vision_features).flatten(0, 1)
            for layer, projector in zip(self.config.lvtc_inject_layers, projectors)
        }

    def enter(
        self, model, hidden_states, image_mask, padding, position_ids, vision_features, last_input
    ) -> PhaseSwitch:
        layout = build_lvtc_layout(image_mask, padding, position_ids, self.short_side**2, self.long_side**2)
        long_states = self.expand(model, hidden_states, layout, image_mask, vision_features)
        return PhaseSwitch(long_states, layout.long_position_ids, layout.long_mask, layout.growth, layout)

    def leave(self, model, hidden_states: torch.Tensor, switch: PhaseSwitch, image_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(hidden_states, switch.layout, image_mask, image_mask.shape[1])

    def second_phase_modules(self, model: "InternVLXModel", vision_features: torch.Tensor) -> list[torch.Tensor]:
        return [model.lvtc_hr_projector(vision_features)] if self.uses_hr_projector else []

    def expand(
        self,
        model: "InternVLXModel",
        hidden_states: torch.Tensor,
        layout: LVTCLayout,
        image_mask: torch.Tensor,
        vision_features: torch.Tensor | None,
    ) -> torch.Tensor:
        """`(B, L, D)` → `(B, L_long, D)`: each tile's N1×N1 span upsampled to N2×N2 (+ HR tokens), in place."""
        batch, _, hidden_size = hidden_states.shape
        long_states = hidden_states.new_zeros(batch, layout.long_mask.shape[1], hidden_size)
        long_states = long_states.index_put(
            (layout.text_rows, layout.text_long), hidden_states[layout.text_rows, layout.text_short]
        )
        tiles = layout.tile_rows.shape[0]
        if tiles == 0:
            return long_states
        spans = hidden_states[image_mask].view(tiles, -1, hidden_size)
        hr_tokens = model.lvtc_hr_projector(vision_features) if self.uses_hr_projector else None
        rows = layout.tile_rows[:, None].expand_as(layout.tile_long)
        return long_states.index_put((rows, layout.tile_long), self.expanded_tiles(spans, hr_tokens))

    def expanded_tiles(self, spans: torch.Tensor, hr_tokens: torch.Tensor | None) -> torch.Tensor:
        """`spans (tiles, N1², D)` (row-major N1×N1 grids) → `(tiles, N2², D)`: upsampled to N2×N2, plus the HR
        projector's `hr_tokens (tiles, N2², D)` when it has one (the vLLM plugin expands with this too)."""
        tiles, _, hidden_size = spans.shape
        grid = spans.view(tiles, self.short_side, self.short_side, hidden_size).permute(0, 3, 1, 2)
        upsampled = F.interpolate(grid, size=(self.long_side, self.long_side), mode=self.config.lvtc_upsample_mode)
        upsampled = upsampled.permute(0, 2, 3, 1).reshape(tiles, self.long_side**2, hidden_size)
        return upsampled + hr_tokens.to(upsampled.dtype) if hr_tokens is not None else upsampled

    def pool(
        self, hidden_states: torch.Tensor, layout: LVTCLayout, image_mask: torch.Tensor, length: int
    ) -> torch.Tensor:
        """`(B, L_long, D)` → `(B, L, D)`: text tokens keep their states, each tile's N2² states are average-pooled
        to N1²."""
        batch, _, hidden_size = hidden_states.shape
        short_states = hidden_states.new_zeros(batch, length, hidden_size)
        short_states = short_states.index_put(
            (layout.text_rows, layout.text_short), hidden_states[layout.text_rows, layout.text_long]
        )
        tiles = layout.tile_rows.shape[0]
        if tiles == 0:
            return short_states
        spans = hidden_states[layout.tile_rows[:, None], layout.tile_long]
        spans = spans.view(tiles, self.long_side, self.long_side, hidden_size).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(spans, kernel_size=self.long_side // self.short_side).permute(0, 2, 3, 1)
        return short_states.index_put(image_mask.nonzero(as_tuple=True), pooled.reshape(-1, hidden_size))


@dataclass
class FastVLayout:
    """Which tokens the layers from K on keep, and where each sits in the pruned sequence."""

    rows: torch.Tensor  # (kept,) row of each kept token
    columns: torch.Tensor  # (kept,) its position in the input sequence
    targets: torch.Tensor  # (kept,) its position in the pruned sequence (rows left-padded to the longest)
    pruned_states: torch.Tensor  # (batch, L, D) every token's state entering layer K (the last one a pruned token has)


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half layout of Llama, Qwen2 and Qwen3: `states (B, heads, L, head_dim)`,
    `cos`/`sin (B, L, head_dim)` as the language model's `rotary_emb` gives them."""
    first, second = states.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return states * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def keep_top_visual_tokens(scores: torch.Tensor, image_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """`(B, L)` bool: the tokens to keep. Each row keeps all its non-visual tokens and, of its n visual tokens, the
    n − floor(ratio · n) with the highest `scores`; ties go to the earlier token (a stable sort), so the choice is
    deterministic."""
    visual = image_mask.bool()
    counts = visual.sum(1)
    keep_counts = counts - torch.floor(counts * ratio).long()
    ranked = scores.float().masked_fill(~visual, -float("inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return ~visual | (ranks < keep_counts[:, None])


class FastVSchedule(TokenSchedule):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2"): training-free pruning of visual tokens.

    Layers 0..K-1 run on the whole input. At layer K each row keeps the top (1 − R) of its visual tokens, ranked by the
    attention they get from the last prompt token in layer K − 1 (averaged over heads), with their original positions;
    layers K.. run on the shorter sequence (rows left-padded to the longest). A pruned token's final state is its state
    entering layer K, normed, so logits stay aligned with `input_ids`. The attention scores come from one extra small
    computation (the last token's query against the keys of layer K − 1), so every layer keeps its sdpa kernel.
    """

    name = "FastV"
    off_switch = "fastv_layer=None"

    def __init__(self, config: InternVLXConfig):
        super().__init__(config, config.fastv_layer)
        self.ratio = config.fastv_ratio

    @property
    def layer_change(self) -> str:
        return f"{self.ratio:g} of the visual tokens pruned from layer {self.switch_layer} on"

    def second_phase_tokens(self, visual_tokens: int) -> int:
        """n − floor(R · n) of a row's n visual tokens."""
        return visual_tokens - math.floor(visual_tokens * self.ratio)

    def check_generation_mode(self, generation_mode: str) -> None:
        if generation_mode == "assisted_generation":
            raise ValueError(
                "assisted generation (assistant_model, prompt_lookup_num_tokens) cannot run FastV pruning: its first "
                "forward feeds the prompt together with candidate tokens, so the pruning would be ranked by a "
                "candidate's attention instead of the last prompt token's. Generate without it, or load the model "
                "with fastv_layer=None."
            )

    def last_token_attention(
        self,
        decoder: nn.Module,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """`(B, L)`: the attention the last token pays every token in `layer` (whose input is `hidden_states`),
        averaged over heads; `keys (B, L)` marks the real tokens."""
        attention = layer.self_attn
        batch, length, _ = hidden_states.shape
        head_dim = attention.head_dim
        normed = layer.input_layernorm(hidden_states)
        query = attention.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim)
        key = attention.k_proj(normed).view(batch, length, -1, head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises queries and keys per head
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        cos, sin = decoder.rotary_emb(normed, position_ids)
        query = apply_rotary(query, cos[:, -1:], sin[:, -1:])
        key = apply_rotary(key, cos, sin)
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = (query @ key.transpose(-1, -2)).float() * attention.scaling  # (B, heads, 1, L)
        if keys is not None:
            scores = scores.masked_fill(~keys.bool()[:, None, None, :], -float("inf"))
        return scores.softmax(-1).mean(1)[:, 0]

    def enter(
        self, model, hidden_states, image_mask, padding, position_ids, vision_features, last_input
    ) -> PhaseSwitch:
        decoder = model.language_model
        layer = decoder.layers[self.switch_layer - 1]
        scores = self.last_token_attention(decoder, layer, last_input, padding, position_ids)
        kept = keep_top_visual_tokens(scores, image_mask, self.ratio)
        batch, _, hidden_size = hidden_states.shape
        counts = kept.sum(1)
        length = int(counts.max())
        rows, columns = kept.nonzero(as_tuple=True)
        targets = (kept.long().cumsum(1) - 1 + (length - counts)[:, None])[rows, columns]
        states = hidden_states.new_zeros(batch, length, hidden_size).index_put(
            (rows, targets), hidden_states[rows, columns]
        )
        positions = position_ids.new_zeros(batch, length).index_put((rows, targets), position_ids[rows, columns])
        real = padding.long() if padding is not None else torch.ones_like(kept, dtype=torch.long)
        keys = real.new_zeros(batch, length).index_put((rows, targets), real[rows, columns])
        layout = FastVLayout(rows, columns, targets, hidden_states)
        return PhaseSwitch(states, positions, keys, torch.zeros_like(counts), layout)

    def leave(self, model, hidden_states: torch.Tensor, switch: PhaseSwitch, image_mask: torch.Tensor) -> torch.Tensor:
        layout = switch.layout
        full = model.language_model.norm(layout.pruned_states)
        return full.index_put((layout.rows, layout.columns), hidden_states[layout.rows, layout.targets])


# The config fields a schedule is built from: the model builds its schedule again when one of them is edited (and
# refuses the edit when the new schedule needs modules the model was not built with).
SCHEDULE_FIELDS = (
    "lvtc_enabled",
    "lvtc_expand_layer",
    "lvtc_hr_downsample_ratio",
    "downsample_ratio",
    "fastv_layer",
    "fastv_ratio",
)


def build_token_schedule(config: InternVLXConfig) -> TokenSchedule | None:
    """The token schedule `config` asks for (LVTC, FastV), or None for the plain model: the one place that reads their
    switches."""
    if config.lvtc_enabled:
        return LVTCSchedule(config)
    if config.fastv_layer is not None:
        return FastVSchedule(config)
    return None


# ---- The decoder loop: the layers in two phases, and the cache state between them -----------------------------------
@dataclass
class PhaseCacheState:
    """What a continuation step (decoded or speculated tokens, no images) needs from a two-phase prefill, stored on the
    cache the caller's `generate` uses (any cache Transformers builds or a user passes).

    Only fixed-shape tensors, so a compiled decode step reads them without host syncs or recompilation.
    """

    growth: torch.Tensor  # (batch,) second-phase position = first-phase position + growth (LVTC: tokens gained)
    prompt_keys: torch.Tensor  # (batch, slots) 1 where the second phase's prompt has a real token; 0 for its padding
    # and every slot after it. `slots` is the second-phase layers' capacity for a static cache, P2 else.
    second_prompt_length: torch.Tensor  # () P2: the prompt as the second-phase layers cached it (rows left-padded)
    first_prompt_length: torch.Tensor  # () P1: the prompt as the first-phase layers cached it

    @property
    def offset(self) -> torch.Tensor:
        """`()` how far the second-phase layers' cache runs ahead of the first phase's: P2 − P1 (< 0 when pruned)."""
        return self.second_prompt_length - self.first_prompt_length

    @classmethod
    def continued(
        cls, cache: Cache | None, has_images: bool, batch: int, device: torch.device, schedule_name: str
    ) -> "PhaseCacheState | None":
        """The state of the prefill a step continues, or None when the step is a prefill.

        A compiled step trusts the state on the cache (Transformers compiles decode steps only, after an eager
        prefill); an eager step checks that the cache holds something (a reset or reused cache is a new prefill).
        """
        if cache is None:
            return None
        state = getattr(cache, "internvl_x_phases", None)
        if torch.compiler.is_compiling():
            return None if has_images else state
        cached = int(cache.get_seq_length())
        if has_images:
            if cached:
                raise ValueError(
                    f"{schedule_name} cannot add images to a cache that already holds {cached} tokens; run the whole "
                    "prompt at once."
                )
            return None
        if not cached:
            return None
        if state is None:  # filled without this schedule's prefill (e.g. by the bare language model): phases align
            zero = torch.zeros((), dtype=torch.long, device=device)
            empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
            state = cls(torch.zeros(batch, dtype=torch.long, device=device), empty, zero, zero)
        return state

    @classmethod
    def store(cls, cache: Cache, switch: PhaseSwitch, first_length: int, capacity: int | None) -> "PhaseCacheState":
        """The state of a prefill whose second phase is `switch`, stored on `cache`; `capacity` is the second-phase
        layers' slots of a static cache (`reserve_second_phase_slots`), None for a dynamic one."""
        keys = switch.key_mask
        if capacity is not None:
            keys = F.pad(keys, (0, capacity - keys.shape[1]))
        lengths = torch.tensor([switch.key_mask.shape[1], first_length], device=keys.device)
        state = cls(switch.growth, keys, lengths[0], lengths[1])
        cache.internvl_x_phases = state
        return state


def reserve_second_phase_slots(
    cache: Cache, layers: range, first_length: int, second_length: int, reserved: dict[int, int]
) -> int | None:
    """Give a static cache's second-phase `layers` room for this prompt; return their capacity (None: dynamic).

    They need the first-phase capacity plus the longest row's growth (LVTC; pruning needs no more). For one
    first-phase capacity (`max_cache_len`), the growth reserved (`reserved`, kept by the caller across calls) only
    grows, so later calls with that capacity keep the same shapes and compiled graphs; another capacity means new
    shapes anyway and reserves what its own calls need.
    """
    if not is_static_cache(cache):
        return None
    first_capacity = static_capacity(cache)
    if first_length > first_capacity:
        raise ValueError(
            f"the prompt has {first_length} tokens but the static cache holds {first_capacity} per layer; "
            f"build it with max_cache_len ≥ {first_length} plus the tokens to generate."
        )
    growth = max(second_length - first_length, 0)
    previous = reserved.get(first_capacity, 0)
    reserved[first_capacity] = max(previous, growth)
    capacity = max(first_capacity + max(previous, growth), *(static_capacity(cache, index) for index in layers))
    for index in layers:
        set_static_capacity(cache.layers[index], capacity)
    return capacity


def weighing_nothing(outputs) -> torch.Tensor | float:
    """A zero that depends on every tensor of `outputs`: added to hidden states it changes no value and no gradient
    of the text path, but puts the modules that made `outputs` in the graph (each gets a zero gradient). ZeRO and
    DDP then see the same modules run and the same gradients reduced on every rank, with images or without."""
    outputs = list(outputs)
    return sum(output.sum() for output in outputs) * 0 if outputs else 0.0


class PhasedDecoder:
    """The decoder layers run under a `TokenSchedule`: layers < s on the input sequence (with the schedule's
    additions to the visual span), layers ≥ s on the sequence the schedule derives at layer s, then mapped back.

    Cache: layers < s cache the first-phase sequence, layers ≥ s the second. The prefill stores a `PhaseCacheState` on
    the cache; a continuation step (decoded or speculated tokens, no images) reads only its fixed-shape tensors and
    gives each token the next position of each phase, so with Transformers' static cache a decode step compiles whole.
    The loop keeps the static caches' second-phase growth (`reserved`) across calls.
    """

    def __init__(self, schedule: TokenSchedule):
        self.schedule = schedule
        self.text_config = schedule.text_config
        self.reserved: dict[int, int] = {}  # static caches: the growth reserved for each first-phase capacity

    def __call__(
        self,
        model: "InternVLXModel",
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | dict | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        image_mask: torch.Tensor | None,
        vision_features: torch.Tensor | None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        padding_vision_features: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run `model`'s decoder layers under the schedule.

        `padding_vision_features` (a batch without images given padding tiles, see `InternVLXModel.forward`): the
        schedule's projectors run on them where they would run on real tiles, in the same order, and add nothing.

        `inputs_embeds (B, L, D)` → `last_hidden_state (B, L, D)`. With `output_hidden_states`, the input of every layer
        then the final normed state; with `output_attentions` (eager attention), each layer's weights `(B, heads, q,
        kv)`. Both default to the language model's config, as `use_cache` does. Entries of layers ≥ s (and the last
        hidden state) are in the second phase's layout, so their lengths differ from the first phase's.
        """
        schedule, decoder = self.schedule, model.language_model
        switch_layer, num_layers = schedule.switch_layer, schedule.num_layers
        implementation = attention_implementation(self.text_config)
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"{schedule.name} runs with attn_implementation 'sdpa' or 'eager', not {implementation!r}."
            )
        # The defaults Transformers' decoders take from their config when an argument is not given.
        if output_attentions is None:
            output_attentions = self.text_config.output_attentions
        if output_attentions and implementation != "eager":
            logger.warning_once(
                f"`{implementation}` attention computes no attention weights, so `output_attentions` gives none; load "
                "the model with attn_implementation='eager' for them."
            )
        if output_hidden_states is None:
            output_hidden_states = self.text_config.output_hidden_states
        if use_cache is None:
            use_cache = self.text_config.use_cache
        if use_cache and decoder.gradient_checkpointing and decoder.training and torch.is_grad_enabled():
            use_cache = False  # as Transformers' decoders: checkpointed layers are recomputed, so they cache nothing
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = DynamicCache(config=self.text_config)
        state = PhaseCacheState.continued(cache, vision_features is not None, batch, device, schedule.name)
        packed = None
        if position_ids is not None and state is None and full_attention_mask(attention_mask) is None:
            packed = packed_sequence_ids(position_ids.expand(batch, -1))
            if packed is not None and image_mask is not None and not torch.compiler.is_compiling():
                self.refuse_packed_images(packed, image_mask)  # with a cache or not: the layout is made per row
            packed = packed if cache is None else None  # as Transformers' decoders: kept apart only without a cache
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(length, device=device) + past).unsqueeze(0).expand(batch, -1)
        layers = decoder.layers[:num_layers]
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions and implementation == "eager" else None

        def run_layer(layer, hidden, mask, positions, rotary) -> torch.Tensor:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden)
            with recorded_attention_weights(layer, all_attentions):
                return run_decoder_layer(layer, hidden, mask, positions, rotary, cache, use_cache=use_cache, **kwargs)

        # First phase: layers 0..s-1 on the input sequence, with the schedule's additions to the visual span.
        first_mask = causal_mask(
            self.text_config, inputs_embeds, full_attention_mask(attention_mask), cache, position_ids
        )
        additions = schedule.first_phase_additions(model, vision_features)
        image_positions = image_mask.nonzero(as_tuple=True) if additions else None
        hidden_states = last_input = inputs_embeds
        if padding_vision_features is not None:
            padding_outputs = schedule.first_phase_additions(model, padding_vision_features).values()
            hidden_states = last_input = hidden_states + weighing_nothing(padding_outputs)
        rotary = decoder.rotary_emb(hidden_states, position_ids)
        for layer_index, layer in enumerate(layers[:switch_layer]):
            if layer_index in additions:
                added = hidden_states[image_positions] + additions[layer_index].to(hidden_states.dtype)
                hidden_states = hidden_states.index_put(image_positions, added)
            last_input = hidden_states
            hidden_states = run_layer(layer, hidden_states, first_mask, position_ids, rotary)

        # Second phase: layers s.. on the schedule's sequence.
        switch = None
        if schedule.switches:
            if state is None:
                if image_mask is None:
                    image_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
                padding = key_validity(attention_mask)
                padding = padding[:, :length] if padding is not None else None
                switch = schedule.enter(
                    model, hidden_states, image_mask, padding, position_ids, vision_features, last_input
                )
                hidden_states, second_positions = switch.hidden_states, switch.position_ids
                if padding_vision_features is not None:
                    padding_outputs = schedule.second_phase_modules(model, padding_vision_features)
                    hidden_states = hidden_states + weighing_nothing(padding_outputs)
                prompt_keys = switch.key_mask
                if cache is not None:
                    second_layers = range(switch_layer, num_layers)
                    capacity = reserve_second_phase_slots(
                        cache, second_layers, length, prompt_keys.shape[1], self.reserved
                    )
                    prompt_keys = PhaseCacheState.store(cache, switch, length, capacity).prompt_keys
                if packed is None:
                    second_mask = self.prompt_attention_mask(
                        cache, prompt_keys, second_positions.shape[1], hidden_states.dtype
                    )
                else:  # text-only packed rows: the second phase has the first one's layout
                    second_mask = self.build_mask(prompt_keys.bool(), length, 0, hidden_states.dtype, packed)
            else:
                second_positions = position_ids + state.growth[:, None]
                second_mask = self.continuation_attention_mask(
                    cache, state, attention_mask, length, inputs_embeds.dtype
                )
            rotary = decoder.rotary_emb(hidden_states, second_positions)
            for layer in layers[switch_layer:]:
                hidden_states = run_layer(layer, hidden_states, second_mask, second_positions, rotary)

        hidden_states = decoder.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        if switch is not None:
            hidden_states = schedule.leave(model, hidden_states, switch, image_mask)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=select_hidden_states(all_hidden_states, output_hidden_states),
            attentions=tuple(all_attentions or ()) if output_attentions else None,
            **named_cache(cache),
        )

    def refuse_packed_images(self, packed: torch.Tensor, image_mask: torch.Tensor) -> None:
        """Rows that pack several sequences are kept apart for text only: the second phase's layout (LVTC's expanded
        tiles, FastV's ranking by the row's last token) is made per row, not per packed sequence."""
        image_tokens = int(image_mask.sum())
        if image_tokens:
            sequences = (packed[:, -1] + 1).tolist()
            raise ValueError(
                f"{self.schedule.name} cannot keep packed sequences apart when they hold images: the rows pack "
                f"{sequences} sequences (position_ids restart without an attention mask) and {image_tokens} image "
                "tokens. Pack text-only rows, or pad the batch instead (TRL: padding_free=False, packing=False)."
            )

    # ---- masks ---------------------------------------------------------------------------------------------------
    def prompt_attention_mask(
        self, cache: Cache | None, prompt_keys: torch.Tensor, second_length: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Second-phase mask of a prefill: causal over its prompt, the padding (0 in `prompt_keys`) masked."""
        switch_layer = self.schedule.switch_layer
        kv_length = cache.get_mask_sizes(second_length, switch_layer)[0] if cache is not None else second_length
        keys = F.pad(prompt_keys, (0, kv_length - prompt_keys.shape[1])).bool()
        return self.build_mask(keys, second_length, 0, dtype)

    def continuation_attention_mask(
        self,
        cache: Cache,
        state: PhaseCacheState,
        attention_mask: torch.Tensor | dict | None,
        query_length: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Second-phase mask of a continuation step: key slot j of those layers holds their prompt's token j, then
        (from P2 on) the continuation's token j − (P2 − P1), which is valid where the first phase's key j − (P2 − P1)
        is.

        The text after the last image keeps that offset in both phases, so a roll-back (`crop`, speculative decoding)
        into the prompt's text tail is continued the same way: slots from the current length on are the new tokens'.
        """
        past = cache.get_seq_length(self.schedule.switch_layer)
        kv_length = cache.get_mask_sizes(query_length, self.schedule.switch_layer)[0]
        slots = torch.arange(kv_length, device=state.growth.device)
        prompt = state.prompt_keys.bool()[:, :kv_length]
        prompt = F.pad(prompt, (0, kv_length - prompt.shape[1]))
        first_keys = key_validity(attention_mask)
        if first_keys is None:
            continued = torch.ones_like(prompt)
        else:
            first_index = (slots - state.offset).clamp(0, first_keys.shape[1] - 1)
            continued = first_keys[:, first_index]
        prompt_end = torch.minimum(state.second_prompt_length, torch.as_tensor(past, device=slots.device))
        keys = torch.where(slots < prompt_end, prompt, continued)
        return self.build_mask(keys, query_length, past, dtype)

    def build_mask(
        self,
        keys: torch.Tensor,
        query_length: int,
        past: int | torch.Tensor,
        dtype: torch.dtype,
        packed: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """`(B, 1, q, kv)` mask: query i sits at key slot `past + i` and sees the valid `keys (B, kv)` up to itself, and
        always itself (padding queries never get an empty row, so no NaN). With `packed (B, kv)` (a prompt of rows
        that pack several sequences, `packed_sequence_ids`) a query sees only keys of its own sequence. Bool for sdpa,
        additive for eager; None where sdpa's causal kernel computes the same (`sdpa_causal_kernel_suffices`)."""
        implementation = attention_implementation(self.text_config)
        if packed is None and sdpa_causal_kernel_suffices(implementation, keys, query_length, past):
            return None
        slots = torch.arange(keys.shape[1], device=keys.device)
        queries = torch.arange(query_length, device=keys.device)[:, None] + past
        allowed = ((slots <= queries)[None, None] & keys[:, None, None, :]) | (slots == queries)[None, None]
        if packed is not None:
            allowed = allowed & (packed[:, None, past : past + query_length, None] == packed[:, None, None, :])
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )


# ---- Input checks: what the model refuses, each check run once from `InternVLXModel.forward` ------------------------
# A refusal names what failed and the numbers, and says one remedy; docs/reliability.md explains the rules.
def check_input_types(input_ids, inputs_embeds, pixel_values, image_flags=None) -> None:
    """Tensors of the shapes and kinds the model reads, refused by name otherwise (a list, a NumPy array, ids
    without a batch dimension or of a floating-point type)."""
    for name, value, dims in (
        ("input_ids", input_ids, 2),
        ("inputs_embeds", inputs_embeds, 3),
        ("pixel_values", pixel_values, 4),
        ("image_flags", image_flags, None),
    ):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor, got {type(value).__name__}; pass return_tensors='pt' to the "
                "processor, or torch.as_tensor(...)."
            )
        if dims is None or name == "pixel_values":
            continue  # the tiles' shape is checked where the vision tower reads them (`get_image_features`)
        if value.dim() != dims:
            layout = {2: "(batch, seq)", 3: "(batch, seq, hidden)"}
            hint = f"; add the batch dimension: {name}[None]" if value.dim() == dims - 1 else ""
            raise ValueError(f"{name} must be {layout[dims]}, got shape {tuple(value.shape)}{hint}.")
    if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()):
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}.")


def check_tile_shape(config: InternVLXConfig, pixel_values: torch.Tensor) -> None:
    """`pixel_values` must be `(tiles, channels, tile_size, tile_size)`, the vision tower's input."""
    size = config.tile_size
    expected = (config.vision_config.num_channels, size, size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        remedy = ""
        if pixel_values.dim() == 4 and pixel_values.shape[-1] == pixel_values.shape[-2] != size:
            remedy = (
                f" This checkpoint's tiles are {size} px (config.vision_config.image_size), these are "
                f"{pixel_values.shape[-1]} px: cut images with the processor, or with InternVL's "
                f"load_image(..., input_size={size})."
            )
        raise ValueError(
            f"pixel_values must have shape (num_tiles, {', '.join(map(str, expected))}), "
            f"got {tuple(pixel_values.shape)}.{remedy}"
        )


def check_pixel_values(pixel_values: torch.Tensor, num_patches: torch.LongTensor | None) -> None:
    """Tiles the vision tower can read as the processor makes them: floating point (not raw 0..255 values), finite,
    adding up to `num_patches`."""
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point (the processor's normalised tiles), got {pixel_values.dtype}; "
            "pass the images through the processor."
        )
    bad = int((~torch.isfinite(pixel_values)).sum())
    if bad:
        raise ValueError(f"pixel_values holds {bad} NaN or infinite values (of {pixel_values.numel()}).")
    if num_patches is not None:
        counts = [int(n) for n in num_patches]
        if any(n < 1 for n in counts) or sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"num_patches {counts} must be at least 1 per image and add up to the {pixel_values.shape[0]} "
                "tiles of pixel_values."
            )


def check_cache_room(cache: Cache | None, new_tokens: int) -> int:
    """The tokens `cache` holds already; a static cache without room for `new_tokens` more is refused."""
    cached = int(cache.get_seq_length()) if cache is not None else 0
    if is_static_cache(cache) and cached + new_tokens > static_capacity(cache):
        raise ValueError(
            f"the static cache holds {static_capacity(cache)} tokens per layer but already has {cached} and this step "
            f"adds {new_tokens}; build it with a larger max_cache_len."
        )
    return cached


def check_image_flags(image_flags: torch.Tensor, pixel_values: torch.Tensor, image_tokens: int) -> None:
    """`image_flags` holds one 0 or 1 per tile, all 1 (tiles of images) or all 0 (padding tiles, for a batch without
    image tokens; docs/fine-tuning.md says why)."""
    flags = image_flags.flatten().tolist()
    if len(flags) != pixel_values.shape[0] or any(flag not in (0, 1) for flag in flags):
        raise ValueError(
            f"image_flags must hold a 0 or 1 for each of the {pixel_values.shape[0]} tiles of pixel_values, "
            f"got {flags[:20]}{' ...' if len(flags) > 20 else ''} ({len(flags)} values)."
        )
    if 0 < sum(flags) < len(flags):
        raise ValueError(
            f"image_flags marks {len(flags) - sum(flags)} of {len(flags)} tiles as padding: padding tiles cannot share "
            "a batch with images; give all 1 or all 0."
        )
    if sum(flags) == 0 and image_tokens:
        raise ValueError(
            f"image_flags marks all {len(flags)} tiles as padding but the text has {image_tokens} image tokens."
        )


def refuse_hidden_images(schedule, input_ids, pixel_values) -> None:
    """A schedule that changes the visual tokens at a layer (LVTC, FastV) finds them by `input_ids` (or, with
    `pixel_values`, by the image token's embedding). `inputs_embeds` alone may hold image features merged outside the
    model (ms-swift merges them so), which would run as the plain model: refused."""
    if schedule is None or not schedule.switches or input_ids is not None or pixel_values is not None:
        return
    raise ValueError(
        f"{schedule.name} ({schedule.layer_change}) must know where the visual tokens are, and inputs_embeds without "
        "input_ids or pixel_values hides them: image features merged into inputs_embeds outside the model would run "
        "as the plain model. Pass input_ids (and pixel_values for images); to fine-tune, examples/finetune.py and "
        "TRL's SFTTrainer do."
    )


def spans_hold_images(span_tiles: list[int], image_tiles: list[int]) -> bool:
    """Whether runs of image tokens of `span_tiles` tiles each are the images of `image_tiles` tiles in order;
    one run may hold several images written back to back without separators."""
    remaining = list(reversed(image_tiles))
    for span in span_tiles:
        while span > 0 and remaining:
            span -= remaining.pop()
        if span != 0:
            return False
    return not remaining


def check_image_spans(
    config: InternVLXConfig, image_mask: torch.Tensor, tiles: int, num_patches: torch.LongTensor | None
) -> None:
    """Each run of `<IMG_CONTEXT>` tokens is one image of whole tiles, `tiles` in all; with `num_patches`, the
    images' tile counts, row by row, must be what it says (a sum alone would let two images' tiles swap)."""
    if not image_mask.any():
        raise ValueError(
            f"pixel_values with {tiles} tiles were given but the text has no image token (id {config.image_token_id}); "
            "expand each `<image>` with the processor."
        )
    per_tile, num_tokens = config.tokens_per_tile, int(image_mask.sum())
    if num_tokens != tiles * per_tile:
        raise ValueError(
            f"the text has {num_tokens} image tokens (id {config.image_token_id}) but pixel_values give {tiles} tiles "
            f"× {per_tile} tokens = {tiles * per_tile} image features; each tile needs exactly {per_tile} "
            "`<IMG_CONTEXT>` tokens."
        )
    edges = F.pad(image_mask.int(), (1, 1)).diff(dim=1)  # +1 where a run starts, -1 just after it ends
    lengths = ((edges == -1).nonzero()[:, 1] - (edges == 1).nonzero()[:, 1]).tolist()  # row-major order
    if any(length % per_tile for length in lengths):
        raise ValueError(
            f"the text's image spans hold {lengths} `<IMG_CONTEXT>` tokens, not whole tiles of {per_tile}."
        )
    if num_patches is None:
        return
    spans, counts = [length // per_tile for length in lengths], [int(n) for n in num_patches]
    if not spans_hold_images(spans, counts):
        raise ValueError(
            f"the text's image spans take {spans} tiles, row by row, but num_patches says {counts}; give num_patches "
            "in the order the images appear."
        )


def check_context_length(
    config: InternVLXConfig, input_ids: torch.LongTensor, needed: int, limit: int | None, note: str
) -> None:
    """Refuse a prompt that needs more than the language model's `limit` positions (`max_position_embeddings`,
    None where RoPE is scaled to reach past them): beyond them it would extrapolate silently."""
    if limit is None or needed <= limit:
        return
    tiles = int((input_ids == config.image_token_id).sum(1).max()) // config.tokens_per_tile
    raise ValueError(
        f"this input needs {needed} positions{note}, more than the language model's max_position_embeddings = "
        f"{limit}; a row holds up to {tiles} tiles of {config.tokens_per_tile} image tokens (an image's tiles, or a "
        "video's frames at one tile each): send fewer images, tiles (max_patches) or video frames (num_frames), or "
        "less text."
    )


# What the bundle's layer loop (LVTC, FastV) and generation read of the language model: a Transformers decoder.
DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def refuse_non_decoders(language_model: nn.Module, text_config) -> None:
    """Refuse, naming the model type, a language model without a Transformers decoder's parts (an encoder such as
    BERT would run bidirectionally, silently)."""
    missing = [part for part in DECODER_PARTS if not hasattr(language_model, part)]
    if missing:
        raise ValueError(
            f"the language model ({text_config.model_type}: {type(language_model).__name__}) is not a decoder "
            f"InternVL-X can run: it lacks {missing}; use a decoder-only model (Llama, Qwen2, Qwen3, ...)."
        )


# Attention implementations of serving engines that run the decoder layers on their own paged KV cache.
PAGED_ENGINE_ATTENTION = ("vllm",)


def refuse_paged_engines(config: InternVLXConfig, schedule: TokenSchedule | None) -> None:
    """A paged serving engine (vLLM's Transformers backend) cannot run a token schedule: refused when the model is
    built, not at the first request (`TokenSchedule.refuse_paged_engine`)."""
    implementation = attention_implementation(config.text_config)
    if schedule is not None and implementation in PAGED_ENGINE_ATTENTION:
        schedule.refuse_paged_engine(f"{implementation!r} attention")


def module_shapes(modules: dict[str, nn.Module]) -> dict[str, tuple]:
    """`{parameter name: shape}` of `modules`, by the names a checkpoint holds them under."""
    return {
        f"{name}.{key}": tuple(value.shape)
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }


def refuse_schedule_without_its_modules(model: nn.Module, schedule: TokenSchedule, edited: dict) -> None:
    """A schedule built again after a config edit (`edited`: field → (before, after)) may need modules the model was
    not built with (LVTC switched on, or its expansion moved from "never" to a layer: its HR projector); running
    without them would drop their tokens silently, so the edit is refused naming them."""
    with torch.device("meta"):
        needed = module_shapes(schedule.trainable_modules())
    have = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    missing = sorted(name.split(".")[0] for name, shape in needed.items() if have.get(name) != shape)
    if missing:
        changes = ", ".join(f"{field} {before!r} → {after!r}" for field, (before, after) in edited.items())
        settings = ", ".join(f"{field}={after!r}" for field, (_, after) in edited.items())
        raise ValueError(
            f"the config edit ({changes}) makes {schedule.name} need {sorted(set(missing))}, which this model was "
            f"built without; load it with the new setting instead: from_pretrained(path, {settings})."
        )


# ---- InternVL2's surface: its loading keywords and its chat API -----------------------------------------------------
# InternVL's own remote code takes these keywords in its model's constructor, so its README, model cards and evaluation
# harnesses pass them to `from_pretrained`, which hands every keyword that is not a config field to the constructor.
def take_internvl_loading_keywords(
    config: InternVLXConfig,
    use_flash_attn: bool | None = None,
    use_flash_attention_2: bool | None = None,
    load_in_8bit: bool | None = None,
    load_in_4bit: bool | None = None,
) -> None:
    """Accept InternVL's `use_flash_attn` / `use_flash_attention_2`: flash attention where asked runs as InternVL's code
    runs it without flash-attn, on the attention Transformers chose (sdpa by default), with one warning saying why and
    how to ask Transformers for it. Refuse `load_in_8bit` / `load_in_4bit`, which Transformers 5 no longer takes as
    keywords, naming the quantization config that replaces them."""
    for name, value in (("load_in_8bit", load_in_8bit), ("load_in_4bit", load_in_4bit)):
        if value:
            raise ValueError(
                f"{name}=True is InternVL2's loading keyword from Transformers 4; Transformers 5 takes quantized "
                f"loading as from_pretrained(..., quantization_config=BitsAndBytesConfig({name}=True)) "
                "(from transformers import BitsAndBytesConfig; docs/loading.md, Quantized loading)."
            )
    for name, value in (("use_flash_attn", use_flash_attn), ("use_flash_attention_2", use_flash_attention_2)):
        if value:
            reason = (
                "InternVL-X's tested fast path is sdpa"
                if is_flash_attn_2_available()
                else "flash-attn is not installed (InternVL's own code falls back the same way)"
            )
            logger.warning_once(
                f"{name}=True (InternVL's loading keyword): {reason}, so the model runs "
                f"{attention_implementation(config)} attention. To ask Transformers for flash attention, "
                "load with attn_implementation='flash_attention_2' instead."
            )


def check_image_token_names(start: str, end: str, context: str) -> None:
    """`chat`'s `IMG_START_TOKEN`, `IMG_END_TOKEN`, `IMG_CONTEXT_TOKEN`: InternVL lets a caller name them; the image
    token ids of this model are its config's, so other names are refused rather than silently ignored."""
    given = (start, end, context)
    ours = (IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN)
    if given != ours:
        raise ValueError(
            f"IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN = {given}, but this model's image tokens are {ours} "
            "(config.image_start_token_id, image_end_token_id, image_token_id); leave them at their defaults."
        )


def check_chat_arguments(
    pixel_values, questions: list, histories: list, num_patches_list, generation_config
) -> tuple[list[int], dict]:
    """`chat`'s and `batch_chat`'s arguments as InternVL's take them, each refused by name otherwise: `pixel_values` a
    tensor or None, questions strings, each history a list of `(question, answer)` string pairs, `num_patches_list`
    positive tile counts adding up to the tiles, `generation_config` a dict of `generate` arguments (None, or a
    `GenerationConfig`'s own settings, are taken too). Returns the tile counts and the `generate` arguments."""
    if pixel_values is not None and not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor of tiles or None, got {type(pixel_values).__name__}.")
    for question in questions:
        if not isinstance(question, str):
            raise ValueError(f"the question must be a string, got {type(question).__name__}: {question!r:.80}.")
    for history in histories:
        pairs = history if isinstance(history, (list, tuple)) else [None] if history is not None else []
        for turn in pairs:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise ValueError(
                    f"history must be a list of (question, answer) string pairs, as chat(return_history=True) returns "
                    f"it; got {turn!r:.80} in it."
                )
    if isinstance(generation_config, GenerationConfig):
        generation_config = generation_config.to_diff_dict()
    elif generation_config is None:
        generation_config = {}
    elif not isinstance(generation_config, dict):
        raise ValueError(
            f"generation_config must be a dict of generate arguments (e.g. dict(max_new_tokens=64)), got "
            f"{type(generation_config).__name__}."
        )
    tiles = pixel_values.shape[0] if pixel_values is not None else 0
    counts = list(num_patches_list) if isinstance(num_patches_list, (list, tuple, torch.Tensor)) else None
    if counts is None or not all(isinstance(int(n) if isinstance(n, torch.Tensor) else n, int) for n in counts):
        raise ValueError(f"num_patches_list must be a list of tile counts, got {num_patches_list!r:.80}.")
    counts = [int(n) for n in counts]
    empty = [index for index, n in enumerate(counts) if n < 1]
    if empty:
        raise ValueError(
            f"num_patches_list {counts} gives image {empty[0]} {counts[empty[0]]} tiles; each image (or frame) has at "
            "least one, and its `<image>` would get no tokens."
        )
    if sum(counts) != tiles:
        raise ValueError(
            f"num_patches_list {counts} adds up to {sum(counts)} tiles but pixel_values has {tiles}; give each "
            "image's (or frame's) tile count in order."
        )
    return counts, dict(generation_config)


def chat_format():
    """The processor's chat template and image-span expansion, which `chat` renders its prompts with: imported on the
    first chat, so loading a model for training or serving does not import the processor or the image libraries it
    reads with (Transformers' loader still ships the processor file with the model: it follows this import)."""
    from .processing_internvl_x import CHAT_TEMPLATE, expand_image_placeholders

    return CHAT_TEMPLATE, expand_image_placeholders


class InternVL2ChatMixin:
    """InternVL2's chat API on the model with a head: `chat`, `batch_chat` and `system_message`, called as InternVL's
    README, model cards and evaluation harnesses call them (VLMEvalKit sets `model.system_message`)."""

    # InternVL2's default system message; a model's own assignment (`model.system_message = ...`) is used instead.
    system_message: str = DEFAULT_SYSTEM_MESSAGE

    def batch_chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        questions: list[str],
        generation_config: dict,
        num_patches_list: list[int] | None = None,
        history=None,
        return_history: bool = False,
        IMG_START_TOKEN: str = IMAGE_START_TOKEN,  # InternVL's keyword names
        IMG_END_TOKEN: str = IMAGE_END_TOKEN,
        IMG_CONTEXT_TOKEN: str = IMAGE_CONTEXT_TOKEN,
        verbose: bool = False,
        image_counts: list[int] | None = None,
    ) -> list[str]:
        """InternVL2's `batch_chat`: one question per image (`num_patches_list` tiles each), answers in order.

        `tokenizer` may be the tokenizer or the `InternVLXProcessor`; `generation_config` is a dict of `generate`
        arguments (a `streamer` included). Generation stops at `<|im_end|>`. `image_counts` is InternVL's older name
        for `num_patches_list`; the image token keywords must be the checkpoint's own.
        """
        if history is not None or return_history:
            raise ValueError("batch_chat does not keep a history; call chat() for multi-round conversations.")
        check_image_token_names(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        if not isinstance(questions, (list, tuple)):
            raise ValueError(f"questions must be a list of strings, got {type(questions).__name__}.")
        num_patches_list = num_patches_list if num_patches_list is not None else image_counts
        if pixel_values is not None:
            num_patches_list = num_patches_list or [1] * len(questions)
            questions = [q if isinstance(q, str) and "<image>" in q else f"<image>\n{q}" for q in questions]
        answers = self._generate_answers(
            tokenizer, pixel_values, list(questions), [None] * len(questions), num_patches_list or [], generation_config
        )
        if verbose:
            for question, answer in zip(questions, answers):
                print(question, "\n", answer)
        return answers

    def chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        IMG_START_TOKEN: str = IMAGE_START_TOKEN,  # InternVL's keyword names
        IMG_END_TOKEN: str = IMAGE_END_TOKEN,
        IMG_CONTEXT_TOKEN: str = IMAGE_CONTEXT_TOKEN,
        verbose: bool = False,
    ):
        """InternVL2's `chat`: answer `question` about `pixel_values (tiles, 3, H, W)`, optionally after `history`.

        `pixel_values` may come from this bundle's processor or from InternVL's own `load_image` recipe (ImageNet
        mean and std, the checkpoint's tile size, a thumbnail after several tiles); the recipe tiles by aspect ratio,
        so for a checkpoint whose processor caps tiles by area or edges (RVTC) the two may cut an image differently.
        Several images or video frames: `num_patches_list` gives each one's tiles in order, with one `<image>` in the
        question for each (`Image-1: <image>\n...`, `Frame1: <image>\n...`). In a first round `<image>\n` is
        prepended when there are tiles and the question has no `<image>`; later rounds keep the image where the
        history has it. The prompt opens with `model.system_message`. `generation_config` is a dict of `generate`
        arguments (a `streamer` included); generation stops at `<|im_end|>`. Returns the answer, or `(answer,
        history)` with `return_history=True`.
        """
        check_image_token_names(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        if not history and pixel_values is not None and isinstance(question, str) and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if isinstance(pixel_values, torch.Tensor) else []
        answer = self._generate_answers(
            tokenizer, pixel_values, [question], [history], num_patches_list, generation_config
        )[0]
        if verbose:
            print(question, "\n", answer)
        history = [*(history or []), (question, answer)]
        return (answer, history) if return_history else answer

    def _generate_answers(self, tokenizer, pixel_values, questions, histories, num_patches_list, generation_config):
        num_patches_list, generation_config = check_chat_arguments(
            pixel_values, questions, histories, num_patches_list, generation_config
        )
        inputs = self._chat_inputs(tokenizer, questions, histories, num_patches_list).to(self.device)
        text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        generation_config.setdefault("eos_token_id", text_tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN))
        generation_config.setdefault("pad_token_id", text_tokenizer.pad_token_id)
        if pixel_values is not None and pixel_values.is_floating_point():  # raw 0..255 tiles are the model's to refuse
            pixel_values = pixel_values.to(self.device, self.dtype)
        output = self.generate(**inputs, pixel_values=pixel_values, **generation_config)
        answers = text_tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [answer.split(CHAT_END_TOKEN)[0].strip() for answer in answers]

    def _chat_inputs(self, tokenizer, questions: list[str], histories: list, num_patches_list: list[int]) -> dict:
        """InternLM2-chat prompts opened by `system_message`, each `<image>` expanded by its tiles, tokenized
        left-padded: the processor's chat format and image spans (`chat_format`)."""
        chat_template, expand_image_placeholders = chat_format()
        processor = tokenizer if hasattr(tokenizer, "image_processor") else None
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if processor is not None and processor.image_seq_length != self.config.tokens_per_tile:
            raise ValueError(
                f"the processor expands each tile into {processor.image_seq_length} tokens but this model takes "
                f"{self.config.tokens_per_tile} per tile; rebuild the processor with image_seq_length="
                f"{self.config.tokens_per_tile}."
            )
        if not isinstance(self.system_message, str):
            raise ValueError(f"model.system_message must be a string, got {type(self.system_message).__name__}.")
        texts = []
        for question, history in zip(questions, histories):
            messages = [{"role": "system", "content": self.system_message}]
            for previous_question, answer in history or []:
                messages += [{"role": "user", "content": previous_question}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": question})
            texts.append(
                tokenizer.apply_chat_template(
                    messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
                )
            )
        texts = expand_image_placeholders(texts, num_patches_list, self.config.tokens_per_tile)
        return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


# ---- The model -------------------------------------------------------------------------------------------------------
@dataclass
class InternVLXImageFeaturesOutput(BaseModelOutputWithPooling):
    """
    vision_features (`torch.FloatTensor` of shape `(num_tiles, 1 + S², vision_hidden_size)`):
        The vision tower's hidden state of `config.vision_feature_layer` (CLS first), which the projectors read.
    """

    vision_features: torch.FloatTensor | None = None


@dataclass
class InternVLXModelOutputWithPast(BaseModelOutputWithPast):
    """
    Outputs of [`InternVLXModel`]: Transformers' `BaseModelOutputWithPast` (its cache field is `past_key_values` up
    to Transformers 5.23 and `cache` from 5.24, readable under both names there), plus:

    image_hidden_states (`torch.FloatTensor` of shape `(num_tiles, tokens_per_tile, hidden_size)`, *optional*):
        Visual tokens produced by the projector for the tiles of this forward pass.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class InternVLXCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    Outputs of [`InternVLXForConditionalGeneration`]: Transformers' `CausalLMOutputWithPast` (`loss`; `logits`
    `(batch, kept_positions, vocab_size)` aligned with `input_ids`; the cache, named as in
    `InternVLXModelOutputWithPast`; `hidden_states`, `attentions`), plus:

    image_hidden_states (`torch.FloatTensor` of shape `(num_tiles, tokens_per_tile, hidden_size)`, *optional*):
        Visual tokens produced by the projector.
    """

    image_hidden_states: torch.FloatTensor | None = None


def vision_tower_features(vision_tower: nn.Module, pixel_values: torch.Tensor, layer: int, **kwargs):
    """`(outputs, features)`: the vision tower's outputs on `pixel_values (tiles, 3, H, W)` and its hidden state of
    `layer` `(tiles, 1 + S², C)` (CLS first), the one the projectors read (the vLLM plugin reads it this way too)."""
    if layer != -1:  # a feature layer other than the last needs the tower's hidden states, asked for or not
        kwargs["output_hidden_states"] = True
    pixel_values = pixel_values.to(dtype=vision_tower.dtype)
    outputs = vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
    return outputs, outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]


class InternVLXPreTrainedModel(PreTrainedModel):
    config_class = InternVLXConfig
    config: InternVLXConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text", "video")  # a video is read as frames of one tile each
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVLVisionLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Every forward compiles whole: a decode step reads only fixed-shape tensors (LVTC's and FastV's included).
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, InternVLXPVTCProjector) and hasattr(module, "cls_scale"):
            init.ones_(module.cls_scale)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Transformers' `save_pretrained`, writing the bundle's own tensor names (the names every InternVL-X
        checkpoint holds) unless `save_original_format=True` is passed. Transformers' default, True, undoes the
        renamings it applied when loading; a model built under DeepSpeed ZeRO-3 records every renaming, used or not,
        so its saves got `model.language_model.model.*` names that Transformers before 5.23 cannot read."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)


def images_per_row(image_tiles: list[int], tiles_per_row: list[int]) -> list[list[int]]:
    """The tile counts of `image_tiles` (every image of the batch, in order) grouped by row, each row holding
    `tiles_per_row` tiles; refused where the images do not divide into the rows."""
    grouped, images = [], iter(image_tiles)
    for tiles in tiles_per_row:
        row = []
        while sum(row) < tiles:
            row.append(next(images, tiles))
        if sum(row) != tiles:
            raise ValueError(
                f"num_patches {image_tiles} does not divide into the rows' image tiles {tiles_per_row} in order."
            )
        grouped.append(row)
    return grouped


class InternVLXModel(InternVLXPreTrainedModel):
    """Vision tower + projector + language model, without the LM head.

    The sub-module names (`vision_tower`, `multi_modal_projector`, `language_model`) equal those of
    `transformers.InternVLModel`, so its checkpoints load without renaming.
    """

    def __init__(self, config: InternVLXConfig, **internvl_loading_keywords):
        config.validate()  # a config edited after it was made is checked before anything is built from it
        schedule = build_token_schedule(config)
        refuse_paged_engines(config, schedule)
        super().__init__(config)
        take_internvl_loading_keywords(config, **internvl_loading_keywords)
        self.vision_tower = InternVLVisionModel(config.vision_config)
        self.multi_modal_projector = PROJECTOR_CLASSES[config.projector_type](config)
        self.language_model = AutoModel.from_config(config.text_config)
        refuse_non_decoders(self.language_model, config.text_config)
        for name, module in (schedule.trainable_modules() if schedule is not None else {}).items():
            self.add_module(name, module)
        self.use_schedule(schedule)
        self.post_init()

    def schedule_settings(self) -> tuple:
        """What a token schedule is built from: the config object and its schedule fields' values."""
        return (self.config, *(getattr(self.config, field) for field in SCHEDULE_FIELDS))

    def use_schedule(self, schedule: TokenSchedule | None) -> None:
        self._token_schedule = schedule
        self._decoder_loop = PhasedDecoder(schedule) if schedule is not None else None
        self._schedule_settings = self.schedule_settings()

    @property
    def token_schedule(self) -> TokenSchedule | None:
        """The per-layer token schedule the decoder runs under (LVTC, FastV), or None for the plain model. Built with
        the model; built again when its config, or a schedule field of it, is changed (FastV can be switched on a
        trained model), and refused when the new schedule needs modules the model was not built with."""
        built_from, current = self._schedule_settings, self.schedule_settings()
        if built_from[0] is not current[0] or built_from[1:] != current[1:]:
            self.config.validate()
            schedule = build_token_schedule(self.config)
            if schedule is not None:
                edited = {
                    field: (before, after)
                    for field, before, after in zip(SCHEDULE_FIELDS, built_from[1:], current[1:])
                    if before != after
                }
                refuse_schedule_without_its_modules(self, schedule, edited)
            self.use_schedule(schedule)
        return self._token_schedule

    @property
    def decoder_loop(self) -> PhasedDecoder | None:
        """The loop that runs the decoder layers under `token_schedule` (None for the plain model)."""
        return self._decoder_loop if self.token_schedule is not None else None

    def visual_token_schedule(self, num_tiles: int) -> list[int]:
        """Visual tokens each decoder layer processes for `num_tiles` tiles: N1² per tile; with LVTC N2² per tile from
        layer k on; with FastV, n − floor(R · n) of the n from layer K on."""
        schedule = self.token_schedule
        if schedule is None:
            return [num_tiles * self.config.tokens_per_tile] * self.config.text_config.num_hidden_layers
        return schedule.visual_tokens_per_layer(num_tiles)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> InternVLXImageFeaturesOutput:
        """The visual tokens of `pixel_values (tiles, 3, H, W)`, as Transformers' vision-language models give them: the
        vision tower's `last_hidden_state (tiles, 1 + S², C)` (and its `hidden_states` and `attentions` when asked, by
        argument or config) with `pooler_output (tiles, tokens_per_tile, D)`, the tokens that enter the language model,
        and `vision_features (tiles, 1 + S², C)`, the hidden state of `vision_feature_layer` (the config's by default;
        CLS first) that the projectors read (LVTC's too). `vision_feature_select_strategy` takes the config's only
        value, `"default"`, as Transformers' InternVL names it. `return_dict=False` (or `config.return_dict=False`)
        gives a tuple."""
        check_tile_shape(self.config, pixel_values)
        if vision_feature_select_strategy not in (None, "default"):
            raise ValueError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r}: InternVL-X's projectors read the "
                "vision tower's tokens one way only, 'default'."
            )
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        depth = self.config.vision_config.num_hidden_layers
        if not isinstance(layer, int) or not -depth <= layer <= depth:
            raise ValueError(f"vision_feature_layer={layer!r} is not a layer of the {depth}-layer vision tower.")
        asked = kwargs.get("output_hidden_states", self.config.vision_config.output_hidden_states)
        outputs, features = vision_tower_features(self.vision_tower, pixel_values, layer, **kwargs)
        return InternVLXImageFeaturesOutput(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.multi_modal_projector(features),
            hidden_states=outputs.hidden_states if asked else None,
            attentions=outputs.attentions,
            vision_features=features,
        )

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, seq)` boolean mask of the `<IMG_CONTEXT>` positions."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def merge_image_features(
        self, inputs_embeds: torch.Tensor, image_mask: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write `image_features (tiles, T, D)` into the `<IMG_CONTEXT>` positions of `inputs_embeds (B, L, D)` (their
        count is checked with the spans, `check_image_spans`)."""
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)

    def positions_needed(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        new_tokens: int = 0,
        position_ids: torch.LongTensor | None = None,
    ):
        """Positions the language model sees for the longest row of a prompt and `new_tokens` more: its real tokens
        (without a padding mask, the highest of `position_ids` plus one: a row that packs several sequences needs the
        longest one's), plus what the token schedule adds (LVTC: each tile's N2² − N1² from the expansion layer on)."""
        padding_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2  # not a prepared mask
        real = attention_mask.bool() if padding_mask else None
        if real is not None:
            lengths = real.sum(1)
        elif position_ids is not None:
            lengths = position_ids.expand(input_ids.shape[0], -1).max(1).values + 1
        else:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1])
        if self.token_schedule is not None:
            tiles = (input_ids == self.config.image_token_id).sum(1) // self.config.tokens_per_tile
            lengths = lengths + self.token_schedule.positions_gained(tiles).to(lengths.device)
        return int(lengths.max()) + new_tokens

    def positions_note(self) -> str:
        """What error messages about positions add: that they count LVTC's expanded tiles."""
        return self.token_schedule.positions_note if self.token_schedule is not None else ""

    def position_limit(self) -> int | None:
        """The language model's `max_position_embeddings`, or None where its RoPE is scaled to reach past them."""
        text_config = self.config.text_config
        rope = getattr(text_config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            return None
        return getattr(text_config, "max_position_embeddings", None)

    def check_inputs(
        self, input_ids, inputs_embeds, pixel_values, num_patches, image_flags, cache, attention_mask, position_ids
    ) -> None:
        """The checks that need no vision tower (`forward` runs them before any work): types, tiles, the cache's room,
        image tokens without tiles, the context."""
        check_input_types(input_ids, inputs_embeds, pixel_values, image_flags)
        refuse_hidden_images(self.token_schedule, input_ids, pixel_values)
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens.shape[1] == 0:
            raise ValueError(f"the input has no tokens (shape {tuple(tokens.shape)}); pass at least one token per row.")
        if pixel_values is not None:
            check_pixel_values(pixel_values, num_patches)
            if image_flags is not None:
                check_image_flags(
                    image_flags, pixel_values, int(self.get_placeholder_mask(input_ids, inputs_embeds).sum())
                )
        cached = check_cache_room(cache, tokens.shape[1])
        if pixel_values is None and input_ids is not None and not cached:
            num_tokens = int((input_ids == self.config.image_token_id).sum())
            if num_tokens:
                raise ValueError(f"the text has {num_tokens} image tokens but no pixel_values were given.")
        if not cached and input_ids is not None:
            needed = self.positions_needed(input_ids, attention_mask, position_ids=position_ids)
            check_context_length(self.config, input_ids, needed, self.position_limit(), self.positions_note())

    @can_return_tuple
    @takes_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        num_patches: torch.LongTensor | None = None,
        image_flags: torch.LongTensor | None = None,
        **kwargs,
    ) -> InternVLXModelOutputWithPast:
        """
        Args:
            input_ids: `(batch, seq)` token ids; each tile's visual tokens sit on `<IMG_CONTEXT>` positions.
            pixel_values: `(num_tiles, 3, H, W)` tiles of all images of the batch, in order of appearance.
            attention_mask: `(batch, seq)`, 1 for real tokens, 0 for padding.
            num_patches: tiles per image as the processor returns them; checked against `pixel_values` when given.
            image_flags: `(num_tiles,)`, 1 for an image's tile, 0 for a padding tile (as in InternVL's training
                data). A batch without images may carry padding tiles (all 0) so that the vision tower and every
                projector run on every step, as ZeRO needs when each rank gets its own batch: they add nothing to
                the outputs and give their modules zero gradients. Tiles of both kinds in one batch are refused.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        # A compiled decode step skips the checks that read tensor values (host syncs); the eager prefill ran them.
        checking = not torch.compiler.is_compiling()
        if checking:
            self.check_inputs(
                input_ids, inputs_embeds, pixel_values, num_patches, image_flags, cache, attention_mask, position_ids
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = vision_features = image_mask = padding_vision_features = None
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
            if image_flags is not None and not bool(image_flags.flatten()[0]):  # padding tiles: they add nothing
                padding_vision_features = image_outputs.vision_features
                inputs_embeds = inputs_embeds + weighing_nothing([image_outputs.pooler_output])
            else:
                image_features, vision_features = image_outputs.pooler_output, image_outputs.vision_features
                image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
                if checking:
                    check_image_spans(self.config, image_mask, pixel_values.shape[0], num_patches)
                inputs_embeds = self.merge_image_features(inputs_embeds, image_mask, image_features)

        language_inputs = dict(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
        )
        loop = self.decoder_loop
        if loop is not None:
            vision = dict(
                image_mask=image_mask, vision_features=vision_features, padding_vision_features=padding_vision_features
            )
            outputs = loop(self, cache=cache, **vision, **language_inputs, **kwargs)
        else:
            outputs = self.language_model(**language_inputs, **named_cache(cache), return_dict=True, **kwargs)
        return InternVLXModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            **named_cache(output_cache(outputs)),
        )


class InternVLXForConditionalGeneration(InternVLXPreTrainedModel, InternVL2ChatMixin, InternVLXGenerationMixin):
    """InternVL-X with a language-modelling head: `generate`, training with `labels`, and InternVL2's `chat`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Tensor parallelism: the language model follows its own plan (`text_config.base_model_tp_plan`); the LM head splits
    # the vocabulary across processes and gathers the logits, as Llama's and native InternVL's do.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: InternVLXConfig, **internvl_loading_keywords):
        config.validate()
        super().__init__(config)
        take_internvl_loading_keywords(config, **internvl_loading_keywords)
        self.model = InternVLXModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `InternVLXModel.get_image_features` (the same keywords): `pooler_output (tiles, tokens_per_tile, D)`
        holds the visual tokens."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @takes_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_patches: torch.LongTensor | None = None,
        image_flags: torch.LongTensor | None = None,
        **kwargs,
    ) -> InternVLXCausalLMOutputWithPast:
        """
        Args:
            labels: `(batch, seq)` target ids aligned with `input_ids` (shifted inside the loss); -100 is ignored.
            logits_to_keep: compute logits only for the last `logits_to_keep` positions (0: all), or for the
                positions of a 1-D index tensor.

        Returns logits `(batch, seq, vocab)` aligned with `input_ids` (or the kept positions).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_patches=num_patches,
            image_flags=image_flags,
            return_dict=True,
            **named_cache(cache),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return InternVLXCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **named_cache(output_cache(outputs)),
        )

    # ---- generate integration ---------------------------------------------------------------------------------------
    @takes_cache_argument
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        pixel_values: torch.FloatTensor | None = None,
        num_patches: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """Images enter with the prefill only: the first iteration, a step without cache, or a cache that holds nothing
        yet (an assistant model's prefill comes with `is_first_iteration=False`). `inputs_embeds` (with `<IMG_CONTEXT>`
        embeddings where the visual tokens go) replace `input_ids` in the prefill, as for Transformers' own models."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **named_cache(cache),
            **kwargs,
        )
        prefill = is_first_iteration or not kwargs.get("use_cache", True)
        prefill = prefill or cache is None or not cache.is_initialized
        if prefill and pixel_values is not None:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["num_patches"] = num_patches
        return model_inputs

    def repeat_images_per_row(self, expand_size: int, input_ids: torch.LongTensor | None, model_kwargs: dict) -> dict:
        """Beam search and `num_return_sequences` repeat each row: take `pixel_values` and `num_patches` out of
        `model_kwargs` and return them with each row's tiles repeated with it, in row order (the generic expansion
        would repeat every tile in place, giving a row's copies each other's tiles)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        num_patches = model_kwargs.pop("num_patches", None)
        if expand_size > 1 and pixel_values is not None:
            image_mask = self.model.get_placeholder_mask(
                input_ids if input_ids is not None and input_ids.numel() else None, model_kwargs.get("inputs_embeds")
            )
            tiles_per_row = (image_mask.sum(1) // self.config.tokens_per_tile).tolist()
            if sum(tiles_per_row) != pixel_values.shape[0]:
                raise ValueError(
                    f"the rows hold image tokens for {tiles_per_row} tiles ({sum(tiles_per_row)} in all) but "
                    f"pixel_values has {pixel_values.shape[0]}."
                )
            rows = pixel_values.split(tiles_per_row)
            pixel_values = torch.cat([row for row in rows for _ in range(expand_size)])
            if num_patches is not None:
                images = images_per_row(num_patches.tolist(), tiles_per_row)
                num_patches = num_patches.new_tensor([n for row in images for _ in range(expand_size) for n in row])
        return dict(pixel_values=pixel_values, num_patches=num_patches)

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, stopping at the language model's last position: where the prompt (LVTC's
        expanded tiles included) plus the tokens asked for would run past `max_position_embeddings` (and RoPE is not
        scaled to reach further), fewer new tokens are generated, with a warning that says how many and why, as
        decoding past the trained positions would extrapolate silently."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        check_input_types(input_ids, kwargs.get("inputs_embeds"), kwargs.get("pixel_values"))
        if isinstance(input_ids, torch.Tensor):
            self.fit_new_tokens_to_context(input_ids, kwargs, generation_config or self.generation_config)
        return super().generate(inputs, generation_config, **kwargs)

    def fit_new_tokens_to_context(self, input_ids: torch.LongTensor, kwargs: dict, generation_config) -> None:
        limit = self.model.position_limit()
        if limit is None:
            return
        prompt = self.model.positions_needed(input_ids, kwargs.get("attention_mask"))
        if kwargs.get("max_new_tokens") is not None:
            asked = kwargs["max_new_tokens"]
        elif kwargs.get("max_length") is not None:
            asked = kwargs["max_length"] - input_ids.shape[1]
        elif generation_config.max_new_tokens is not None:
            asked = generation_config.max_new_tokens
        elif generation_config.max_length is not None:
            asked = generation_config.max_length - input_ids.shape[1]
        else:
            asked = default_new_tokens()
        room = limit - prompt
        expanded = self.model.positions_note()
        if room < 0:
            return  # the prompt alone is too long: the forward's context check refuses it, with its numbers
        if asked > 0 and room == 0:
            raise ValueError(
                f"the prompt takes {prompt} positions{expanded}, all of the language model's max_position_embeddings "
                f"= {limit}: no room for a new token; send a shorter prompt or fewer tiles."
            )
        if asked > room:
            logger.warning(
                f"generating at most {room} new tokens instead of {asked}: the prompt takes {prompt} of the language "
                f"model's max_position_embeddings = {limit} positions{expanded}."
            )
            kwargs.pop("max_length", None)
            kwargs["max_new_tokens"] = room

    def check_generation_request(self, generation_config, model_kwargs: dict, generation_mode: str) -> None:
        """Refuse modes that cannot work with this model's settings, by name, before anything runs."""
        if self.model.token_schedule is not None:
            self.model.token_schedule.check_generation_mode(generation_mode)
        chunk = generation_config.prefill_chunk_size
        prompt = model_kwargs.get("attention_mask")
        if chunk is not None and model_kwargs.get("pixel_values") is not None:
            if prompt is None or prompt.shape[-1] > chunk:
                raise ValueError(
                    f"prefill_chunk_size={chunk} would split the prompt"
                    f"{f' of {prompt.shape[-1]} tokens' if prompt is not None else ''} and its image spans between "
                    "chunks, but every image is encoded with the whole prompt (and LVTC expands each tile's span at "
                    "once); pass prefill_chunk_size=None, or a chunk at least as long as the prompt."
                )

    def check_cache_capacity(self, cache: Cache | None, max_cache_length: int) -> None:
        """Refuse a static cache that cannot hold this `generate` call, before anything runs."""
        if is_static_cache(cache) and static_capacity(cache) < max_cache_length:
            raise ValueError(
                f"the static cache holds {static_capacity(cache)} tokens per layer but this call needs "
                f"{max_cache_length} (the prompt plus max_new_tokens, less one); build it with max_cache_len ≥ "
                f"{max_cache_length}."
            )


# InternVL2's surface, concluded: what `AutoModel` gives.
class InternVLXChatModel(InternVLXForConditionalGeneration):
    """What `AutoModel` gives: the model with `chat`, `batch_chat` and `generate`, as InternVL's own remote code maps
    `AutoModel` to its chat model (its README, model cards and evaluation harnesses load it that way).

    `AutoModel.from_config` still builds the base `InternVLXModel`, as for Transformers' native models: serving engines
    (vLLM's Transformers backend) build the base model that way and add their own LM head. For hidden states only,
    take `model.model` of a loaded model, or load `InternVLXModel` itself (docs/loading.md).
    """

    @classmethod
    def _from_config(cls, config: InternVLXConfig, **kwargs) -> InternVLXModel:
        return InternVLXModel._from_config(config, **kwargs)


InternVLXModel.register_for_auto_class("AutoModel")
InternVLXForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
InternVLXChatModel.register_for_auto_class("AutoModel")

__all__ = [
    "InternVLXPreTrainedModel",
    "InternVLXModel",
    "InternVLXForConditionalGeneration",
    "InternVLXChatModel",
    "InternVLXStaticCache",
]
