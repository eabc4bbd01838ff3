"""``benchmarks/front.py`` at its ``--quick`` size: both systems run, and the numbers it reports are sound.

The script's own figures (BENCHMARKS.md) come from its full run; this checks the machinery on 4 captions
and 10 steps: the same static mask caches the same steps in cachedit and cache-dit, a point with no
cached step reproduces the uncached images exactly (cachedit, inner eager: bitwise), PSNR never reaches
the mean as ``inf``, and the front and the matched-budget rows follow from the points.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import front  # noqa: E402


@pytest.fixture(scope="module")
def quick_run():
    pytest.importorskip("cache_dit", reason="the front compares with cache-dit: pip install cache-dit==1.5.3")
    args = front.build_parser().parse_args(["--quick", "--no-write"])
    args.n, args.steps, args.batch_size = 4, 10, 2
    follow, points = front.run_front(args, log=lambda s: None)
    return args, follow, points


def by(points, system, label, calibrator="none"):
    (p,) = [p for p in points if p.system == system and p.spec.label == label and p.spec.calibrator == calibrator]
    return p


def test_static_mask_caches_the_same_steps_in_both_systems(quick_run):
    args, _, points = quick_run
    import cachedit

    zeros = tuple(s for s, bit in enumerate(cachedit.steps_mask(args.steps, "fast")) if bit == 0)
    for calibrator in ("none", "taylorseer1"):
        ours, theirs = by(points, "cachedit", "fast static", calibrator), by(points, "cache-dit", "fast static", calibrator)
        assert ours.cached_steps == theirs.cached_steps == (zeros,) * 2  # two batches of two captions
        assert ours.computed == theirs.computed == args.steps - len(zeros)
    # No calibrator: the same cached residuals added to the same head outputs; the two implementations differ
    # only by fp32 operation order, far below what one differently cached step would change (several dB).
    ours, theirs = by(points, "cachedit", "fast static"), by(points, "cache-dit", "fast static")
    assert ours.latent_psnr == pytest.approx(theirs.latent_psnr, abs=0.05)
    assert ours.psnr < front.PSNR_CAP  # caching 4 of 10 steps does change the images


def test_scores_are_finite_and_bounded(quick_run):
    args, follow, points = quick_run
    assert 0.0 <= follow <= 1.0
    assert {p.system for p in points} == {"cachedit", "cache-dit"}
    for p in points:
        assert math.isfinite(p.psnr) and math.isfinite(p.latent_psnr) and p.psnr <= front.PSNR_CAP
        assert 0.0 <= p.follow <= 1.0 and -1.0 <= p.ssim <= 1.0
        assert 0 < p.computed <= args.steps
    # τ 0.12 on this model caches nothing in 10 steps with warmup 4, so cachedit (inner eager) reproduces the
    # uncached images bitwise: PSNR at the cap, SSIM 1.
    ours = by(points, "cachedit", "τ0.12")
    assert ours.computed == args.steps and ours.psnr == front.PSNR_CAP and ours.ssim == pytest.approx(1.0)


def test_tables_name_every_point(quick_run):
    args, follow, points = quick_run
    all_points, matched, static, _ = front.tables(points, follow, args.steps)
    assert all_points.count("\n") == len(points) + 1  # header, rule, one row per point
    assert "fast static" in static and "budget 0.5" in all_points
    assert matched.count("\n") == len({round(p.computed, 6) for p in points if p.system == "cache-dit"}) + 1


def _point(system, computed, psnr):
    spec = front.Spec("dbcache", f"{computed}/{psnr}", {})
    return front.Point(system, spec, computed, psnr, 1.0, psnr, 1.0, (), 0.0)


points_strategy = st.lists(
    st.tuples(st.sampled_from(["cachedit", "cache-dit"]), st.integers(1, 28), st.floats(10, 60)), min_size=1, max_size=30
)


@given(points_strategy)
@settings(max_examples=80, deadline=None)
def test_front_dominates_every_point(raw):
    points = [_point(*r) for r in raw]
    for system in ("cachedit", "cache-dit"):
        best = front.front(points, system)
        assert [p.computed for p in best] == sorted(p.computed for p in best)
        assert all(a.psnr < b.psnr for a, b in zip(best, best[1:]))
        for p in points:
            if p.system == system:
                assert any(b.computed <= p.computed and b.psnr >= p.psnr for b in best)
                assert front.best_at(points, system, p.computed).psnr >= p.psnr
    for computed, theirs, ours in front.matched_budgets(points):
        assert theirs.system == "cache-dit" and theirs.computed <= computed + front.EPS
        assert ours is None or (ours.system == "cachedit" and ours.computed <= computed + front.EPS)
