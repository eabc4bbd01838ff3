"""The user-facing verbs: ``request``, ``open_request``/``rows`` (batches of several requests), ``stats``,
``explain`` (and ``enable`` for diffusers)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cachedit.config import CacheditConfig, request_settings
from cachedit.runtime import masks, policy, registry
from cachedit.runtime import rows as _rows
from cachedit.runtime.rows import RequestHandle, RowsError, RowsUnsupported
from cachedit.runtime.step_cache import RequestStats, RequestToken
from cachedit.runtime.step_cache import open_request as _open_token


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
    checked = _checked(num_inference_steps, settings)
    with _open_token(frozenset(id(t) for t in _tensors(model)), num_inference_steps, checked):
        yield


def _checked(num_inference_steps: int | None, settings: dict[str, Any]) -> dict[str, Any]:
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps={num_inference_steps!r}; expected a positive int or None")
    checked = request_settings(settings)
    if num_inference_steps is None:  # a mask or a budget in these settings needs the step count: say so now
        policy.plan(CacheditConfig().for_request(checked), None)
    return checked


def open_request(model: Any, num_inference_steps: int | None = None, **settings: Any) -> RequestHandle:
    """Open a request on ``model`` that no context carries: a handle for ``cachedit.rows``.

    Same arguments as ``request``. The request lives until ``handle.close()`` (or the end of
    ``with handle:``), which frees its buffers; a server opens one per generation and closes it when
    the generation ends, fails or is cancelled.
    """
    checked = _checked(num_inference_steps, settings)
    return RequestHandle(RequestToken(frozenset(id(t) for t in _tensors(model)), num_inference_steps, checked))


@contextlib.contextmanager
def rows(model: Any, groups: Sequence[tuple[RequestHandle, int]]) -> Iterator[_rows.Batch]:
    """Tag the rows of the batched forwards inside with their requests (Note [Rows of several requests]).

    ``groups`` lists ``(handle, n_rows)`` in batch order: the first ``n_rows`` rows belong to the first
    handle's request, and so on (a request's CFG rows together, in the order it uses alone). Each call
    inside is one step of every group's request; each group decides with its own state and settings,
    and the middle blocks run only on the rows that compute. For that the model must be traced with a
    dynamic batch size (``torch._dynamo.mark_dynamic(x, 0)`` on the batched inputs); with a static
    one every row runs the middle and cached rows take their cached result.
    A group's request whose settings cannot be planned raises ``cachedit.RowsError`` naming it,
    before any request moved a step. A model on the per-block path (Dynamo compiled its blocks one graph
    each) runs one request per call: several groups raise ``cachedit.RowsUnsupported`` before the call
    does anything, and one group runs as that request.
    """
    checked, seen = [], set()
    for i, group in enumerate(groups):
        if not (isinstance(group, (tuple, list)) and len(group) == 2 and isinstance(group[0], RequestHandle)):
            raise TypeError(f"rows group {i} is {group!r}; expected (handle from cachedit.open_request, n_rows)")
        handle, n = group
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"rows group {i} has n_rows={n!r}; expected a positive int")
        if handle.id in seen:
            raise ValueError(f"rows group {i}: request {handle.id} appears twice; a request's rows must be consecutive")
        if handle.closed:
            raise ValueError(f"rows group {i}: request {handle.id} was closed; open a new one with cachedit.open_request")
        seen.add(handle.id)
        checked.append((handle, n))
    owner = frozenset(id(t) for t in _tensors(model))
    with _rows.tag_rows(owner, checked) as batch:
        yield batch  # batch.gated: how many forwards reached the gate (0: an error came before any decision)


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
