"""The DBCache decision rules as properties over random configurations and diff sequences."""

from hypothesis import given, settings
from hypothesis import strategies as st

from cachedit.config import CacheditConfig
import math

import pytest

from cachedit.runtime.policy import Action, BranchHistory, Reason, decide, needs_diff, plan, record

configs = st.builds(
    CacheditConfig,
    Fn=st.just(1),
    threshold=st.sampled_from([-0.1, 0.0, 0.05, 0.1, 0.3, 0.99, 1.0, 2.0]),
    warmup_steps=st.integers(0, 6),
    warmup_interval=st.integers(1, 3),
    max_cached_steps=st.integers(-1, 6),
    max_continuous_cached_steps=st.integers(-1, 4),
)


def run(config, diffs, num_steps=None):
    history = BranchHistory()
    decisions = []
    schedule = plan(config, num_steps)
    for step, d in enumerate(diffs):
        diff = d if needs_diff(schedule, history, step) else None
        before = (len(history.cached_steps), history.streak, history.has_previous)
        decision = decide(schedule, history, step, diff)
        record(history, decision)
        decisions.append((decision, before, d))
    return decisions, history


@given(configs, st.lists(st.floats(0, 0.5), min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_rules(config, diffs):
    decisions, history = run(config, diffs)
    streak = 0
    for step, (decision, (n_cached, streak_before, has_prev), d) in enumerate(decisions):
        assert decision.step == step
        if step in config.warmup_step_set:
            assert decision.action is Action.COMPUTE and decision.reason is Reason.WARMUP
            assert decision.diff is None
        if decision.action is Action.CACHE:
            assert has_prev, "a cached step needs an earlier computed step"
            assert config.max_cached_steps < 0 or n_cached < config.max_cached_steps
            assert config.max_continuous_cached_steps < 0 or streak_before < config.max_continuous_cached_steps
            assert config.threshold > 0
            assert config.threshold >= 1 or d < config.threshold  # strict
        else:
            # completeness: when no earlier rule blocks and the diff is under the threshold, we cache
            blocked = (
                step in config.warmup_step_set
                or 0 <= config.max_cached_steps <= n_cached
                or 0 <= config.max_continuous_cached_steps <= streak_before
                or config.threshold <= 0
                or not has_prev
            )
            assert blocked or (config.threshold < 1 and d >= config.threshold)
        streak = streak + 1 if decision.action is Action.CACHE else 0
        assert config.max_continuous_cached_steps < 0 or streak <= config.max_continuous_cached_steps
    assert config.max_cached_steps < 0 or len(history.cached_steps) <= config.max_cached_steps
    assert sorted(history.cached_steps + history.computed_steps) == list(range(len(diffs)))


def test_equal_to_threshold_computes():
    config = CacheditConfig(threshold=0.1, warmup_steps=0)
    history = BranchHistory(has_previous=True, computed_steps=[0])
    assert decide(plan(config, None), history, 1, 0.1).action is Action.COMPUTE
    assert decide(plan(config, None), history, 1, 0.0999999).action is Action.CACHE


def test_warmup_interval_leaves_ordinary_steps_inside_the_window():
    config = CacheditConfig(threshold=0.5, warmup_steps=6, warmup_interval=2)
    decisions, _ = run(config, [0.0] * 8)
    assert [d.action for d, _, _ in decisions] == [
        Action.COMPUTE,  # 0 warmup
        Action.CACHE,  # 1 ordinary
        Action.COMPUTE,  # 2 warmup
        Action.CACHE,
        Action.COMPUTE,  # 4 warmup
        Action.CACHE,
        Action.CACHE,
        Action.CACHE,
    ]


@given(
    st.integers(2, 60),
    st.floats(0.01, 1.0),
    st.integers(0, 4),
    st.lists(st.floats(0, 2, allow_nan=False), min_size=60, max_size=60),
)
@settings(max_examples=200, deadline=None)
def test_budget_computes_exactly_its_share(num_steps, budget, warmup, diffs):
    config = CacheditConfig(budget=budget, warmup_steps=warmup)
    share = math.ceil(budget * num_steps - 1e-9)
    mandatory = {0, num_steps - 1} | set(range(min(warmup, num_steps)))
    if share < len(mandatory):
        with pytest.raises(ValueError, match="fewer than the"):
            plan(config, num_steps)
        return
    decisions, history = run(config, diffs[:num_steps], num_steps)
    assert len(history.computed_steps) == share
    assert mandatory <= set(history.computed_steps)
    assert all(d.cache == (d.step in history.cached_steps) for d, _, _ in decisions)


def test_budget_spends_computes_where_the_features_move():
    config = CacheditConfig(budget=0.5, warmup_steps=1)
    # the head residual barely moves for steps 1-9, then moves a lot every step
    diffs = [0.0] + [0.01] * 9 + [0.5] * 9 + [0.0]
    _, history = run(config, diffs, 20)
    assert len(history.computed_steps) == 10
    assert sum(s >= 10 for s in history.computed_steps) > sum(1 <= s < 10 for s in history.computed_steps)


def test_budget_and_masks_need_the_step_count():
    for setting in (dict(budget=0.4), dict(scm="fast")):
        with pytest.raises(ValueError, match="needs the request's step count"):
            plan(CacheditConfig(**setting), None)


def test_static_mask_caches_zero_bits_and_truncates_warmup():
    config = CacheditConfig(scm="1110010001", scm_policy="static", warmup_steps=8, threshold=0.0)
    decisions, history = run(config, [1.0] * 10, 10)
    assert history.computed_steps == [0, 1, 2, 5, 9]
    assert [d.reason for d, _, _ in decisions[:4]] == [Reason.WARMUP] * 3 + [Reason.SCM_STATIC]


def test_dynamic_mask_falls_through_to_the_threshold_on_zero_bits():
    config = CacheditConfig(scm="1101", threshold=0.5, warmup_steps=0)
    decisions, _ = run(config, [0.0, 0.0, 0.9, 0.1], 4)
    assert [(d.action, d.reason) for d, _, _ in decisions] == [
        (Action.COMPUTE, Reason.SCM_COMPUTE),
        (Action.COMPUTE, Reason.SCM_COMPUTE),
        (Action.COMPUTE, Reason.CHANGED),
        (Action.COMPUTE, Reason.SCM_COMPUTE),
    ]


def test_accumulated_diff_stops_caching():
    config = CacheditConfig(threshold=0.5, warmup_steps=1, max_accumulated_residual_diff_threshold=0.25)
    decisions, _ = run(config, [0.0, 0.1, 0.1, 0.1, 0.1])
    assert [d.reason for d, _, _ in decisions] == [
        Reason.WARMUP, Reason.SIMILAR, Reason.SIMILAR, Reason.SIMILAR, Reason.MAX_ACCUMULATED
    ]
