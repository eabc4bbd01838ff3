"""Speed at a fixed static mask: cachedit against cache-dit 1.5.3 + torch.compile, in one process (issue 13).

A Flux-shaped ``FluxTransformer2DModel`` with random weights inside a ``FluxPipeline`` with no text
encoders and no VAE (driven by ``prompt_embeds``, ``output_type="latent"``). A static steps-computation
mask (preset ``--mask``, default "fast") fixes which steps compute, so the weights do not decide the
cached steps and every cached system runs exactly the same blocks. Systems, each on its own copy of the
same weights:

  eager               diffusers' forward, no cache;
  inductor            ``transformer.compile()`` (Inductor), no cache;
  cache-dit+regional  cache-dit's Flux adapter, then what its own CLI does with ``--compile``:
                      ``cache_dit.set_compile_configs()`` and ``transformer.compile_repeated_blocks()``;
  cache-dit+compile   cache-dit, then ``torch.compile`` of the whole transformer (graph breaks where cache-dit
                      leaves the graph);
  cachedit            ``cachedit.enable(pipe, scm=mask, scm_policy="static", cfg="batched")`` (Inductor inside;
                      ``cfg="batched"`` is cache-dit's ``enable_separate_cfg=False``: FluxPipeline without true
                      CFG makes one call per step. The default ``cfg="auto"`` reads nothing more: inside a
                      request it pairs CFG calls by their latent, so a step the mask decides reads nothing).

``torch.set_float32_matmul_precision("high")`` (cache-dit's CLI sets it) holds for all systems. The
systems compile in this order, cache-dit's last, because ``set_compile_configs`` changes Inductor's
global configuration for everything compiled after it. Inductor writes to a fresh cache directory, so
compile times are cold. Timed generations run in interleaved rounds (one generation of every system per
round, the order rotating each round), so load drifts on a shared machine hit all systems alike.

Per system: median and spread (min-max) of the seconds per generation; compile time = first generation
(which compiles every path: the mask has computed and cached steps) minus the median; Dynamo graphs and
graph breaks counted during that first generation (``torch._dynamo.utils.counters``); host reads per
step (Tensor -> Python conversions: ``item``, ``tolist``, ``__bool__``, ... counted during one
generation; each is a device sync on a GPU; the pipeline's own reads are the eager row); peak RSS of a
separate process per system that builds, compiles and runs one generation (its ``VmHWM``; ``--no-rss``
skips it),
and on CUDA the peak allocated device memory of the system's generation in this process.

    python benchmarks/vs_cache_dit.py                  # CPU: 4 double + 12 single blocks, width 256
    python benchmarks/vs_cache_dit.py --device cuda    # FLUX.1-dev shape, bf16, random weights on device
    python benchmarks/vs_cache_dit.py --quick --no-write --no-rss   # seconds: the test's size
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

SHAPES = {
    # name: (double, single, heads, head_dim, text_dim, pooled_dim, image_side_px, text_tokens, guidance_embeds)
    "quick": (2, 2, 2, 32, 64, 64, 128, 16, False),
    "cpu": (4, 12, 4, 64, 256, 256, 512, 64, False),
    "flux-dev": (19, 38, 24, 128, 4096, 768, 1024, 512, True),
}
SYSTEMS = ("eager", "inductor", "cache-dit+regional", "cache-dit+compile", "cachedit")
CACHE_DIT = ("cache-dit+regional", "cache-dit+compile")


@dataclasses.dataclass
class Setup:
    shape: str
    device: str
    dtype: str
    steps: int
    mask: str
    compiler: str = "inductor"

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]


def transformer_config(shape: str) -> dict:
    double, single, heads, head_dim, text_dim, pooled_dim, _, _, guidance = SHAPES[shape]
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)  # FLUX.1: (16, 56, 56) at head dim 128
    return dict(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance, axes_dims_rope=rope,
    )


def build_pipeline(setup: Setup, cls=None):
    """A ``FluxPipeline`` around a random-weight transformer, built on the device (seed 0: every call holds the
    same weights)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    cls = cls or type("FluxPipeline", (FluxPipeline,), {})  # cache-dit patches the class: one class per pipeline
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[torch.device(setup.device)] if setup.device != "cpu" else []):
        torch.manual_seed(0)
        torch.set_default_dtype(setup.torch_dtype)
        try:
            with torch.device(setup.device):
                transformer = FluxTransformer2DModel(**transformer_config(setup.shape)).eval()
        finally:
            torch.set_default_dtype(default)
    transformer.requires_grad_(False)
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
               text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt(setup: Setup):
    import torch

    *_, text_dim, pooled_dim, _, text_tokens, _ = SHAPES[setup.shape]
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, text_tokens, text_dim, generator=g)
    pooled = torch.randn(1, pooled_dim, generator=g)
    return embeds.to(setup.device, setup.torch_dtype), pooled.to(setup.device, setup.torch_dtype)


def generate(pipe, setup: Setup, embeds):
    import torch

    side = SHAPES[setup.shape][6]
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], height=side, width=side,
                   num_inference_steps=setup.steps, generator=torch.Generator().manual_seed(0),
                   output_type="latent", return_dict=False)[0]
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def mask_bits(setup: Setup) -> list[int]:
    import cachedit

    return cachedit.steps_mask(setup.steps, setup.mask)


def _quiet_cache_dit():
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)


def make_system(name: str, setup: Setup):
    """The pipeline of system ``name``, ready for its first (compiling) generation."""
    import torch

    pipe = build_pipeline(setup)
    if name == "eager":
        return pipe
    if name == "inductor":
        pipe.transformer.compile(backend=setup.compiler)
        return pipe
    if name == "cachedit":
        import cachedit

        return cachedit.enable(pipe, inner=setup.compiler, Fn=1, Bn=0, warmup_steps=4, scm="".join(map(str, mask_bits(setup))),
                               scm_policy="static", cfg="batched")
    import cache_dit

    _quiet_cache_dit()
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4, residual_diff_threshold=0.12,
        steps_computation_mask=mask_bits(setup), steps_computation_policy="static", enable_separate_cfg=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache_dit.enable_cache(pipe, cache_config=config)
    _quiet_cache_dit()
    cache_dit.set_compile_configs()
    if name == "cache-dit+regional":
        pipe.transformer.compile_repeated_blocks(backend=setup.compiler)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=setup.compiler)
    return pipe


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


@dataclasses.dataclass
class Result:
    name: str
    first: float = 0.0
    seconds: list[float] = dataclasses.field(default_factory=list)
    graphs: int = 0
    breaks: int = 0
    reads_per_step: float = 0.0
    cached: int = 0
    rss_mib: float | None = None
    device_peak_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def compile(self) -> float:
        return max(0.0, self.first - self.median)


def cached_steps(name: str, pipe) -> int:
    if name == "cachedit":
        import cachedit

        return len(cachedit.stats(pipe.transformer)[-1].branches["main"].cached_steps)
    if name in CACHE_DIT:
        import cache_dit

        return len(cache_dit.summary(pipe, logging=False)[0].cached_steps)
    return 0


def run_in_process(setup: Setup, rounds: int, systems: Sequence[str], log=print):
    """Compile every system (its first generation), then time ``rounds`` interleaved rounds."""
    from report import count_host_reads  # benchmarks/ is on sys.path once main() ran

    import torch

    torch.set_float32_matmul_precision("high")
    embeds = prompt(setup)
    pipes, results, outputs = {}, {}, {}
    for name in systems:
        pipes[name] = make_system(name, setup)
        result = results[name] = Result(name)
        graphs, breaks = dynamo_counts()
        if setup.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        outputs[name] = generate(pipes[name], setup, embeds)
        result.first = time.perf_counter() - start
        if setup.device.startswith("cuda"):
            result.device_peak_mib = torch.cuda.max_memory_allocated() / 2**20
        after = dynamo_counts()
        result.graphs, result.breaks = after[0] - graphs, after[1] - breaks
        result.cached = cached_steps(name, pipes[name])
        log(f"{name}: first generation {result.first:.1f} s, {result.graphs} graphs, {result.breaks} breaks, "
            f"{result.cached} cached steps")
    for name in systems:
        with count_host_reads() as reads:
            generate(pipes[name], setup, embeds)
        results[name].reads_per_step = reads["reads"] / setup.steps
    settled = dynamo_counts()
    for r in range(rounds):
        order = list(systems[r % len(systems):]) + list(systems[: r % len(systems)])
        for name in order:
            start = time.perf_counter()
            generate(pipes[name], setup, embeds)
            results[name].seconds.append(time.perf_counter() - start)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {results[n].seconds[-1]:.2f} s" for n in systems))
    recompiles = dynamo_counts()[0] - settled[0]
    return results, outputs, recompiles


def rss_of(name: str, setup: Setup, cache_dir: str) -> float:
    """Peak RSS (MiB) of a fresh process that builds ``name``, compiles it and runs one generation."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    args = [sys.executable, os.path.abspath(__file__), "--rss-only", name, "--shape", setup.shape, "--device",
            setup.device, "--dtype", setup.dtype, "--steps", str(setup.steps), "--mask", setup.mask,
            "--compiler", setup.compiler]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def rss_only(name: str, setup: Setup) -> None:
    import torch

    torch.set_float32_matmul_precision("high")
    pipe = make_system(name, setup)
    generate(pipe, setup, prompt(setup))
    print(json.dumps({"rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM``, the high-water mark of its own address space.

    Not ``getrusage``'s ``ru_maxrss``: on Linux a child inherits its parent's high-water mark at ``fork``
    and keeps it across ``exec``, so every system measured from this script's big parent read the parent's
    1.2 GiB. Falls back to ``ru_maxrss`` where there is no ``/proc``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(results: dict[str, Result], setup: Setup, recompiles: int) -> tuple[str, dict[str, float]]:
    from report import markdown_table

    best_cache_dit = min((results[n] for n in CACHE_DIT if n in results), key=lambda r: r.median, default=None)
    rows = []
    for name, r in results.items():
        spread = f"{min(r.seconds):.2f}-{max(r.seconds):.2f}"
        row = [name, f"{r.median:.2f}", spread, f"{r.compile:.1f}", str(r.graphs), str(r.breaks),
               f"{r.reads_per_step:.2f}", str(r.cached), "-" if r.rss_mib is None else f"{r.rss_mib:.0f}"]
        if setup.device.startswith("cuda"):
            row.append(f"{r.device_peak_mib:.0f}")
        rows.append(row)
    header = ["system", "s / generation (median)", "min-max", "compile s", "Dynamo graphs", "graph breaks",
              "host reads / step", f"cached steps of {setup.steps}", "peak RSS MiB"]
    if setup.device.startswith("cuda"):
        header.append("peak device MiB")
    ratios = {}
    if "cachedit" in results:
        for name in CACHE_DIT:
            if name in results:
                ratios[name] = results["cachedit"].median / results[name].median
        if "inductor" in results:
            ratios["inductor"] = results["cachedit"].median / results["inductor"].median
    lines = [markdown_table(header, rows), ""]
    for name, ratio in ratios.items():
        lines.append(f"- cachedit / {name}: **{ratio:.3f}** (medians)")
    if best_cache_dit is not None and "cachedit" in results:
        lines.append(f"- cachedit / the faster cache-dit ({best_cache_dit.name}): "
                     f"**{results['cachedit'].median / best_cache_dit.median:.3f}** (target <= 0.9)")
    lines.append(f"- Dynamo graphs compiled during the timed rounds (recompiles): {recompiles}")
    if best_cache_dit is not None and "cachedit" in results and "eager" in results:
        ours = results["cachedit"]
        ratio = ours.median / best_cache_dit.median
        spread = max((max(r.seconds) - min(r.seconds)) / r.median for r in (ours, best_cache_dit))
        if ratio > 0.9:
            lines.append(
                f"- Target not met here: both cached systems run the same blocks on the same steps, and on this "
                f"machine a step is arithmetic-bound (eager: {results['eager'].median / setup.steps:.2f} s per "
                f"step), so what differs between them (graph breaks, Python glue, host reads) is small: the "
                f"difference, {abs(1 - ratio):.1%} of a generation, is inside the run-to-run spread ({spread:.1%})."
            )
    return "\n".join(lines), ratios


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: cpu on the CPU, flux-dev on cuda)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on cuda")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--mask", default="fast", help="steps-computation mask preset, static policy (default fast)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compiler", choices=("inductor", "aot_eager", "eager"), default=None,
                        help="torch.compile backend of every compiled system and cachedit's inner compiler "
                             "(default inductor; eager with --quick: Dynamo's graphs and breaks without the codegen)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 8 steps, 1 round, --compiler eager (the test)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-system RSS processes")
    parser.add_argument("--warm-cache", action="store_true", help="use Inductor's usual cache dir (compile times warm)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--rss-only", choices=SYSTEMS, help=argparse.SUPPRESS)
    return parser


def setup_of(args) -> Setup:
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.shape, args.steps, args.rounds = args.shape or "quick", min(args.steps, 8), 1
        args.compiler = args.compiler or "eager"
    return Setup(args.shape or ("flux-dev" if cuda else "cpu"), args.device, args.dtype or ("bf16" if cuda else "fp32"),
                 args.steps, args.mask, args.compiler or "inductor")


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup = setup_of(args)
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cache_dir = saved
    if not args.warm_cache and args.rss_only is None:
        cache_dir = tempfile.mkdtemp(prefix="vs_cache_dit_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # before torch is imported: compile times are cold
    try:
        return _main(args, setup, cache_dir)
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def _main(args, setup: Setup, cache_dir: str | None) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # Compile in this process: on 2 shared cores, Inductor's pool of compile workers made first compiles
    # minutes long (the demo found the same, issue 15).
    torch._inductor.config.compile_threads = 1
    if args.rss_only:
        rss_only(args.rss_only, setup)
        return {}
    if setup.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    results, outputs, recompiles = run_in_process(setup, args.rounds, args.systems, log)
    if not args.no_rss:
        for name in args.systems:
            results[name].rss_mib = rss_of(name, setup, cache_dir or tempfile.mkdtemp())
            log(f"{name}: peak RSS {results[name].rss_mib:.0f} MiB")
    body, ratios = table(results, setup, recompiles)
    cached = {r.cached for n, r in results.items() if n in (*CACHE_DIT, "cachedit")}
    deltas = {}
    if "cachedit" in outputs:
        ref = outputs["cachedit"].float()
        deltas = {n: float((outputs[n].float() - ref).abs().max()) for n in CACHE_DIT if n in outputs}
    agree = "; ".join(f"{n} {d:.2e}" for n, d in deltas.items())
    import cache_dit
    import diffusers

    double, single, heads, head_dim, _, _, side, text_tokens, _ = SHAPES[setup.shape]
    tokens = (side // 16) ** 2
    intro = (
        f"`FluxTransformer2DModel`, {double} double + {single} single blocks, width {heads * head_dim} "
        f"({heads} heads x {head_dim}), {tokens} image + {text_tokens} text tokens, {setup.dtype}, random weights, "
        f"in a `FluxPipeline` (no text encoders, no VAE), {setup.steps} steps, static mask `{setup.mask}` "
        f"({''.join(map(str, mask_bits(setup)))}), F1B0; cached steps per system: {sorted(cached)}. "
        f"{args.rounds} interleaved rounds, {torch.get_num_threads()} torch threads, compiler "
        f"`{setup.compiler}`; cache-dit "
        f"{cache_dit.__version__}, diffusers {diffusers.__version__}. Compile times are "
        f"{'warm (existing Inductor cache)' if args.warm_cache else 'cold (a fresh Inductor cache directory)'}. "
        f"{'' if args.no_rss else 'Peak RSS: a separate process per system (build, compile, one generation). '}"
        f"Final latents, max |Δ| vs "
        f"cachedit: {agree or 'n/a'}. Total {(time.perf_counter() - started) / 60:.1f} min."
    )
    text = intro + "\n\n" + body
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"systems": {n: {**dataclasses.asdict(r), "median": r.median, "compile": r.compile}
                                   for n, r in results.items()},
                       "ratios": ratios, "recompiles": recompiles, "max_abs_delta_vs_cachedit": deltas,
                       "mask": mask_bits(setup)}, f, indent=1)
    if not args.no_write:
        from report import write_section

        default_shape = "flux-dev" if setup.device.startswith("cuda") else "cpu"
        title = "cachedit vs cache-dit + compile, static mask" + (" (CUDA)" if setup.device.startswith("cuda") else "")
        if setup.shape != default_shape:
            title += f", shape {setup.shape}"
        write_section(title, text, "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]))
    return {"results": results, "ratios": ratios, "recompiles": recompiles, "outputs": outputs}


if __name__ == "__main__":
    main()
