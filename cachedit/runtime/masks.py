"""Steps computation masks (SCM): which denoising steps run the middle blocks (pure, no tensors).

Note [Steps computation masks]
==============================
Background. A mask fixes, per denoising step, whether the cached blocks are computed (bit 1) or may be
served from the cache (bit 0). Under the "static" policy a 0-bit caches unconditionally; under "dynamic"
it falls through to the usual DBCache checks (``reference/cache-semantics.md``, decision order step 2).
A mask is written as runs: ``compute_runs = (c0, c1, ...)`` and ``cache_runs = (k0, k1, ...)`` give
``[1]*c0 + [0]*k0 + [1]*c1 + [0]*k1 + ...``. cache-dit 1.5.3 ships four presets tuned on 28-step
FLUX.1-dev; ``steps_mask(T, preset)`` equals ``cache_dit.steps_mask(total_steps=T, mask_policy=preset)``
for every T at which cache-dit returns a mask (checked for T = 4..1000 in tests).

The rule, for a preset at T steps:
  1. Pick base runs (``_PRESET_RUNS``): the 28-step runs for T >= 16; cache-dit's few-step tables for
     distilled models at T = 8, T = 9 and T = 10..15 (one 15-step table); one preset-independent mask at
     T = 4 (``1101``) and T = 6 (``111001``).
  2. T > 28: grow the runs. Each run but the last grows by ``max(floor(r28 * T / 56), 1)`` (``r28`` its
     28-step length), in mask order (c0, k0, c1, k1, ...), then the last (compute) run grows by 1; this
     round repeats and stops the moment the total reaches T. The growth is computed in float, as
     cache-dit does: an exact floor would change ultra's mask at T = 488, 920 and 976.
  3. Cut the total down to T from the tail: with E steps over, the cache runs give up ceil(E/2) steps and
     the compute runs floor(E/2), each taken from its list's last runs; if one list runs out, the other
     gives the rest. (Cutting the lists separately can leave two compute runs adjacent: slow at T = 10 is
     ``1111011111``.)
  4. Lay out the runs alternately and force the last step to compute.

Degenerate cases: where cache-dit asserts, we make our own mask.
  * T = 5 and T = 7 (every preset): cache-dit only knows 4 and 6 below 8 steps. We compute
    ``n = max(2, round_half_up(T * f))`` steps, f the preset's 28-step computed fraction
    (``computed_fraction``): a leading run of ``ceil(n / 2)`` computes, the other computes spread evenly
    over the remaining steps, the last one on the last step. The floor of 2 keeps the first step (nothing
    to reuse yet) and the last (the final latents) computed. Masks: slow 11001 / 1110101, medium 11001 /
    1100101, fast 10001 / 1100001, ultra 10001 / 1000001. They compute fewer steps than cache-dit's
    fixed 4- and 6-step masks (3 of 4, 4 of 6), which ignore the preset; ours follow it.
  * T = 1, 2, 3: every step computes. This is cache-dit's 4-step mask ``1101`` cut to T with the last
    step forced to compute; at most one step could be cached there anyway.
No mask cache-dit returns for T = 4..100 is structurally degenerate: each has length T and computes the
first and the last step. Some stray far from the preset's 28-step fraction, by cache-dit's design, and
we keep them, for parity: the fixed 4/6-step masks (ultra at 4 computes 0.75 against 0.29), the few-step
tables (slow at 10 computes 0.90 against 0.64), tail-cutting at 16..27 (slow at 16: 0.81) and growth
past 28 (slow at 50: 0.76).

Explicit runs follow the same layout without forcing the last step: runs longer than T are cut to T
(as cache-dit does); runs shorter than T are padded with computed steps (cache-dit asserts): a step the
runs do not cover is never cached.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from fractions import Fraction

Runs = tuple[tuple[int, ...], tuple[int, ...]]  # (compute_runs, cache_runs)

PRESETS = ("slow", "medium", "fast", "ultra")

# cache-dit 1.5.3's preset runs, keyed by the step count each table is written for (Note, rule step 1).
_PRESET_RUNS: dict[int, dict[str, Runs]] = {
    28: {
        "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
        "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
        "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
        "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
    },
    15: {
        "slow": ((4, 2, 2, 2, 1), (1, 1, 1, 1)),
        "medium": ((4, 2, 1, 1, 1), (1, 1, 2, 2)),
        "fast": ((3, 1, 1, 1, 1), (1, 2, 2, 3)),
        "ultra": ((2, 1, 1, 1, 1), (1, 2, 3, 3)),
    },
    9: {
        "slow": ((5, 2, 1), (1,)),
        "medium": ((5, 1, 1), (1, 1)),
        "fast": ((4, 1, 1), (1, 2)),
        "ultra": ((3, 1, 1), (2, 2)),
    },
    8: {
        "slow": ((5, 1, 1), (1,)),
        "medium": ((4, 1, 1), (1, 1)),
        "fast": ((3, 1, 1), (1, 2)),
        "ultra": ((2, 1, 1), (2, 2)),
    },
    6: {name: ((3, 1), (2,)) for name in PRESETS},
    4: {name: ((2, 1), (1,)) for name in PRESETS},
}

# Step counts where cache-dit 1.5.3 has no preset mask (it asserts); see the Note.
FALLBACK_STEPS = frozenset({1, 2, 3, 5, 7})


def computed_fraction(preset: str) -> Fraction:
    """The share of computed steps in ``preset``'s 28-step mask (slow 9/14, medium 15/28, fast 11/28, ultra 2/7)."""
    compute, cache = _PRESET_RUNS[28][_check_preset(preset)]
    return Fraction(sum(compute), sum(compute) + sum(cache))


def steps_mask(
    num_steps: int,
    preset: str | None = None,
    *,
    compute_runs: Sequence[int] | None = None,
    cache_runs: Sequence[int] | None = None,
) -> list[int]:
    """The mask for ``num_steps`` steps, 1 = compute and 0 = cache, from a preset or explicit runs.

    See Note [Steps computation masks] for the rule and the step counts where we differ from cache-dit.
    """
    _check_num_steps(num_steps)
    if compute_runs is None and cache_runs is None:
        if preset is None:
            raise ValueError(
                "steps_mask needs a preset or runs; expected preset= one of "
                f"{', '.join(PRESETS)}, or compute_runs= and cache_runs= (e.g. compute_runs=[4, 1], cache_runs=[2])"
            )
        return _preset_mask(num_steps, _check_preset(preset))
    if preset is not None:
        raise ValueError(
            f"steps_mask got preset={preset!r} and explicit runs; expected one of them: drop preset= to use "
            "compute_runs/cache_runs, or drop the runs to use the preset"
        )
    if compute_runs is None or cache_runs is None:
        given, missing = ("compute_runs", "cache_runs") if cache_runs is None else ("cache_runs", "compute_runs")
        raise ValueError(
            f"steps_mask got {given} without {missing}; expected both (use cache_runs=[] for a mask of computes only)"
        )
    compute, cache = _check_runs(compute_runs, cache_runs)
    mask = _lay_out(compute, cache)[:num_steps]
    return mask + [1] * (num_steps - len(mask))


def _preset_mask(num_steps: int, preset: str) -> list[int]:
    if num_steps in FALLBACK_STEPS:
        return _fraction_mask(num_steps, computed_fraction(preset))
    if num_steps in (4, 6, 8, 9):
        compute, cache = _PRESET_RUNS[num_steps][preset]
    else:
        table = 15 if num_steps < 16 else 28
        compute, cache = _PRESET_RUNS[table][preset]
        if num_steps > table:
            compute, cache = _grow(compute, cache, num_steps)
    compute, cache = _cut(compute, cache, num_steps)
    mask = _lay_out(compute, cache)
    assert len(mask) == num_steps, f"preset {preset!r} laid out {len(mask)} steps for num_steps={num_steps}"
    mask[-1] = 1
    return mask


def _grow(compute: Sequence[int], cache: Sequence[int], num_steps: int) -> Runs:
    """Lengthen 28-step runs until they cover ``num_steps`` (Note, rule step 2); the total may overshoot."""
    assert len(compute) == len(cache) + 1, "preset runs start and end with a compute run"
    runs = [r for pair in zip(compute, cache) for r in pair] + [compute[-1]]  # mask order c0 k0 c1 k1 ... cN
    # Float product on purpose: cache-dit's growth is int(r * (T / 28) * 0.5), and T / 28 * 0.5 == T / 56 exactly.
    increments = [max(int(r * (num_steps / 56)), 1) for r in runs[:-1]] + [1]
    total = sum(runs)
    while total < num_steps:
        for i, inc in enumerate(increments):
            runs[i] += inc
            total += inc
            if total >= num_steps:
                break
    return tuple(runs[0::2]), tuple(runs[1::2])


def _cut(compute: Sequence[int], cache: Sequence[int], num_steps: int) -> Runs:
    """Shorten runs to exactly ``num_steps`` from the tail, cache first (Note, rule step 3)."""
    excess = sum(compute) + sum(cache) - num_steps
    if excess <= 0:
        return tuple(compute), tuple(cache)
    from_cache = min(sum(cache), max(math.ceil(excess / 2), excess - sum(compute)))
    return _trim_tail(compute, excess - from_cache), _trim_tail(cache, from_cache)


def _trim_tail(runs: Sequence[int], steps: int) -> tuple[int, ...]:
    kept = list(runs)
    while steps > 0:
        take = min(steps, kept[-1])
        kept[-1] -= take
        steps -= take
        if kept[-1] == 0:
            kept.pop()
    return tuple(kept)


def _lay_out(compute: Sequence[int], cache: Sequence[int]) -> list[int]:
    mask: list[int] = []
    for i in range(max(len(compute), len(cache))):
        mask += [1] * (compute[i] if i < len(compute) else 0)
        mask += [0] * (cache[i] if i < len(cache) else 0)
    return mask


def _fraction_mask(num_steps: int, fraction: Fraction) -> list[int]:
    """Our mask where cache-dit has none: about ``fraction`` of the steps computed (Note, degenerate cases)."""
    if num_steps < 4:
        return [1] * num_steps
    computed = max(2, math.floor(num_steps * fraction + Fraction(1, 2)))
    lead = math.ceil(computed / 2)
    spread = computed - lead  # >= 1, and includes the last step
    span = num_steps - lead  # steps after the leading run
    mask = [1] * lead + [0] * span
    for j in range(spread):
        mask[num_steps - 1 - j * span // spread] = 1
    return mask


def _check_num_steps(num_steps: object) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(
            f"num_steps={num_steps!r} is not an integer; expected the number of denoising steps, e.g. num_steps=28"
        )
    if num_steps < 1:
        raise ValueError(
            f"num_steps={num_steps} is out of range; expected at least 1 denoising step "
            "(pass the pipeline's num_inference_steps, e.g. 28)"
        )


def _check_preset(preset: object) -> str:
    if isinstance(preset, str) and preset in PRESETS:
        return preset
    hint = ""
    if isinstance(preset, str):
        close = difflib.get_close_matches(preset.lower(), PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown steps-mask preset {preset!r}; expected one of {', '.join(PRESETS)}{hint}")


def _check_runs(compute_runs: Sequence[int], cache_runs: Sequence[int]) -> Runs:
    for name, runs in (("compute_runs", compute_runs), ("cache_runs", cache_runs)):
        if isinstance(runs, (str, bytes)) or not isinstance(runs, Sequence):
            raise ValueError(f"{name}={runs!r} is not a sequence; expected run lengths such as {name}=[4, 1]")
        for i, r in enumerate(runs):
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(
                    f"{name}[{i}]={r!r} in {name}={list(runs)!r} is not a positive integer; expected run lengths "
                    f">= 1 (drop the run to merge its neighbours, or end with a compute run for a trailing cache)"
                )
    if not compute_runs:
        raise ValueError(
            f"compute_runs={list(compute_runs)!r} is empty; expected at least one compute run: the first step "
            "has nothing to reuse (e.g. compute_runs=[4, 1], cache_runs=[2])"
        )
    if len(compute_runs) - len(cache_runs) not in (0, 1):
        raise ValueError(
            f"compute_runs has {len(compute_runs)} runs and cache_runs {len(cache_runs)}; expected the runs to "
            "alternate starting with a compute run, so cache_runs has as many runs as compute_runs or one fewer "
            "(merge adjacent runs of the same kind into one)"
        )
    return tuple(compute_runs), tuple(cache_runs)
