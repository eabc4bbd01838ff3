"""Requests as a serving stack makes them, on tiny real diffusers transformers (issue: requests own their state).

Each scenario runs requests through one compiled model and compares every request with the same request
run alone on a fresh compile. Tolerance: none. With ``inner="eager"`` and the same decisions the parts
run the same aten ops on the same inputs, so a request served among others is bitwise its solo run; any
state leaking between requests changes a decision or a cached residual, and with it the output.
"""

import asyncio
import gc
import math
import threading
import time
import weakref

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cachedit
from cachedit.api import _graphs
from tests.request_streams import OPTIONS, SPEC, Request, cached_steps, compile_fresh, exhaust, flux_inputs, timesteps



pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def fresh(**options):
    return compile_fresh(**options)


def solo(request, **options):
    """``request`` alone on a fresh compile: (final latent, cached steps per branch)."""
    torch._dynamo.reset()
    model, fast = fresh(**options)
    out = request.run(fast)
    (record,) = cachedit.stats(model)
    torch._dynamo.reset()
    return out, cached_steps(record)


def test_concurrent_first_calls_on_a_fresh_compile_each_equal_their_solo_runs():
    """Two threads make their first calls at once: Dynamo compiles the frame twice, both graphs serve
    the same requests."""
    requests = {seed: Request(seed, timesteps(20), explicit=True) for seed in (1, 2)}
    expected = {seed: solo(r) for seed, r in requests.items()}
    assert all(steps["main"] for _, steps in expected.values()), "nothing cached: the scenario tests nothing"
    model, fast = fresh()
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(seed):
        try:
            gen = requests[seed].generate(fast)
            barrier.wait(timeout=60)  # both first calls race the compile
            results[seed] = exhaust(gen)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in requests]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors and not any(th.is_alive() for th in threads), errors
    records = cachedit.stats(model)
    assert sorted(r.steps for r in records) == [20, 20], [(r.id, r.steps) for r in records]
    for seed, (out, steps) in expected.items():
        assert torch.equal(results[seed], out), f"request {seed} differs from its solo run"
    assert sorted(map(cached_steps, records), key=str) == sorted((s for _, s in expected.values()), key=str)


def test_a_cancelled_request_then_img2img_starting_mid_schedule_starts_from_nothing():
    full = timesteps(28)
    cancelled = Request(1, full, stop_after=15)
    img2img = Request(2, full[17:])  # strength ~0.4: starts below the cancelled request's last timestep
    expected_out, expected_steps = solo(img2img)
    model, fast = fresh()
    assert cancelled.run(fast) is None
    out = img2img.run(fast)
    records = cachedit.stats(model)
    assert [r.steps for r in records] == [15, len(full) - 17]
    assert records[1].branches["main"].reasons[0] == "compute: warmup step"
    assert cached_steps(records[1]) == expected_steps and torch.equal(out, expected_out)


def test_one_call_requests_and_a_one_step_model_each_start_from_nothing():
    model, fast = fresh(warmup_steps=0, threshold=0.9)
    for seed in range(3):
        Request(seed, [1.0]).run(fast)  # a 1-step model: every request at the same timestep
    Request(3, timesteps(6, start=2)).run(fast)  # then a request below that timestep
    records = cachedit.stats(model)
    assert [(r.steps, list(r.branches)) for r in records] == [(1, ["main"])] * 3 + [(4, ["main"])]
    assert all(r.branches["main"].reasons[0].startswith("compute: no previous") for r in records)


def test_an_exception_mid_request_leaves_nothing_behind():
    model, fast = fresh()
    with pytest.raises(RuntimeError, match="client gone"):
        gen = Request(1, timesteps(10), explicit=True).generate(fast)
        for _ in range(6):
            next(gen)
        gen.throw(RuntimeError("client gone"))
    assert cachedit.stats(model)[0].bytes_held == 0
    request = Request(2, timesteps(10)[4:], explicit=True)
    expected = solo(request)
    torch._dynamo.reset()
    model, fast = fresh()
    assert torch.equal(request.run(fast), expected[0])


def test_asyncio_tasks_interleaved_on_one_thread_each_equal_their_solo_runs():
    requests = {seed: Request(seed, timesteps(16), calls_per_step=2) for seed in (1, 2)}
    expected = {seed: solo(r) for seed, r in requests.items()}
    model, fast = fresh()

    async def run(request):
        gen = request.steps(fast)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value
            await asyncio.sleep(0)  # the other task's step runs here

    async def main():
        return await asyncio.gather(*(run(r) for r in requests.values()))

    outs = asyncio.run(main())
    records = cachedit.stats(model)
    assert sorted(r.steps for r in records) == [16, 16]
    for out, (expected_out, expected_steps) in zip(outs, expected.values()):
        assert torch.equal(out, expected_out)
    assert sorted(map(cached_steps, records), key=str) == sorted((s for _, s in expected.values()), key=str)


def _flux_bf16(num_steps, mu=2.0):
    """FluxPipeline at 1536x1536 (9216 tokens: shift mu 2.0) passes bf16 sigmas: 50 steps repeat two."""
    sigmas = SPEC.timesteps(num_steps)
    shifted = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in sigmas]
    return [float(torch.tensor(t).to(torch.bfloat16)) for t in shifted]


def _heun(values):
    return values[:1] + [t for t in values[1:] for _ in range(2)]


@pytest.mark.parametrize(
    "schedule",
    [lambda: _flux_bf16(50), lambda: _heun(SPEC.timesteps(8))],
    ids=["bf16-50-steps", "heun-8-steps"],
)
def test_repeated_timesteps_are_new_steps_not_a_cfg_pair(schedule):
    """bf16 rounds neighbouring timesteps of long schedules to one value; Heun repeats them by design."""
    values = schedule()
    assert len(set(values)) < len(values), "the schedule has no repeated timestep"
    detected = Request(1, values)
    explicit_batched = Request(1, values, explicit=True, settings={"cfg": "batched"})  # each call one step
    expected_out, expected_steps = solo(explicit_batched)
    model, fast = fresh()
    out = detected.run(fast)
    (record,) = cachedit.stats(model)
    assert (record.steps, list(record.branches)) == (len(values), ["main"])
    assert cached_steps(record) == expected_steps and torch.equal(out, expected_out)


def test_a_third_call_at_one_step_gets_its_own_branch():
    triple = Request(1, timesteps(12), calls_per_step=3)
    model, fast = fresh(threshold=0.6)
    triple.run(fast)
    (record,) = cachedit.stats(model)
    assert list(record.branches) == ["cond", "uncond", "branch2"] and record.steps == 12
    for name, branch in record.branches.items():
        assert sorted(branch.cached_steps + branch.computed_steps) == list(range(12)), name
    # each branch decides on its own head residuals: compare with the diffs a branch alone would see
    assert record.branches["branch2"].diffs != record.branches["cond"].diffs


def test_per_request_thresholds_through_one_graph_without_recompiles():
    model, fast = fresh()
    never = Request(1, timesteps(12), explicit=True, settings={"threshold": 0.0})
    often = Request(1, timesteps(12), explicit=True, settings={"threshold": 0.9, "warmup_steps": 1})
    out_never, out_often = never.run(fast), often.run(fast)
    records = cachedit.stats(model)
    assert records[0].num_cached_steps == 0 and records[1].num_cached_steps > 0
    assert records[1].settings == {"threshold": 0.9, "warmup_steps": 1}
    assert not torch.equal(out_never, out_often)
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0
    assert torch.equal(out_often, solo(often)[0])


def test_structural_or_unknown_settings_per_request_are_refused():
    model = SPEC.build()
    with pytest.raises(ValueError, match="Fn=2 cannot be set per request: it is fixed when the model is compiled"):
        with cachedit.request(model, Fn=2):
            pass
    with pytest.raises(ValueError, match="Did you mean 'threshold'"):
        with cachedit.request(model, treshold=0.2):
            pass
    with pytest.raises(ValueError, match="threshold='high' is not a number"):
        with cachedit.request(model, threshold="high"):
            pass


def _tensors_alive(exclude: set[int]) -> list[torch.Tensor]:
    """Every real (not fake, not meta) tensor the garbage collector can see, minus ``exclude``."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    found = []
    for obj in gc.get_objects():
        try:
            is_tensor = isinstance(obj, torch.Tensor)
        except Exception:  # objects whose __class__ property raises
            continue
        if is_tensor and not isinstance(obj, FakeTensor) and obj.device.type != "meta" and id(obj) not in exclude:
            found.append(obj)
    return found


def _generate(fast, tokens, seed, steps=4):
    kwargs = flux_inputs(tokens, seed)
    x = kwargs.pop("hidden_states")
    with torch.no_grad():
        for t in SPEC.timesteps(steps):
            x = x - fast(hidden_states=x, timestep=torch.tensor([t]), **kwargs)[0] / steps


IDLE = 3.0  # seconds: far above the few milliseconds between the last detected call and the check


def test_finished_requests_hold_no_buffers_and_stats_count_the_live_ones():
    """50 detected requests over 3 resolutions and an explicit one: afterwards only the request that
    may still go on holds buffers, and ``bytes_held`` is what the garbage collector finds."""
    model, fast = fresh(threshold=0.9, warmup_steps=1, request_idle_seconds=IDLE)
    _generate(fast, 16, seed=0)  # compile for each resolution before the baseline
    for tokens in (24, 40):
        _generate(fast, tokens, seed=0)
    time.sleep(IDLE + 0.1)
    cachedit.stats(model)  # sweeps the idle request
    baseline = {id(t) for t in _tensors_alive(set())}
    for k in range(50):
        _generate(fast, (16, 24, 40)[k % 3], seed=k + 1)
    with cachedit.request(fast, num_inference_steps=None):
        _generate(fast, 24, seed=99)
    records = cachedit.stats(model)
    live = _tensors_alive(baseline)
    assert all(r.bytes_held == 0 for r in records[:-2]), "a superseded or exited request holds buffers"
    assert records[-2].bytes_held > 0 and records[-1].bytes_held == 0  # the last detected one may go on
    assert sum(t.numel() * t.element_size() for t in live) == sum(r.bytes_held for r in records)
    assert f"residual bytes held: {records[-2].bytes_held}" in cachedit.explain(model)
    del live
    time.sleep(IDLE + 0.1)  # the last detected request goes idle
    assert all(r.bytes_held == 0 for r in cachedit.stats(model))
    assert _tensors_alive(baseline) == []


def test_dynamo_reset_frees_the_state_and_the_registry_drops_dead_entries():
    from cachedit.runtime import registry

    model, fast = fresh(threshold=0.9, warmup_steps=1)
    Request(1, timesteps(6)).run(fast)
    (graph,) = _graphs(model)
    state = weakref.ref(graph.cache.states_for(None)[0])
    del graph
    params = list(model.parameters())
    assert registry.filed(params) > 0
    torch._dynamo.reset()
    gc.collect()
    assert state() is None, "torch._dynamo.reset() left the request state alive"
    assert registry.filed(params) == 0 and cachedit.stats(model) == []


def test_a_byte_cap_drops_the_oldest_detected_requests(caplog):
    """Two detected requests alive at once (two threads taking turns) under a cap of one byte: each
    computed step drops the other request's buffers, so neither ever caches, and the cap is logged once."""
    model, fast = fresh(threshold=0.9, warmup_steps=1, max_residual_bytes=1)
    turns = {1: threading.Semaphore(1), 2: threading.Semaphore(0)}
    errors = []

    def run(seed, other):
        class Alternating(torch.nn.Module):
            def forward(self, **kwargs):
                turns[seed].acquire()
                try:
                    return fast(**kwargs)
                finally:
                    turns[other].release()

        try:
            Request(seed, timesteps(8)).run(Alternating())
        except Exception as err:  # surfaced below
            errors.append(err)
            turns[other].release()

    with caplog.at_level("WARNING", logger="cachedit"):
        threads = [threading.Thread(target=run, args=(1, 2)), threading.Thread(target=run, args=(2, 1))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    assert not errors
    records = cachedit.stats(model)
    assert [r.steps for r in records] == [8, 8] and [r.num_cached_steps for r in records] == [0, 0]
    assert any("no previous computed step" in reason for reason in records[1].branches["main"].reasons.values())
    assert sum("max_residual_bytes=1" in r.message for r in caplog.records) == 1


def test_two_compiles_of_one_model_start_requests_with_their_own_defaults():
    """Two torch.compile calls on one model with different options share the model's requests (same
    split); a request started through one follows that compile's settings, whatever ran before it."""
    model = SPEC.build()
    never = torch.compile(model, backend="cachedit", options={**OPTIONS, "threshold": 0.0})
    often = torch.compile(model, backend="cachedit", options={**OPTIONS, "threshold": 0.9, "warmup_steps": 1})
    for fast in (never, often, never, often):
        Request(1, timesteps(8)).run(fast)
    assert [r.num_cached_steps > 0 for r in cachedit.stats(model)] == [False, True, False, True]
