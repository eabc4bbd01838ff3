"""Merge the transformer calls of concurrent pipeline calls into one batched call per step.

Note [Merged pipeline calls]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``cachedit serve --model DIR --max-batch N`` runs up to N generations of any diffusers pipeline at once,
each its own ``pipe(...)`` call in its own thread, and batches their transformer calls:

  - The pipeline's ``transformer`` is replaced by ``MergingTransformer``, a module that holds the real
    (compiled) one and hands every other attribute through (``config``, ``dtype``, ``cache_context``).
    The model's forward is not touched.
  - Each generation thread calls its own view of the pipeline (``from_pipe``: the same models, its own
    scheduler, tokenizers and pipeline attributes), since a pipeline call keeps its state on the
    pipeline and fast tokenizers refuse concurrent use.
  - A generation *joins* at its first transformer call and *leaves* after its last step (the pipeline's
    step callback says so) or when its call ends. A *round* fires when every generation that has joined
    is waiting with a call: so a generation joins at a step boundary, and one that is encoding its prompt
    or decoding its image holds no one back.
  - The calls of a round are grouped by compatibility and each group becomes ONE call, its rows tagged with
    ``cachedit.rows`` (one group per generation, in arrival order), so each generation decides compute or
    cache with its own request, and the middle blocks run only on the rows that compute.
  - Merging, argument by argument (bound to ``forward``'s signature): a tensor whose first size is the
    call's row count in every call (the row count is the first size of the first tensor argument, the
    latent) is concatenated along that dimension, and so is a list of one item per row; any other
    argument must be equal in every call and is passed once (rotary ids, ``return_dict``, attention
    kwargs). Calls that differ anywhere else (another image size, another text length) go to separate
    groups. The outputs are cut back by rows: every output tensor (or list) whose first size is the
    merged row count is split, any other is handed to each.
  - A generation's CFG rows stay together: they are one call's rows, in the pipeline's own order. A
    pipeline that makes two calls per step (CogView4's cond and uncond) makes them in two rounds, and
    ``cachedit.rows`` takes the second as a further call of the same step (the latent did not move), as
    a request alone does (tests cover batched CFG, not this case).
  - Errors: an error before the gate (``rows`` saw no decision) reruns each call of the group alone, so
    only the one that raises fails; an error after it fails the group's calls (their states moved). A
    model on the per-block path (Dynamo compiled its blocks one graph each) runs one request per call:
    its first merged call raises ``RowsUnsupported`` before any decision, and from then on every call
    runs alone (the generations still run concurrently, their calls one after another).

Batch sizes vary with the mix: the concatenated tensors are marked dynamic along the batch
(``maybe_mark_dynamic``), so the model compiles once for every mix (a one-row call compiles its own
static graph); a model whose code specialises the batch size (Chroma, Lumina2, ZImage) recompiles per
size instead, and there mixed calls run the middle on every row.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

import cachedit
from cachedit.runtime.rows import RowsUnsupported

log = logging.getLogger("cachedit.serve")

CALLER: contextvars.ContextVar[Any] = contextvars.ContextVar("cachedit_merge_caller", default=None)


@dataclasses.dataclass(eq=False)
class _Call:
    caller: Any  # the generation: its ``handle`` is its cachedit request
    bound: inspect.BoundArguments
    rows: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class CallMerger:
    """The rounds of Note [Merged pipeline calls] for one model; ``on_call(groups)`` sees each merged call."""

    def __init__(self, model: torch.nn.Module, on_call: Callable[[list[int]], None] | None = None):
        self.model = model
        self.signature = inspect.signature(model.forward)
        self.on_call = on_call
        self.cond = threading.Condition()
        self.joined: set[Any] = set()
        self.pending: list[_Call] = []
        self.running = False
        self.alone = False  # the model's path runs one request per call: every call of a round runs alone

    # -- a generation's thread --------------------------------------------------------------------------

    def call(self, caller: Any, args: tuple, kwargs: dict) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        first = next((v for v in bound.arguments.values() if isinstance(v, torch.Tensor)), None)
        if first is None or first.dim() == 0:
            raise TypeError(f"{type(self.model).__name__}: the first tensor argument (the latent) has no batch dimension to merge along")
        call = _Call(caller, bound, int(first.shape[0]))
        with self.cond:
            self.joined.add(caller)
            self.pending.append(call)
        self._fire_if_ready()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def leave(self, caller: Any) -> None:
        """``caller`` makes no more calls (its last step is done, or its pipeline call ended)."""
        with self.cond:
            self.joined.discard(caller)
        self._fire_if_ready()

    # -- rounds -------------------------------------------------------------------------------------------

    def _fire_if_ready(self) -> None:
        while True:
            with self.cond:
                waiting = {c.caller for c in self.pending}
                if self.running or not self.pending or not self.joined <= waiting:
                    return
                calls, self.pending, self.running = self.pending, [], True
            try:
                for group in [[c] for c in calls] if self.alone else _groups(calls):
                    self._run(group)
            finally:
                with self.cond:
                    self.running = False
            # the callers released above call again later; loop in case a leave completed a round meanwhile

    def _run(self, group: list[_Call]) -> None:
        try:
            outs = self._merged(group)
        except Exception as err:
            if isinstance(err, RowsUnsupported) and not self.alone:
                self.alone = True
                log.warning(f"cachedit serve: calls are not merged: {err}")
            if getattr(err, "cachedit_gated", 1) == 0 and len(group) > 1:
                for call in group:  # nothing was decided: alone, only the call that raises fails
                    self._run([call])
                return
            for call in group:
                call.error = err
                call.done.set()
            return
        for call, out in zip(group, outs):
            call.result = out
            call.done.set()

    @torch.no_grad()
    def _merged(self, group: list[_Call]) -> list[Any]:
        lead = group[0].bound
        merged = inspect.BoundArguments(lead.signature, lead.arguments.copy())
        total = sum(c.rows for c in group)
        for name, value in lead.arguments.items():
            if not _is_rows(value, group[0].rows):
                continue
            parts = [c.bound.arguments[name] for c in group]
            if isinstance(value, list):
                merged.arguments[name] = [item for part in parts for item in part]
                continue
            cat = torch.cat(parts) if len(group) > 1 else value
            if total > 1:
                torch._dynamo.maybe_mark_dynamic(cat, 0)
            merged.arguments[name] = cat
        if self.on_call is not None:
            self.on_call([c.rows for c in group])
        with cachedit.rows(self.model, [(c.caller.handle, c.rows) for c in group]) as tagged:
            try:
                out = self.model(*merged.args, **merged.kwargs)
            except Exception as err:
                err.cachedit_gated = tagged.gated  # type: ignore[attr-defined]
                raise
        return _split(out, [c.rows for c in group], total)


def _is_rows(value: Any, rows: int) -> bool:
    """Whether ``value`` has one entry per row: a tensor with ``rows`` first, or a list of ``rows`` items
    (QwenImage's ``img_shapes``, ``txt_seq_lens``)."""
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == rows
    return isinstance(value, list) and len(value) == rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device and (a is b or torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # values that do not compare: not mergeable
        return False


def compatible(a: _Call, b: _Call) -> bool:
    """Whether ``b`` can share ``a``'s merged call (Note [Merged pipeline calls]: merging)."""
    if a.bound.arguments.keys() != b.bound.arguments.keys():
        return False
    for name, x in a.bound.arguments.items():
        y = b.bound.arguments[name]
        if _is_rows(x, a.rows) and _is_rows(y, b.rows):
            if isinstance(x, list) != isinstance(y, list):
                return False
            if isinstance(x, torch.Tensor) and (x.shape[1:] != y.shape[1:] or x.dtype != y.dtype or x.device != y.device):
                return False
        elif not _same(x, y):
            return False
    return True


def _groups(calls: Sequence[_Call]) -> list[list[_Call]]:
    groups: list[list[_Call]] = []
    for call in calls:
        home = next((g for g in groups if compatible(g[0], call)), None)
        if home is None:
            groups.append([call])
        else:
            home.append(call)
    return groups


def _split(out: Any, rows: list[int], total: int) -> list[Any]:
    """Cut a merged output back into one output per call (tensors of ``total`` rows are split)."""
    if isinstance(out, torch.Tensor):
        return list(out.split(rows)) if out.dim() > 0 and out.shape[0] == total else [out] * len(rows)
    if isinstance(out, list) and len(out) == total:  # one item per row (ZImage's per-sample outputs)
        bounds = [sum(rows[:i]) for i in range(len(rows) + 1)]
        return [out[a:b] for a, b in zip(bounds, bounds[1:])]
    if isinstance(out, (tuple, list)):
        parts = [_split(o, rows, total) for o in out]
        return [type(out)(p[i] for p in parts) for i in range(len(rows))]
    if dataclasses.is_dataclass(out):
        fields = {f.name: _split(getattr(out, f.name), rows, total) for f in dataclasses.fields(out)}
        return [type(out)(**{k: v[i] for k, v in fields.items()}) for i in range(len(rows))]
    return [out] * len(rows)


class MergingTransformer(torch.nn.Module):
    """Stands in for a pipeline's transformer: calls made by a generation (``CALLER`` set) go through the
    merger; any other call, and every attribute, goes to the real module."""

    def __init__(self, model: torch.nn.Module, merger: CallMerger):
        super().__init__()
        self.inner = model
        self.merger = merger

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        caller = CALLER.get()
        if caller is None:
            return self.inner(*args, **kwargs)
        return self.merger.call(caller, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)
