"""The step-cache decision: compute the middle blocks or reuse their cached residual (pure, no tensors).

The order of checks is cache-dit 1.5.3's (``reference/cache-semantics.md``); the first rule that
applies decides, and the decision carries the rule as its reason. A request's ``Plan`` holds what
depends on its step count: the warmup steps, the steps-computation mask, the budget.

Note [Budget mode]
~~~~~~~~~~~~~~~~~~
``budget = b`` computes exactly ``K = ceil(b * T)`` of a request's ``T`` steps per branch, so latency is
known when the request starts. Mandatory computes: step 0 (there is nothing to reuse before it), the
warmup steps and the last step; ``K`` must cover them. Every other step is decided by a controller:
  - if the computes left are at least the free steps left, compute (the budget must be spent);
  - if no compute is left beyond the mandatory ones, cache;
  - otherwise compute iff the head residual moved at least ``rate * gap`` since the last computed step,
    where ``gap = free steps left / computes left`` is the spacing that spends the budget evenly and
    ``rate`` the mean change per step seen so far in this branch (diff / steps since its computed step).
So features that move fast get computes early, slow stretches are skipped, and the count is exact.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from cachedit.config import SCM_PRESETS, CacheditConfig, ScmPolicy
from cachedit.runtime import masks


class Action(enum.Enum):
    COMPUTE = "compute"
    CACHE = "cache"


class Reason(enum.Enum):
    WARMUP = "warmup step"
    SCM_COMPUTE = "steps mask: compute"
    SCM_STATIC = "steps mask: cache (static)"
    BUDGET_MANDATORY = "budget: first or last step"
    BUDGET_SPEND = "budget: the computes left must be spent"
    BUDGET_SPENT = "budget: spent"
    BUDGET_MOVED = "budget: moved at least its share"
    BUDGET_STILL = "budget: moved less than its share"
    MAX_CACHED = "max_cached_steps reached"
    MAX_CONTINUOUS = "max_continuous_cached_steps reached"
    MAX_ACCUMULATED = "max_accumulated_residual_diff_threshold reached"
    DISABLED = "threshold <= 0"
    NO_PREVIOUS = "no previous computed step to compare with"
    ALWAYS = "threshold >= 1"
    SIMILAR = "diff < threshold"
    CHANGED = "diff >= threshold"
    PER_BLOCK = "decided per block (dbprune)"
    NOT_PRUNED = "block excluded from pruning (non_prune_blocks)"
    UNKNOWN_REQUEST = "request boundaries unknown: the graph has no timestep input and no cachedit.request is open"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    step: int
    diff: float | None = None

    @property
    def cache(self) -> bool:
        return self.action is Action.CACHE

    def describe(self) -> str:
        diff = f" (diff {self.diff:.4g})" if self.diff is not None else ""
        return f"{self.action.value}: {self.reason.value}{diff}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a request's step count fixes: warmup steps, the steps-computation mask, the budget."""

    config: CacheditConfig
    num_steps: int | None
    warmup: frozenset[int]
    mask: tuple[int, ...] | None = None  # 1 = compute; steps past its end follow the usual rules
    budget: int | None = None  # computed steps per branch (budget mode)


def plan(config: CacheditConfig, num_steps: int | None) -> Plan:
    """The plan of a request of ``num_steps`` steps (None: unknown) under ``config``.

    Raises ValueError when a setting needs the step count and it is unknown, or cannot be honoured.
    """
    warmup = config.warmup_step_set
    mask = None
    if config.scm != "none":
        if config.scm in SCM_PRESETS:
            if num_steps is None:
                raise ValueError(
                    f"scm={config.scm!r} needs the request's step count: use cachedit.enable(pipe), "
                    "cachedit.request(model, num_inference_steps=N), or num_inference_steps=N "
                    "(CACHEDIT_NUM_INFERENCE_STEPS) for detected requests"
                )
            mask = tuple(masks.steps_mask(num_steps, config.scm))
        else:
            mask = tuple(int(bit) for bit in config.scm)
        leading = next((i for i, bit in enumerate(mask) if bit == 0), len(mask))
        warmup = frozenset(range(0, min(config.warmup_steps, leading), config.warmup_interval))
    budget = None
    if config.budget > 0:
        if num_steps is None:
            raise ValueError(
                f"budget={config.budget} needs the request's step count: use cachedit.enable(pipe), "
                "cachedit.request(model, num_inference_steps=N), or num_inference_steps=N "
                "(CACHEDIT_NUM_INFERENCE_STEPS) for detected requests"
            )
        budget = math.ceil(config.budget * num_steps - 1e-9)
        mandatory = _mandatory(warmup, num_steps)
        if budget < len(mandatory):
            raise ValueError(
                f"budget={config.budget} of {num_steps} steps is {budget} computed steps, fewer than the "
                f"{len(mandatory)} that must compute (step 0, the warmup steps, the last step); raise the "
                "budget or lower warmup_steps"
            )
    return Plan(config, num_steps, warmup, mask, budget)


def _mandatory(warmup: frozenset[int], num_steps: int) -> frozenset[int]:
    return frozenset(s for s in (warmup | {0, num_steps - 1}) if s < num_steps)


@dataclasses.dataclass
class BranchHistory:
    """What the policy needs to remember for one branch of one request."""

    cached_steps: list[int] = dataclasses.field(default_factory=list)
    computed_steps: list[int] = dataclasses.field(default_factory=list)
    streak: int = 0  # cached steps in a row, ending at the last step
    has_previous: bool = False  # a head residual from a computed step is stored
    accumulated_diff: float = 0.0  # sum of the positive diffs recorded (cache-dit's accumulated diff)
    rate_sum: float = 0.0  # budget mode: sum of diff / steps since the computed step, over measured steps
    rate_count: int = 0


def needs_diff(plan: Plan, history: BranchHistory, step: int) -> bool:
    """Whether ``decide`` at ``step`` will read the diff, i.e. every earlier rule passes."""
    if plan.budget is not None:
        return _budget_rule(plan, history, step) is None
    config = plan.config
    return _rule(plan, history, step) is None and 0.0 < config.threshold < 1.0


def decide(plan: Plan, history: BranchHistory, step: int, diff: float | None) -> Decision:
    """Decide for ``step``; ``diff`` is the relative L1 of the head residual (needed iff ``needs_diff``)."""
    if plan.budget is not None:
        return _decide_budget(plan, history, step, diff)
    early = _rule(plan, history, step)
    if early is not None:
        action = Action.CACHE if early is Reason.SCM_STATIC else Action.COMPUTE
        return Decision(action, early, step)
    if plan.config.threshold >= 1.0:
        return Decision(Action.CACHE, Reason.ALWAYS, step)
    assert diff is not None, "decide() needs the diff whenever needs_diff() is true"
    if diff < plan.config.threshold:  # strict, as in cache-dit
        return Decision(Action.CACHE, Reason.SIMILAR, step, diff)
    return Decision(Action.COMPUTE, Reason.CHANGED, step, diff)


def block_history(history: BranchHistory, step: int, pruned_now: bool, has_input: bool) -> BranchHistory:
    """What DBPrune decides one block on: the branch's history, with this step already counted as cached
    once a block of it was pruned (cache-dit 1.5.3 records the step at the first pruned block, and its
    ``max_cached_steps`` check then sees it; its run-length check excludes the current step, as the
    streak does), and whether this block has an input from its last computed step to compare with."""
    cached = history.cached_steps + [step] if pruned_now else history.cached_steps
    return dataclasses.replace(history, cached_steps=cached, has_previous=has_input)


def needs_block_diff(plan: Plan, history: BranchHistory, step: int) -> bool:
    """``needs_diff`` for one DBPrune block (``history`` from ``block_history``)."""
    threshold = plan.config.prune_threshold
    return _rule(plan, history, step, threshold) is None and 0.0 < threshold < 1.0


def decide_block(plan: Plan, history: BranchHistory, step: int, diff: float | None) -> Decision:
    """Prune one block (CACHE) or run it: cache-dit's order of checks, on the relative L1 of the block's
    input against its input at its last computed step, with ``prune_threshold``."""
    threshold = plan.config.prune_threshold
    early = _rule(plan, history, step, threshold)
    if early is not None:
        return Decision(Action.CACHE if early is Reason.SCM_STATIC else Action.COMPUTE, early, step)
    if threshold >= 1.0:
        return Decision(Action.CACHE, Reason.ALWAYS, step)
    assert diff is not None, "decide_block() needs the diff whenever needs_block_diff() is true"
    if diff < threshold:
        return Decision(Action.CACHE, Reason.SIMILAR, step, diff)
    return Decision(Action.COMPUTE, Reason.CHANGED, step, diff)


def _rule(plan: Plan, history: BranchHistory, step: int, threshold: float | None = None) -> Reason | None:
    config = plan.config
    threshold = config.threshold if threshold is None else threshold
    if step in plan.warmup:
        return Reason.WARMUP
    if plan.mask is not None and step < len(plan.mask):
        if plan.mask[step] == 1:
            return Reason.SCM_COMPUTE
        if config.scm_policy is ScmPolicy.STATIC:
            return Reason.SCM_STATIC if history.has_previous else Reason.NO_PREVIOUS
    if 0 <= config.max_cached_steps <= len(history.cached_steps):
        return Reason.MAX_CACHED
    if 0 <= config.max_continuous_cached_steps <= history.streak:
        return Reason.MAX_CONTINUOUS
    limit = config.max_accumulated_residual_diff_threshold
    if limit > 0.0 and history.accumulated_diff >= limit:
        return Reason.MAX_ACCUMULATED
    if threshold <= 0.0:
        return Reason.DISABLED
    if not history.has_previous:
        return Reason.NO_PREVIOUS
    return None


def _budget_rule(plan: Plan, history: BranchHistory, step: int) -> tuple[Action, Reason] | None:
    """The forced decisions of budget mode (Note [Budget mode]); None when the diff decides."""
    if step in _mandatory(plan.warmup, plan.num_steps) or step >= plan.num_steps or not history.has_previous:
        return Action.COMPUTE, Reason.BUDGET_MANDATORY
    computes_left, free_left = _budget_left(plan, history, step)
    if computes_left <= 0:
        return Action.CACHE, Reason.BUDGET_SPENT
    if computes_left >= free_left:
        return Action.COMPUTE, Reason.BUDGET_SPEND
    return None


def _budget_left(plan: Plan, history: BranchHistory, step: int) -> tuple[int, int]:
    """At a step that is not mandatory: the computes left to place, and the free steps left (this one included)."""
    mandatory_left = sum(1 for s in _mandatory(plan.warmup, plan.num_steps) if s >= step)
    computes_left = plan.budget - len(history.computed_steps) - mandatory_left
    return computes_left, plan.num_steps - step - mandatory_left


def _decide_budget(plan: Plan, history: BranchHistory, step: int, diff: float | None) -> Decision:
    forced = _budget_rule(plan, history, step)
    if forced is not None:
        return Decision(forced[0], forced[1], step)
    assert diff is not None, "decide() needs the diff whenever needs_diff() is true"
    computes_left, free_left = _budget_left(plan, history, step)
    since = step - history.computed_steps[-1]
    rate = history.rate_sum / history.rate_count if history.rate_count else diff / since
    if diff >= rate * free_left / computes_left:
        return Decision(Action.COMPUTE, Reason.BUDGET_MOVED, step, diff)
    return Decision(Action.CACHE, Reason.BUDGET_STILL, step, diff)


def record(history: BranchHistory, decision: Decision) -> None:
    """Advance ``history`` past ``decision``."""
    diff = decision.diff
    if diff is not None and math.isfinite(diff):
        if diff > 0.0:
            history.accumulated_diff += diff
        if history.computed_steps:
            history.rate_sum += diff / max(decision.step - history.computed_steps[-1], 1)
            history.rate_count += 1
    if decision.cache:
        history.cached_steps.append(decision.step)
        history.streak += 1
    else:
        history.computed_steps.append(decision.step)
        history.streak = 0
        history.has_previous = True
