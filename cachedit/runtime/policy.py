"""The DBCache decision: compute the middle blocks or reuse their cached residual (pure, no tensors).

The order of checks is cache-dit 1.5.3's (``reference/cache-semantics.md``); the first rule that
applies decides, and the decision carries the rule as its reason.
"""

from __future__ import annotations

import dataclasses
import enum

from cachedit.config import CacheditConfig


class Action(enum.Enum):
    COMPUTE = "compute"
    CACHE = "cache"


class Reason(enum.Enum):
    WARMUP = "warmup step"
    MAX_CACHED = "max_cached_steps reached"
    MAX_CONTINUOUS = "max_continuous_cached_steps reached"
    DISABLED = "threshold <= 0"
    NO_PREVIOUS = "no previous computed step to compare with"
    ALWAYS = "threshold >= 1"
    SIMILAR = "diff < threshold"
    CHANGED = "diff >= threshold"
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


@dataclasses.dataclass
class BranchHistory:
    """What the policy needs to remember for one branch of one request."""

    cached_steps: list[int] = dataclasses.field(default_factory=list)
    computed_steps: list[int] = dataclasses.field(default_factory=list)
    streak: int = 0  # cached steps in a row, ending at the last step
    has_previous: bool = False  # a head residual from a computed step is stored


def needs_diff(config: CacheditConfig, history: BranchHistory, step: int) -> bool:
    """Whether ``decide`` at ``step`` will read the diff, i.e. every earlier rule passes."""
    return _rule(config, history, step) is None and 0.0 < config.threshold < 1.0


def decide(config: CacheditConfig, history: BranchHistory, step: int, diff: float | None) -> Decision:
    """Decide for ``step``; ``diff`` is the relative L1 of the head residual (needed iff ``needs_diff``)."""
    early = _rule(config, history, step)
    if early is not None:
        return Decision(Action.COMPUTE, early, step)
    if config.threshold >= 1.0:
        return Decision(Action.CACHE, Reason.ALWAYS, step)
    assert diff is not None, "decide() needs the diff whenever needs_diff() is true"
    if diff < config.threshold:  # strict, as in cache-dit
        return Decision(Action.CACHE, Reason.SIMILAR, step, diff)
    return Decision(Action.COMPUTE, Reason.CHANGED, step, diff)


def _rule(config: CacheditConfig, history: BranchHistory, step: int) -> Reason | None:
    if step in config.warmup_step_set:
        return Reason.WARMUP
    if 0 <= config.max_cached_steps <= len(history.cached_steps):
        return Reason.MAX_CACHED
    if 0 <= config.max_continuous_cached_steps <= history.streak:
        return Reason.MAX_CONTINUOUS
    if config.threshold <= 0.0:
        return Reason.DISABLED
    if not history.has_previous:
        return Reason.NO_PREVIOUS
    return None


def record(history: BranchHistory, decision: Decision) -> None:
    """Advance ``history`` past ``decision``."""
    if decision.cache:
        history.cached_steps.append(decision.step)
        history.streak += 1
    else:
        history.computed_steps.append(decision.step)
        history.streak = 0
        history.has_previous = True
