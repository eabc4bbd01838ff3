"""Step-cache state: models -> requests -> CFG branches -> buffers, history, settings and stats.

Note [Requests and branches]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A request is one generation. Its state (branches, buffers, history, settings) belongs to the request,
not to a compiled graph: Dynamo may compile one frame twice (two threads making their first call at
once, a new guard, a new resolution), and every graph of the same model instance and the same split
must serve the same request. So each graph's ``StepCache`` finds one ``ModelState`` per model instance
and split (``registry.shared``); the graphs own it, and it dies with the last of them or with the model.

Where a call's request is found:
  - explicit (``cachedit.request`` / ``cachedit.enable``): by its token, a ContextVar the user's context
    carries (threads, asyncio tasks and ``asyncio.to_thread`` workers see the token of their context).
    It ends when the context exits, and its buffers go with it.
  - detected: by the execution context, the running asyncio task, else the thread. (A ContextVar is not
    enough here: a task inherits its parent's context, so two tasks spawned by one would share it.)

Boundaries of a detected request, checked in this order on each call:
  1. Another call of the current step: the latent input is the very tensor of the previous call (same
     object, same version). It is the next branch of that step: cond, uncond, then any further call
     (triple guidance) with a branch of its own. This is a host-side check, no extra device read.
  2. A new request when: the input shape changed (a new resolution); ``num_inference_steps`` steps are
     done (when known); the conditioning input (the largest other input, e.g. the text embedding, which
     pipelines make once per generation) is none of the request's; or the timestep breaks the direction
     the request moves in. A timestep equal to the last one on a new latent (bf16 rounding at many
     steps, Heun's repeated timesteps) is a new step when the conditioning matches or the request has a
     direction, and a new request otherwise (a one-call request, a 1-step model without conditioning).
  3. Otherwise the next step. Without a latent signal (no such input), the old rule applies: a repeated
     timestep right after a step's first call is its uncond call.
A request left behind (cancelled, a client gone) is superseded by the next request of its context,
dropped when idle for ``request_idle_seconds``, or dropped with its thread or task. Without a timestep
input and outside an explicit request, boundaries cannot be seen and every step computes.

The one host synchronisation per step: the timestep and the residual-diff sums of every branch the
call could belong to are read together with one ``tolist()``; the branch is resolved afterwards.

Note [Forced refresh]
~~~~~~~~~~~~~~~~~~~~~
``force_refresh_step_hint = h`` restarts a request's cache state at step ``h`` (``force_refresh_step_policy
= "repeat"``: at every multiple of ``h``), for pipelines whose transformer calls are not one denoising
schedule: a first call that encodes a reference image before denoising starts (hint 1), or several
denoising loops in one generation (hint = steps per loop, repeat). At that step every branch drops its
buffers and history, and warmup, masks, limits, the budget and ``num_inference_steps`` count from it
again, as in cache-dit 1.5.3; the request's stats keep counting steps from its start. cache-dit counts
the hint in transformer calls, we count steps (a step's CFG calls are one step): with separate CFG its
hint is twice ours.

Note [Timestep from the caller]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
When a graph break puts the block chain in a graph of its own after the code that reads the timestep
(Lumina2, OmniGen, QwenImage 2.1), that graph has no timestep input, and without one a detected request
cannot see where one generation ends. But the model's ``forward`` frame, which runs the graph, still holds
the timestep it was called with: the gate looks for that frame on the call stack (the ``forward`` whose
``self`` owns the graph's parameters; its code is remembered after the first find) and reads its local
``timestep`` (or ``timesteps``, ``t``, ``sigma``, ``sigmas``), if that is still a 0-d or 1-d tensor or a
number (``timestep_local``), as the per-block path does (``runtime/per_block.py``); a forward that takes
a timestep it never uses (DreamLite) gets it read the same way. When the graph resumes the forward after a
graph break, its other inputs are the previous graph's outputs, new tensors on every call, so they are not
used as the latent and conditioning signals: the timestep rules alone place the call (a new request when
the timestep breaks its direction, or after ``num_inference_steps``). A forward that rebinds the name to an
embedding, or holds none, leaves the old rule: caching inside explicit requests only. Frames are per thread, so concurrent
requests read their own.

Memory: a request's buffers are the head residual of its last computed step and the middle residuals,
per branch. A branch frees them after the last of ``num_inference_steps`` steps. With
``max_residual_bytes`` set, the oldest detected requests of a model lose their buffers (and compute
from then on) when a new residual would exceed it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from cachedit import kernels  # noqa: F401  (registers torch.ops.cachedit.*)
from cachedit.config import CachePolicy, Calibrator, CacheditConfig, CfgMode, RefreshPolicy
from cachedit.runtime import calibrators, policy, registry, rows

log = logging.getLogger("cachedit")

MAX_RECORDS = 256  # request records kept per model instance for ``cachedit.stats``
_MAX_FRAMES = 64  # how far up the call stack the model's forward is looked for
_request_ids = itertools.count()


@dataclasses.dataclass
class BranchStats:
    """One branch of one request: lists of step indices, and per step the diff and the decision."""

    computed_steps: list[int] = dataclasses.field(default_factory=list)
    cached_steps: list[int] = dataclasses.field(default_factory=list)
    diffs: dict[int, float] = dataclasses.field(default_factory=dict)
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)
    # policy="dbprune": per step, the chain positions of the pruned blocks and each decided block's diff
    pruned_blocks: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    block_diffs: dict[int, dict[int, float]] = dataclasses.field(default_factory=dict)
    # block_lists="separate": the decisions of each later block list, by its path (this one's are the first list's)
    lists: dict[str, "BranchStats"] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RequestStats:
    """One request as ``cachedit.stats`` reports it. Branch names: ``main``, or ``cond``/``uncond`` (and
    ``branch2``... for further calls per step)."""

    id: int
    source: str  # "explicit" (cachedit.request / enable), "timestep" (detected) or "call" (no timestep)
    num_inference_steps: int | None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # the request's own settings
    steps: int = 0
    branch_list: list[BranchStats] = dataclasses.field(default_factory=list)
    live: weakref.ref | None = dataclasses.field(default=None, repr=False, compare=False)  # the request's state

    @property
    def bytes_held(self) -> int:
        """Bytes of residual buffers this request holds now; 0 once it ended."""
        request = self.live() if self.live is not None else None
        return sum(b.nbytes() for b in request.branches) if request is not None else 0

    @property
    def branches(self) -> dict[str, BranchStats]:
        names = ["main"] if len(self.branch_list) == 1 else ["cond", "uncond"]
        names += [f"branch{i}" for i in range(len(names), len(self.branch_list))]
        return dict(zip(names, self.branch_list))

    @property
    def num_cached_steps(self) -> int:
        """Cached calls over all branches (a count; ``BranchStats.cached_steps`` lists the steps)."""
        return sum(len(b.cached_steps) for b in self.branch_list)

    @property
    def num_computed_steps(self) -> int:
        """Computed calls over all branches (a count; ``BranchStats.computed_steps`` lists the steps)."""
        return sum(len(b.computed_steps) for b in self.branch_list)


@dataclasses.dataclass(eq=False)
class _Kept:
    """What one gated part (the middle, or one middle block under a DBPrune split) keeps for a branch."""

    residuals: tuple[torch.Tensor, ...] | None = None  # its residual per output
    layouts: tuple = ()  # (size, stride) of each output, which the next compiled part expects
    calibrators: list | None = None  # per output, when a calibrator forecasts the residuals
    block_input: torch.Tensor | None = None  # dbprune: its primary input at its last computed step

    def nbytes(self) -> int:
        tensors = [*(self.residuals or ()), *([self.block_input] if self.block_input is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(c.nbytes() for c in self.calibrators or ())


@dataclasses.dataclass(eq=False)
class _Branch:
    history: policy.BranchHistory = dataclasses.field(default_factory=policy.BranchHistory)
    stats: BranchStats = dataclasses.field(default_factory=BranchStats)
    prev_residual: torch.Tensor | None = None  # head residual of the last computed step
    kept: list[_Kept] = dataclasses.field(default_factory=list)  # per gated part
    pruned_now: list[int] = dataclasses.field(default_factory=list)  # dbprune: blocks pruned in this step
    lists: dict[str, "_Branch"] = dataclasses.field(default_factory=dict)  # later block lists' own state

    def list_branch(self, path: str) -> "_Branch":
        """The state of block list ``path`` in this branch (block_lists="separate", Note [Block lists])."""
        found = self.lists.get(path)
        if found is None:
            found = self.lists[path] = _Branch()
            self.stats.lists[path] = found.stats
        return found

    def part(self, k: int) -> _Kept:
        while len(self.kept) <= k:
            self.kept.append(_Kept())
        return self.kept[k]

    def nbytes(self) -> int:
        head = self.prev_residual.numel() * self.prev_residual.element_size() if self.prev_residual is not None else 0
        return head + sum(k.nbytes() for k in list(self.kept)) + sum(b.nbytes() for b in list(self.lists.values()))

    def drop(self, lists: bool = True) -> None:
        """Forget the buffers: the next step computes (``NO_PREVIOUS``). ``lists=False`` keeps the later block
        lists' (their gates still decide this step, and drop their own)."""
        self.prev_residual, self.kept = None, []
        self.history.has_previous = False
        for other in list(self.lists.values()) if lists else ():
            other.drop()


@dataclasses.dataclass(eq=False)
class _Request:
    stats: RequestStats
    config: CacheditConfig  # the compile defaults with this request's settings
    plan: policy.Plan  # what its step count fixes: warmup, steps mask, budget
    branches: list[_Branch] = dataclasses.field(default_factory=list)
    step: int = -1
    origin: int = 0  # the step the cache state last (re)started at (Note [Forced refresh])
    calls_at_step: int = 0
    last_t: float | None = None
    direction: int = 0  # +1 / -1 once two distinct timesteps were seen
    latent: weakref.ref | None = None  # the latent input of the last call, and its version then
    latent_version: int = -1
    conditionings: list[weakref.ref] = dataclasses.field(default_factory=list)
    list_plans: dict[str, tuple[CacheditConfig, policy.Plan]] = dataclasses.field(default_factory=dict)
    shape: tuple[int, ...] | None = None  # the head residual's shape (a new resolution is a new request)
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    def branch(self, index: int) -> _Branch:
        while len(self.branches) <= index:
            self.branches.append(_Branch())
            self.stats.branch_list.append(self.branches[-1].stats)
        return self.branches[index]

    @property
    def local_step(self) -> int:
        """The step as the policy counts it: from the last forced refresh."""
        return self.step - self.origin

    def refresh(self) -> None:
        """Restart the cache state at this step (Note [Forced refresh]); the stats keep counting."""
        for branch in self.branches:
            branch.drop()
            for b in (branch, *branch.lists.values()):
                b.history = policy.BranchHistory()
        self.origin = self.step

    def same_latent(self, latent: torch.Tensor | None) -> bool:
        return latent is not None and self.latent is not None and self.latent() is latent and (
            latent._version == self.latent_version
        )

    def knows(self, conditioning: torch.Tensor) -> bool:
        return any(ref() is conditioning for ref in self.conditionings)

    def end(self) -> None:
        for branch in self.branches:
            branch.drop()


@dataclasses.dataclass(eq=False)
class RequestToken:
    """An explicit request opened by ``cachedit.request``; applies to the caches of one model."""

    owner: frozenset[int]  # ids of the model's parameters
    num_inference_steps: int | None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # checked by config.request_settings
    id: int = dataclasses.field(default_factory=lambda: next(_request_ids))
    users: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)  # ModelStates holding its state


_ACTIVE: contextvars.ContextVar[RequestToken | None] = contextvars.ContextVar("cachedit_request", default=None)


@contextlib.contextmanager
def open_request(
    owner: frozenset[int], num_inference_steps: int | None, settings: Mapping[str, Any] | None = None
) -> Iterator[RequestToken]:
    token = RequestToken(owner, num_inference_steps, dict(settings or {}))
    reset = _ACTIVE.set(token)
    try:
        yield token
    finally:
        _ACTIVE.reset(reset)
        for state in list(token.users):
            state.close(token)


def _calibrator(config: CacheditConfig):
    """A fresh calibrator for one carried stream of one branch (Note [Calibrators])."""
    name = config.calibrator.value
    params = {
        "taylorseer": {"order": config.taylorseer_order},
        "dmd": {"history": config.dmd_history, "order": config.taylorseer_order},  # order: its fallback's
    }.get(name, {})
    return calibrators.make_calibrator(name, **params)


def _borrowed_diff(req: _Request, branch: _Branch, step: int) -> float | None:
    """With ``cfg_diff_compute_separate=False``, a further call of a step (uncond, ...) decides on the diff
    its first call recorded at that step, as cache-dit does; None when it computes its own."""
    if req.config.cfg_diff_compute_separate or not req.branches or branch is req.branches[0]:
        return None
    return req.branches[0].stats.diffs.get(step)


TIMESTEP_LOCALS = ("timestep", "timesteps", "t", "sigma", "sigmas")


def timestep_local(f_locals: Mapping[str, Any]) -> tuple[str, torch.Tensor] | None:
    """The timestep a model's forward holds in its locals, as ``(name, tensor)``; None when it holds none a
    request rule can trust. Only a 0-d or 1-d real tensor (one value per sample) or a number counts: a
    forward that rebinds the name to its embedding (HiDream: ``timesteps = self.t_embedder(timesteps)``) has
    lost the value."""
    for name in TIMESTEP_LOCALS:
        value = f_locals.get(name)
        if isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() > 0 and not value.is_complex():
            return name, value.detach()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name, torch.tensor([float(value)])
    return None


def _refreshes_at(config: CacheditConfig, step: int) -> bool:
    """Whether ``force_refresh_step_hint`` restarts the cache state at ``step`` (Note [Forced refresh])."""
    hint = config.force_refresh_step_hint
    if hint <= 0 or step <= 0:
        return False
    return step == hint or (config.force_refresh_step_policy is RefreshPolicy.REPEAT and step % hint == 0)


def _execution_context() -> object:
    """What a detected request is keyed by: the running asyncio task, else the current thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return task if task is not None else threading.current_thread()


class ModelState:
    """The requests of one model instance under one split, shared by every graph compiled for it."""

    def __init__(self, param: torch.Tensor, config: CacheditConfig):
        self.param = weakref.ref(param)
        self.config = config  # the first graph's; a later graph of the same split has the same defaults
        self.records: collections.deque[RequestStats] = collections.deque(maxlen=MAX_RECORDS)
        self.explicit: dict[int, _Request] = {}  # token id -> request
        self.detected: weakref.WeakKeyDictionary[object, _Request] = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()
        self._next_sweep = 0.0
        self._capped = False  # the byte cap was logged

    def new_request(self, source: str, config: CacheditConfig, num_steps: int | None, settings) -> _Request:
        schedule = policy.plan(config, num_steps)  # raises when a setting needs an unknown step count
        stats = RequestStats(next(_request_ids), source, num_steps, dict(settings))
        request = _Request(stats, config, schedule)
        stats.live = weakref.ref(request)
        with self.lock:
            self.records.append(stats)
        return request

    def set_detected(self, context: object, request: _Request) -> None:
        with self.lock:
            old = self.detected.get(context)
            self.detected[context] = request
        if old is not None:
            old.end()  # superseded

    def close(self, token: RequestToken) -> None:
        """End an explicit request: drop its buffers (its stats stay)."""
        with self.lock:
            request = self.explicit.pop(token.id, None)
        if request is not None:
            request.end()

    def sweep(self, now: float | None = None) -> None:
        """Drop detected requests idle for longer than ``request_idle_seconds``."""
        now = time.monotonic() if now is None else now
        idle = self.config.request_idle_seconds
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(idle / 4, 1.0)
        with self.lock:
            stale = [(c, r) for c, r in self.detected.items() if now - r.last_used > idle]
            for context, _ in stale:
                del self.detected[context]
        for _, request in stale:
            request.end()

    def requests(self) -> list[_Request]:
        with self.lock:
            return list(self.explicit.values()) + list(self.detected.values())

    def bytes_held(self) -> int:
        return sum(r.stats.bytes_held for r in self.requests())

    def enforce_cap(self, keep: _Request) -> None:
        """Drop the buffers of the oldest detected requests while the model holds more than the cap."""
        cap = self.config.max_residual_bytes
        if cap < 0:
            return
        total = self.bytes_held()
        if total <= cap:
            return
        with self.lock:
            victims = sorted((r for r in self.detected.values() if r is not keep), key=lambda r: r.stats.id)
        for request in victims:
            if total <= cap:
                break
            total -= request.stats.bytes_held
            request.end()
        if not self._capped:
            self._capped = True
            log.warning(
                f"cachedit: residual buffers reached max_residual_bytes={cap}; the oldest detected requests "
                "lose their buffers and compute every step (logged once per model)"
            )


class StepCache:
    """The step-cache logic of one compiled graph; the state lives in ``ModelState`` objects.

    ``split`` names the split (Fn, Bn, chain): graphs with the same split share a model's state.
    ``on_new_owner(param)`` is called the first time a model instance (named by one of its
    parameters, which the gate receives as an input) runs through this graph.
    """

    def __init__(
        self,
        config: CacheditConfig,
        split: Any = None,
        on_new_owner: Callable[[torch.Tensor], None] | None = None,
    ):
        self.config = config
        self.split = split
        self.on_new_owner = on_new_owner
        # This graph keeps the states of the models it served alive, keyed by the identity of the
        # model's parameter; a parameter's death queues its key (callbacks may run inside the lock).
        self._states: dict[int, tuple[weakref.ref, ModelState]] = {}
        self._dead: list[int] = []
        self._lock = threading.Lock()
        self.reduce_sums = None  # set under context parallelism: sums a tensor over every rank
        self.parts = 1  # gated parts per call: 1, or one per middle block (DBPrune split)
        self.dbprune_split = False  # one gated part per middle block (Note [DBPrune split]): dbprune works
        self.has_later_lists = False  # block_lists="separate" found lists after the first (Note [Block lists])
        # Note [Timestep from the caller]: set when the graph has no timestep input
        self.timestep_from_caller = False
        self.resumed = False  # this graph starts after a graph break: its inputs are the previous graph's outputs
        self.caller_code = None  # the code of the model's forward that calls this graph, once found
        self.timestep_source: str | None = None
        self.copy_inputs = False  # dbprune keeps block inputs past the step: copy them out of CUDA graph pools

    # -- state ------------------------------------------------------------------------------------

    def state(self, param: torch.Tensor) -> ModelState:
        entry = self._states.get(id(param))
        if entry is not None and entry[0]() is param:
            return entry[1]
        with self._lock:  # two threads may bring a new model instance at once: one state results
            self._purge()
            entry = self._states.get(id(param))
            created = entry is None or entry[0]() is not param
            if created:
                state = registry.shared(param, self.split, lambda: ModelState(param, self.config))
                ref = weakref.ref(param, lambda _r, key=id(param), dead=self._dead: dead.append(key))
                entry = self._states[id(param)] = (ref, state)
        if created and self.on_new_owner is not None:
            self.on_new_owner(param)
        return entry[1]

    def _purge(self) -> None:
        """Forget the states of dead model instances (called under ``_lock``)."""
        while self._dead:
            key = self._dead.pop()
            entry = self._states.get(key)
            if entry is not None and entry[0]() is None:
                del self._states[key]

    def states_for(self, param_ids) -> list[ModelState]:
        """The states of the model instances among ``param_ids`` (all when None)."""
        with self._lock:
            self._purge()
            items = list(self._states.items())
        return [state for key, (_, state) in items if param_ids is None or key in param_ids]

    def records_for(self, param_ids) -> list[RequestStats]:
        """Request records of the model instances among ``param_ids`` (all when None), oldest first."""
        records = []
        for state in self.states_for(param_ids):
            state.sweep()
            with state.lock:
                records += list(state.records)
        return sorted(records, key=lambda r: r.id)

    @property
    def records(self) -> list[RequestStats]:
        return self.records_for(None)

    # -- the gate ---------------------------------------------------------------------------------

    def gate(
        self,
        residual: torch.Tensor,
        timestep: torch.Tensor | None,
        param: torch.Tensor,
        latent: torch.Tensor | None = None,
        conditioning: torch.Tensor | None = None,
    ) -> tuple:
        """Place this call in its request, step and branch, and decide compute or cache.

        Returns what the reuse node needs: ``(decision, branch, request, state, cached residuals)``.
        """
        tagged = rows.active(param)  # rows of several requests in one batch (runtime/rows.py)
        if tagged is not None:
            if self.has_later_lists:
                _PLACED.set(None)
            return rows.gate(self, tagged, residual, timestep, param, latent, conditioning)
        gated = self._gate(residual, timestep, param, latent, conditioning)
        if self.has_later_lists:  # for the gates of later block lists in this call (Note [Block lists])
            _PLACED.set((self, *gated[:4]))  # not the cached residuals: the context outlives the request
        return gated

    def gate_alone(self, residual, timestep, param) -> tuple:
        """``gate`` for a call of one request whatever the row tagging (the per-block path's)."""
        return self._gate(residual, timestep, param, None, None)

    def _gate(self, residual, timestep, param, latent, conditioning) -> tuple:
        if timestep is None and self.timestep_from_caller:
            timestep = self._caller_timestep(param)
            if self.resumed:  # inputs made by the graph before this one, new on every call: no request signal
                latent = conditioning = None
        state = self.state(param)
        now = time.monotonic()
        state.sweep(now)
        token = _ACTIVE.get()
        if token is not None and id(param) not in token.owner:
            token = None  # a request opened for another model
        context = None if token is not None else _execution_context()
        with state.lock:
            req = state.explicit.get(token.id) if token is not None else state.detected.get(context)
        config = req.config if req is not None else self.config.for_request(token.settings if token else {})
        same_step = req is not None and req.step >= 0 and config.cfg is not CfgMode.BATCHED and req.same_latent(latent)
        # An explicit request needs the timestep only to pair CFG calls without a latent signal: with one, a
        # step that needs no diff (a mask's static step, warmup) reads nothing from the device.
        read_t = timestep is not None and (token is None or (config.cfg is not CfgMode.BATCHED and latent is None))
        t, sums = self._read(req, config, residual, timestep if read_t else None, latent, same_step)

        if token is not None:
            if req is None:
                req = state.new_request("explicit", config, token.num_inference_steps, token.settings)
                self._check_split(config)
                with state.lock:
                    state.explicit[token.id] = req
                token.users.add(state)
        elif self._starts_new(req, t, residual, latent, conditioning, same_step):
            source = "timestep" if t is not None else "call"
            steps = self.config.num_inference_steps or None
            req = state.new_request(source, self.config, steps, {})  # this graph's defaults, not the last request's
            self._check_split(self.config)
            state.set_detected(context, req)
        req.last_used = now
        if req.shape is not None and req.shape != tuple(residual.shape):
            for branch in req.branches:  # a new resolution inside an explicit request: nothing to reuse
                branch.drop()
        req.shape = tuple(residual.shape)
        branch = self._advance(req, t, latent, conditioning, same_step)
        if req.calls_at_step == 1 and _refreshes_at(req.config, req.step):
            req.refresh()

        if token is None and timestep is None:
            # Caching across a boundary we cannot see could mix two requests: compute.
            decision = policy.Decision(policy.Action.COMPUTE, policy.Reason.UNKNOWN_REQUEST, req.step)
            self.decided(req, branch, decision, residual)
            return decision, branch, req, state, None
        if req.config.policy is CachePolicy.DBPRUNE:
            branch.pruned_now = []  # each block decides in its reuse node; the last one records the step
            return policy.Decision(policy.Action.COMPUTE, policy.Reason.PER_BLOCK, req.local_step), branch, req, state, None
        decision, cached = self.decide(req, branch, sums.get(id(branch)), residual)
        return decision, branch, req, state, cached

    def decide(self, req: _Request, branch: _Branch, sums: tuple[float, float] | None, residual: torch.Tensor):
        """Decide ``branch``'s step from the diff sums read for it (None: not read) and record it.

        Returns the decision and, for a cached step, what each gated part adds (taken now: another thread
        may drop this request's buffers, by the byte cap or the idle sweep, before the reuse node runs).
        """
        diff = None
        borrowed = _borrowed_diff(req, branch, req.step)
        step = req.local_step
        if sums is not None:
            num, den = sums
            diff = num / den if den > 0 else float("inf")  # 0/0 is NaN in cache-dit: never similar
        elif borrowed is not None and policy.needs_diff(req.plan, branch.history, step):
            diff = borrowed
        elif policy.needs_diff(req.plan, branch.history, step):
            diff = float("inf")  # the residual's shape changed since the last computed step
        decision = policy.decide(req.plan, branch.history, step, diff)
        return decision, self.decided(req, branch, decision, residual)

    @staticmethod
    def decided(req: _Request, branch: _Branch, decision: policy.Decision, residual: torch.Tensor):
        """Record ``decision`` in ``branch``; return what a cached step adds per gated part (None: computes)."""
        policy.record(branch.history, decision)
        stats = branch.stats
        (stats.cached_steps if decision.cache else stats.computed_steps).append(req.step)
        stats.reasons[req.step] = decision.describe()
        if decision.diff is not None:
            stats.diffs[req.step] = decision.diff
        if not decision.cache:
            branch.prev_residual = residual
            return None
        return [_what_to_add(kept, req.step) for kept in branch.kept]

    def _caller_timestep(self, param: torch.Tensor) -> torch.Tensor | None:
        """Note [Timestep from the caller]: the timestep local of the model's ``forward`` frame that is
        running this graph, found on the call stack (the model is the module that owns ``param``)."""
        frame = sys._getframe(2)
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            code = frame.f_code
            if code is self.caller_code:
                found = timestep_local(frame.f_locals)
                return found[1] if found is not None else None
            if self.caller_code is None and code.co_name == "forward":
                owner = frame.f_locals.get("self")
                if (
                    isinstance(owner, torch.nn.Module)
                    and not type(owner).__module__.startswith("torch.")
                    and any(p is param for p in owner.parameters())
                ):
                    found = timestep_local(frame.f_locals)
                    if found is None:
                        return None
                    self.caller_code = code
                    self.timestep_source = f"the local {found[0]!r} of {type(owner).__name__}.forward, which runs this graph"
                    return found[1]
            frame = frame.f_back
        return None

    def _check_split(self, config: CacheditConfig) -> None:
        if config.policy is CachePolicy.DBPRUNE and not self.dbprune_split:
            raise ValueError(
                "policy='dbprune' decides per block, which needs the DBPrune split this model was not compiled "
                "with: compile it with options={'policy': 'dbprune'} (requests can then choose dbcache or dbprune)"
            )

    def _read(
        self,
        req: _Request | None,
        config: CacheditConfig,
        residual: torch.Tensor,
        timestep: torch.Tensor | None,
        latent: torch.Tensor | None,
        same_step: bool,
    ) -> tuple[float | None, dict[int, tuple[float, float]]]:
        """Read the timestep and the diff sums of every branch this call may belong to, in one go.

        Returns the timestep (None when not read) and ``id(branch) -> (sum|prev - cur|, sum|prev|)``.
        """
        candidates: list[tuple[_Branch, int]] = []  # (branch, the step it would be at)
        if req is not None and req.step >= 0 and config.policy is not CachePolicy.DBPRUNE:
            if same_step:
                candidates.append((req.branch(req.calls_at_step), req.step))
            else:
                candidates.append((req.branch(0), req.step + 1))
                pair_possible = latent is None and config.cfg is not CfgMode.BATCHED and req.calls_at_step == 1
                if pair_possible and len(req.branches) > 1:
                    candidates.append((req.branches[1], req.step))
        # (a step about to be refreshed reads a diff it will not use: at most once per refresh)
        reads = [timestep.reshape(-1)[:1].float()] if timestep is not None else []
        diffs_for = []
        for branch, step in candidates:
            prev = branch.prev_residual
            if _borrowed_diff(req, branch, step) is not None:
                continue  # a further CFG call reuses the first call's diff of this step
            local = step - req.origin
            if prev is not None and prev.shape == residual.shape and policy.needs_diff(req.plan, branch.history, local):
                reads.append(torch.ops.cachedit.residual_diff(prev, residual))
                diffs_for.append(branch)
        if diffs_for and self.reduce_sums is not None:  # context parallel: decide on the sums over all ranks
            k = 1 if timestep is not None else 0
            reads[k:] = [self.reduce_sums(torch.cat(reads[k:]))]
        # The one host synchronisation of this step.
        values = torch.cat([r.to(residual.device) for r in reads]).tolist() if reads else []
        t = values.pop(0) if timestep is not None else None
        return t, {id(b): (values[2 * i], values[2 * i + 1]) for i, b in enumerate(diffs_for)}

    @staticmethod
    def _is_pair(req: _Request, t: float | None, latent: torch.Tensor | None, same_step: bool) -> bool:
        """Is this call a further call (another branch) of the step ``req`` is at?"""
        if same_step:
            return True
        if latent is not None or req.config.cfg is CfgMode.BATCHED or req.calls_at_step != 1:
            return False  # with a latent signal, only the same latent makes a pair
        if t is not None and req.last_t is not None:
            return t == req.last_t
        return req.config.cfg is CfgMode.SEPARATE  # no timestep: alternate by call parity

    def _starts_new(self, req, t, residual, latent, conditioning, same_step) -> bool:
        """Does this call (outside an explicit request) start a new detected request? Note [Requests and branches]."""
        if req is None:
            return True
        if same_step or self._is_pair(req, t, latent, same_step):
            return False
        if req.shape != tuple(residual.shape):
            return True  # a new resolution
        n = req.stats.num_inference_steps
        if n is not None and req.local_step + 1 >= n:
            return True
        known = conditioning is not None and bool(req.conditionings)
        if known and not req.knows(conditioning):
            return True
        if t is None or req.last_t is None:
            return False
        if t == req.last_t:  # a repeat on a new latent: a new step if the conditioning or a direction says so
            return req.direction == 0 and not known
        direction = 1 if t > req.last_t else -1
        return req.direction != 0 and direction != req.direction

    def _advance(self, req: _Request, t, latent, conditioning, same_step) -> _Branch:
        """Move ``req`` to this call: a further call of the current step, or the next step."""
        if req.step >= 0 and self._is_pair(req, t, latent, same_step):
            index = req.calls_at_step
            req.calls_at_step += 1
        else:
            if req.last_t is not None and t is not None and t != req.last_t:
                req.direction = 1 if t > req.last_t else -1
            req.step += 1
            req.stats.steps = req.step + 1
            index, req.calls_at_step = 0, 1
        req.last_t = t
        if latent is not None:
            req.latent, req.latent_version = weakref.ref(latent), latent._version
        if conditioning is not None and not req.knows(conditioning):
            req.conditionings.append(weakref.ref(conditioning))
        return req.branch(index)

    # -- the reuse node -------------------------------------------------------------------------

    def reuse(self, gated, middle, k: int, segment, inputs) -> tuple[torch.Tensor, ...]:
        """Gated part ``k`` (``segment``): run it, or rebuild its outputs from what its residuals say."""
        if isinstance(gated, rows.Gated):  # a batch tagged with cachedit.rows (runtime/rows.py)
            return rows.reuse(self, gated, middle, k, segment, inputs)
        decision, branch, req, state, cached = gated
        if decision.reason is policy.Reason.PER_BLOCK:
            outs = self._prune(req, branch, middle, k, segment, inputs)
        elif decision.cache:
            residuals, layouts = cached[k]
            assert residuals is not None, "a cached step needs residuals from a computed step"
            outs = _add(inputs, segment.residual_of, residuals, layouts)
        else:
            outs = self._compute(req, branch.part(k), middle, segment, inputs)
        if k < self.parts - 1:
            return outs
        # The step's last gated part.
        if decision.reason is policy.Reason.PER_BLOCK:
            self._record_pruned(req, branch)
        n = req.stats.num_inference_steps
        if n is not None and req.local_step + 1 >= n:
            branch.drop(lists=False)  # this branch's last step: nothing will reuse its buffers
        if not decision.cache:
            state.enforce_cap(req)
        return outs

    def _compute(self, req: _Request, kept: _Kept, middle, segment, inputs) -> tuple[torch.Tensor, ...]:
        computed = middle(*inputs)
        outs = tuple(computed[: len(segment.residual_of)])
        kept.residuals = tuple(computed[len(segment.residual_of) :])
        kept.layouts = tuple((o.shape, o.stride()) for o in outs)
        config = req.config
        if config.calibrator is not Calibrator.NONE:
            if kept.calibrators is None:
                kept.calibrators = [_calibrator(config) for _ in kept.residuals]
            for calibrator, value in zip(kept.calibrators, kept.residuals):
                calibrator.update(req.step, value)
        return outs

    def _prune(self, req: _Request, branch: _Branch, middle, k: int, segment, inputs) -> tuple[torch.Tensor, ...]:
        """DBPrune: run this block, or add its residual of its last computed step (Note [DBPrune split])."""
        (block,) = segment.blocks
        kept, config, step = branch.part(k), req.config, req.local_step
        if block in config.non_prune_block_set:
            return tuple(middle(*inputs)[: len(segment.residual_of)])  # kept nothing, as in cache-dit
        x = inputs[segment.primary]
        prev = kept.block_input
        has_input = prev is not None and prev.shape == x.shape and kept.residuals is not None
        view = policy.block_history(branch.history, step, bool(branch.pruned_now), has_input)
        diff = None
        if policy.needs_block_diff(req.plan, view, step):
            sums = torch.ops.cachedit.residual_diff(prev, x)
            if self.reduce_sums is not None:
                sums = self.reduce_sums(sums)
            num, den = sums.tolist()  # a host read per decided block: the next block's input depends on it
            diff = num / den if den > 0 else float("inf")
            branch.stats.block_diffs.setdefault(req.step, {})[block] = diff
        if policy.decide_block(req.plan, view, step, diff).cache:
            branch.pruned_now.append(block)
            residuals, layouts = _what_to_add(kept, req.step)
            return _add(inputs, segment.residual_of, residuals, layouts)
        outs = self._compute(req, kept, middle, segment, inputs)
        kept.block_input = x.clone() if self.copy_inputs else x
        return outs

    @staticmethod
    def _record_pruned(req: _Request, branch: _Branch) -> None:
        """A dbprune step counts as cached when any block of it was pruned (cache-dit's count)."""
        pruned = branch.pruned_now
        action = policy.Action.CACHE if pruned else policy.Action.COMPUTE
        policy.record(branch.history, policy.Decision(action, policy.Reason.PER_BLOCK, req.local_step))
        stats = branch.stats
        (stats.cached_steps if pruned else stats.computed_steps).append(req.step)
        stats.pruned_blocks[req.step] = list(pruned)
        stats.reasons[req.step] = f"{action.value}: {len(pruned)} blocks pruned" + (f" ({pruned})" if pruned else "")


def _what_to_add(kept: _Kept, step: int) -> tuple:
    """A gated part's residuals for a cached step (or its calibrators' forecasts), and its output layouts."""
    residuals = kept.residuals
    if kept.calibrators is not None and residuals is not None:
        residuals = tuple(c.forecast(step) for c in kept.calibrators)
    return residuals, kept.layouts


def _add(inputs, residual_of, residuals, layouts) -> tuple[torch.Tensor, ...]:
    """Input + residual per output. The next part was compiled for the outputs' layout (Inductor asserts sizes
    and strides); a stream entering a part can be a strided slice, so the sum is written into that layout."""
    return tuple(
        torch.add(inputs[j], r, out=torch.empty_strided(size, stride, dtype=r.dtype, device=r.device))
        for j, r, (size, stride) in zip(residual_of, residuals, layouts)
    )


# Note [Block lists]
# ~~~~~~~~~~~~~~~~~~
# With ``block_lists="separate"`` each block list of the chain (FLUX.1: double, then single blocks), and
# each list that follows it in a graph of its own making (FLUX.2's single blocks, which take the joined
# stream), is cut into head | middle | tail by its own ``Fn``/``Bn`` (``list_settings``) and gets a gate of
# its own: its decision compares its own head residual with its own last computed step, under its own
# settings, history and buffers. The first list's gate places the call in its request, step and CFG
# branch as always; a later list's gate (``ListCache``) takes that placement from this context
# (``_PLACED``: the later gates run in the same forward, right after) and keeps its state in the branch
# (``_Branch.lists``), so requests, branches, refreshes and the end of a request apply to every list at
# once. Each later list reads its own diff: one more host read per step and list, since its head
# residual exists only after the earlier list's tail ran. Stats: ``BranchStats.lists[path]``.
_PLACED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("cachedit_placed", default=None)


class _ListView:
    """A request as one later block list sees it: its own settings and plan, its own state per branch."""

    def __init__(self, req: _Request, path: str, config: CacheditConfig, plan: policy.Plan):
        self.req, self.path, self.config, self.plan = req, path, config, plan

    step = property(lambda self: self.req.step)
    local_step = property(lambda self: self.req.local_step)
    origin = property(lambda self: self.req.origin)
    stats = property(lambda self: self.req.stats)
    branches = property(lambda self: [b.list_branch(self.path) for b in self.req.branches])


class ListCache(StepCache):
    """The gate of a later block list under ``block_lists="separate"`` (Note [Block lists])."""

    def __init__(self, leader: StepCache, path: str, config: CacheditConfig):
        """``config``: the compile-time settings with this list's ``list_settings`` on top."""
        super().__init__(config)
        self.leader, self.path = leader, path

    def gate(self, residual, timestep=None, param=None, latent=None, conditioning=None) -> tuple:
        placed = _PLACED.get()
        if placed is None or placed[0] is not self.leader:
            raise RuntimeError(
                f"block list {self.path} decides after the first list of the same call, which did not run through "
                "its gate here (cachedit.rows does not take block_lists='separate'); compile with block_lists='joined'"
            )
        _, lead, branch, req, state = placed
        own = branch.list_branch(self.path)
        view = self._view(req)
        if lead.reason is policy.Reason.UNKNOWN_REQUEST:
            decision = policy.Decision(policy.Action.COMPUTE, policy.Reason.UNKNOWN_REQUEST, req.step)
            self.decided(view, own, decision, residual)
            return decision, own, view, state, None
        sums, prev, step = None, own.prev_residual, view.local_step
        if (
            prev is not None
            and prev.shape == residual.shape
            and _borrowed_diff(view, own, req.step) is None
            and policy.needs_diff(view.plan, own.history, step)
        ):
            found = torch.ops.cachedit.residual_diff(prev, residual)
            if self.reduce_sums is not None:
                found = self.reduce_sums(found)
            sums = tuple(found.tolist())  # this list's own host read
        decision, cached = self.decide(view, own, sums, residual)
        return decision, own, view, state, cached

    def _view(self, req: _Request) -> _ListView:
        found = req.list_plans.get(self.path)
        if found is None:
            config = self.config.for_request(req.stats.settings)  # the list's settings, then the request's
            found = req.list_plans[self.path] = (config, policy.plan(config, req.stats.num_inference_steps))
        return _ListView(req, self.path, *found)


class Gate(torch.nn.Module):
    """The ``cachedit_gate`` node: decides compute or cache for this call."""

    def __init__(self, cache: StepCache):
        super().__init__()
        self.cache = cache

    def forward(self, residual, timestep, param, latent=None, conditioning=None):
        return self.cache.gate(residual, timestep, param, latent, conditioning)


class Reuse(torch.nn.Module):
    """A ``cachedit_reuse`` node: runs its gated part, or rebuilds its outputs from cached residuals."""

    def __init__(self, cache: StepCache, k: int, segment):
        """``segment``: the fxpasses ``Segment`` of part ``k`` (its ``residual_of``, ``primary``, ``blocks``)."""
        super().__init__()
        self.cache = cache
        self.k = k
        self.segment = segment

    def forward(self, gated, middle, *inputs):
        return self.cache.reuse(gated, middle, self.k, self.segment, inputs)
