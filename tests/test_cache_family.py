"""The cache family end to end: steps masks, calibrators, budget mode and the DBCache limits, switched per
request on one compiled tiny Flux (inner "eager").

Tolerances: none where an output is compared with another run of the same decisions (same aten ops on the
same inputs). Calibrated outputs are compared with plain reuse only by direction (closer or not), never
by a tolerance.
"""

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cachedit
from tests.request_streams import Request, compile_fresh, timesteps


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


SETTINGS = [
    {},
    {"scm": "fast"},
    {"scm": "ultra", "scm_policy": "static"},
    {"scm": "110100101", "scm_policy": "static"},
    {"budget": 0.4},
    {"calibrator": "taylorseer", "taylorseer_order": 2},
    {"calibrator": "foca"},
    {"calibrator": "dmd", "dmd_history": 4},
    {"max_accumulated_residual_diff_threshold": 0.5},
]


# With the DBPrune split (compiled with policy="dbprune"), requests choose DBCache or DBPrune.
PRUNE_SETTINGS = [
    {"policy": "dbprune", "prune_threshold": 0.4},
    {"policy": "dbprune", "prune_threshold": 0.4, "non_prune_blocks": "2", "max_continuous_cached_steps": 1},
    {"policy": "dbprune", "scm": "110100101", "scm_policy": "static"},
    {"policy": "dbprune", "calibrator": "taylorseer"},
    {"force_refresh_step_hint": 4},
]


@pytest.mark.parametrize("compiled", ["dbcache", "dbprune"])
def test_every_policy_through_one_graph_without_recompiles_or_graph_breaks(compiled):
    model, fast = compile_fresh(threshold=0.4, warmup_steps=2, policy=compiled)
    if compiled == "dbprune":  # the compiled default is dbprune: the DBCache settings ask for dbcache
        settings = [{"policy": "dbcache", **s} for s in SETTINGS + PRUNE_SETTINGS[-1:]] + PRUNE_SETTINGS[:-1]
    else:
        settings = SETTINGS + PRUNE_SETTINGS[-1:]
    outs = [Request(1, timesteps(9), explicit=True, settings=s).run(fast) for s in settings]
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    records = cachedit.stats(model)
    assert [r.settings for r in records] == settings
    for record, s in zip(records, settings):
        if s.get("policy") == "dbprune":
            pruned = record.branches["main"].pruned_blocks
            assert any(pruned.values()), f"{s}: nothing pruned"
            if "non_prune_blocks" in s:
                assert 2 not in {b for blocks in pruned.values() for b in blocks}, pruned
    by = {str(s): r for s, r in zip(SETTINGS, records)}  # the first len(SETTINGS) requests, either way
    assert by[str({"budget": 0.4})].num_computed_steps == math.ceil(0.4 * 9)
    static = by[str({"scm": "110100101", "scm_policy": "static"})]
    assert static.branches["main"].cached_steps == [2, 4, 5, 7]
    assert all(torch.isfinite(out).all() for out in outs)
    assert all(r.bytes_held == 0 for r in records), "every explicit request ended"


def test_dbprune_needs_the_per_block_split():
    _, fast = compile_fresh(threshold=0.4, warmup_steps=2)
    with pytest.raises(ValueError, match="policy='dbprune' decides per block.*options=\\{'policy': 'dbprune'\\}"):
        Request(1, timesteps(3), explicit=True, settings={"policy": "dbprune"}).run(fast)


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
def test_budget_mode_computes_exactly_its_share_per_branch(budget):
    model, fast = compile_fresh(warmup_steps=1)
    Request(3, timesteps(16), explicit=True, settings={"budget": budget}, calls_per_step=2).run(fast)
    (record,) = cachedit.stats(model)
    for name, branch in record.branches.items():
        assert len(branch.computed_steps) == math.ceil(budget * 16), name
        assert {0, 15} <= set(branch.computed_steps), name


@pytest.mark.parametrize("calibrator", ["taylorseer", "foca", "dmd"])
def test_calibrators_change_only_the_cached_steps(calibrator):
    """Same static mask, so the same cached steps: the calibrated run differs from plain reuse, and only
    from the first cached step on (computed steps before it are identical)."""
    mask = "11110101010101"
    model, fast = compile_fresh(warmup_steps=0)
    plain = Request(2, timesteps(len(mask)), explicit=True, settings={"scm": mask, "scm_policy": "static"})
    forecast = Request(2, timesteps(len(mask)), explicit=True, settings={**plain.settings, "calibrator": calibrator})
    out_plain, out_forecast = plain.run(fast), forecast.run(fast)
    records = cachedit.stats(model)
    assert records[0].branches["main"].cached_steps == records[1].branches["main"].cached_steps == [4, 6, 8, 10, 12]
    assert not torch.equal(out_plain, out_forecast)


def test_a_mask_needs_the_step_count():
    model = compile_fresh()[0]
    with pytest.raises(ValueError, match="scm='fast' needs the request's step count"):
        with cachedit.request(model, scm="fast"):
            pass


def test_a_static_mask_reads_nothing_from_the_device_in_an_explicit_request(monkeypatch):
    """Every step decided by the mask: no diff is needed, and an explicit request with a latent signal pairs
    CFG calls by the latent, not the timestep, so no step syncs with the device (default cfg "auto")."""
    _, fast = compile_fresh(threshold=0.4, warmup_steps=2, cfg="auto")
    Request(1, timesteps(3), explicit=True).run(fast)  # compile outside the count
    reads = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    Request(2, timesteps(9), explicit=True, settings={"scm": "110100101", "scm_policy": "static"}).run(fast)
    Request(3, timesteps(9), explicit=True, settings={"scm": "110100101"}).run(fast)  # dynamic: 0 bits read a diff
    assert len(reads) == 4, reads  # the dynamic mask's four 0 bits, one read each
