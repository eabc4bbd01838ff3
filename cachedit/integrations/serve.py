"""``cachedit serve`` and ``cachedit generate``: an OpenAI-shaped image server over the engines of
``engine.py`` (Note [Continuous batching] for the embedded model, Note [Serving any pipeline] for the rest).

This module validates requests (every error names its field), maps the engine's outcomes to HTTP
(429 with Retry-After for a full queue, 499 for a client that left, 500 for a generation that raised)
and holds the command lines. The model: the embedded pipeline (offline, CPU) by default, or ``--model``,
any diffusers pipeline directory (or Hub id) whose pipeline has a ``transformer``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

import torch

from cachedit.config import CacheditConfig, request_settings
from cachedit.integrations.engine import Cancelled, Engine, Params, QueueFull, RequestError, engine_for
from cachedit.runtime import policy

log = logging.getLogger("cachedit.serve")

MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1


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


def parse_request(body: Any, engine: Engine, max_size: int, default_steps: int | None = None) -> Params:
    """Validate the JSON body of ``POST /v1/images/generations`` for ``engine``'s model; errors name the
    field. The per-request settings override the served model's configuration (``engine.config``)."""
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
    n = _int(body, "n", 1, 1, engine.max_n)
    default_size, multiple = engine.default_size, engine.size_multiple
    size = body.get("size", f"{default_size}x{default_size}")
    if not isinstance(size, str) or size.count("x") != 1 or not all(p.isdigit() for p in size.split("x")):
        raise RequestError("size", f"size={size!r}: expected 'WIDTHxHEIGHT', e.g. '{default_size}x{default_size}'")
    width, height = (int(p) for p in size.split("x"))
    for side in (width, height):
        if side % multiple or not multiple <= side <= max_size:
            raise RequestError(
                "size", f"size={size!r}: each side must be a multiple of {multiple} (the model's patch in pixels), "
                f"from {multiple} to {max_size}"
            )
    steps = _int(body, "num_inference_steps", default_steps or engine.default_steps, 1, MAX_STEPS)
    guidance = body.get("guidance_scale", engine.default_guidance)
    if engine.default_guidance is None:
        if guidance is not None:
            raise RequestError("guidance_scale", f"guidance_scale={guidance!r}: {type(engine.pipe).__name__} takes no guidance_scale")
        guidance = 0.0
    elif isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0.0 <= guidance <= MAX_GUIDANCE:
        raise RequestError("guidance_scale", f"guidance_scale={guidance!r}: expected a number from 0 to {MAX_GUIDANCE}")
    seed = body.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _int(body, "seed", 0, 0, MAX_SEED)
    settings = body.get("cachedit", {}) or {}
    if not isinstance(settings, dict):
        raise RequestError("cachedit", f"cachedit={settings!r}: expected an object of per-request settings, e.g. {{\"threshold\": 0.1}}")
    params = Params(prompt, n, height, width, steps, float(guidance), seed, check_settings(settings, steps, engine.config))
    engine.check(params)
    return params


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


# -- HTTP ---------------------------------------------------------------------------------------------------


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None):
    from starlette.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    engine: Engine, model_id: str = "cachedit-embedded", max_size: int | None = None, default_steps: int | None = None,
    warm: bool = True,
):
    """The ASGI app (FastAPI) around ``engine``; the engine is warmed at start-up and drained at shutdown.
    ``max_size``: the largest image side (default: twice the model's default size, at least 128);
    ``default_steps``: when a request gives none (default: the pipeline's)."""
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
    max_size = max_size or max(128, 2 * engine.default_size)

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
            params = parse_request(body, engine, max_size, default_steps)
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


def cache_options(args: argparse.Namespace, embedded: bool) -> dict[str, Any]:
    """The model's compile options from the CLI. The embedded model (8 blocks) starts from Fn=1, Bn=0,
    warmup 2; any other model from cachedit's defaults."""
    options: dict[str, Any] = {"Fn": 1, "Bn": 0, "warmup_steps": 2} if embedded else {}
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


def is_embedded(model: str | None) -> bool:
    """Whether ``model`` (None, a directory or a Hub id) is the embedded pipeline."""
    if model is None:
        return True
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):  # another layout, or a Hub id
        return False
    with open(index) as f:
        return json.load(f).get("_class_name") == "EmbeddedDiTPipeline"


def load(model: str | None, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False):
    """The pipeline to serve: the embedded one (``model`` None or a directory saved from it), else any
    diffusers pipeline directory or Hub id, through ``DiffusionPipeline.from_pretrained`` (with
    ``trust_remote_code``: components whose code ships in their folder)."""
    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    if is_embedded(model):
        from cachedit.embedded import load_pipeline

        pipe = load_pipeline(model, **kwargs)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as err:
            raise SystemExit(f"cachedit: --model {model!r} is not a loadable diffusers pipeline: {err}") from None
    return pipe.to(device) if device else pipe


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a diffusers pipeline directory or Hub id (default: the embedded model)")
    parser.add_argument("--device", default=None, help="where the pipeline runs, e.g. cuda (default: where it loads)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="the pipeline's dtype")
    parser.add_argument("--trust-remote-code", action="store_true", dest="trust_remote_code",
                        help="run the code of custom components that ship in the model directory")


def _engine(args: argparse.Namespace, max_batch: int, max_queue: int) -> Engine:
    options = cache_options(args, is_embedded(args.model))
    try:
        return engine_for(load(args.model, args.device, args.dtype, args.trust_remote_code), options, max_batch=max_batch, max_queue=max_queue)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"cachedit: {err}") from None


def build_serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, dest="max_batch",
                        help="generations per transformer call (1: no batching, one generation after another)")
    parser.add_argument("--max-queue", type=int, default=64, dest="max_queue", help="waiting generations before 429")
    parser.add_argument("--max-size", type=int, default=None, dest="max_size",
                        help="largest image side (default: twice the model's default size, at least 128)")
    parser.add_argument("--default-size", type=int, default=None, dest="default_size",
                        help="image side when a request gives no size, and of the warm-up (default: the pipeline's)")
    parser.add_argument("--default-steps", type=int, default=None, dest="default_steps",
                        help="num_inference_steps when a request gives none (default: the pipeline's; 8 for the embedded model)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_cache_options(parser)
    return parser


def serve_main(args: argparse.Namespace) -> int:
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = _engine(args, args.max_batch, args.max_queue)
    if args.default_size:
        if args.default_size % engine.size_multiple:
            engine.stop()
            raise SystemExit(f"--default-size {args.default_size}: expected a multiple of {engine.size_multiple} (the model's patch in pixels)")
        engine.default_size = args.default_size
    model_id = "cachedit-embedded" if is_embedded(args.model) else args.model.rstrip("/")
    model_id = os.path.basename(model_id) if os.path.isdir(model_id) else model_id
    app = create_app(engine, model_id=model_id, max_size=args.max_size, default_steps=args.default_steps)
    print(f"cachedit serve: http://{args.host}:{args.port} ({type(engine.pipe).__name__}, options {engine.options}, "
          f"max batch {engine.max_batch})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def build_generate_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("prompt")
    parser.add_argument("--out", default="cachedit.png", metavar="FILE", help="PNG path (n > 1: FILE-0.png, ...)")
    add_model_options(parser)
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, dest="num_inference_steps", help="default: the pipeline's")
    parser.add_argument("--guidance-scale", type=float, default=None, dest="guidance_scale", help="default: the pipeline's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a per-request setting, e.g. --setting threshold=0.2 (repeatable)")
    add_cache_options(parser)
    return parser


def generate_main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    body: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "seed": args.seed}
    for key, value in (("size", args.size), ("num_inference_steps", args.num_inference_steps),
                       ("guidance_scale", args.guidance_scale)):
        if value is not None:
            body[key] = value
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
    engine = _engine(args, max_batch=1, max_queue=1)
    try:
        params = parse_request(body, engine, max_size=max(4096, engine.default_size))
    except RequestError as err:
        engine.stop()
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
