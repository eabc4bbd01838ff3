"""A stateful property test of request state: hypothesis draws streams of requests served concurrently.

The machine serves requests through one compiled tiny Flux from several execution contexts (two
threads and two asyncio tasks on one event loop), interleaving their steps as a server would: explicit
and detected requests, separate CFG with skipped uncond calls and a third guidance call, per-request
settings, mid-schedule starts, repeated timesteps, cancellations, and two resolutions (so two graphs of
one model serve the stream). Every request that completes must equal the same request run alone on a
compile of its own: the same final latent (bitwise: inner "eager", so equal decisions mean equal aten
ops on equal inputs) and the same cached steps per branch.

Budget: ``TEST_STATEFUL_EXAMPLES`` examples (default 6 for CI) of up to ``TEST_STATEFUL_STEPS`` rules.
"""

import asyncio
import concurrent.futures
import os
import queue
import threading

import pytest
import torch
import torch._dynamo
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import cachedit
from tests.request_streams import OPTIONS, SPEC, Request, cached_steps, exhaust

EXAMPLES = int(os.environ.get("TEST_STATEFUL_EXAMPLES", "6"))
STEPS = int(os.environ.get("TEST_STATEFUL_STEPS", "50"))
TIMEOUT = 120  # seconds for one step of one request: a hang is a failure


class ThreadContext:
    """A worker thread that runs the functions handed to it, one at a time."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            fn, future = self._queue.get()
            if fn is None:
                return
            try:
                future.set_result(fn())
            except BaseException as err:  # handed back to the caller
                future.set_exception(err)

    def call(self, fn):
        future = concurrent.futures.Future()
        self._queue.put((fn, future))
        return future.result(timeout=TIMEOUT)

    def close(self):
        self._queue.put((None, None))
        self._thread.join(timeout=TIMEOUT)


class TaskContext:
    """An asyncio task on a shared event loop that runs the functions handed to it, one at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue = asyncio.run_coroutine_threadsafe(self._make_queue(), loop).result(timeout=TIMEOUT)
        self._task = asyncio.run_coroutine_threadsafe(self._start(), loop).result(timeout=TIMEOUT)

    @staticmethod
    async def _make_queue():
        return asyncio.Queue()

    async def _start(self):
        return asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self):
        while True:
            fn, future = await self._queue.get()
            if fn is None:
                return
            try:
                future.set_result(fn())
            except BaseException as err:  # handed back to the caller
                future.set_exception(err)
            await asyncio.sleep(0)  # let the other tasks run between steps

    def call(self, fn):
        future = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (fn, future))
        return future.result(timeout=TIMEOUT)

    def close(self):
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (None, None))


def _schedule(kind: str, n: int) -> list[float]:
    values = SPEC.timesteps(n)
    if kind == "heun":  # repeated timesteps, each on a new latent
        return values[:1] + [t for t in values[1:] for _ in range(2)]
    return values


@st.composite
def requests(draw) -> Request:
    explicit = draw(st.booleans())
    n = draw(st.integers(3, 7))
    values = _schedule(draw(st.sampled_from(["plain", "heun"])), n)
    start = draw(st.integers(0, 2))  # img2img: start mid-schedule
    calls = draw(st.sampled_from([1, 1, 2, 3]))
    skip = tuple(draw(st.sets(st.integers(1, len(values) - 1), max_size=2))) if calls > 1 else ()
    settings_ = {}
    if explicit:  # per-request settings ride on explicit requests
        settings_ = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "threshold": st.sampled_from([0.0, 0.3, 0.9]),
                    "warmup_steps": st.integers(0, 2),
                    "max_continuous_cached_steps": st.sampled_from([-1, 1]),
                },
            )
        )
    return Request(
        seed=draw(st.integers(0, 5)),
        timesteps=values[start:],
        explicit=explicit,
        settings=settings_,
        calls_per_step=calls,
        tokens=draw(st.sampled_from([16, 24])),
        skip_extra_at=skip,
    )


class Serving:
    """What lives across examples: the compiled models and the contexts (compiling per example would
    dominate the budget; requests, not compiles, are what the machine varies)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.loop_thread.start()
        self.contexts = [ThreadContext(), ThreadContext(), TaskContext(self.loop), TaskContext(self.loop)]
        self.model = SPEC.build()
        self.fast = torch.compile(self.model, backend="cachedit", options=OPTIONS)
        # The reference: another instance compiled separately (different options, so Dynamo compiles
        # it anew rather than reusing the machine's graphs), each request run alone on it.
        self.solo_model = SPEC.build()
        self.solo_fast = torch.compile(self.solo_model, backend="cachedit", options={**OPTIONS, "log": "error"})
        self.solo_results: dict = {}
        self.completed: list[Request] = []  # every request checked against its solo run

    def solo(self, request: Request):
        key = repr(request)
        if key not in self.solo_results:
            before = {r.id for r in cachedit.stats(self.solo_model)}
            out = exhaust(request.generate(self.solo_fast))
            (record,) = [r for r in cachedit.stats(self.solo_model) if r.id not in before]
            self.solo_results[key] = (out, cached_steps(record))
        return self.solo_results[key]

    def close(self):
        for context in self.contexts:
            context.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def serving():
    torch._dynamo.reset()
    serving = Serving()
    yield serving
    serving.close()
    torch._dynamo.reset()


class RequestStreams(RuleBasedStateMachine):
    serving: Serving  # set by the test

    def __init__(self):
        super().__init__()
        self.active: dict[int, tuple[Request, object, int | None]] = {}  # context -> (request, generator, record id)

    @initialize()
    def fresh_contexts(self):
        self.active.clear()

    def _record_ids(self):
        return {r.id for r in cachedit.stats(self.serving.model)}

    @precondition(lambda self: len(self.active) < len(self.serving.contexts))
    @rule(data=st.data(), request=requests())
    def start(self, data, request):
        free = [i for i in range(len(self.serving.contexts)) if i not in self.active]
        context = data.draw(st.sampled_from(free))
        generator = request.generate(self.serving.fast)
        self.active[context] = (request, generator, None)
        self._advance(context)

    @precondition(lambda self: self.active)
    @rule(data=st.data(), count=st.integers(1, 3))
    def step(self, data, count):
        """Advance one context by a few steps; the rule runs again for another context, so steps of
        different requests interleave."""
        context = data.draw(st.sampled_from(sorted(self.active)))
        for _ in range(count):
            if context in self.active:
                self._advance(context)

    @precondition(lambda self: self.active)
    @rule(data=st.data(), really=st.integers(0, 3))
    def cancel(self, data, really):
        """Cancel a request midway (one draw in four, so that most requests complete and get checked)."""
        context = data.draw(st.sampled_from(sorted(self.active)))
        if really == 0:
            _, generator, _ = self.active.pop(context)
            self.serving.contexts[context].call(generator.close)  # exits an explicit request's context there

    def _advance(self, context):
        request, generator, record = self.active[context]
        before = self._record_ids() if record is None else None

        def one_step():
            try:
                next(generator)
                return False, None
            except StopIteration as stop:
                return True, stop.value

        done, out = self.serving.contexts[context].call(one_step)
        if record is None:
            (record,) = self._record_ids() - before  # the request's first step opened exactly one record
            self.active[context] = (request, generator, record)
        if done:
            del self.active[context]
            self._check(request, out, record)

    def _check(self, request, out, record_id):
        expected_out, expected_steps = self.serving.solo(request)
        (record,) = [r for r in cachedit.stats(self.serving.model) if r.id == record_id]
        assert cached_steps(record) == expected_steps, f"{request}: cached steps differ from its solo run"
        assert torch.equal(out, expected_out), f"{request}: output differs from its solo run"
        assert record.steps == len(request.timesteps)
        self.serving.completed.append(request)

    @invariant()
    def finished_requests_hold_nothing(self):
        live = {record for _, _, record in self.active.values()}
        for record in cachedit.stats(self.serving.model):
            if record.id not in live and record.source == "explicit":
                assert record.bytes_held == 0, f"explicit request {record.id} ended but holds buffers"

    def teardown(self):
        for context, (_, generator, _) in list(self.active.items()):
            self.serving.contexts[context].call(generator.close)
        self.active.clear()


@pytest.mark.timeout(1800)
def test_request_streams_equal_their_solo_runs(serving):
    RequestStreams.serving = serving
    run = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=os.environ.get("TEST_STATEFUL_RANDOM") != "1",
    )(RequestStreams)
    run.TestCase().runTest()
    done = serving.completed
    print(f"stateful: {EXAMPLES} examples, {len(done)} completed requests checked against their solo runs")
    assert len(done) >= EXAMPLES, f"only {len(done)} requests completed: the machine checked too little"
    kinds = {(r.explicit, r.calls_per_step > 1, r.tokens) for r in done}
    assert len(kinds) >= 4, f"the streams covered too few kinds of request: {kinds}"
    graphs = [g for g in cachedit.api._graphs(serving.model) if g.cache is not None]
    assert len(graphs) == 2, "both resolutions should have been served, each by its own graph"
