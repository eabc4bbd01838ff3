"""``cachedit serve`` and ``cachedit generate``: an OpenAI-shaped image server with continuous batching.

Note [Continuous batching]
~~~~~~~~~~~~~~~~~~~~~~~~~~
One worker thread owns the model. It keeps a list of active generations and a FIFO queue:
  - at each step boundary it admits queued generations into the active list, up to ``max_batch``,
    while they are *compatible* with the active ones: the same image size (the transformer's image
    tokens, rotary tables and ids are shared by every row of one call). Step counts, seeds, guidance
    and cache settings may differ: every row carries its own timestep, and each generation is its own
    cachedit request (``cachedit.open_request``). A queued generation of another size waits until the
    active list drains (FIFO: nothing is overtaken, nothing starves);
  - each step runs ONE transformer call for all active generations, their rows tagged with
    ``cachedit.rows`` (a generation's CFG rows together: uncond then cond, as the pipeline alone), so
    each generation decides compute/cache with its own state and settings, and the middle blocks run
    only on the rows that compute. The batch dimension is marked dynamic, so no mix recompiles;
  - each generation then takes its own guidance and scheduler step; a finished one is decoded, its
    request closed (buffers freed) and its HTTP handler woken.
So a generation served among others makes the same decisions as alone (up to float reordering in the
batched matmuls, Note [Rows of several requests]).

Faults: a client that disconnects marks its generation cancelled; the worker drops it at the next step
and closes its request. A full queue answers 429 with Retry-After. A generation whose request cannot
start fails alone (``cachedit.RowsError`` names it before any row moved). An error raised before the
gate (in the head) is retried one generation at a time, so only the one that raises fails; an error
after the gate fails the generations of that call (their states moved together). SIGTERM: uvicorn
stops accepting, the in-flight generations finish, then the worker stops.

The model: the embedded pipeline (``cachedit.embedded``, offline, CPU) or ``--model DIR``, a directory
of an ``EmbeddedDiTPipeline`` (the loop below is that pipeline's ``__call__``, batched across requests).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import io
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

import cachedit
from cachedit.config import CacheditConfig, request_settings
from cachedit.runtime import policy

log = logging.getLogger("cachedit.serve")

MAX_STEPS = 200
MAX_N = 4
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A bad request: ``param`` names the field (``cachedit.threshold`` for a per-request setting)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Cancelled(RuntimeError):
    """The client went away: the generation was dropped at a step boundary."""


@dataclasses.dataclass(frozen=True)
class Params:
    """A validated generation request."""

    prompt: str
    n: int = 1
    height: int = 32
    width: int = 32
    steps: int = 8
    guidance: float = 4.0
    seed: int = 0
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


FIELDS = (
    "prompt", "n", "size", "response_format", "model", "user",  # OpenAI's
    "num_inference_steps", "guidance_scale", "seed", "cachedit",  # extensions
)


def _int(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"{name}={value!r}: expected an integer from {low} to {high}")
    if not low <= value <= high:
        raise RequestError(name, f"{name}={value} is out of range; expected {low} to {high}")
    return value


def parse_request(
    body: Any, *, patch: int, default_size: int, max_size: int, default_steps: int, base: CacheditConfig | None = None,
    max_n: int = MAX_N,
) -> Params:
    """Validate the JSON body of ``POST /v1/images/generations``; errors name the field. ``base``: the
    served model's configuration, which the per-request settings override."""
    if not isinstance(body, dict):
        raise RequestError(None, f"the body must be a JSON object; got {type(body).__name__}")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise RequestError(unknown[0], f"unknown field {unknown[0]!r}; accepted fields: {', '.join(FIELDS)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt", f"prompt={prompt!r}: expected a non-empty string")
    if len(prompt) > 4000:
        raise RequestError("prompt", f"prompt has {len(prompt)} characters; at most 4000")
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise RequestError("response_format", f"response_format={fmt!r}: only 'b64_json' is served (no image URLs)")
    n = _int(body, "n", 1, 1, max_n)
    size = body.get("size", f"{default_size}x{default_size}")
    if not isinstance(size, str) or size.count("x") != 1 or not all(p.isdigit() for p in size.split("x")):
        raise RequestError("size", f"size={size!r}: expected 'WIDTHxHEIGHT', e.g. '{default_size}x{default_size}'")
    width, height = (int(p) for p in size.split("x"))
    for side in (width, height):
        if side % patch or not patch <= side <= max_size:
            raise RequestError(
                "size", f"size={size!r}: each side must be a multiple of the model's patch size {patch}, from {patch} to {max_size}"
            )
    steps = _int(body, "num_inference_steps", default_steps, 1, MAX_STEPS)
    guidance = body.get("guidance_scale", 4.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0.0 <= guidance <= MAX_GUIDANCE:
        raise RequestError("guidance_scale", f"guidance_scale={guidance!r}: expected a number from 0 to {MAX_GUIDANCE}")
    seed = body.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _int(body, "seed", 0, 0, MAX_SEED)
    settings = body.get("cachedit", {}) or {}
    if not isinstance(settings, dict):
        raise RequestError("cachedit", f"cachedit={settings!r}: expected an object of per-request settings, e.g. {{\"threshold\": 0.1}}")
    settings = check_settings(settings, steps, base)
    return Params(prompt, n, height, width, steps, float(guidance), seed, settings)


def check_settings(settings: Mapping[str, Any], steps: int, base: CacheditConfig | None = None) -> dict[str, Any]:
    """Per-request cache settings, checked as ``cachedit.request`` checks them, plus what the step count
    allows (a budget or mask that cannot be honoured); errors name ``cachedit.<key>``."""
    checked = {}
    for key, value in settings.items():
        try:
            checked.update(request_settings({key: value}))
        except (ValueError, TypeError) as err:
            raise RequestError(f"cachedit.{key}", str(err)) from None
        if key == "threshold" and checked[key] < 0:
            raise RequestError("cachedit.threshold", f"threshold={value!r} is negative; expected >= 0 (0 disables caching)")
    try:
        policy.plan((base or CacheditConfig()).for_request(checked), steps)
    except ValueError as err:
        key = "budget" if "budget" in checked else "scm" if "scm" in checked else next(iter(checked), None)
        raise RequestError(f"cachedit.{key}" if key else "cachedit", str(err)) from None
    return checked


@dataclasses.dataclass(eq=False)
class Job:
    """One generation: its parameters, its place in the batch loop, and how it ends."""

    params: Params
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    on_step: Callable[[int], None] | None = None
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    started: float | None = None
    # set when admitted
    handle: Any = None
    scheduler: Any = None
    latents: torch.Tensor | None = None  # [n, S, C] packed
    embeds: torch.Tensor | None = None  # rows of encoder_hidden_states
    pooled: torch.Tensor | None = None
    step: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return self.params.height, self.params.width

    @property
    def cfg(self) -> bool:
        return self.params.guidance > 1.0

    @property
    def rows(self) -> int:
        return self.params.n * (2 if self.cfg else 1)

    def cancel(self) -> None:
        self.cancelled = True


class Metrics:
    """Prometheus metrics of one engine (its own registry)."""

    def __init__(self):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("cachedit_requests", "Generation requests by outcome", ["status"], registry=r)
        self.queue = prom.Gauge("cachedit_queue_depth", "Generations waiting to join the batch", registry=r)
        self.active = prom.Gauge("cachedit_active_generations", "Generations in the running batch", registry=r)
        buckets = (1, 2, 4, 8, 16, 32, 64)
        self.batch_rows = prom.Histogram("cachedit_batch_rows", "Rows per transformer call", buckets=buckets, registry=r)
        self.batch_requests = prom.Histogram("cachedit_batch_generations", "Generations per transformer call", buckets=buckets, registry=r)
        self.steps = prom.Counter("cachedit_steps", "Transformer steps of finished generations, computed or cached", ["kind"], registry=r)
        self.latency = prom.Histogram(
            "cachedit_request_latency_seconds", "Submission to result, per generation",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.bytes_held = prom.Gauge("cachedit_residual_bytes_held", "Residual buffers held by live requests", registry=r)

    def text(self) -> bytes:
        import prometheus_client as prom

        return prom.generate_latest(self.registry)


class Engine:
    """The batching worker around one embedded-style pipeline (Note [Continuous batching])."""

    def __init__(self, pipe, options: Mapping[str, Any] | None = None, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}: both must be >= 1")
        from cachedit.embedded.pipeline import EmbeddedDiTPipeline

        if not isinstance(pipe, EmbeddedDiTPipeline):
            raise TypeError(
                f"cachedit serve batches the EmbeddedDiTPipeline loop; {type(pipe).__name__} is not supported yet "
                "(load a directory saved from cachedit.embedded, or serve it one request at a time with cachedit.enable)"
            )
        self.pipe = pipe
        self.options = dict(options or {})
        self.config = CacheditConfig.resolve(self.options)  # a bad option fails here, not at the first generation
        self.model = pipe.transformer
        self.model.compile(backend="cachedit", options=self.options)
        self.patch = pipe.patch_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = Metrics()
        self.queue: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=64)
        self.thread = threading.Thread(target=self._run, name="cachedit-serve-worker", daemon=True)
        self.thread.start()

    # -- the outside ------------------------------------------------------------------------------------

    def submit(self, params: Params, on_step: Callable[[int], None] | None = None) -> Job:
        job = Job(params, on_step=on_step)
        with self.cond:
            if self.stopping:
                raise QueueFull(5)
            if len(self.queue) >= self.max_queue:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFull(self.retry_after())
            self.queue.append(job)
            self.metrics.queue.set(len(self.queue))
            self.cond.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until the queue has room, roughly: the batches queued ahead times the steps of a queued
        generation (their mean) times the recent mean seconds of a step."""
        step = (sum(self.step_seconds) / len(self.step_seconds)) if self.step_seconds else 0.1
        steps = sum(j.params.steps for j in self.queue) / len(self.queue) if self.queue else 1
        batches = math.ceil(len(self.queue) / self.max_batch)
        return max(1, math.ceil(batches * steps * step))

    def generate(self, params: Params, on_step: Callable[[int], None] | None = None, timeout: float | None = None) -> dict:
        return self.submit(params, on_step).future.result(timeout)

    def bytes_held(self) -> int:
        return sum(r.bytes_held for r in cachedit.stats(self.model))

    def health(self) -> dict:
        with self.cond:
            queued, active = len(self.queue), len(self.active)
        held = self.bytes_held()
        self.metrics.bytes_held.set(held)
        return {"status": "draining" if self.stopping else "ok", "queued": queued, "active": active, "bytes_held": held}

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued and active generation, then stop the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def warm(self) -> float:
        """Compile (and trace the dynamic batch) before serving: two generations of the default size in one batch."""
        start = time.perf_counter()
        size = self.pipe.default_sample_size
        jobs = [self.submit(Params("a red circle", height=size, width=size, steps=2, seed=s)) for s in (0, 1)]
        for job in jobs:
            job.future.result()
        return time.perf_counter() - start

    # -- the worker ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.active and not self.queue:
                    if self.stopping:
                        return
                    self.cond.wait()
                admitted = self._admit()
            for job in admitted:
                self._start(job)
            if self.active:
                self._step()

    def _admit(self) -> list[Job]:
        """Take queued jobs into the batch at this step boundary (under ``cond``)."""
        taken = []
        while self.queue and len(self.active) + len(taken) < self.max_batch:
            job = self.queue[0]
            if job.cancelled:
                self.queue.popleft()
                self._fail(job, Cancelled("cancelled before it started"), "cancelled")
                continue
            size = (self.active or taken)[0].size if (self.active or taken) else job.size
            if job.size != size:
                break  # FIFO: a generation of another size waits for the batch to drain
            taken.append(self.queue.popleft())
        self.metrics.queue.set(len(self.queue))
        return taken

    @torch.no_grad()
    def _start(self, job: Job) -> None:
        """Encode the prompt, draw the noise, open the request (as the pipeline does alone)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from cachedit.embedded.pipeline import pack_patches

        p = job.params
        try:
            pipe = self.pipe
            device, dtype = pipe._execution_device, self.model.dtype
            embeds, pooled = pipe.encode_prompt(p.prompt, device)
            embeds = embeds.repeat_interleave(p.n, 0).to(dtype)
            pooled = pooled.repeat_interleave(p.n, 0).to(dtype)
            if job.cfg:
                neg, neg_pooled = pipe.encode_prompt([""], device)
                embeds = torch.cat([neg.repeat_interleave(p.n, 0).to(dtype), embeds])
                pooled = torch.cat([neg_pooled.repeat_interleave(p.n, 0).to(dtype), pooled])
            generator = torch.Generator().manual_seed(p.seed)
            noise = torch.randn((p.n, 3, p.height, p.width), generator=generator, dtype=torch.float32)
            job.latents = pack_patches(noise.to(device), self.patch)
            job.embeds, job.pooled = embeds, pooled
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / p.steps, p.steps), device=device)
            job.scheduler = scheduler
            job.handle = cachedit.open_request(self.model, num_inference_steps=p.steps, **p.settings)
        except Exception as err:  # this generation only
            log.exception("cachedit serve: a generation failed to start")
            self._fail(job, err, "error")
            return
        job.started = time.perf_counter()
        with self.cond:
            self.active.append(job)
        self.metrics.active.set(len(self.active))

    def _fail(self, job: Job, err: BaseException, status: str) -> None:
        if job.handle is not None:
            job.handle.close()
        with self.cond:
            if job in self.active:
                self.active.remove(job)
        self.metrics.active.set(len(self.active))
        self.metrics.requests.labels(status).inc()
        if not job.future.done():
            job.future.set_exception(err)

    @torch.no_grad()
    def _forward(self, jobs: list[Job]) -> tuple[torch.Tensor, Any]:
        """One transformer call for ``jobs``' rows; returns the output and the rows context."""
        from cachedit.embedded.pipeline import image_ids

        p0 = jobs[0].params
        device, dtype = self.pipe._execution_device, self.model.dtype
        hidden = torch.cat([torch.cat([j.latents] * 2) if j.cfg else j.latents for j in jobs]).to(dtype)
        embeds = torch.cat([j.embeds for j in jobs])
        pooled = torch.cat([j.pooled for j in jobs])
        timestep = torch.cat([(j.scheduler.timesteps[j.step] / 1000).expand(j.rows) for j in jobs]).to(dtype)
        if hidden.shape[0] > 1:  # one graph for every batch size and mix (Note [Rows of several requests])
            for t in (hidden, embeds, pooled, timestep):
                torch._dynamo.mark_dynamic(t, 0)
        img_ids = image_ids(p0.height, p0.width, self.patch, device)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device)
        with cachedit.rows(self.model, [(j.handle, j.rows) for j in jobs]) as tagged:
            try:
                out = self.model(
                    hidden_states=hidden, encoder_hidden_states=embeds, pooled_projections=pooled,
                    timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                )[0]
            except Exception as err:
                err.cachedit_gated = tagged.gated  # type: ignore[attr-defined]
                raise
        return out.float()

    def _step(self) -> None:
        jobs = []
        for job in list(self.active):
            if job.cancelled:
                self._fail(job, Cancelled("the client disconnected"), "cancelled")
            else:
                jobs.append(job)
        if not jobs:
            return
        start = time.perf_counter()
        try:
            outs = [(jobs, self._forward(jobs))]
        except cachedit.RowsError as err:  # one generation's request could not start: nothing moved
            bad = next(j for j in jobs if j.handle is err.handle)
            self._fail(bad, err.error, "error")
            return
        except Exception as err:
            if getattr(err, "cachedit_gated", 1) == 0 and len(jobs) > 1:
                outs = []  # raised before any decision: run each alone, so only the one that raises fails
                for job in jobs:
                    try:
                        outs.append(([job], self._forward([job])))
                    except Exception as alone:
                        log.exception("cachedit serve: a generation raised inside the model")
                        self._fail(job, alone, "error")
            else:
                log.exception("cachedit serve: a batched step raised after its decisions; its generations fail")
                for job in jobs:
                    self._fail(job, err, "error")
                return
        self.step_seconds.append(time.perf_counter() - start)
        for group, out in outs:
            rows = sum(j.rows for j in group)
            self.metrics.batch_rows.observe(rows)
            self.metrics.batch_requests.observe(len(group))
            offset = 0
            for job in group:
                mine = out[offset : offset + job.rows]
                offset += job.rows
                try:
                    self._advance(job, mine)
                except Exception as err:
                    log.exception("cachedit serve: a generation failed after its step")
                    self._fail(job, err, "error")

    def _advance(self, job: Job, noise: torch.Tensor) -> None:
        if job.cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + job.params.guidance * (cond - uncond)
        t = job.scheduler.timesteps[job.step]
        job.latents = job.scheduler.step(noise, t, job.latents, return_dict=False)[0]
        job.step += 1
        if job.on_step is not None:
            job.on_step(job.step)
        if job.step == job.params.steps:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        from cachedit.embedded.pipeline import unpack_patches

        p = job.params
        job.handle.close()
        record = job.handle.stats
        image = unpack_patches(job.latents, p.height, p.width, self.patch)
        pils = self.pipe.image_processor.postprocess(image, output_type="pil")
        data = []
        for pil in pils:
            buffer = io.BytesIO()
            pil.save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
        done = time.perf_counter()
        branch = record.branch_list[0] if record is not None and record.branch_list else None
        cached = list(branch.cached_steps) if branch else []
        computed = list(branch.computed_steps) if branch else []
        result = {
            "created": int(time.time()),
            "data": data,
            "cachedit": {
                "seed": p.seed,
                "num_inference_steps": p.steps,
                "cached_steps": cached,
                "computed_steps": computed,
                "settings": dict(p.settings),
                "timing": {
                    "queued_s": round(job.started - job.submitted, 6),
                    "run_s": round(done - job.started, 6),
                    "total_s": round(done - job.submitted, 6),
                },
            },
        }
        with self.cond:
            self.active.remove(job)
        self.metrics.active.set(len(self.active))
        self.metrics.requests.labels("ok").inc()
        self.metrics.steps.labels("cached").inc(len(cached))
        self.metrics.steps.labels("computed").inc(len(computed))
        self.metrics.latency.observe(done - job.submitted)
        job.future.set_result(result)


# -- HTTP ---------------------------------------------------------------------------------------------------


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None):
    from starlette.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine, model_id: str = "cachedit-embedded", max_size: int = 128, default_steps: int = 8, warm: bool = True):
    """The ASGI app (FastAPI) around ``engine``; the engine is warmed at start-up and drained at shutdown."""
    import contextlib

    from fastapi import FastAPI, Request
    from starlette.responses import JSONResponse, Response

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if warm:
            seconds = await asyncio.to_thread(engine.warm)
            log.warning(f"cachedit serve: warmed the compiled model in {seconds:.1f} s")
        yield
        await asyncio.to_thread(engine.stop)  # uvicorn has let the in-flight requests finish
        print("cachedit serve: drained, stopped", flush=True)

    app = FastAPI(title="cachedit serve", lifespan=lifespan)
    default_size = engine.pipe.default_sample_size

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "cachedit"}]}

    @app.get("/metrics")
    async def metrics():
        engine.health()  # refresh the gauges read on demand
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def generations(request):
        try:
            body = await request.json()
        except Exception as err:
            return _error(400, f"the body is not valid JSON: {err}")
        try:
            params = parse_request(
                body, patch=engine.patch, default_size=default_size, max_size=max_size, default_steps=default_steps,
                base=engine.config,
            )
            if isinstance(body.get("model"), str) and body["model"] != model_id:
                raise RequestError("model", f"model={body['model']!r}: this server serves {model_id!r}")
        except RequestError as err:
            return _error(400, str(err), err.param)
        try:
            job = engine.submit(params)
        except QueueFull as err:
            return _error(429, str(err), headers={"Retry-After": str(err.retry_after)})
        waiting = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.05)
            if done:
                break
            if await request.is_disconnected():
                job.cancel()  # dropped at the next step boundary, its request closed
                waiting.cancel()
                return Response(status_code=499)
        try:
            return JSONResponse(waiting.result())
        except Cancelled as err:
            return Response(str(err), status_code=499)
        except Exception as err:
            return _error(500, f"the generation failed: {type(err).__name__}: {err}")

    generations.__annotations__["request"] = Request  # the class itself: this module's annotations are strings
    app.post("/v1/images/generations")(generations)
    return app


# -- CLI ----------------------------------------------------------------------------------------------------


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cache options (defaults of every request; CACHEDIT_* variables apply too)")
    group.add_argument("--inner", choices=("inductor", "eager", "aot_eager"), default=None, help="the inner compiler")
    group.add_argument("--threshold", type=float, default=None, help="residual-diff threshold")
    group.add_argument("--Fn", type=int, default=None, help="blocks always computed first")
    group.add_argument("--Bn", type=int, default=None, help="blocks always computed last")
    group.add_argument("--warmup-steps", type=int, default=None, dest="warmup_steps")
    group.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                       help="any cachedit option, e.g. -o max_continuous_cached_steps=2 (repeatable)")


def cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model's compile options from the CLI (embedded-model defaults: Fn=1, Bn=0, warmup 2)."""
    options: dict[str, Any] = {"Fn": 1, "Bn": 0, "warmup_steps": 2}
    for name in ("inner", "threshold", "Fn", "Bn", "warmup_steps"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE, e.g. -o threshold=0.1")
        options[key.strip()] = value.strip()
    try:
        CacheditConfig.resolve(options)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"cachedit: {err}") from None
    return options


def _load(model: str | None):
    from cachedit.embedded import load_pipeline

    return load_pipeline(model)


def build_serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, metavar="DIR", help="an EmbeddedDiTPipeline directory (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, dest="max_batch", help="generations per transformer call (1: no batching)")
    parser.add_argument("--max-queue", type=int, default=64, dest="max_queue", help="waiting generations before 429")
    parser.add_argument("--max-size", type=int, default=128, dest="max_size", help="largest image side")
    parser.add_argument("--default-steps", type=int, default=8, dest="default_steps", help="num_inference_steps when a request gives none")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_cache_options(parser)
    return parser


def serve_main(args: argparse.Namespace) -> int:
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    options = cache_options(args)
    engine = Engine(_load(args.model), options, max_batch=args.max_batch, max_queue=args.max_queue)
    app = create_app(engine, max_size=args.max_size, default_steps=args.default_steps)
    print(f"cachedit serve: http://{args.host}:{args.port} (options {options}, max batch {args.max_batch})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def build_generate_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("prompt")
    parser.add_argument("--out", default="cachedit.png", metavar="FILE", help="PNG path (n > 1: FILE-0.png, ...)")
    parser.add_argument("--model", default=None, metavar="DIR")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, dest="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float, default=4.0, dest="guidance_scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a per-request setting, e.g. --setting threshold=0.2 (repeatable)")
    add_cache_options(parser)
    return parser


def generate_main(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    options = cache_options(args)
    pipe = _load(args.model)
    body = {"prompt": args.prompt, "n": args.n, "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale, "seed": args.seed}
    if args.size:
        body["size"] = args.size
    settings = {}
    for item in args.setting:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--setting {item!r}: expected KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    body["cachedit"] = settings
    engine = Engine(pipe, options, max_batch=1, max_queue=1)
    try:
        params = parse_request(body, patch=engine.patch, default_size=pipe.default_sample_size, max_size=1024,
                               default_steps=args.num_inference_steps, base=engine.config)
    except RequestError as err:
        raise SystemExit(f"cachedit generate: {err}") from None
    with tqdm(total=params.steps, desc="steps") as bar:
        result = engine.generate(params, on_step=lambda step: bar.update(1))
    engine.stop()
    paths = [args.out] if params.n == 1 else [args.out.replace(".png", "") + f"-{i}.png" for i in range(params.n)]
    for path, item in zip(paths, result["data"]):
        with open(path, "wb") as f:
            f.write(base64.b64decode(item["b64_json"]))
    info = result["cachedit"]
    print(f"wrote {', '.join(paths)}: {info['timing']['run_s']:.2f} s, cached steps {info['cached_steps']}, "
          f"computed {info['computed_steps']}")
    return 0
