"""Rows of several requests in one batched forward: each row group follows its own request.

Note [Rows of several requests]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A server batches concurrent requests into one transformer call per step. Which rows belong to which
request cannot be seen from the tensors, so the caller says it:

    a = cachedit.open_request(model, num_inference_steps=8, threshold=0.1)
    b = cachedit.open_request(model, num_inference_steps=4)
    with cachedit.rows(model, [(a, 2), (b, 2)]):   # rows 0-1 are a's (uncond, cond), rows 2-3 are b's
        out = compiled(hidden_states=x, timestep=t, ...)   # batch 4
    a.close(); b.close()                            # or when each finishes: its buffers go with it

A group is a run of consecutive rows of one request (the CFG rows of a request stay together, in the
order that request would use alone). Every call under ``rows`` is one step of each group's request;
the groups may be at different steps (each row carries its own timestep: a request joins the batch at
any step boundary) and have different settings.

The gate (``gate``):
  1. Every group's request is found or made first, so a request whose settings cannot be planned
     raises ``RowsError`` naming its group before any request moved a step.
  2. One host read for the whole batch: each group's timestep (its first row) and the diff sums
     ``sum|prev - cur|, sum|prev|`` of its rows of the head residual against its own last computed
     step, stacked into one tensor and read with one ``tolist()``.
  3. Each group advances and decides exactly as its request would alone (``policy.decide`` on its own
     history and plan).

The reuse node (``reuse``), with C the rows that compute:
  - all rows compute: the middle runs on the batch as usual and each group keeps its rows' residuals;
  - some rows compute: the middle runs on the rows of C only. Its inputs are indexed along the batch
    dimension, which is found from shapes: the graph was traced with a symbolic batch size ``s``
    (``torch._dynamo.mark_dynamic(x, 0)`` on the batched inputs, or an automatic dynamic recompile),
    the primary stream is ``[s, ...]``, and every middle input whose first size is ``s`` is indexed,
    every integer input equal to ``s`` is replaced by ``len(C)``; everything else (rotary tables,
    parameters) passes as is. An input whose first size is a symbol of its own that no batched input
    explains (PixArt's attention mask: Dynamo ties it to ``s`` only through a view's runtime check) is
    indexed too when at run time that size is the batch size, and integers that are expressions of that
    symbol (the attention's ``2 * s'`` repeat size) are evaluated at ``len(C)``; when it is not the batch
    size, the middle runs on every row. So one compiled middle serves every mix, with no recompilation.
    The outputs are scattered back into a full batch; cached rows get ``input + cached residual``;
  - no row computes: every row is ``input + cached residual``.
A graph traced with a static batch size (its middle bakes ``B`` into reshapes) cannot run a sub-batch:
there the middle runs on all rows and the cached rows' outputs are replaced by their cached ones (the
decisions and results are each request's own; only the saving is lost; logged once).

Equality with a request run alone: the decisions are the same functions of the same state, but the
head ran on a bigger batch, so its values may differ from the solo run by floating-point reordering
(BLAS blocks a matmul by its row count). A decision can only flip when a diff lies within that
rounding (about 1e-6 relative) of the threshold.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cachedit.config import CachePolicy, Calibrator, CfgMode
from cachedit.runtime import policy

log = logging.getLogger("cachedit")


class RowsError(RuntimeError):
    """A group's request could not start (its settings cannot be planned); no request moved a step.

    ``handle`` is the group's request handle, ``index`` its position in the ``rows`` list.
    """

    def __init__(self, index: int, handle: "RequestHandle", error: Exception):
        super().__init__(f"rows group {index} (request {handle.token.id}): {error}")
        self.index, self.handle, self.error = index, handle, error


class RequestHandle:
    """A request opened by ``cachedit.open_request``: not bound to a context, closed by ``close()``.

    Use it in ``cachedit.rows`` groups. ``with handle:`` closes it at the end of the block.
    """

    def __init__(self, token: Any):
        self.token = token
        self.closed = False
        self.stats = None  # its RequestStats (as cachedit.stats lists it) once a forward ran it

    @property
    def id(self) -> int:
        return self.token.id

    def close(self) -> None:
        """End the request: its buffers are freed (its stats stay in ``cachedit.stats``)."""
        self.closed = True
        for state in list(self.token.users):
            state.close(self.token)

    def __enter__(self) -> "RequestHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RequestHandle(id={self.token.id}, steps={self.token.num_inference_steps}{', closed' if self.closed else ''})"


@dataclasses.dataclass(frozen=True)
class _Group:
    handle: RequestHandle
    start: int
    stop: int


@dataclasses.dataclass(eq=False)
class Batch:
    """What ``cachedit.rows`` puts in the context: the owner model and the row groups."""

    owner: frozenset[int]
    groups: tuple[_Group, ...]
    rows: int
    gated: int = 0  # gate calls made under this context (a caller retrying after an error checks it)


ACTIVE: contextvars.ContextVar[Batch | None] = contextvars.ContextVar("cachedit_rows", default=None)


@contextlib.contextmanager
def tag_rows(owner: frozenset[int], groups: Sequence[tuple[RequestHandle, int]]) -> Iterator[Batch]:
    """The context behind ``cachedit.rows`` (argument checks are the caller's)."""
    spans, start = [], 0
    for handle, n in groups:
        spans.append(_Group(handle, start, start + n))
        start += n
    from cachedit.runtime import step_cache as sc

    batch = Batch(owner, tuple(spans), start)
    reset = ACTIVE.set(batch)
    # one group is one request: a path that runs one request per call finds it as cachedit.request's
    alone = sc._ACTIVE.set(spans[0].handle.token) if len(spans) == 1 else None
    try:
        yield batch
    finally:
        if alone is not None:
            sc._ACTIVE.reset(alone)
        ACTIVE.reset(reset)


class RowsUnsupported(RuntimeError):
    """The model's path cannot run several requests' rows in one call (raised before any decision)."""


def one_request_only(param: torch.Tensor | None) -> None:
    """For a path that runs one request per call (the per-block path): raise ``RowsUnsupported`` when rows
    of several requests are tagged for the model owning ``param``, before the call does anything."""
    batch = active(param) if param is not None else None
    if batch is not None and len(batch.groups) > 1:
        raise RowsUnsupported(
            f"this model runs through the per-block path (Dynamo compiled its blocks one graph each), which runs "
            f"one request per call; cachedit.rows tagged {len(batch.groups)} groups: call once per request"
        )


def gate_one_request(cache, batch: Batch, residual, timestep, param) -> tuple:
    """The gate of the per-block path under ``cachedit.rows``: a batch of one group is that group's request
    (``tag_rows`` made it the active one; ``one_request_only`` refused several before the call began)."""
    assert len(batch.groups) == 1, "one_request_only runs at the first block"
    batch.gated += 1
    gated = cache.gate_alone(residual, timestep, param)
    batch.groups[0].handle.stats = gated[2].stats
    return gated


def active(param: torch.Tensor) -> Batch | None:
    """The row tagging in force for the model owning ``param``, if any."""
    batch = ACTIVE.get()
    return batch if batch is not None and id(param) in batch.owner else None


@dataclasses.dataclass(eq=False)
class _Gated:
    """One group after the gate: what its rows get from the reuse node."""

    group: _Group
    decision: policy.Decision
    branch: Any
    req: Any
    cached: tuple | None


@dataclasses.dataclass(eq=False)
class Gated:
    """The gate's result for a tagged batch (``StepCache.reuse`` hands it to ``reuse``)."""

    groups: list[_Gated]
    state: Any
    rows: int


def gate(cache, batch: Batch, residual, timestep, param, latent=None, conditioning=None) -> Gated:
    """Decide compute or cache for each row group of this call (Note [Rows of several requests])."""
    from cachedit.runtime import step_cache as sc

    if residual.shape[0] != batch.rows:
        raise ValueError(
            f"cachedit.rows tags {batch.rows} rows ({', '.join(str(g.stop - g.start) for g in batch.groups)} per group) "
            f"but the forward's batch has {residual.shape[0]}; the row counts must add up to the batch size"
        )
    batch.gated += 1
    state = cache.state(param)
    now = time.monotonic()
    state.sweep(now)
    # 1. find or make every group's request before any moves a step
    reqs = []
    for i, group in enumerate(batch.groups):
        token = group.handle.token
        with state.lock:
            req = state.explicit.get(token.id)
        if req is None:
            if group.handle.closed:
                raise RowsError(i, group.handle, ValueError("the request handle was closed"))
            try:
                config = cache.config.for_request(token.settings)
                if config.policy is CachePolicy.DBPRUNE:
                    raise ValueError("policy='dbprune' decides per block, which cachedit.rows does not run; use dbcache")
                req = state.new_request("explicit", config, token.num_inference_steps, token.settings)
            except ValueError as err:
                raise RowsError(i, group.handle, err) from err
            with state.lock:
                state.explicit[token.id] = req
            token.users.add(state)
            group.handle.stats = req.stats
        reqs.append(req)

    # 2. one host read: the groups' timesteps and their diff sums
    same = [r.step >= 0 and r.config.cfg is not CfgMode.BATCHED and r.same_latent(latent) for r in reqs]
    reads, diffs_for = [], []
    n_t = 0
    if timestep is not None:
        flat = timestep.reshape(-1)
        if flat.numel() == batch.rows:
            idx = torch.tensor([g.start for g in batch.groups], device=flat.device)
            reads.append(flat.index_select(0, idx).float())
        else:
            reads.append(flat[:1].float().expand(len(batch.groups)))
        n_t = len(batch.groups)
    for group, req, same_step in zip(batch.groups, reqs, same):
        rows = residual[group.start : group.stop]
        if req.step < 0:
            continue
        branch, step = (req.branch(req.calls_at_step), req.step) if same_step else (req.branch(0), req.step + 1)
        prev = branch.prev_residual
        if sc._borrowed_diff(req, branch, step) is not None:
            continue
        if prev is not None and prev.shape == rows.shape and policy.needs_diff(req.plan, branch.history, step - req.origin):
            reads.append(torch.ops.cachedit.residual_diff(prev, rows))
            diffs_for.append(branch)
    if diffs_for and cache.reduce_sums is not None:
        reads[1 if n_t else 0 :] = [cache.reduce_sums(torch.cat(reads[1 if n_t else 0 :]))]
    values = torch.cat([r.to(residual.device) for r in reads]).tolist() if reads else []  # the one host read
    ts, values = values[:n_t], values[n_t:]
    sums = {id(b): (values[2 * i], values[2 * i + 1]) for i, b in enumerate(diffs_for)}

    # 3. each group advances and decides as its request would alone
    out = []
    for i, (group, req, same_step) in enumerate(zip(batch.groups, reqs, same)):
        rows = residual[group.start : group.stop]
        t = ts[i] if ts else None
        req.last_used = now
        if req.shape is not None and req.shape != tuple(rows.shape):
            for branch in req.branches:
                branch.drop()
        req.shape = tuple(rows.shape)
        branch = cache._advance(req, t, latent, conditioning, same_step)
        if req.calls_at_step == 1 and sc._refreshes_at(req.config, req.step):
            req.refresh()
        # its own copy of the rows: a view would keep the whole batch alive
        decision, cached = cache.decide(req, branch, sums.get(id(branch)), rows)
        if not decision.cache:
            branch.prev_residual = rows.clone()
        out.append(_Gated(group, decision, branch, req, cached))
    return Gated(out, state, batch.rows)


@dataclasses.dataclass(frozen=True)
class _MiddleRows:
    """How to run a compiled middle on a sub-batch: which inputs to index, which integers are the batch size."""

    ok: bool
    indexed: tuple[int, ...] = ()  # input positions indexed along dim 0
    sizes: tuple[int, ...] = ()  # integer input positions that are the batch size
    why: str = ""
    # inputs whose first size is a symbol the trace kept apart from the batch ("stray"): indexed when at run
    # time that size is the batch size, else the middle runs on every row; integer inputs that are
    # expressions of those symbols (2 * s for batch x heads) are evaluated with them set to the sub-batch
    maybe_indexed: tuple[int, ...] = ()
    maybe_sizes: tuple[tuple[int, Any], ...] = ()  # (input position, sympy expression of stray symbols)
    stray: frozenset = frozenset()


def _analyse(middle, n_carried: int) -> _MiddleRows:
    """Find the batch dimension of ``middle``'s inputs from the symbolic sizes it was traced with."""
    graph_module = getattr(middle, "graph_module", None)
    if graph_module is None:
        return _MiddleRows(False, why="the middle keeps no graph to read its input sizes from")
    values = [n.meta.get("example_value") for n in graph_module.graph.find_nodes(op="placeholder")]
    primary = values[0] if values else None
    size = primary.shape[0] if isinstance(primary, torch.Tensor) and primary.dim() else None
    symbol = size.node.expr if isinstance(size, torch.SymInt) else None
    if symbol is None or not symbol.is_Symbol:
        return _MiddleRows(
            False,
            why="the graph was traced with a static batch size; mark the batch dimension dynamic "
            "(torch._dynamo.mark_dynamic(x, 0) on the batched inputs) so the middle can run on the computing rows only",
        )
    indexed, sizes = [], []
    for i, value in enumerate(values):
        if isinstance(value, torch.SymInt):
            if value.node.expr == symbol:
                sizes.append(i)
            elif symbol in value.node.expr.free_symbols:
                return _MiddleRows(False, why=f"middle input {i} is the size {value}, which depends on the batch size")
        elif isinstance(value, torch.Tensor):
            exprs = [s.node.expr if isinstance(s, torch.SymInt) else None for s in value.shape]
            if exprs and exprs[0] == symbol:
                if any(e is not None and symbol in e.free_symbols for e in exprs[1:]):
                    return _MiddleRows(False, why=f"middle input {i} {tuple(value.shape)} has the batch size in two dims")
                indexed.append(i)
            elif any(e is not None and symbol in e.free_symbols for e in exprs):
                return _MiddleRows(False, why=f"middle input {i} {tuple(value.shape)} has the batch size off dim 0")
    if not set(range(n_carried)) <= set(indexed):
        return _MiddleRows(False, why="a stream entering the middle has no batch dimension first")
    # A first size that is a symbol of its own (not the batch, nor a size of the batched inputs) may be a
    # batch size the trace never tied to the primary's: an attention mask marked dynamic apart, whose only
    # link to the batch is a view's runtime check (PixArt). Left whole it breaks that view; so such inputs
    # are indexed when, at run time, their first size is the batch size, and the middle runs on every row
    # when it is not (``reuse``). A tensor whose first size is an expression of such a symbol declines.
    known = {symbol}
    for i in indexed:
        known |= {e for s in values[i].shape[1:] if isinstance(s, torch.SymInt) for e in s.node.expr.free_symbols}
    maybe_indexed, stray = [], set()
    for i, value in enumerate(values):
        if i in indexed or not isinstance(value, torch.Tensor) or not value.dim() or not isinstance(value.shape[0], torch.SymInt):
            continue
        first = value.shape[0].node.expr
        if not first.free_symbols - known:
            continue
        if not first.is_Symbol:
            return _MiddleRows(
                False,
                why=f"middle input {i} {tuple(value.shape)} starts with a size ({first}) the trace did not tie to the "
                "batch size, which may be another batch dimension",
            )
        maybe_indexed.append(i)
        stray.add(first)
    maybe_sizes = [
        (i, value.node.expr)
        for i, value in enumerate(values)
        if isinstance(value, torch.SymInt) and value.node.expr.free_symbols and value.node.expr.free_symbols <= stray
    ]
    return _MiddleRows(
        True, tuple(indexed), tuple(sizes), maybe_indexed=tuple(maybe_indexed), maybe_sizes=tuple(maybe_sizes),
        stray=frozenset(stray),
    )


def _middle_rows(middle, n_carried: int) -> _MiddleRows:
    found = getattr(middle, "_cachedit_rows", None)
    if found is None:
        found = _analyse(middle, n_carried)
        try:
            middle._cachedit_rows = found
        except AttributeError:
            pass
        if not found.ok:
            log.warning(f"cachedit.rows: mixed batches run the middle on every row: {found.why}")
    return found


def _row_layout(t: torch.Tensor) -> tuple:
    """``(sizes after dim 0, strides)`` of a batched tensor: enough to lay out a batch of any size like it."""
    return tuple(t.shape[1:]), tuple(t.stride())


def _full(layout: tuple, rows: int, like: torch.Tensor) -> torch.Tensor:
    """An empty batch of ``rows`` rows with ``layout``: the strides of the rows kept when the batch
    dimension is outermost (a slice of a wider tensor, as the tail expects), else contiguous."""
    rest, stride = layout
    extent = sum((s - 1) * st for s, st in zip(rest, stride[1:])) + 1
    if len(stride) == len(rest) + 1 and stride[0] >= extent:
        return torch.empty_strided((rows, *rest), stride, dtype=like.dtype, device=like.device)
    return torch.empty((rows, *rest), dtype=like.dtype, device=like.device)


def reuse(cache, gated: Gated, middle, part: int, segment, inputs) -> tuple[torch.Tensor, ...]:
    """Run gated part ``part`` on the rows that compute; rebuild the others from their cached residuals."""
    from cachedit.runtime.step_cache import _calibrator

    residual_of = segment.residual_of
    k = len(residual_of)
    groups = gated.groups
    computing = [g for g in groups if not g.decision.cache]
    n_carried = max(residual_of) + 1
    computed, sub = None, None  # the middle's outputs, and the rows of the batch they are for
    if len(computing) == len(groups):
        computed, sub = middle(*inputs), None
    elif computing:
        plan = _middle_rows(middle, n_carried)
        full = {s: gated.rows for s in plan.stray}
        if plan.ok and all(inputs[i].shape[0] == gated.rows for i in plan.maybe_indexed) and all(
            inputs[i] == int(expr.subs(full)) for i, expr in plan.maybe_sizes
        ):
            rows = [r for g in computing for r in range(g.group.start, g.group.stop)]
            device = inputs[0].device
            index = torch.tensor(rows if len(rows) > 1 else rows * 2, device=device)  # >= 2: a size-1 batch may be specialised
            args = list(inputs)
            for i in (*plan.indexed, *plan.maybe_indexed):
                args[i] = inputs[i].index_select(0, index)
            for i in plan.sizes:
                args[i] = len(index)
            for i, expr in plan.maybe_sizes:
                args[i] = int(expr.subs({s: len(index) for s in plan.stray}))
            computed, sub = middle(*args), rows
        else:
            computed, sub = middle(*inputs), None
    outs: list[torch.Tensor | None] = [None] * k
    if computed is not None and sub is None and len(computing) == len(groups):
        outs = list(computed[:k])
    else:
        for j in range(k):
            if computed is not None:
                layout = _row_layout(computed[j])
            else:
                layout = groups[0].cached[part][1][j]
            outs[j] = _full(layout, gated.rows, inputs[residual_of[j]])
        position = {}
        if sub is not None:
            position = {r: p for p, r in enumerate(sub)}
        for g in computing:
            s, e = g.group.start, g.group.stop
            for j in range(k):
                src = computed[j][position[s] : position[s] + (e - s)] if sub is not None else computed[j][s:e]
                outs[j][s:e].copy_(src)
    for g in groups:
        s, e = g.group.start, g.group.stop
        branch, req = g.branch, g.req
        if g.decision.cache:
            residuals, _ = g.cached[part]
            assert residuals is not None, "a cached step needs residuals from a computed step"
            for j, r in zip(range(k), residuals):
                torch.add(inputs[residual_of[j]][s:e], r, out=outs[j][s:e])
        else:
            if sub is not None:
                p = sub.index(s)
                mine = tuple(r[p : p + (e - s)].clone() for r in computed[k:])
            else:
                mine = tuple(r[s:e].clone() for r in computed[k:])
            kept = branch.part(part)
            kept.residuals = mine
            kept.layouts = tuple(_row_layout(o) for o in outs)
            if req.config.calibrator is not Calibrator.NONE:
                if kept.calibrators is None:
                    kept.calibrators = [_calibrator(req.config) for _ in mine]
                for calibrator, value in zip(kept.calibrators, mine):
                    calibrator.update(req.step, value)
        if part < cache.parts - 1:
            continue  # the step ends at the last gated part
        n = req.stats.num_inference_steps
        if n is not None and req.local_step + 1 >= n:
            branch.drop()
        if not g.decision.cache:
            gated.state.enforce_cap(req)
    return tuple(outs)
