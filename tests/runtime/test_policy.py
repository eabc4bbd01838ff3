"""The DBCache decision rules as properties over random configurations and diff sequences."""

from hypothesis import given, settings
from hypothesis import strategies as st

from cachedit.config import CacheditConfig
from cachedit.runtime.policy import Action, BranchHistory, Reason, decide, needs_diff, record

configs = st.builds(
    CacheditConfig,
    Fn=st.just(1),
    threshold=st.sampled_from([-0.1, 0.0, 0.05, 0.1, 0.3, 0.99, 1.0, 2.0]),
    warmup_steps=st.integers(0, 6),
    warmup_interval=st.integers(1, 3),
    max_cached_steps=st.integers(-1, 6),
    max_continuous_cached_steps=st.integers(-1, 4),
)


def run(config, diffs):
    history = BranchHistory()
    decisions = []
    for step, d in enumerate(diffs):
        diff = d if needs_diff(config, history, step) else None
        before = (len(history.cached_steps), history.streak, history.has_previous)
        decision = decide(config, history, step, diff)
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
    assert decide(config, history, 1, 0.1).action is Action.COMPUTE
    assert decide(config, history, 1, 0.0999999).action is Action.CACHE


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
