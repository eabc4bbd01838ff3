"""``cachedit demo``: the embedded model with and without cachedit, as a table and one PNG grid.

For each setting (the uncached baseline first) a freshly loaded transformer is compiled, one
warm-up generation absorbs the compile, and then every prompt is generated with the same seed.
Seconds per image (the median over prompts, robust to a busy machine) exclude the compile; PSNR
and SSIM compare each image with the baseline's image of the same prompt, in float on ``[0, 1]``
images. The grid has one row per prompt and one column per setting.
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
DEFAULT_OUT = "cachedit_demo.png"
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
    psnr: list[float] = dataclasses.field(default_factory=list)
    ssim: list[float] = dataclasses.field(default_factory=list)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two float images in ``[0, 1]``; ``inf`` when equal."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


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
    for row in rows:
        for image, reference in zip(row.images, rows[0].images):
            row.psnr.append(psnr(image, reference))
            row.ssim.append(ssim(image, reference))
    return rows


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
        mean_psnr = float(np.mean(row.psnr))
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
    base = float(np.median(rows[0].seconds))
    for c, row in enumerate(rows):
        x = label_w + pad + c * (cell + pad)
        sec = float(np.median(row.seconds))
        mean_psnr = float(np.mean(row.psnr))
        quality = "reference" if c == 0 else f"PSNR {mean_psnr:.1f} dB"
        text = "\n".join(textwrap.wrap(row.setting.name, 20)[:2] + [f"{base / sec:.2f}x, {quality}"])
        draw.multiline_text((x, 4), text, fill="black", font=font, spacing=2)
        for r, image in enumerate(row.images):
            y = header_h + pad + r * (cell + pad)
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            grid.paste(tile.resize((cell, cell), Image.NEAREST), (x, y))
    for r, prompt in enumerate(prompts):
        y = header_h + pad + r * (cell + pad)
        draw.multiline_text((pad, y + 4), "\n".join(textwrap.wrap(prompt, 26)), fill="black", font=font, spacing=2)
    return grid


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="cachedit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="one or more prompts")
    parser.add_argument("--steps", type=int, default=28, help="num_inference_steps per image")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the PNG grid is written")
    parser.add_argument("--model", default=None, help="a diffusers pipeline directory (default: the embedded model)")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "eager"),
                        help="the baseline's compiler and cachedit's inner compiler (inductor: about a minute "
                             "of compiles on a 2-core CPU with cold caches; eager: seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> list[Row]:
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1; got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run_demo(args.prompts, args.steps, default_settings(args.inner), model=args.model, seed=args.seed)
    print(format_table(rows))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    make_grid(rows, args.prompts).save(args.out)
    print(f"grid: {args.out} ({len(args.prompts)} prompts x {len(rows)} settings, {args.steps} steps, "
          f"reference: {rows[0].setting.name}); total {time.perf_counter() - started:.0f} s")
    return rows
