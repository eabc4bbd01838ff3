"""``cachedit.enable(pipe)``: compile a diffusers pipeline's transformer with the cachedit backend.

The transformer is compiled in place (``Module.compile``), so the pipeline keeps its component, and
the pipeline's class is swapped for a subclass whose ``__call__`` opens one ``cachedit.request`` per
call with that call's ``num_inference_steps``. The keyword ``cachedit={...}`` of such a call carries
that request's settings (``pipe(prompt, cachedit={"threshold": 0.2})``); it never reaches the pipeline.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from cachedit.config import CacheditConfig


def enable(pipe: Any, config: CacheditConfig | None = None, **options: Any) -> Any:
    """Compile ``pipe.transformer`` with ``backend="cachedit"``; returns ``pipe``.

    ``config`` and ``options`` (field names of ``CacheditConfig``) are checked here, so a typo fails
    now rather than at the first generation.
    """
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"cachedit.enable expects a diffusers pipeline with a `transformer` module; "
            f"{type(pipe).__name__} has {type(transformer).__name__}. For a bare model use "
            "torch.compile(model, backend='cachedit')"
        )
    compile_options = dict(options)
    if config is not None:
        compile_options["config"] = config
    CacheditConfig.resolve(compile_options)  # validate now
    transformer.compile(backend="cachedit", options=compile_options)
    cls = type(pipe)
    if not getattr(cls, "_cachedit_wrapped", False):
        pipe.__class__ = type(cls.__name__, (cls,), {"__call__": _with_request(cls.__call__), "_cachedit_wrapped": True})
    return pipe


def _with_request(call):
    default_steps = inspect.signature(call).parameters.get("num_inference_steps")
    default_steps = default_steps.default if default_steps is not None else None

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        from cachedit.api import request

        settings = kwargs.pop("cachedit", None) or {}
        if not isinstance(settings, dict):
            raise TypeError(
                f"cachedit={settings!r}: expected a dict of per-request settings, e.g. cachedit={{'threshold': 0.2}}"
            )
        steps = kwargs.get("num_inference_steps", default_steps)
        steps = steps if isinstance(steps, int) and steps > 0 else None
        with request(self.transformer, num_inference_steps=steps, **settings):
            return call(self, *args, **kwargs)

    return __call__
