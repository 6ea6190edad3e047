"""InternVL-X as a vLLM model: the bundle's vision tower and projectors, vLLM's decoder layers on its paged KV cache,
and LVTC's two streams.

With LVTC (a checkpoint whose tiles grow from N1² to N2² tokens at layer k), vLLM schedules the long stream: the
processor writes N2² `<IMG_CONTEXT>` rows per tile. The layers before k run on the short sub-batch of each step (text,
each tile's first N1² rows, decoded tokens; `layout.step_layout`) at short positions, with attention metadata and KV
slots of their own that the runner side builds each step (`LVTCStep`); the layers from k on run on every scheduled
row. Between the two, each tile the step completes is expanded as the bundle expands it (`expanded_tiles`: its
carriers' states upsampled, plus the HR projector's tokens). Keys and values: layers before k hold short token s in
slot s of the request's blocks, layers from k on hold long row p in slot p, so a request's blocks (sized by vLLM for
the long stream) hold both.

The vision side's outputs travel to the decoder as one multimodal embedding per image row, wide enough for all of it:
`[main projector | LR projectors 1..J-1 | HR projector]` (`MediaParts`); `embed_input_ids` puts the main projector's
tokens in the rows and keeps the rest for `forward`.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, override_forward_context
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from .layout import StepLayout

# The vLLM decoder that runs each language model of the bundle (a text config's `model_type`).
DECODERS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
IMAGE_PLACEHOLDER = "<IMG_CONTEXT>"  # what the chat template writes for each image, and what the plugin expands


def bundle_name(model_path: str, name: str):
    """A name of the checkpoint's own bundle files (`FILE.NAME`), loaded as Transformers loads remote code."""
    return get_class_from_dynamic_module(name, model_path)


def token_schedule(config, model_path: str):
    """The checkpoint's token schedule (LVTC), or None for plain and PVTC checkpoints: the bundle's
    `build_token_schedule`, the one reader of the schedule switches."""
    return bundle_name(model_path, "modeling_internvl_x.build_token_schedule")(config)


def expands(schedule) -> bool:
    """Whether the schedule grows tiles at a layer (LVTC with k < L): the plugin then schedules the long stream."""
    return schedule is not None and schedule.switches


def tokens_per_tile(config, schedule) -> int:
    """Rows a tile takes in the stream vLLM schedules: N2² when LVTC expands, N1² otherwise."""
    return schedule.second_phase_tokens(config.tokens_per_tile) if expands(schedule) else config.tokens_per_tile


@dataclasses.dataclass
class LVTCStep:
    """What the layers before k run on in one step: the short sub-batch (`layout`) and, per attention layer before k,
    its attention metadata and KV slots, built by the runner side (`v1_adapter` before vLLM 0.34)."""

    layout: StepLayout
    attn_metadata: dict
    slot_mapping: dict

    def forward_context(self, base):
        """The runner's forward context, with the short layers' metadata and slots in place of the long ones."""
        return dataclasses.replace(
            base,
            attn_metadata={**base.attn_metadata, **self.attn_metadata},
            slot_mapping={**base.slot_mapping, **self.slot_mapping},
        )


def lvtc_model_state():
    from .model_state import LVTCModelState  # vLLM 0.34's runner only

    return LVTCModelState


# ---- processing: tiles by the bundle's image processor, N2² (or N1²) rows per tile --------------------------------
class InternVLXProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def schedule(self):
        return token_schedule(self.get_hf_config(), self.ctx.model_config.model)

    def tokens_per_tile(self) -> int:
        return tokens_per_tile(self.get_hf_config(), self.schedule())

    def image_processor(self):
        return self.get_hf_processor().image_processor

    def get_num_image_tokens(self, *, image_width: int, image_height: int, **image_kwargs) -> int:
        """`<img>`, the tiles' rows, `</img>`: the tiles as the checkpoint's image processor cuts the image (RVTC's
        area or edge caps included)."""
        tiles = self.image_processor().get_number_of_image_patches(image_height, image_width, image_kwargs)
        return 2 + tiles * self.tokens_per_tile()

    def get_image_size_with_most_features(self) -> ImageSize:
        processor = self.image_processor()
        side, most = processor.image_size, processor.max_patches
        sizes = [
            ImageSize(width=side * c, height=side * r) for c in range(1, most + 1) for r in range(1, most // c + 1)
        ]
        return max(sizes, key=lambda size: self.get_num_image_tokens(image_width=size.width, image_height=size.height))


class InternVLXDummyInputsBuilder(BaseDummyInputsBuilder[InternVLXProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(width=size.width, height=size.height, num_images=mm_counts.get("image", 0))
        return {"image": images}


class InternVLXMultiModalProcessor(BaseMultiModalProcessor[InternVLXProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """The images' tiles by the checkpoint's own image processor (its `slicing` and `max_patches`, or the
        request's `mm_processor_kwargs`); the prompt is tokenized by vLLM and expanded by `_get_prompt_updates`."""
        images = hf_data.get("images")
        image_kwargs = {name: value for name, value in hf_kwargs.items() if name != "truncation"}
        outputs = self.info.image_processor()(images, return_tensors="pt", **image_kwargs)
        return BatchFeature({"pixel_values": outputs["pixel_values"], "num_patches": outputs["num_patches"]})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_patches = hf_inputs.get("num_patches", torch.empty(0, dtype=torch.long))
        return dict(
            pixel_values=MultiModalFieldConfig.flat_from_sizes("image", num_patches),
            num_patches=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        tokenizer = self.info.get_tokenizer()
        start, context, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<img>", IMAGE_PLACEHOLDER, "</img>"))
        image_kwargs = {name: value for name, value in hf_processor_mm_kwargs.items() if name != "truncation"}

        def replacement(item: int) -> PromptUpdateDetails:
            # the tiles by the image's size, as the image processor cuts it (cached items come resolved)
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item)
            rows = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height, **image_kwargs)
            return PromptUpdateDetails.select_token_id([start] + [context] * (rows - 2) + [end], context)

        return [PromptReplacement(modality="image", target=[context], replacement=replacement)]


def with_vllm_linears(module: nn.Module, prefix: str) -> nn.Module:
    """`module` with each `nn.Linear` inside it replaced by vLLM's `ReplicatedLinear` of the same shape and name (as
    vLLM's Transformers backend does): the same computation, through vLLM's matrix multiplication, which on CPUs is
    oneDNN's (the vision side took about 20 % longer with torch's own). The checkpoint's tensors load into it by the
    same names."""
    for name, child in list(module.named_children()):
        qualified = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Linear):
            linear = ReplicatedLinear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                params_dtype=child.weight.dtype,
                prefix=qualified,
                return_bias=False,
            )
            setattr(module, name, linear)
        else:
            with_vllm_linears(child, qualified)
    return module


class VisionParts(nn.Module):
    """The bundle's vision tower, main projector and LVTC projectors, under the names the checkpoint holds them
    (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.lvtc_*`): LVTC's hooks read them from here as
    they read them from the bundle's model. Their linear layers are vLLM's (`with_vllm_linears`)."""

    def __init__(self, config, model_path: str, schedule):
        super().__init__()
        self.config = config
        self.vision_tower = bundle_name(model_path, "modeling_internvl_x.InternVLVisionModel")(config.vision_config)
        projectors = bundle_name(model_path, "modeling_internvl_x.PROJECTOR_CLASSES")
        self.multi_modal_projector = projectors[config.projector_type](config)
        for name, module in (schedule.trainable_modules() if schedule is not None else {}).items():
            self.add_module(name, module)
        with_vllm_linears(self, "")


@MULTIMODAL_REGISTRY.register_processor(
    InternVLXMultiModalProcessor, info=InternVLXProcessingInfo, dummy_inputs=InternVLXDummyInputsBuilder
)
class InternVLXForVLLM(nn.Module, SupportsMultiModal):
    """InternVL-X in vLLM: plain and PVTC checkpoints as one stream, LVTC as two (the module's docstring)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"InternVL-X in vLLM reads text and images, not {modality}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        model_path = vllm_config.model_config.model
        self.config = config
        self.schedule = token_schedule(config, model_path)
        self.vision_feature_layer = config.vision_feature_layer
        self.vision_tower_features = bundle_name(model_path, "modeling_internvl_x.vision_tower_features")
        self.vision = VisionParts(config, model_path, self.schedule)
        text_type = config.text_config.model_type
        if text_type not in DECODERS:
            raise ValueError(f"the plugin runs {sorted(DECODERS)} language models, not {text_type!r}.")
        self.language_model = init_vllm_registered_model(
            vllm_config,
            hf_config=config.text_config,
            prefix=maybe_prefix(prefix, "language_model"),
            architectures=[DECODERS[text_type]],
        )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        # The media rows of the step being run, and their parts beyond the main projector's (`embed_input_ids`).
        self.step_media: tuple[torch.Tensor, torch.Tensor] | None = None
        if expands(self.schedule):
            # vLLM 0.34's runner asks its model for the state that prepares each step; LVTC's builds the short
            # sub-batch. Other checkpoints (no such attribute) take vLLM's default.
            self.get_model_state_cls = lvtc_model_state

    # ---- what the decoder runs ---------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    @property
    def switch_layer(self) -> int:
        """k: the first layer on the long stream (the depth when nothing expands)."""
        return self.schedule.switch_layer if expands(self.schedule) else len(self.layers)

    def short_layer_names(self) -> list[str]:
        """The attention layers before k, which run on the short sub-batch (their `LVTCStep` metadata)."""
        return [layer.self_attn.attn.layer_name for layer in self.layers[: self.switch_layer]]

    @property
    def injections(self) -> list[int]:
        """The layers before which LR projectors 1..J-1 add their tokens (LVTC), in the order of `MediaParts`."""
        return list(self.config.lvtc_inject_layers) if self.config.lvtc_enabled else []

    # ---- multimodal inputs -----------------------------------------------------------------------------------------
    def embed_multimodal(self, pixel_values=None, num_patches=None, **kwargs) -> MultiModalEmbeddings:
        """One tensor per image: each of its rows `[main | LR 1..J-1 | HR]` (the parts each row takes; zeros
        elsewhere), `rows = tiles × tokens_per_tile` as the processor wrote them."""
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        tiles_per_image = [int(n) for n in torch.as_tensor(num_patches).flatten()]
        dtype = next(self.vision.vision_tower.parameters()).dtype
        _, features = self.vision_tower_features(
            self.vision.vision_tower, pixel_values.to(dtype), self.vision_feature_layer
        )
        main = self.vision.multi_modal_projector(features)  # (tiles, N1², D)
        tiles, short, hidden = main.shape
        rows = tokens_per_tile(self.config, self.schedule)
        parts = [main]
        if self.injections:
            additions = self.schedule.first_phase_additions(self.vision, features)
            parts += [additions[layer].view(tiles, short, hidden) for layer in self.injections]
        wide = main.new_zeros(tiles, rows, hidden * (len(parts) + self.uses_hr_projector))
        for number, part in enumerate(parts):
            wide[:, :short, number * hidden : (number + 1) * hidden] = part
        if self.uses_hr_projector:
            wide[:, :, -hidden:] = self.vision.lvtc_hr_projector(features)
        return tuple(image.flatten(0, 1) for image in wide.split(tiles_per_image))

    @property
    def uses_hr_projector(self) -> bool:
        return expands(self.schedule) and self.schedule.uses_hr_projector

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings, the main projector's tokens in the image rows; the other parts of those rows are kept for
        this step's `forward`."""
        embeddings = self.language_model.embed_input_ids(input_ids)
        self.step_media = None
        if not multimodal_embeddings or is_multimodal is None or not bool(is_multimodal.any()):
            return embeddings
        wide = torch.cat(list(multimodal_embeddings)).to(embeddings.dtype)
        hidden = embeddings.shape[-1]
        rows = is_multimodal.to(embeddings.device).nonzero().flatten()
        embeddings = embeddings.index_put((rows,), wide[:, :hidden])
        self.step_media = (rows, wide[:, hidden:])
        return embeddings

    # ---- the decoder -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        lvtc_step: LVTCStep | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.language_model.embed_input_ids(input_ids)
        media, self.step_media = self.step_media, None
        media_of_row = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
        extras = hidden.new_zeros(0, 0)
        if media is not None:
            media_of_row[media[0]] = torch.arange(media[0].shape[0], device=hidden.device)
            extras = media[1]
        if lvtc_step is None and expands(self.schedule) and get_forward_context().attn_metadata:
            raise RuntimeError(
                "an LVTC step came without its short sub-batch (`lvtc_step`): the plugin's runner side is not in "
                "place (its worker before vLLM 0.34, its ModelState from 0.34), which the plugin's config hook "
                "installs."
            )
        if lvtc_step is None:
            # one stream: plain, PVTC, LVTC that never expands (k = L); also vLLM's profiling runs, on every row
            return self.run_layers(hidden, positions, range(len(self.layers)), media_of_row, extras)
        layout = lvtc_step.layout
        with override_forward_context(lvtc_step.forward_context(get_forward_context())):
            short = self.run_layers(
                hidden[layout.short_rows],
                layout.short_positions,
                range(self.switch_layer),
                media_of_row[layout.short_rows],
                extras,
                normed=False,
            )
        states = hidden.index_put((layout.short_rows,), short)
        if layout.tile_rows.numel():
            hr_tokens = None
            if self.uses_hr_projector:
                hr_tokens = extras[media_of_row[layout.tile_rows], -hidden.shape[-1] :]
            expanded = self.schedule.expanded_tiles(short[layout.tile_carriers], hr_tokens)
            states = states.index_put((layout.tile_rows.flatten(),), expanded.flatten(0, 1).to(states.dtype))
        return self.run_layers(states, positions, range(self.switch_layer, len(self.layers)), media_of_row, extras)

    def run_layers(self, hidden, positions, layer_range, media_of_row, extras, normed: bool = True) -> torch.Tensor:
        """Decoder layers `layer_range` on `hidden` at `positions`, each LR projector's tokens added to the image rows
        before its layer; the final norm when `normed`, else the residual stream's value."""
        residual = None
        carriers = (media_of_row >= 0).nonzero().flatten()
        media = media_of_row[carriers]
        size = hidden.shape[-1]
        for index in layer_range:
            if index in self.injections and carriers.numel():
                part = self.injections.index(index)  # LR projector part + 1 of the row, after the main projector's
                added = extras[media, part * size : (part + 1) * size].to(hidden.dtype)
                if residual is None:
                    hidden = hidden.index_add(0, carriers, added)
                else:
                    residual = residual.index_add(0, carriers, added)
            hidden, residual = self.layers[index](positions, hidden, residual)
        if not normed:
            return hidden if residual is None else hidden + residual
        hidden, _ = self.language_model.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ---- weights ---------------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tensors: the language model's (`model.language_model.*`, `lm_head.weight`) through vLLM's
        loader, the vision side's (`model.vision_tower.*`, projectors) as they are."""
        vision = dict(self.vision.named_parameters())
        vision.update(dict(self.vision.named_buffers()))
        language, loaded = [], set()
        for name, tensor in weights:
            if name.startswith("model.language_model."):
                language.append((name.replace("model.language_model.", "model.", 1), tensor))
            elif name == "lm_head.weight":
                language.append((name, tensor))
            elif name.startswith("model.") and name.removeprefix("model.") in vision:
                target = vision[name.removeprefix("model.")]
                with torch.no_grad():
                    target.copy_(tensor.to(target.dtype))
                loaded.add(f"vision.{name.removeprefix('model.')}")
            else:
                raise ValueError(f"the checkpoint holds {name}, which InternVL-X's vLLM model has no place for.")
        loaded |= {f"language_model.{name}" for name in self.language_model.load_weights(language)}
        return loaded
