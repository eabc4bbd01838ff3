"""cachedit: a torch.compile backend that step-caches diffusion transformers.

    torch.compile(transformer, backend="cachedit")          # env vars / options configure it
    cachedit.enable(pipe, Fn=1, threshold=0.12)             # diffusers one-liner
    with cachedit.request(transformer, num_inference_steps=28): ...
    a = cachedit.open_request(transformer, 8); with cachedit.rows(transformer, [(a, 2), (b, 2)]): ...
    cachedit.stats(transformer); print(cachedit.explain(transformer))
"""

from cachedit.api import RequestHandle, RowsError, RowsUnsupported, enable, explain, open_request, request, rows, stats, steps_mask
from cachedit.config import CacheditConfig

__all__ = [
    "CacheditConfig",
    "RequestHandle",
    "RowsError",
    "RowsUnsupported",
    "enable",
    "explain",
    "open_request",
    "request",
    "rows",
    "stats",
    "steps_mask",
]
