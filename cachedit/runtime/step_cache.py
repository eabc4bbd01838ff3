"""Per-compiled-model step-cache state: requests -> CFG branches -> buffers, counters and stats.

Note [Requests and branches]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A request is one generation. Its calls come from one thread (or one explicit ``cachedit.request``
context), so the state of the request being detected lives in a thread-local: two requests served
concurrently from two threads never see each other's buffers.

Without an explicit request, boundaries are read from the timestep input. Within a request the
timestep moves monotonically (down for most pipelines, up for those that pass ``1 - t``); a call that
repeats the previous timestep is the second call of a separate-CFG pair (branch 1, same step); a call
that breaks the direction, repeats a timestep a third time, or comes after ``num_inference_steps``
steps starts a new request, which starts from nothing (no off-by-one against the previous one).

The one host synchronisation per step: the timestep and the residual-diff sums of every branch the
call could belong to are read together with one ``tolist()``; the branch is resolved afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

from cachedit import kernels  # noqa: F401  (registers torch.ops.cachedit.*)
from cachedit.config import CacheditConfig, CfgMode
from cachedit.runtime import policy

MAX_RECORDS = 256  # request records kept per compiled graph for ``cachedit.stats``
_request_ids = itertools.count()


@dataclasses.dataclass
class BranchStats:
    computed_steps: list[int] = dataclasses.field(default_factory=list)
    cached_steps: list[int] = dataclasses.field(default_factory=list)
    diffs: dict[int, float] = dataclasses.field(default_factory=dict)
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RequestStats:
    """One request as ``cachedit.stats`` reports it. Branch names: ``main``, or ``cond``/``uncond``."""

    id: int
    source: str  # "explicit" (cachedit.request / enable) or "timestep" (detected)
    num_inference_steps: int | None
    steps: int = 0
    branch_list: list[BranchStats] = dataclasses.field(default_factory=list)

    @property
    def branches(self) -> dict[str, BranchStats]:
        names = ["main"] if len(self.branch_list) == 1 else ["cond", "uncond"]
        return dict(zip(names, self.branch_list))

    @property
    def cached_steps(self) -> int:
        return sum(len(b.cached_steps) for b in self.branch_list)

    @property
    def computed_steps(self) -> int:
        return sum(len(b.computed_steps) for b in self.branch_list)


@dataclasses.dataclass
class _Branch:
    history: policy.BranchHistory = dataclasses.field(default_factory=policy.BranchHistory)
    stats: BranchStats = dataclasses.field(default_factory=BranchStats)
    prev_residual: torch.Tensor | None = None  # head residual of the last computed step
    residuals: tuple[torch.Tensor, ...] | None = None  # middle residual per carried tensor
    layouts: tuple = ()  # (size, stride) of each middle output, which the compiled tail expects


@dataclasses.dataclass
class _Request:
    stats: RequestStats
    branches: list[_Branch] = dataclasses.field(default_factory=list)
    step: int = -1
    calls_at_step: int = 0
    last_t: float | None = None
    direction: int = 0  # +1 / -1 once two steps were seen

    def branch(self, index: int) -> _Branch:
        while len(self.branches) <= index:
            self.branches.append(_Branch())
            self.stats.branch_list.append(self.branches[-1].stats)
        return self.branches[index]


@dataclasses.dataclass(eq=False)
class RequestToken:
    """An explicit request opened by ``cachedit.request``; applies to the caches of one model."""

    owner: frozenset[int]  # ids of the model's parameters
    num_inference_steps: int | None
    id: int = dataclasses.field(default_factory=lambda: next(_request_ids))
    users: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)  # caches holding its state


_ACTIVE: contextvars.ContextVar[RequestToken | None] = contextvars.ContextVar("cachedit_request", default=None)


@contextlib.contextmanager
def open_request(owner: frozenset[int], num_inference_steps: int | None) -> Iterator[RequestToken]:
    token = RequestToken(owner, num_inference_steps)
    reset = _ACTIVE.set(token)
    try:
        yield token
    finally:
        _ACTIVE.reset(reset)
        for cache in list(token.users):
            cache.close(token)


@dataclasses.dataclass(eq=False)
class _Owner:
    """The state of one model instance. Dynamo shares one graph between instances of a class
    (parameters are graph inputs), so a compiled graph can serve several models: each keeps its own."""

    records: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=MAX_RECORDS))
    local: threading.local = dataclasses.field(default_factory=threading.local)  # the detected request
    explicit: dict[int, _Request] = dataclasses.field(default_factory=dict)  # token id -> request


class StepCache:
    """All step-cache state of one compiled graph, per model instance. Owned by the top module.

    ``on_new_owner(param)`` is called the first time a model instance (named by one of its
    parameters, which the gate receives as an input) runs through the graph.
    """

    def __init__(self, config: CacheditConfig, on_new_owner: Callable[[torch.Tensor], None] | None = None):
        self.config = config
        self.on_new_owner = on_new_owner
        self._owners: dict[int, _Owner] = {}
        self._lock = threading.Lock()
        self.reduce_sums = None  # set under context parallelism: sums a tensor over every rank

    # -- requests -------------------------------------------------------------------------------

    def _owner(self, param: torch.Tensor) -> tuple[int, _Owner]:
        key = id(param)
        owner = self._owners.get(key)
        if owner is None:
            with self._lock:  # two threads may bring a new model instance at once: one creates its state
                owner = self._owners.get(key)
                created = owner is None
                if created:
                    owner = self._owners[key] = _Owner()
            if created:
                weakref.finalize(param, self._owners.pop, key, None)
                if self.on_new_owner is not None:
                    self.on_new_owner(param)
        return key, owner

    def records_for(self, param_ids) -> list[RequestStats]:
        """Request records of the model instances among ``param_ids`` (all when None), oldest first."""
        owners = [o for k, o in list(self._owners.items()) if param_ids is None or k in param_ids]
        return sorted((r for o in owners for r in list(o.records)), key=lambda r: r.id)

    @property
    def records(self) -> list[RequestStats]:
        return self.records_for(None)

    def _new_request(self, owner: _Owner, source: str, num_steps: int | None) -> _Request:
        stats = RequestStats(id=next(_request_ids), source=source, num_inference_steps=num_steps)
        with self._lock:
            owner.records.append(stats)
        return _Request(stats)

    def close(self, token: RequestToken) -> None:
        """Drop the buffers of an explicit request (its stats stay)."""
        for owner in list(self._owners.values()):
            owner.explicit.pop(token.id, None)

    def _current(self, key: int, owner: _Owner) -> tuple[_Request | None, RequestToken | None]:
        token = _ACTIVE.get()
        if token is not None and key in token.owner:
            return owner.explicit.get(token.id), token
        return getattr(owner.local, "request", None), None

    def _is_pair(self, req: _Request, t: float | None) -> bool:
        """Is this call the second call (uncond branch) of the step ``req`` is at?"""
        if self.config.cfg is CfgMode.BATCHED or req.calls_at_step != 1:
            return False
        if t is not None and req.last_t is not None:
            return t == req.last_t
        return self.config.cfg is CfgMode.SEPARATE  # no timestep: alternate by call parity

    def _starts_new(self, req: _Request | None, t: float | None) -> bool:
        if req is None:
            return True
        if self._is_pair(req, t):
            return False
        n = req.stats.num_inference_steps
        if n is not None and req.step + 1 >= n:
            return True
        if t is None or req.last_t is None:
            return False
        if t == req.last_t:
            return True  # a timestep repeated where no CFG pair is possible
        direction = 1 if t > req.last_t else -1
        return req.direction != 0 and direction != req.direction

    # -- the gate ---------------------------------------------------------------------------------

    def gate(
        self, residual: torch.Tensor, timestep: torch.Tensor | None, param: torch.Tensor
    ) -> tuple[policy.Decision, _Branch]:
        """Place this call in its request, step and branch, and decide compute or cache."""
        key, owner = self._owner(param)
        req, token = self._current(key, owner)
        read_t = timestep is not None and (token is None or self.config.cfg is not CfgMode.BATCHED)
        t, sums = self._read(req, residual, timestep if read_t else None)
        if token is not None:
            if req is None:
                req = owner.explicit[token.id] = self._new_request(owner, "explicit", token.num_inference_steps)
                token.users.add(self)
        elif self._starts_new(req, t):
            req = owner.local.request = self._new_request(owner, "timestep" if t is not None else "call", None)
        branch = self._advance(req, t)

        if token is None and timestep is None:
            # Caching across a boundary we cannot see could mix two requests: compute.
            decision = policy.Decision(policy.Action.COMPUTE, policy.Reason.UNKNOWN_REQUEST, req.step)
        else:
            diff = None
            if id(branch) in sums:
                num, den = sums[id(branch)]
                diff = num / den if den > 0 else float("inf")  # 0/0 is NaN in cache-dit: never similar
            elif policy.needs_diff(self.config, branch.history, req.step):
                diff = float("inf")  # the residual's shape changed since the last computed step
            decision = policy.decide(self.config, branch.history, req.step, diff)
        policy.record(branch.history, decision)
        stats = branch.stats
        (stats.cached_steps if decision.cache else stats.computed_steps).append(req.step)
        stats.reasons[req.step] = decision.describe()
        if decision.diff is not None:
            stats.diffs[req.step] = decision.diff
        if not decision.cache:
            branch.prev_residual = residual
        return decision, branch

    def _read(
        self, req: _Request | None, residual: torch.Tensor, timestep: torch.Tensor | None
    ) -> tuple[float | None, dict[int, tuple[float, float]]]:
        """Read the timestep and the diff sums of every branch this call may belong to, in one go.

        Returns the timestep (None when not read) and ``id(branch) -> (sum|prev - cur|, sum|prev|)``.
        """
        candidates: list[tuple[_Branch, int]] = []  # (branch, the step it would be at)
        if req is not None and req.step >= 0:
            candidates.append((req.branch(0), req.step + 1))
            if self.config.cfg is not CfgMode.BATCHED and req.calls_at_step == 1 and len(req.branches) > 1:
                candidates.append((req.branches[1], req.step))
        reads = [timestep.reshape(-1)[:1].float()] if timestep is not None else []
        diffs_for = []
        for branch, step in candidates:
            prev = branch.prev_residual
            if prev is not None and prev.shape == residual.shape and policy.needs_diff(self.config, branch.history, step):
                reads.append(torch.ops.cachedit.residual_diff(prev, residual))
                diffs_for.append(branch)
        if diffs_for and self.reduce_sums is not None:  # context parallel: decide on the sums over all ranks
            k = 1 if timestep is not None else 0
            reads[k:] = [self.reduce_sums(torch.cat(reads[k:]))]
        # The one host synchronisation of this step.
        values = torch.cat([r.to(residual.device) for r in reads]).tolist() if reads else []
        t = values.pop(0) if timestep is not None else None
        return t, {id(b): (values[2 * i], values[2 * i + 1]) for i, b in enumerate(diffs_for)}

    def _advance(self, req: _Request, t: float | None) -> _Branch:
        """Move ``req`` to this call: the second call of a CFG pair, or the next step."""
        if req.step >= 0 and self._is_pair(req, t):
            index, req.calls_at_step = 1, 2
        else:
            if req.last_t is not None and t is not None and t != req.last_t:
                req.direction = 1 if t > req.last_t else -1
            req.step += 1
            req.stats.steps = req.step + 1
            index, req.calls_at_step = 0, 1
        req.last_t = t
        return req.branch(index)

    # -- the reuse node -------------------------------------------------------------------------

    def reuse(self, gated, middle, residual_of: tuple[int, ...], inputs) -> tuple[torch.Tensor, ...]:
        decision, branch = gated
        if decision.cache:
            assert branch.residuals is not None, "a cached step needs residuals from a computed step"
            # The tail was compiled for the middle's output layout (Inductor asserts sizes and strides);
            # a stream entering the middle can be a strided slice, so add into that layout.
            return tuple(
                torch.add(inputs[j], r, out=torch.empty_strided(size, stride, dtype=r.dtype, device=r.device))
                for j, r, (size, stride) in zip(residual_of, branch.residuals, branch.layouts)
            )
        outs = middle(*inputs)
        k = len(residual_of)
        branch.residuals = tuple(outs[k:])
        branch.layouts = tuple((o.shape, o.stride()) for o in outs[:k])
        return tuple(outs[:k])


class Gate(torch.nn.Module):
    """The ``cachedit_gate`` node: decides compute or cache for this call."""

    def __init__(self, cache: StepCache):
        super().__init__()
        self.cache = cache

    def forward(self, residual: torch.Tensor, timestep: torch.Tensor | None, param: torch.Tensor):
        return self.cache.gate(residual, timestep, param)


class Reuse(torch.nn.Module):
    """The ``cachedit_reuse`` node: runs the middle, or rebuilds its outputs from cached residuals."""

    def __init__(self, cache: StepCache, residual_of: tuple[int, ...]):
        super().__init__()
        self.cache = cache
        self.residual_of = residual_of

    def forward(self, gated, middle, *inputs):
        return self.cache.reuse(gated, middle, self.residual_of, inputs)
