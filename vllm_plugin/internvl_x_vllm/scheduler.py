"""Prefix caching with LVTC: a request reuses cached blocks only before its first image.

vLLM hashes a request's blocks over the long stream, but the layers before k store short token s in slot s, which past
an image is not the long row s the hash describes; before the first image both streams agree. So a request's cache hit
is cut back to the last whole block before its first image (requests without images hit as usual), in vLLM 0.32 as in
0.34 (whose core can bound hits per request, `Request.prefix_cache_hit_limit`, but fills the bound from sampling
parameters only).
"""

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler


def first_image_row(request) -> int | None:
    """Where a request's first image starts in its prompt (vLLM's placeholder offsets), or None without images."""
    offsets = [feature.mm_position.offset for feature in request.mm_features or []]
    return min(offsets) if offsets else None


class PrefixBeforeImagesMixin:
    def _get_local_prefix_cache_hit(self, request, *args, **kwargs):
        blocks, computed, boundary, diverged = super()._get_local_prefix_cache_hit(request, *args, **kwargs)
        first_image = first_image_row(request)
        if first_image is None or computed <= first_image:
            return blocks, computed, boundary, diverged
        block_size = self.cache_config.block_size
        kept = first_image // block_size
        capped = self.kv_cache_manager.create_kv_cache_blocks(tuple(group[:kept] for group in blocks.blocks))
        return capped, kept * block_size, min(boundary, kept * block_size), diverged


class LVTCScheduler(PrefixBeforeImagesMixin, Scheduler):
    pass


class LVTCAsyncScheduler(PrefixBeforeImagesMixin, AsyncScheduler):
    pass
