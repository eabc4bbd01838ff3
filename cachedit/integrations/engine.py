"""The workers behind ``cachedit serve`` and ``cachedit generate``: one thread owns the model and runs
the queued generations; the HTTP layer (``serve.py``) only submits, waits and answers.

Note [Continuous batching]
~~~~~~~~~~~~~~~~~~~~~~~~~~
``BatchedEngine`` serves the embedded pipeline (``cachedit.embedded``), whose denoising loop it runs
itself, batched across requests. It keeps a list of active generations and a FIFO queue:
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

Note [Serving any pipeline]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every other diffusers pipeline with a ``transformer`` is served by ``PipelineEngine`` through its own
``pipe(prompt=..., num_inference_steps=..., height=..., width=..., generator=...)``, so any text-to-image
DiT pipeline works with its own text encoders, guidance, scheduler and VAE:
  - ``max_batch > 1``: up to ``max_batch`` generations run at once, each its own pipeline call in its own
    thread, and their transformer calls are merged into one batched call per step with a row group per
    generation (Note [Merged pipeline calls] in ``merge_calls.py``). Each generation is a request opened
    with ``cachedit.open_request``; ``policy="dbprune"`` and separate block lists are refused there, as in
    the batched loop above;
  - ``max_batch == 1``: one generation after another, each inside ``cachedit.request`` (every setting).
Cancellation rides on ``callback_on_step_end`` (or the older ``callback``, PixArt's): the callback raises
``Cancelled`` at the step after the client left, the exception leaves the pipeline, and the request is
closed on the way out. A pipeline with neither finishes a cancelled generation and drops its result.
Sizes must be multiples of the VAE's scale factor times the transformer's patch (at least 2, which
Flux-style 2x2 packing needs).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import copy
import dataclasses
import inspect
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

import cachedit
from cachedit.config import BlockLists, CacheditConfig, CachePolicy

log = logging.getLogger("cachedit.serve")

MAX_N = 4


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


@dataclasses.dataclass(eq=False)
class Job:
    """One generation: its parameters, its place in the batch loop (BatchedEngine), and how it ends."""

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
    """The worker that owns one pipeline's compiled transformer: queue, metrics, health and drain.

    Subclasses say how a pipeline is served (``_bind``) and run the queue (``_run``). What ``_bind`` sets:
    ``size_multiple`` (image sides must be multiples of it), ``default_size``, ``default_steps``,
    ``default_guidance`` (None: the pipeline takes no guidance) and ``max_n`` (images per request).
    """

    size_multiple: int
    default_size: int
    default_steps: int
    default_guidance: float | None
    max_n: int = MAX_N

    def __init__(self, pipe, options: Mapping[str, Any] | None = None, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}: both must be >= 1")
        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, torch.nn.Module):
            raise TypeError(
                f"cachedit serve accelerates a diffusion transformer: {type(pipe).__name__} has no `transformer` "
                f"module (it has {type(transformer).__name__}); serve a DiT pipeline such as Flux, SD3 or PixArt"
            )
        self.pipe = pipe
        self.options = dict(options or {})
        self.config = CacheditConfig.resolve(self.options)  # a bad option fails here, not at the first generation
        self.model = transformer
        self.max_batch, self.max_queue = max_batch, max_queue
        self._bind(pipe)
        self.model.compile(backend="cachedit", options=self.options)
        self.metrics = Metrics()
        self.queue: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=64)
        self.thread = threading.Thread(target=self._run, name="cachedit-serve-worker", daemon=True)
        self.thread.start()

    def _bind(self, pipe) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def check(self, params: Params) -> None:
        """Refuse (``RequestError``) what this engine cannot serve although the settings are valid."""

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
        """Compile before serving: two generations of the default size, submitted together (the batched
        engine traces its dynamic batch with them)."""
        start = time.perf_counter()
        size = self.default_size
        guidance = self.default_guidance if self.default_guidance is not None else 0.0
        jobs = [
            self.submit(Params("a red circle", height=size, width=size, steps=2, guidance=guidance, seed=s))
            for s in (0, 1)
        ]
        for job in jobs:
            job.future.result()
        return time.perf_counter() - start

    # -- endings ----------------------------------------------------------------------------------------

    def _fail(self, job: Job, err: BaseException, status: str) -> None:
        if job.handle is not None:
            job.handle.close()
        with self.cond:
            if job in self.active:
                self.active.remove(job)
            self.cond.notify_all()
        self.metrics.active.set(len(self.active))
        self.metrics.requests.labels(status).inc()
        if not job.future.done():
            job.future.set_exception(err)

    def _succeed(self, job: Job, images: list, record: Any) -> None:
        """Answer ``job`` with its PIL ``images`` and its request's stats ``record`` (None: never gated)."""
        p = job.params
        data = []
        for pil in images:
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
            self.cond.notify_all()
        self.metrics.active.set(len(self.active))
        self.metrics.requests.labels("ok").inc()
        self.metrics.steps.labels("cached").inc(len(cached))
        self.metrics.steps.labels("computed").inc(len(computed))
        self.metrics.latency.observe(done - job.submitted)
        job.future.set_result(result)


class BatchedEngine(Engine):
    """The embedded pipeline's loop, batched across requests (Note [Continuous batching])."""

    def _bind(self, pipe) -> None:
        from cachedit.embedded.pipeline import EmbeddedDiTPipeline

        if not isinstance(pipe, EmbeddedDiTPipeline):
            raise TypeError(f"BatchedEngine runs the EmbeddedDiTPipeline loop; use PipelineEngine for {type(pipe).__name__}")
        if self.config.policy is CachePolicy.DBPRUNE or self.config.block_lists is BlockLists.SEPARATE:
            raise ValueError(
                f"policy={self.config.policy.value!r}, block_lists={self.config.block_lists.value!r}: a batched step "
                "decides once per request (cachedit.rows), not per block or per list; serve with policy='dbcache' "
                "and block_lists='joined'"
            )
        self.patch = pipe.patch_size
        self.size_multiple = self.patch
        self.default_size = pipe.default_sample_size
        self.default_steps = 8
        self.default_guidance = 4.0

    def check(self, params: Params) -> None:
        if self.config.for_request(params.settings).policy is CachePolicy.DBPRUNE:
            raise RequestError(
                "cachedit.policy",
                "policy='dbprune' decides per block, which a batched step does not run; use policy='dbcache'",
            )

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
        image = unpack_patches(job.latents, p.height, p.width, self.patch)
        self._succeed(job, self.pipe.image_processor.postprocess(image, output_type="pil"), job.handle.stats)


class PipelineEngine(Engine):
    """Any diffusers text-to-image pipeline with a transformer: its own ``__call__`` per generation, up to
    ``max_batch`` at once with their transformer calls merged (Notes [Serving any pipeline] and
    [Merged pipeline calls]); ``max_batch=1`` runs them one after another."""

    NEEDS = ("prompt", "num_inference_steps", "height", "width", "generator", "output_type")

    def _bind(self, pipe) -> None:
        accepted = inspect.signature(type(pipe).__call__).parameters
        missing = [name for name in self.NEEDS if name not in accepted]
        if missing:
            raise TypeError(
                f"cachedit serve calls pipe({', '.join(f'{n}=...' for n in self.NEEDS)}); "
                f"{type(pipe).__name__}.__call__ takes no {', '.join(missing)}: it is not a text-to-image pipeline"
            )
        self.accepted = accepted
        steps = accepted["num_inference_steps"].default
        self.default_steps = steps if isinstance(steps, int) and steps > 0 else 28
        guidance = accepted.get("guidance_scale")
        guidance = guidance.default if guidance is not None else None
        self.default_guidance = float(guidance) if isinstance(guidance, (int, float)) else None
        self.max_n = MAX_N if "num_images_per_prompt" in accepted else 1
        vae_scale = int(getattr(pipe, "vae_scale_factor", None) or 8)
        patch = self.model.config.get("patch_size", 1) if hasattr(self.model, "config") else 1
        patch = max(patch[-2:]) if isinstance(patch, (tuple, list)) else int(patch or 1)
        self.size_multiple = vae_scale * max(patch, 2)
        # the pipeline's default height: default_sample_size (Flux, SD3, ...) or the transformer's sample_size
        # (PixArt, ...), in latent pixels
        sample = getattr(pipe, "default_sample_size", None) or getattr(self.model, "config", {}).get("sample_size")
        size = sample * vae_scale if isinstance(sample, int) and sample > 0 else 1024
        self.default_size = max(self.size_multiple, size // self.size_multiple * self.size_multiple)
        if "callback_on_step_end" not in accepted and "callback" not in accepted:
            log.warning(
                f"cachedit serve: {type(pipe).__name__}.__call__ takes no step callback; a client that leaves "
                "cancels nothing before its generation ends"
            )
        pipe.set_progress_bar_config(disable=True)
        self.merger = None
        if self.max_batch > 1:
            if self.config.policy is CachePolicy.DBPRUNE or self.config.block_lists is BlockLists.SEPARATE:
                raise ValueError(
                    f"policy={self.config.policy.value!r}, block_lists={self.config.block_lists.value!r}: a merged "
                    "call decides once per request (cachedit.rows), not per block or per list; serve with "
                    "--max-batch 1, or with policy='dbcache' and block_lists='joined'"
                )
            from cachedit.integrations.merge_calls import CallMerger, MergingTransformer

            self.merger = CallMerger(self.model, on_call=self._observe)
            pipe.transformer = MergingTransformer(self.model, self.merger)
            self.views = threading.local()

    def _view(self):
        """This generation thread's own pipeline over the shared models: a pipeline call keeps its state
        on the pipeline and in its scheduler, and fast tokenizers refuse concurrent use, so each thread gets
        its own copies of every component that is not a module (Note [Merged pipeline calls])."""
        view = getattr(self.views, "pipe", None)
        if view is None:
            own = {  # every component passed: from_pipe drops custom (remote-code) ones it is not handed
                name: component if component is None or isinstance(component, torch.nn.Module) else copy.deepcopy(component)
                for name, component in self.pipe.components.items()
            }
            quiet = logging.getLogger("diffusers")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # from_pipe's no-op .to(dtype) warns about fp32 modules each time
            try:
                view = self.views.pipe = type(self.pipe).from_pipe(self.pipe, **own)
            finally:
                quiet.setLevel(level)
            view.set_progress_bar_config(disable=True)
        return view

    def check(self, params: Params) -> None:
        if self.config.for_request(params.settings).policy is not CachePolicy.DBPRUNE:
            return
        if self.merger is not None:
            raise RequestError(
                "cachedit.policy",
                "policy='dbprune' decides per block, which a merged call does not run; use policy='dbcache' "
                "(or serve with --max-batch 1 and -o policy=dbprune)",
            )
        if self.config.policy is not CachePolicy.DBPRUNE:
            raise RequestError(
                "cachedit.policy",
                "policy='dbprune' needs the per-block split, which this server's model was compiled without; "
                "start the server with -o policy=dbprune (its requests may then choose dbcache too)",
            )

    def _observe(self, rows: list[int]) -> None:
        self.metrics.batch_rows.observe(sum(rows))
        self.metrics.batch_requests.observe(len(rows))

    def _run(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.max_batch, thread_name_prefix="cachedit-serve-generation") as pool:
            while True:
                with self.cond:
                    while not self.queue or len(self.active) >= self.max_batch:
                        if self.stopping and not self.queue and not self.active:
                            return
                        self.cond.wait()
                    job = self.queue.popleft()
                    self.metrics.queue.set(len(self.queue))
                    self.active.append(job)
                    self.metrics.active.set(len(self.active))
                pool.submit(self._generate, job)

    @torch.no_grad()
    def _generate(self, job: Job) -> None:
        from cachedit.integrations.merge_calls import CALLER

        p = job.params
        job.started = last = time.perf_counter()

        def step_done(index: int) -> None:
            nonlocal last
            if job.cancelled:
                raise Cancelled("the client disconnected")  # leaves pipe(); its request is closed below
            now = time.perf_counter()
            self.step_seconds.append(now - last)
            last = now
            if self.merger is None:  # one generation per call; its row count (CFG) is the pipeline's to know
                self.metrics.batch_requests.observe(1)
            elif index == p.steps - 1:
                self.merger.leave(job)  # decoding next: the others' steps need not wait for it
            if job.on_step is not None:
                job.on_step(index + 1)

        kwargs: dict[str, Any] = dict(
            prompt=p.prompt, num_inference_steps=p.steps, height=p.height, width=p.width,
            generator=torch.Generator().manual_seed(p.seed), output_type="pil",
        )
        if self.max_n > 1:
            kwargs["num_images_per_prompt"] = p.n
        if self.default_guidance is not None:
            kwargs["guidance_scale"] = p.guidance
        if "callback_on_step_end" in self.accepted:
            kwargs["callback_on_step_end"] = lambda pipe, index, timestep, tensors: step_done(index) or {}
        elif "callback" in self.accepted:
            kwargs["callback"] = lambda index, timestep, latents: step_done(index)
            if "callback_steps" in self.accepted:
                kwargs["callback_steps"] = 1
        try:
            if job.cancelled:
                raise Cancelled("cancelled before it started")
            if self.merger is None:
                before = {r.id for r in cachedit.stats(self.model)}
                with cachedit.request(self.model, num_inference_steps=p.steps, **p.settings):
                    images = getattr(self.pipe(**kwargs), "images", None)
                # one generation at a time: the one explicit record it added is this generation's
                record = next((r for r in cachedit.stats(self.model) if r.id not in before and r.source == "explicit"), None)
            else:
                job.handle = cachedit.open_request(self.model, num_inference_steps=p.steps, **p.settings)
                token = CALLER.set(job)
                try:
                    images = getattr(self._view()(**kwargs), "images", None)
                finally:
                    CALLER.reset(token)
                    self.merger.leave(job)
                job.handle.close()
                record = job.handle.stats
            if job.cancelled:
                raise Cancelled("the client disconnected")
            if not isinstance(images, list):
                raise TypeError(f"{type(self.pipe).__name__} returned no list of images: cachedit serve serves image pipelines")
        except Cancelled as err:
            self._fail(job, err, "cancelled")
            return
        except Exception as err:  # this generation only
            log.exception("cachedit serve: a generation raised inside the pipeline")
            self._fail(job, err, "error")
            return
        self._succeed(job, images, record)


def engine_for(pipe, options: Mapping[str, Any] | None = None, max_batch: int = 8, max_queue: int = 64) -> Engine:
    """The engine that serves ``pipe``: the embedded pipeline's batched loop, or any other pipeline's own call."""
    from cachedit.embedded.pipeline import EmbeddedDiTPipeline

    cls = BatchedEngine if isinstance(pipe, EmbeddedDiTPipeline) else PipelineEngine
    return cls(pipe, options, max_batch=max_batch, max_queue=max_queue)
