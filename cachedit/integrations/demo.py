"""``cachedit demo``: the embedded model with and without cachedit, as a table and one PNG grid.

For each setting (the uncached baseline first) a freshly loaded transformer is compiled, one
warm-up generation absorbs the compile, and then every prompt is generated with the same seed.
Seconds per image (the median over prompts, robust to a busy machine) exclude the compile; PSNR
and SSIM compare each image with the baseline's image of the same prompt, in float on ``[0, 1]``
images (a setting's PSNR is that of its mean squared error over the prompts, so one image equal to
the baseline's cannot make it infinite). The grid has one row per prompt and one column per setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_PROMPTS = (
    "a large red circle in the center on a white background",
    "a small blue square at the top left on a gray background",
    "a large yellow triangle at the bottom right on a black background",
    "a small green circle at the top right on a white background",
    "a large purple square at the bottom left on a black background",
)
DEFAULT_OUT = "cachedit_demo.png"  # in the current directory; never overwritten unless named with --out
WARMUP_PROMPT = "a small orange triangle in the center on a gray background"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One column of the demo: ``options`` for ``cachedit.enable``, or ``None`` for the baseline,
    which ``baseline_backend`` compiles (``"eager"``: not compiled)."""

    name: str
    options: dict | None
    baseline_backend: str = "eager"


def default_settings(inner: str) -> list[Setting]:
    """Baseline, then DBCache from conservative to aggressive.

    Thresholds are set against the embedded model's residual-diff curve (BENCHMARKS.md, "Embedded
    model"): step to step, its first-block residual changes by about 0.06-0.11 (relative L1), and the
    diff DBCache checks is against the last computed step, so it grows while steps are cached.
    0.08 is cache-dit's default. cachedit has no TaylorSeer yet, so the strongest setting is DBCache
    with a high threshold and a short warmup.
    """
    base = {"Fn": 1, "Bn": 0, "warmup_steps": 4, "inner": inner}
    return [
        Setting(f"baseline ({inner})", None, baseline_backend=inner),
        Setting("DBCache F1B0 t=0.08", {**base, "threshold": 0.08}),
        Setting("DBCache F1B0 t=0.15", {**base, "threshold": 0.15}),
        Setting("DBCache F1B0 t=0.3 (strongest)", {**base, "threshold": 0.3, "warmup_steps": 2}),
    ]


@dataclasses.dataclass
class Row:
    setting: Setting
    seconds: list[float] = dataclasses.field(default_factory=list)
    computed: list[int] = dataclasses.field(default_factory=list)
    cached: list[int] = dataclasses.field(default_factory=list)
    images: list[np.ndarray] = dataclasses.field(default_factory=list)  # [H, W, 3] float in [0, 1]
    mse: list[float] = dataclasses.field(default_factory=list)
    psnr: list[float] = dataclasses.field(default_factory=list)
    ssim: list[float] = dataclasses.field(default_factory=list)

    @property
    def mean_psnr(self) -> float:
        """PSNR of the mean squared error over the prompts: ``inf`` only when every image is identical."""
        return psnr_of_mse(float(np.mean(self.mse)))


def mse(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared error of two float images in ``[0, 1]``, in float64."""
    return float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))


def psnr_of_mse(error: float) -> float:
    """Peak signal-to-noise ratio in dB (peak 1) of a mean squared error; ``inf`` for 0."""
    return math.inf if error == 0 else 10 * math.log10(1.0 / error)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two float images in ``[0, 1]``; ``inf`` when equal.

    Average a set through ``mse`` and ``psnr_of_mse``, not by averaging these values: one identical
    image would make the mean ``inf``.
    """
    return psnr_of_mse(mse(image, reference))


def ssim(image: np.ndarray, reference: np.ndarray, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window, data range 1) over pixels and channels.

    Images are ``[H, W, C]`` float in ``[0, 1]``; the window is 7 rather than 11 because the
    embedded model's images are 32x32.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64)).permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    y = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64)).permute(2, 0, 1)[:, None]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]  # [1, 1, k, k]

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel)  # valid region only

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def _load(model: str | None):
    """The embedded pipeline (shipped weights, or a directory saved from it) or any diffusers pipeline."""
    import json

    from cachedit.embedded import load_pipeline
    from cachedit.embedded.pipeline import EmbeddedDiTPipeline

    if model is None:
        return load_pipeline()
    index = os.path.join(model, "model_index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            if json.load(f).get("_class_name") == EmbeddedDiTPipeline.__name__:
                return load_pipeline(model)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model)


def _fresh_pipeline(model: str | None):
    """A freshly loaded pipeline, so each setting compiles its own transformer from the same weights."""
    pipe = _load(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, steps: int, seed: int) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np")
    return np.asarray(out.images[0], dtype=np.float32)  # [H, W, 3] in [0, 1]


def run_demo(
    prompts: Sequence[str],
    steps: int,
    settings: Sequence[Setting],
    model: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[Row]:
    """Generate every prompt under every setting; the first setting is the reference for quality."""
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(settings) * (len(prompts) + 1), desc="demo", disable=not progress, file=sys.stderr)
    # Compile in this process: Inductor's compile workers start in the background and, with warm caches,
    # were still starting during the first timed images, which then took 3x longer on 2 cores.
    with torch._inductor.config.patch(compile_threads=1):
        for setting in settings:
            rows.append(_run_setting(setting, prompts, steps, seed, model, bar))
    bar.close()
    score(rows)
    return rows


def score(rows: Sequence[Row]) -> None:
    """Fill each row's MSE, PSNR and SSIM against the first row's images, prompt by prompt."""
    for row in rows:
        for image, reference in zip(row.images, rows[0].images):
            row.mse.append(mse(image, reference))
            row.psnr.append(psnr_of_mse(row.mse[-1]))
            row.ssim.append(ssim(image, reference))


def _run_setting(setting: Setting, prompts: Sequence[str], steps: int, seed: int, model: str | None, bar) -> Row:
    """One column: compile a fresh pipeline for ``setting``, warm it up, then time every prompt."""
    import cachedit

    pipe = _fresh_pipeline(model)
    if setting.options is None:
        if setting.baseline_backend != "eager":
            pipe.transformer.compile(backend=setting.baseline_backend)
    else:
        cachedit.enable(pipe, **setting.options)
    row = Row(setting)
    bar.set_postfix_str(f"{setting.name}: compile + warm-up")
    _generate(pipe, WARMUP_PROMPT, steps, seed)  # compile happens here, outside the timings
    bar.update()
    bar.set_postfix_str(setting.name)
    for prompt in prompts:
        start = time.perf_counter()
        image = _generate(pipe, prompt, steps, seed)
        row.seconds.append(time.perf_counter() - start)
        row.images.append(image)
        if setting.options is None:
            row.computed.append(steps)
            row.cached.append(0)
        else:
            records = cachedit.stats(pipe.transformer)
            # No record: the backend declined to step-cache this model (cachedit.explain says why).
            row.computed.append(records[-1].num_computed_steps if records else steps)
            row.cached.append(records[-1].num_cached_steps if records else 0)
        bar.update()
    return row


def format_table(rows: Sequence[Row]) -> str:
    base = float(np.median(rows[0].seconds))
    header = ("setting", "s/image (median)", "speedup", "computed/cached", "PSNR dB", "SSIM")
    lines = []
    for row in rows:
        sec = float(np.median(row.seconds))
        mean_psnr = row.mean_psnr
        lines.append(
            (
                row.setting.name,
                f"{sec:.3f}",
                f"{base / sec:.2f}x",
                f"{np.mean(row.computed):.1f}/{np.mean(row.cached):.1f}",
                "inf" if math.isinf(mean_psnr) else f"{mean_psnr:.1f}",
                f"{np.mean(row.ssim):.4f}",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def column_label(rows: Sequence[Row], c: int) -> str:
    """The grid's header for column ``c``: setting name, speedup, and PSNR (of the mean MSE)."""
    import textwrap

    row = rows[c]
    speedup = float(np.median(rows[0].seconds)) / float(np.median(row.seconds))
    mean_psnr = row.mean_psnr
    quality = "reference" if c == 0 else "identical" if math.isinf(mean_psnr) else f"PSNR {mean_psnr:.1f} dB"
    return "\n".join(textwrap.wrap(row.setting.name, 20)[:2] + [f"{speedup:.2f}x, {quality}"])


def make_grid(rows: Sequence[Row], prompts: Sequence[str], cell: int = 128):
    """One PIL image: a header row of setting names (with speedup and PSNR), then one row per prompt."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    label_w, header_h, pad = 190, 58, 6
    width = label_w + len(rows) * (cell + pad) + pad
    height = header_h + len(prompts) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, row in enumerate(rows):
        x = label_w + pad + c * (cell + pad)
        text = column_label(rows, c)
        draw.multiline_text((x, 4), text, fill="black", font=font, spacing=2)
        for r, image in enumerate(row.images):
            y = header_h + pad + r * (cell + pad)
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            grid.paste(tile.resize((cell, cell), Image.NEAREST), (x, y))
    for r, prompt in enumerate(prompts):
        y = header_h + pad + r * (cell + pad)
        draw.multiline_text((pad, y + 4), "\n".join(textwrap.wrap(prompt, 26)), fill="black", font=font, spacing=2)
    return grid


DESCRIPTION = (
    "Generate images with the embedded model uncached and with several cachedit settings; print seconds "
    "per image, speedup, computed/cached steps, PSNR and SSIM against the uncached images, and write a "
    "labelled PNG grid."
)
EPILOG = (
    "The grid goes to ./cachedit_demo.png, or to the first free cachedit_demo-2.png, -3, ... when that "
    "exists; --out PATH writes (and overwrites) PATH. On a machine busy with other work the demo uses fewer "
    "threads and warns: seconds and speedups are only comparable on an idle machine."
)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="cachedit demo")
    parser.description, parser.epilog = DESCRIPTION, EPILOG
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), metavar="PROMPT",
                        help=f"one or more prompts (default: {len(DEFAULT_PROMPTS)} built-in prompts of coloured shapes)")
    parser.add_argument("--steps", type=int, default=28, help="num_inference_steps per image (default: %(default)s)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"where the PNG grid is written (default: ./{DEFAULT_OUT}, never overwritten: "
                             "the next free numbered name is used)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a diffusers pipeline directory (default: the embedded model shipped with cachedit)")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "eager"),
                        help="the baseline's compiler and cachedit's inner compiler (default: %(default)s; "
                             "inductor compiles each setting first, eager starts at once)")
    parser.add_argument("--seed", type=int, default=0,
                        help="generator seed, the same for every prompt and setting (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"torch.set_num_threads (default: this machine's {_usable_cores()} cores minus "
                             "those other processes keep busy when the demo starts, at least 1)")
    return parser


def _usable_cores() -> int:
    """Cores torch would use by default, within this process's CPU affinity."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), affinity))


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from ``/proc/stat``; ``None`` where there is none (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is already counted in user time


def busy_cpus(sample_seconds: float = 0.5) -> float:
    """How many CPUs other processes keep busy now: ``/proc/stat`` sampled while this process sleeps,
    else the 1-minute load average (which also remembers the last minute, e.g. a demo that just ended)."""
    before = _cpu_ticks()
    if before is not None:
        time.sleep(sample_seconds)
        after = _cpu_ticks()
        if after is not None and after[1] > before[1]:
            return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def choose_threads(requested: int | None) -> tuple[int, str | None]:
    """The thread count for the demo and, when the machine is busy, a warning to print.

    On 2 cores with another job running, the default 2 threads took 145 s for what 1 thread did in
    14 s (issue 15): threads that wait on each other lose whole time slices to the other job.
    """
    cores = _usable_cores()
    busy = busy_cpus()
    if busy < 0.5:
        return requested or cores, None
    threads = requested or max(1, min(cores, round(cores - busy)))
    how = "--threads N to override" if requested is None else "set by --threads"
    return threads, (
        f"warning: the machine is busy: other processes keep about {busy:.1f} of {os.cpu_count()} CPUs busy; "
        f"using {threads} thread{'s' if threads > 1 else ''} ({how}). Seconds and speedups will be noisy: "
        "compare them on an idle machine."
    )


def free_path(path: str) -> str:
    """``path``, or ``stem-2.ext``, ``stem-3.ext``, ... : the first name that does not exist yet."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return candidate


def main(args: argparse.Namespace | Sequence[str] | None = None) -> list[Row]:
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1; got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be at least 1; got {args.threads}")
    threads, warning = choose_threads(args.threads)
    if warning:
        print(warning, file=sys.stderr)
    torch.set_num_threads(threads)
    out = free_path(DEFAULT_OUT) if args.out is None else args.out
    replacing = args.out is not None and os.path.exists(out)
    started = time.perf_counter()
    rows = run_demo(args.prompts, args.steps, default_settings(args.inner), model=args.model, seed=args.seed)
    print(format_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    make_grid(rows, args.prompts).save(out)
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"grid: {os.path.abspath(out)}{' (replaced)' if replacing else ''} ({len(args.prompts)} prompts x "
          f"{len(rows)} settings, {args.steps} steps, reference: {rows[0].setting.name})")
    print(f"total {time.perf_counter() - started:.0f} s on {threads} thread{'s' if threads > 1 else ''}{load}")
    return rows
