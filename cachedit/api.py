"""The user-facing verbs: ``request``, ``stats``, ``explain`` (and ``enable`` for diffusers)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cachedit.config import CacheditConfig, request_settings
from cachedit.runtime import masks, policy, registry
from cachedit.runtime.step_cache import RequestStats, open_request


def _module(model: Any) -> torch.nn.Module:
    """The user's module behind ``model``: an nn.Module, a torch.compile result, or a pipeline."""
    if hasattr(model, "transformer") and isinstance(getattr(model, "transformer"), torch.nn.Module):
        model = model.transformer  # a diffusers pipeline
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module, the result of torch.compile(module), or a diffusers pipeline; "
            f"got {type(model).__name__}"
        )
    return model


def _tensors(model: Any) -> list[torch.Tensor]:
    """The tensors that name ``model`` in compiled graphs (Dynamo lifts parameters and buffers as inputs)."""
    module = _module(model)
    return list(itertools.chain(module.parameters(), module.buffers()))


def _graphs(model: Any) -> list[registry.CompiledGraph]:
    return registry.lookup(_tensors(model))


@contextlib.contextmanager
def request(model: Any, num_inference_steps: int | None = None, **settings: Any) -> Iterator[None]:
    """Mark one generation on ``model``: every call inside is a step of one new request.

    ``settings`` override the compile-time defaults for this request only: every name in
    ``cachedit.config.REQUEST_SETTINGS`` (``threshold``, the warmup and step limits, ``cfg``, and the cache
    family: ``scm``, ``scm_policy``, ``calibrator``, ``budget``, ...). They change no compiled graph (no
    recompile). Settings that shape the split (``Fn``, ``Bn``, ``inner``, ``mode``, ``ulysses``, ``ring``,
    ``fp8_comm``) are fixed at compile time and refused here.

    Without it, cachedit detects requests (Note [Requests and branches]). The context is per thread and
    per asyncio task, so concurrent requests stay apart; its buffers are freed when it exits.
    """
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps={num_inference_steps!r}; expected a positive int or None")
    checked = request_settings(settings)
    if num_inference_steps is None:  # a mask or a budget in these settings needs the step count: say so now
        policy.plan(CacheditConfig().for_request(checked), None)
    with open_request(frozenset(id(t) for t in _tensors(model)), num_inference_steps, checked):
        yield


def stats(model: Any) -> list[RequestStats]:
    """One record per request on ``model`` (every compiled graph of it), oldest first.

    ``bytes_held`` is what each request's residual buffers take now (0 once it ended).
    """
    tensors = _tensors(model)
    ids = {id(t) for t in tensors}
    records = {r.id: r for g in registry.lookup(tensors) if g.cache is not None for r in g.cache.records_for(ids)}
    return sorted(records.values(), key=lambda r: r.id)


def steps_mask(
    num_steps: int,
    preset: str | None = "medium",
    *,
    compute_runs: Sequence[int] | None = None,
    cache_runs: Sequence[int] | None = None,
) -> list[int]:
    """The steps-computation mask cachedit uses for ``scm=preset`` (or explicit run lengths): one int per
    step, 1 = compute, 0 = cache (``scm_policy="static"``) or let the usual rules decide (``"dynamic"``)."""
    return masks.steps_mask(num_steps, preset, compute_runs=compute_runs, cache_runs=cache_runs)


def explain(model: Any) -> str:
    """What the backend found and did for each compiled graph of ``model``."""
    graphs = _graphs(model)
    if not graphs:
        return f"{type(_module(model)).__name__}: not compiled with backend='cachedit' yet (call it once first)"
    return "\n".join(g.describe() for g in graphs)


def enable(pipe: Any, config: Any = None, **options: Any) -> Any:
    """Compile ``pipe.transformer`` with the cachedit backend; each ``pipe(...)`` call is one request."""
    from cachedit.integrations.diffusers import enable as _enable

    return _enable(pipe, config, **options)
