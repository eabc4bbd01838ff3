"""Steps computation masks: parity with cache-dit 1.5.3's ``steps_mask``, our masks where it has none, errors."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedit.runtime.masks import FALLBACK_STEPS, PRESETS, computed_fraction, steps_mask

cache_dit = pytest.importorskip("cache_dit")


def as_str(mask):
    return "".join(map(str, mask))


def leading_computes(mask):
    return next((i for i, bit in enumerate(mask) if bit == 0), len(mask))


@pytest.mark.parametrize("num_steps", range(4, 101))
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_equals_cache_dit(preset, num_steps):
    if num_steps in FALLBACK_STEPS:
        with pytest.raises(AssertionError):  # where cache-dit asserts, we make our own mask (next tests)
            cache_dit.steps_mask(total_steps=num_steps, mask_policy=preset)
        return
    expected = cache_dit.steps_mask(total_steps=num_steps, mask_policy=preset)
    assert as_str(steps_mask(num_steps, preset)) == as_str(expected)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_equals_cache_dit_long_runs(preset):
    # Growth past 28 steps is computed in float like cache-dit's; an exact floor would differ at ultra 488, 920, 976.
    mismatched = [
        t for t in range(101, 1001) if steps_mask(t, preset) != cache_dit.steps_mask(total_steps=t, mask_policy=preset)
    ]
    assert mismatched == []


def test_fallback_steps_are_exactly_where_cache_dit_asserts():
    asserted = set()
    for t in range(1, 101):
        try:
            cache_dit.steps_mask(total_steps=t, mask_policy="medium")
        except AssertionError:
            asserted.add(t)
    assert asserted == set(FALLBACK_STEPS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_mask_structure(preset):
    for t in range(1, 1001):
        mask = steps_mask(t, preset)
        assert len(mask) == t and set(mask) <= {0, 1}, t
        assert mask[0] == 1, f"T={t}: the first step has nothing to reuse"
        assert mask[-1] == 1, f"T={t}: the last step produces the final latents"


@pytest.mark.parametrize("num_steps", sorted(t for t in FALLBACK_STEPS if t >= 4))
@pytest.mark.parametrize("preset", PRESETS)
def test_fallback_mask_follows_the_preset_fraction(preset, num_steps):
    mask = steps_mask(num_steps, preset)
    computed, target = sum(mask), num_steps * computed_fraction(preset)
    if target < Fraction(3, 2):
        assert computed == 2, "at least the first and the last step compute"
    else:
        # Tolerance: half a step, from rounding the preset's fraction to whole steps.
        assert abs(computed - target) <= Fraction(1, 2)
    lead = leading_computes(mask)
    assert lead == math.ceil(computed / 2), "half the computes (rounded up) form the leading run"
    assert mask[-1] == 1 and mask[lead] == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_fallback_masks_are_the_documented_ones(preset):
    documented = {  # the Note's table
        "slow": ("11001", "1110101"),
        "medium": ("11001", "1100101"),
        "fast": ("10001", "1100001"),
        "ultra": ("10001", "1000001"),
    }
    assert (as_str(steps_mask(5, preset)), as_str(steps_mask(7, preset))) == documented[preset]


@pytest.mark.parametrize("num_steps", [1, 2, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_under_four_steps_every_step_computes(preset, num_steps):
    assert steps_mask(num_steps, preset) == [1] * num_steps


def test_fallback_presets_are_ordered():
    for t in sorted(FALLBACK_STEPS):
        computed = [sum(steps_mask(t, p)) for p in PRESETS]
        assert computed == sorted(computed, reverse=True), f"slower presets compute at least as much at T={t}"


def test_computed_fraction_is_the_28_step_share():
    expected = [Fraction(18, 28), Fraction(15, 28), Fraction(11, 28), Fraction(8, 28)]
    assert [computed_fraction(p) for p in PRESETS] == expected
    for p in PRESETS:
        mask = cache_dit.steps_mask(total_steps=28, mask_policy=p)
        assert Fraction(sum(mask), 28) == computed_fraction(p)


run_lists = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(1, 8), min_size=n, max_size=n),
        st.integers(n - 1, n).flatmap(lambda m: st.lists(st.integers(1, 8), min_size=m, max_size=m)),
    )
)


@given(runs=run_lists, num_steps=st.integers(1, 100))
@settings(max_examples=400, deadline=None)
def test_explicit_runs(runs, num_steps):
    compute, cache = runs
    mask = steps_mask(num_steps, compute_runs=compute, cache_runs=cache)
    assert len(mask) == num_steps
    laid_out = "".join("1" * c + "0" * k for c, k in zip(compute, cache + [0]))
    covered = min(num_steps, len(laid_out))
    assert as_str(mask[:covered]) == laid_out[:covered], "runs alternate compute, cache, compute, ..."
    assert mask[covered:] == [1] * (num_steps - covered), "steps past the runs are computed"
    if num_steps <= len(laid_out):  # cache-dit asserts when the runs are shorter than total_steps
        assert mask == cache_dit.steps_mask(compute_bins=list(compute), cache_bins=list(cache), total_steps=num_steps)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(num_steps=0, preset="fast"), ["num_steps=0", "at least 1"]),
        (dict(num_steps=-3, preset="fast"), ["num_steps=-3", "at least 1"]),
        (dict(num_steps=2.5, preset="fast"), ["num_steps=2.5", "not an integer", "num_steps=28"]),
        (dict(num_steps=True, preset="fast"), ["num_steps=True", "not an integer"]),
        (dict(num_steps="28", preset="fast"), ["num_steps='28'", "not an integer"]),
        (dict(num_steps=28, preset="ultar"), ["'ultar'", "slow, medium, fast, ultra", "did you mean 'ultra'"]),
        (dict(num_steps=28, preset="MEDIUM"), ["'MEDIUM'", "did you mean 'medium'"]),
        (dict(num_steps=28, preset="dynamic"), ["'dynamic'", "expected one of slow, medium, fast, ultra"]),
        (dict(num_steps=28), ["needs a preset or runs", "compute_runs="]),
        (dict(num_steps=28, preset="fast", compute_runs=[4], cache_runs=[2]), ["preset='fast'", "drop preset="]),
        (dict(num_steps=28, compute_runs=[4, 1]), ["compute_runs without cache_runs", "cache_runs=[]"]),
        (dict(num_steps=28, cache_runs=[2]), ["cache_runs without compute_runs"]),
        (dict(num_steps=28, compute_runs=[4, 0], cache_runs=[2]), ["compute_runs[1]=0", "[4, 0]", ">= 1"]),
        (dict(num_steps=28, compute_runs=[4, 1], cache_runs=[-2]), ["cache_runs[0]=-2", ">= 1"]),
        (dict(num_steps=28, compute_runs=[4, True], cache_runs=[2]), ["compute_runs[1]=True"]),
        (dict(num_steps=28, compute_runs=[], cache_runs=[]), ["compute_runs=[] is empty", "first step"]),
        (dict(num_steps=28, compute_runs=[4], cache_runs=[2, 3]), ["1 runs and cache_runs 2", "one fewer"]),
        (dict(num_steps=28, compute_runs=[4, 1, 1], cache_runs=[2]), ["3 runs and cache_runs 1", "merge adjacent"]),
        (dict(num_steps=28, compute_runs="41", cache_runs=[2]), ["compute_runs='41'", "not a sequence"]),
    ],
)
def test_bad_input_is_explained(kwargs, fragments):
    with pytest.raises(ValueError) as err:
        steps_mask(**kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_preset_in_computed_fraction():
    with pytest.raises(ValueError, match="did you mean 'fast'"):
        computed_fraction("fats")
