"""Speed-quality front of cachedit and cache-dit 1.5.3 on the trained embedded model (issue 13).

Every point of the grid generates the same seeded captions (``cachedit.embedded.evaluate.scenes``)
with the same seeds, in the same batches, and compares each image with the uncached image of the
same caption. Points, per system:

  * DBCache F1B0 W4 at several thresholds (both systems);
  * steps-computation masks (the four presets) with the static policy (both systems: the cached steps
    are the mask's zeros, so this compares what a cached step adds) and the dynamic policy;
  * budget mode (cachedit only: cache-dit has none);
  * each with calibrators none / TaylorSeer (order 1, 2) / FoCa / DMD where the grid asks for them.

Per point: mean computed steps per image (of ``--steps``), PSNR and SSIM of the images against the
uncached images, PSNR of the final latents (unclamped, before postprocessing), and the prompt-following
rate of the embedded evaluator (colour, shape and position all read back right). PSNR is computed in
float64 on ``[0, 1]`` (latents mapped by ``(x + 1) / 2``, unclamped) per image, capped at ``PSNR_CAP``
dB, then averaged over images: the cap keeps an identical image from making a mean infinite and sits
above 8-bit quantisation's ~59 dB, so it only merges differences no image can show.

The uncached reference and cachedit run diffusers' forward (cachedit through ``cachedit.enable(pipe,
inner="eager")``: quality does not depend on the compiler); cache-dit runs through ``BlockAdapter``
on a fresh copy of the pipeline per point (its Flux adapter: both block lists as one chain, Flux's
patch functor). Batches share one decision per step in both systems (one request, batched CFG).

    python benchmarks/front.py               # default grid: 82 points, 22 min on 2 cores at load ~8
    python benchmarks/front.py --full        # every calibrator on every policy, more thresholds
    python benchmarks/front.py --quick --no-write   # seconds: the test's size
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cachedit  # noqa: E402
from cachedit.embedded import evaluate, load_pipeline  # noqa: E402
from cachedit.embedded.pipeline import EmbeddedDiTPipeline  # noqa: E402
from cachedit.integrations.demo import mse, psnr_of_mse, ssim  # noqa: E402

PSNR_CAP = 60.0  # dB; see the module docstring
FN, BN = 1, 0
WARMUP = 4
CALIBRATORS = ("none", "taylorseer1", "taylorseer2", "foca", "dmd")
PRESETS = ("slow", "medium", "fast", "ultra")
PLOT = Path(__file__).with_name("front.png")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One setting of the grid, in cachedit's option names; ``systems`` that have it."""

    family: str  # "dbcache", "scm-static", "scm-dynamic", "budget"
    label: str
    options: dict
    calibrator: str = "none"
    systems: tuple[str, ...] = ("cachedit", "cache-dit")

    def cachedit_settings(self) -> dict:
        settings = {"warmup_steps": WARMUP, **self.options}
        if self.calibrator.startswith("taylorseer"):
            settings.update(calibrator="taylorseer", taylorseer_order=int(self.calibrator[-1]))
        elif self.calibrator != "none":
            settings["calibrator"] = self.calibrator
        return settings


@dataclasses.dataclass
class Point:
    system: str
    spec: Spec
    computed: float  # mean computed steps per image
    psnr: float  # mean per-image PSNR (capped), images
    ssim: float
    latent_psnr: float  # mean per-image PSNR (capped), final latents
    follow: float  # prompt-following rate ("all": colour, shape and position right)
    cached_steps: tuple[tuple[int, ...], ...]  # per batch
    seconds: float

    def fraction(self, steps: int) -> float:
        return self.computed / steps


def grid(full: bool, quick: bool) -> list[Spec]:
    if quick:
        return [
            Spec("dbcache", "τ0.12", {"threshold": 0.12}),
            *(Spec("scm-static", "fast static", {"scm": "fast", "scm_policy": "static"}, c) for c in ("none", "taylorseer1")),
            Spec("budget", "budget 0.5", {"budget": 0.5}, systems=("cachedit",)),
        ]
    thresholds = (0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.5) if full else (0.04, 0.08, 0.12, 0.2, 0.3, 0.5)
    some = CALIBRATORS if full else ("none", "taylorseer1")
    specs = [Spec("dbcache", f"τ{t}", {"threshold": t}, c) for t in thresholds for c in some]
    specs += [
        Spec("scm-static", f"{p} static", {"scm": p, "scm_policy": "static"}, c) for p in PRESETS for c in CALIBRATORS
    ]
    dynamic_taus = (0.08, 0.12, 0.2) if full else (0.12,)
    specs += [
        Spec("scm-dynamic", f"{p} dynamic τ{t}", {"scm": p, "scm_policy": "dynamic", "threshold": t}, c)
        for p in PRESETS
        for t in dynamic_taus
        for c in (CALIBRATORS if full else ("none",))
    ]
    budgets = (0.25, 0.3, 0.35, 0.45, 0.55, 0.65, 0.8) if full else (0.25, 0.35, 0.5, 0.65, 0.8)
    specs += [Spec("budget", f"budget {b}", {"budget": b}, c, ("cachedit",)) for b in budgets for c in some]
    return specs


# --- generation ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    images: list[torch.Tensor]  # [3, H, W] float in [0, 1]
    latents: list[torch.Tensor]  # [3, H, W] float, unclamped, about [-1, 1]
    cached_steps: list[tuple[int, ...]]  # per batch
    batch_sizes: list[int]
    seconds: float


def _capture_latents(pipe) -> list[torch.Tensor]:
    """Record what the pipeline hands its image processor: the final latents, before the [0, 1] clamp."""
    seen: list[torch.Tensor] = []
    original = pipe.image_processor.postprocess

    def postprocess(image, *args, **kwargs):
        seen.append(image.detach().float().clone())
        return original(image, *args, **kwargs)

    pipe.image_processor.postprocess = postprocess
    return seen


def generate(pipe, scenes, steps: int, seed: int, batch_size: int, cached_of, **call) -> Run:
    """Every scene's image, in batches seeded like the evaluator's; ``cached_of(pipe)`` reads the last
    call's cached steps."""
    latents = _capture_latents(pipe)
    images, cached, sizes = [], [], []
    start_time = time.perf_counter()
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        out = pipe(
            [s.caption for s in chunk],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + start),
            output_type="pt",
            **call,
        ).images
        images.extend(out.float())
        cached.append(tuple(cached_of(pipe)))
        sizes.append(len(chunk))
    seconds = time.perf_counter() - start_time
    flat = [x for batch in latents for x in batch]
    return Run(images, flat, cached, sizes, seconds)


def fresh_pipeline() -> EmbeddedDiTPipeline:
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CachedItSystem:
    """One pipeline compiled once (Fn/Bn fixed); every point is a per-call ``cachedit={...}``."""

    name = "cachedit"

    def __init__(self) -> None:
        torch._dynamo.reset()  # a fresh graph and StepCache for this pipeline
        self.pipe = cachedit.enable(fresh_pipeline(), inner="eager", Fn=FN, Bn=BN)

    def run(self, spec: Spec, scenes, steps, seed, batch_size) -> Run:
        def cached_of(pipe):
            return cachedit.stats(pipe.transformer)[-1].branches["main"].cached_steps

        return generate(self.pipe, scenes, steps, seed, batch_size, cached_of, cachedit=spec.cachedit_settings())


class CacheDitSystem:
    """cache-dit 1.5.3 through its ``BlockAdapter`` API, on a fresh pipeline per point."""

    name = "cache-dit"

    def __init__(self) -> None:
        import cache_dit

        logging.getLogger("cache_dit").setLevel(logging.WARNING)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("cache_dit"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.cd = cache_dit

    def configs(self, spec: Spec, steps: int):
        cd = self.cd
        o = spec.options
        kwargs = dict(
            Fn_compute_blocks=FN,
            Bn_compute_blocks=BN,
            max_warmup_steps=WARMUP,
            residual_diff_threshold=o.get("threshold", 0.12),
            enable_separate_cfg=False,  # the embedded pipeline batches cond and uncond
        )
        if "scm" in o:
            kwargs.update(
                steps_computation_mask=cd.steps_mask(total_steps=steps, mask_policy=o["scm"]),
                steps_computation_policy=o["scm_policy"],
            )
        if spec.calibrator == "none":
            calibrator = None
        elif spec.calibrator.startswith("taylorseer"):
            calibrator = cd.TaylorSeerCalibratorConfig(taylorseer_order=int(spec.calibrator[-1]))
        elif spec.calibrator == "foca":
            calibrator = cd.FoCaCalibratorConfig()
        else:
            calibrator = cd.DMDCalibratorConfig(dmd_history=6)
        return cd.DBCacheConfig(**kwargs), calibrator

    def run(self, spec: Spec, scenes, steps, seed, batch_size) -> Run:
        from cache_dit.caching.patch_functors import FluxPatchFunctor

        cd = self.cd
        pipe = fresh_pipeline()
        pipe.__class__ = type(EmbeddedDiTPipeline.__name__, (EmbeddedDiTPipeline,), {})  # cache-dit patches the class
        t = pipe.transformer
        adapter = cd.BlockAdapter(
            pipe=pipe,
            transformer=t,
            blocks=t.transformer_blocks + t.single_transformer_blocks,
            blocks_name="transformer_blocks",
            dummy_blocks_names=["single_transformer_blocks"],
            patch_functor=FluxPatchFunctor(),
            forward_pattern=cd.ForwardPattern.Pattern_1,
        )
        cache_config, calibrator = self.configs(spec, steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cd.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)

        def cached_of(pipe):
            return cd.summary(pipe, logging=False)[0].cached_steps

        return generate(pipe, scenes, steps, seed, batch_size, cached_of)


# --- scoring ---------------------------------------------------------------------------------------------------


def capped_psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    return min(PSNR_CAP, psnr_of_mse(mse(x.numpy(), reference.numpy())))


def score(system: str, spec: Spec, run: Run, reference: Run, scenes, steps: int) -> Point:
    psnrs, ssims, latent_psnrs = [], [], []
    for image, ref, latent, ref_latent in zip(run.images, reference.images, run.latents, reference.latents, strict=True):
        psnrs.append(capped_psnr(image, ref))
        ssims.append(ssim(image.permute(1, 2, 0).numpy(), ref.permute(1, 2, 0).numpy()))
        latent_psnrs.append(capped_psnr((latent + 1) / 2, (ref_latent + 1) / 2))
    per_image = [steps - len(cached) for cached, n in zip(run.cached_steps, run.batch_sizes) for _ in range(n)]
    return Point(
        system,
        spec,
        float(np.mean(per_image)),
        float(np.mean(psnrs)),
        float(np.mean(ssims)),
        float(np.mean(latent_psnrs)),
        evaluate.agreement(scenes, run.images)["all"],
        tuple(run.cached_steps),
        run.seconds,
    )


# --- fronts and tables -----------------------------------------------------------------------------------------

EPS = 1e-9


def best_at(points: Sequence[Point], system: str, computed: float) -> Point | None:
    """``system``'s highest-PSNR point that computes at most ``computed`` steps per image on average."""
    fitting = [p for p in points if p.system == system and p.computed <= computed + EPS]
    return max(fitting, key=lambda p: p.psnr, default=None)


def front(points: Sequence[Point], system: str) -> list[Point]:
    """The Pareto front: points that no point computing as few or fewer steps beats on PSNR."""
    out: list[Point] = []
    for p in sorted((p for p in points if p.system == system), key=lambda p: (p.computed, -p.psnr)):
        if not out or p.psnr > out[-1].psnr:
            out.append(p)
    return out


def matched_budgets(points: Sequence[Point]) -> list[tuple[float, Point, Point | None]]:
    """At each cache-dit point's computed steps: cache-dit's best and cachedit's best within that budget."""
    rows = []
    for computed in sorted({round(p.computed, 6) for p in points if p.system == "cache-dit"}):
        theirs = best_at(points, "cache-dit", computed)
        rows.append((computed, theirs, best_at(points, "cachedit", computed)))
    return rows


def name(p: Point) -> str:
    calibrator = "" if p.spec.calibrator == "none" else f" + {p.spec.calibrator}"
    return f"{p.spec.label}{calibrator}"


def f1(x: float) -> str:
    return f"{x:.2f}"


def tables(points: Sequence[Point], reference_follow: float, steps: int) -> tuple[str, str, str, list[str]]:
    """(all points, matched budgets, static masks, losses) as markdown."""
    from report import markdown_table

    rows = [
        [p.system, p.spec.family, name(p), f"{p.computed:.2f}", f"{p.fraction(steps):.3f}", f1(p.psnr),
         f"{p.ssim:.4f}", f1(p.latent_psnr), f"{p.follow:.0%}"]
        for p in sorted(points, key=lambda p: (p.spec.family, p.system, p.computed, -p.psnr))
    ]
    all_points = markdown_table(
        ["system", "policy", "setting", "computed steps", "fraction", "PSNR dB", "SSIM", "latent PSNR dB", "follows"],
        rows,
    )
    losses: list[str] = []
    matched = []
    for computed, theirs, ours in matched_budgets(points):
        if ours is None:
            matched.append([f"{computed:.2f}", f"{name(theirs)}: {f1(theirs.psnr)}", "no point", "", ""])
            continue
        delta = ours.psnr - theirs.psnr
        verdict = "ahead" if delta > 0.005 else "equal" if delta >= -0.005 else "**behind**"
        if delta < -0.005:
            losses.append(f"at {computed:.2f} computed steps: cachedit {f1(ours.psnr)} dB < cache-dit {f1(theirs.psnr)} dB")
        matched.append([f"{computed:.2f}", f"{name(theirs)}: {f1(theirs.psnr)}", f"{name(ours)} ({ours.computed:.2f}): "
                        f"{f1(ours.psnr)}", f"{delta:+.2f}", verdict])
    matched_table = markdown_table(
        ["computed steps (budget)", "cache-dit best within it: PSNR dB", "cachedit best within it: PSNR dB",
         "Δ dB", "cachedit"],
        matched,
    )
    static = []
    by_key = {(p.system, p.spec.label, p.spec.calibrator): p for p in points if p.spec.family == "scm-static"}
    for (system, label, calibrator), ours in by_key.items():
        if system != "cachedit" or ("cache-dit", label, calibrator) not in by_key:
            continue
        theirs = by_key["cache-dit", label, calibrator]
        same = "yes" if ours.cached_steps == theirs.cached_steps else "**no**"
        delta = ours.latent_psnr - theirs.latent_psnr
        if delta < -0.005:
            losses.append(f"static {label} + {calibrator}: latent PSNR {f1(ours.latent_psnr)} < {f1(theirs.latent_psnr)}")
        static.append([label, calibrator, f"{ours.computed:.0f}", same, f1(ours.latent_psnr), f1(theirs.latent_psnr),
                       f"{delta:+.2f}", f1(ours.psnr), f1(theirs.psnr)])
    static_table = markdown_table(
        ["mask", "calibrator", "computed steps", "same cached steps", "cachedit latent PSNR", "cache-dit latent PSNR",
         "Δ dB", "cachedit image PSNR", "cache-dit image PSNR"],
        static,
    )
    return all_points, matched_table, static_table, losses


def plot(points: Sequence[Point], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    style = {"cachedit": dict(color="tab:blue", lw=1.6, zorder=3), "cache-dit": dict(color="tab:orange", lw=4, alpha=0.6)}
    for system in ("cache-dit", "cachedit"):  # cachedit's thinner line on top: where the fronts agree both show
        mine = [p for p in points if p.system == system]
        ax.scatter([p.fraction(steps) for p in mine], [p.psnr for p in mine], s=14, alpha=0.35,
                   color=style[system]["color"])
        best = front(points, system)
        ax.step([p.fraction(steps) for p in best], [p.psnr for p in best], where="post", marker="o", markersize=4,
                label=f"{system}: best front", **style[system])
    ax.set_xlabel(f"computed fraction of {steps} steps (mean over images)")
    ax.set_ylabel(f"PSNR vs uncached, dB (mean over images, capped at {PSNR_CAP:.0f})")
    ax.set_title("Embedded model: quality vs computed steps (all points faint, fronts bold)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------------------


def run_front(args: argparse.Namespace, log=print) -> tuple[float, list[Point]]:
    """The reference's prompt-following rate and every point of the grid."""
    torch.set_num_threads(args.threads)
    scenes = evaluate.scenes(args.n, args.seed)
    reference = generate(fresh_pipeline(), scenes, args.steps, args.seed, args.batch_size, lambda pipe: ())
    reference_follow = evaluate.agreement(scenes, reference.images)["all"]
    log(f"uncached: {reference.seconds:.1f} s, follows {reference_follow:.0%}")
    systems = {"cachedit": CachedItSystem(), "cache-dit": CacheDitSystem()}
    points = []
    for spec in grid(args.full, args.quick):
        if getattr(args, "families", None) and spec.family not in args.families:
            continue
        for system in spec.systems:
            run = systems[system].run(spec, scenes, args.steps, args.seed, args.batch_size)
            points.append(score(system, spec, run, reference, scenes, args.steps))
            p = points[-1]
            log(f"{system:9} {name(p):32} computed {p.computed:5.2f}  PSNR {p.psnr:5.2f}  latent {p.latent_psnr:5.2f}  "
                f"SSIM {p.ssim:.4f}  follows {p.follow:.0%}  {run.seconds:.1f} s")
    return reference_follow, points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("-n", type=int, default=24, help="captions (evaluate.scenes(n, seed)); default %(default)s")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=4, help="captions per pipeline call (one decision per step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="every calibrator on every policy, more thresholds")
    parser.add_argument("--quick", action="store_true", help="a handful of points at tiny sizes (the test)")
    parser.add_argument("--families", nargs="+", choices=("dbcache", "scm-static", "scm-dynamic", "budget"),
                        help="only these policies (implies --no-write)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and the plot alone")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.n, args.steps, args.batch_size = min(args.n, 4), 10, 2
    if args.families:
        args.no_write = True
    started = time.perf_counter()
    reference_follow, points = run_front(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    all_points, matched, static, losses = tables(points, reference_follow, args.steps)
    elapsed = time.perf_counter() - started
    import cache_dit
    import diffusers

    verdict = "cachedit is at or above cache-dit at every matched budget and every static mask." if not losses else (
        "cachedit is behind in: " + "; ".join(losses) + "."
    )
    body = f"""The trained embedded model (`cachedit/embedded`), {args.n} seeded captions (`evaluate.scenes({args.n}, \
{args.seed})`), {args.steps} steps, guidance 4.0, batches of {args.batch_size} (one decision per step and batch in both \
systems), F{FN}B{BN}, warmup {WARMUP}. cachedit through `cachedit.enable(pipe, inner="eager")` with per-call settings; \
cache-dit {cache_dit.__version__} through `BlockAdapter` (its Flux layout: both block lists as one chain); diffusers \
{diffusers.__version__}. PSNR: float64 on [0, 1], per image, capped at {PSNR_CAP:.0f} dB, then averaged over images; \
latents: the final latents before postprocessing, mapped by (x + 1) / 2, unclamped. "follows": the embedded evaluator's \
rate of images whose colour, shape and position all read back right (uncached: {reference_follow:.0%}). \
{len(points)} points in {elapsed / 60:.1f} min.

![PSNR vs computed fraction](front.png)

**Matched budgets.** For each cache-dit point's mean computed steps, each system's best PSNR among its points that \
compute at most that many:

{matched}

**Static masks** (issue 11): a static steps-computation mask fixes the cached steps (the column checks they are \
the same in both systems), so the difference is what a cached step adds. Without a calibrator both add the same \
residual; FoCa is the same algorithm in both. DMD: cache-dit's Taylor fallback (fewer than 4 snapshots) overshoots \
(Note [Calibrators] in `cachedit/runtime/calibrators.py`). TaylorSeer: cache-dit creates its state one step late in \
a calibrator's first request (each cache-dit point here is a fresh pipeline, so the first batch), restarting the \
ladder on updates up to step 2; cachedit differences from step 1. Where the first cached step comes after step 3 the \
forecasts agree; where a mask caches early (order 2 on "ultra": steps 4-5 forecast from steps 1-3), cache-dit's \
shorter ladder extrapolates less from the fast-changing first steps, and on this model that is closer.

{static}

{verdict}

All points:

{all_points}
"""
    print(body)
    if not args.no_write:
        from report import write_section

        plot(points, args.steps, PLOT)
        command = "python benchmarks/front.py" + (" --full" if args.full else "")
        write_section("Speed-quality front vs cache-dit", body, command)


if __name__ == "__main__":
    main()
