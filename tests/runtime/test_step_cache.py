"""Request detection, CFG branches, diffs and thread isolation of the StepCache (no graph needed)."""

import threading
import time

import pytest
import torch

import cachedit
from cachedit.config import CacheditConfig
from cachedit.fxpasses.step_cache_gate import Segment
from cachedit.runtime.step_cache import StepCache, open_request


OWNER = torch.nn.Parameter(torch.zeros(1))  # stands for the model instance (the gate gets one of its parameters)


# One gated part with one stream: output 0 continues input 0.
MIDDLE = Segment(part="middle", reuse="cachedit_reuse", blocks=(1,), carried=("h",), residual_of=(0,), primary=0)

def make(**kw):
    kw = {"Fn": 1, "threshold": 0.5, "warmup_steps": 1, **kw}
    return StepCache(CacheditConfig(**kw), split=object())  # a split of its own: shares no state


def call(cache, t, value=1.0):
    """One transformer call: head residual filled with ``value`` at timestep ``t``."""
    residual = torch.full((2, 5), float(value))
    ts = None if t is None else torch.tensor([float(t), float(t)])
    return cache.gate(residual, ts, OWNER)[0]


def test_descending_timesteps_then_a_new_request_starts_from_nothing():
    cache = make()
    first = [call(cache, t, v) for t, v in zip([999, 800, 600, 400], [1.0, 1.1, 1.2, 1.3])]
    second = [call(cache, t, v) for t, v in zip([999, 800, 600, 400], [1.0, 1.1, 1.2, 1.3])]
    assert len(cache.records) == 2
    assert [d.step for d in first] == [d.step for d in second] == [0, 1, 2, 3]
    # no off-by-one: the first call of the second request is a warmup step, not compared with request 1
    assert [d.describe() for d in first] == [d.describe() for d in second]
    assert cache.records[1].branches["main"].reasons[0] == "compute: warmup step"


def test_ascending_timesteps_are_one_request():
    cache = make()
    for t in [0.0, 0.25, 0.5, 0.75]:
        call(cache, t)
    call(cache, 0.0)  # breaks the direction: new request
    assert [r.steps for r in cache.records] == [4, 1]


def test_separate_cfg_pairs_share_a_step_and_keep_separate_state():
    cache = make(warmup_steps=0)
    # cond residual constant (diff 0 -> cached), uncond residual jumps (diff 1.0 -> computed)
    for k, t in enumerate([1.0, 0.8, 0.6, 0.4]):
        call(cache, t, 1.0)
        call(cache, t, 2.0 ** k)
    (req,) = cache.records
    assert req.steps == 4 and set(req.branches) == {"cond", "uncond"}
    assert req.branches["cond"].cached_steps == [1, 2, 3]
    assert req.branches["uncond"].computed_steps == [0, 1, 2, 3]
    assert req.branches["uncond"].diffs == {1: 1.0, 2: 1.0, 3: 1.0}


def test_batched_cfg_treats_a_repeated_timestep_as_a_new_request():
    cache = make(cfg="batched")
    call(cache, 1.0)
    call(cache, 1.0)
    assert [r.steps for r in cache.records] == [1, 1]


def test_skipped_uncond_call_keeps_branches_aligned():
    cache = make(warmup_steps=0)
    call(cache, 1.0), call(cache, 1.0)
    call(cache, 0.8)  # the pipeline skipped the uncond call at this step
    call(cache, 0.6), call(cache, 0.6)
    (req,) = cache.records
    assert sorted(req.branches["cond"].computed_steps + req.branches["cond"].cached_steps) == [0, 1, 2]
    assert sorted(req.branches["uncond"].computed_steps + req.branches["uncond"].cached_steps) == [0, 2]


def test_diff_is_relative_l1_against_the_last_computed_step():
    cache = make(threshold=0.15, warmup_steps=0)
    values = [1.0, 1.1, 1.2, 1.35]
    decisions = [call(cache, t, v) for t, v in zip([4, 3, 2, 1], values)]
    # step 1: |1.0-1.1|/1.0 = 0.1 < 0.15 -> cache; step 2: still vs step 0: 0.2 -> compute;
    # step 3: vs step 2 (1.2): 0.125 -> cache
    assert [d.action.value for d in decisions] == ["compute", "cache", "compute", "cache"]
    assert [round(d.diff, 6) if d.diff is not None else None for d in decisions] == [None, 0.1, 0.2, 0.125]


def test_explicit_request_counts_steps_without_timesteps():
    cache = make(cfg="separate")
    owner = frozenset({id(OWNER)})
    with open_request(owner, num_inference_steps=3):
        for _ in range(3):
            call(cache, None), call(cache, None)  # cond, uncond by call parity
    (req,) = cache.records
    assert req.source == "explicit" and req.steps == 3 and req.num_inference_steps == 3
    assert set(req.branches) == {"cond", "uncond"}
    assert not any(s.explicit for s in cache.states_for(None)), "buffers of a closed request are dropped"


def test_num_inference_steps_bounds_a_detected_request_when_known():
    cache = make(num_inference_steps=2)
    with open_request(frozenset({999}), 2):  # a request for another model does not apply
        decisions = [call(cache, t) for t in (1.0, 0.5, 0.25)]  # one direction throughout
    assert [(r.source, r.num_inference_steps, r.steps) for r in cache.records] == [("timestep", 2, 2), ("timestep", 2, 1)]
    assert [d.step for d in decisions] == [0, 1, 0]


def test_a_branch_frees_its_buffers_after_its_last_step():
    cache = make(num_inference_steps=2)
    latent = torch.zeros(1)
    gated = cache.gate(torch.ones(2, 5), torch.tensor([1.0]), OWNER, latent)
    cache.reuse(gated, lambda h: (h + 1, torch.ones(2, 5)), 0, MIDDLE, (torch.zeros(2, 5),))
    assert cache.records[0].bytes_held == 2 * 40  # head residual + middle residual, fp32 [2, 5]
    gated = cache.gate(torch.ones(2, 5), torch.tensor([0.5]), OWNER, torch.zeros(1))
    cache.reuse(gated, lambda h: (h + 1, torch.ones(2, 5)), 0, MIDDLE, (torch.zeros(2, 5),))
    assert cache.records[0].bytes_held == 0


def test_same_latent_is_another_branch_and_a_third_call_gets_its_own():
    cache = make(warmup_steps=0)
    for t in (1.0, 0.5):
        latent = torch.zeros(1)
        for _ in range(3):  # cond, uncond, a third guidance call: all on the step's latent
            cache.gate(torch.ones(2, 5), torch.tensor([t]), OWNER, latent)
    (req,) = cache.records
    assert req.steps == 2 and list(req.branches) == ["cond", "uncond", "branch2"]
    assert all(b.computed_steps + b.cached_steps == [0, 1] for b in req.branch_list)


def test_new_conditioning_starts_a_new_request_whatever_the_timestep():
    cache = make()
    text_a, text_b = torch.zeros(1, 2), torch.zeros(1, 2)
    for t in (1.0, 0.8, 0.6):
        cache.gate(torch.ones(2, 5), torch.tensor([t]), OWNER, torch.zeros(1), text_a)
    cache.gate(torch.ones(2, 5), torch.tensor([0.4]), OWNER, torch.zeros(1), text_b)  # continues in time only
    assert [r.steps for r in cache.records] == [3, 1]


def test_an_idle_detected_request_is_dropped():
    cache = make(request_idle_seconds=0.05)
    gated = cache.gate(torch.ones(2, 5), torch.tensor([1.0]), OWNER, torch.zeros(1))
    cache.reuse(gated, lambda h: (h + 1, torch.ones(2, 5)), 0, MIDDLE, (torch.zeros(2, 5),))
    del gated
    assert cache.records[0].bytes_held > 0
    time.sleep(0.3)
    assert cache.records[0].bytes_held == 0  # reading the records sweeps idle requests


def test_request_validates_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        with cachedit.request(torch.nn.Linear(1, 1), num_inference_steps=0):
            pass


def test_interleaved_threads_each_get_their_own_request():
    cache = make(warmup_steps=0, threshold=0.15)
    alone = make(warmup_steps=0, threshold=0.15)
    timesteps = [1.0, 0.8, 0.6, 0.4, 0.2]
    values = {"a": [1.0, 1.05, 1.3, 1.32, 1.34], "b": [2.0, 2.5, 2.55, 2.6, 3.0]}
    expected = {k: [call(alone, t, v).describe() for t, v in zip(timesteps, vs)] for k, vs in values.items()}
    turns = threading.Semaphore(1), threading.Semaphore(0)
    got = {}

    def worker(name, mine, other):
        out = []
        for t, v in zip(timesteps, values[name]):
            turns[mine].acquire()  # strict alternation: a0 b0 a1 b1 ...
            out.append(call(cache, t, v).describe())
            turns[other].release()
        got[name] = out

    threads = [threading.Thread(target=worker, args=("a", 0, 1)), threading.Thread(target=worker, args=("b", 1, 0))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert got == expected
    assert sorted(r.steps for r in cache.records) == [5, 5]


def test_model_instances_sharing_a_graph_keep_their_own_requests():
    cache = make()
    other = torch.nn.Parameter(torch.zeros(1))
    residual = torch.ones(2, 5)
    for t in [1.0, 0.5]:
        cache.gate(residual, torch.tensor([t]), OWNER)
        cache.gate(residual, torch.tensor([t]), other)  # same timestep, another model: not a CFG pair
    assert [r.steps for r in cache.records_for({id(OWNER)})] == [2]
    assert [r.steps for r in cache.records_for({id(other)})] == [2]
    assert set(cache.records_for({id(OWNER)})[0].branches) == {"main"}


def test_without_timestep_or_request_nothing_is_cached():
    cache = make(threshold=0.9, warmup_steps=0)
    decisions = [call(cache, None) for _ in range(4)]
    assert all(not d.cache for d in decisions)
    assert "request boundaries unknown" in decisions[-1].describe()
