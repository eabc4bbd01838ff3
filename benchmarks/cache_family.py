"""The cache family on the trained embedded model: quality at equal computed steps (issue: the cache family).

One compiled transformer (inner eager) serves every setting through per-request settings
(``pipe(..., cachedit={...})``), so each row differs from the uncached images only by its decisions and
what cached steps add. Per row: mean computed steps per image, and PSNR (of the mean MSE over images,
never a mean of per-image dB) and mean SSIM against the uncached image of the same prompt and seed.

Rows come in groups of equal computed steps: a static steps mask with each calibrator, and budget mode
with the same number of computed steps.

    python benchmarks/cache_family.py [--prompts 8] [--steps 28] [--no-write]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import cachedit
from cachedit.embedded import load_pipeline
from cachedit.embedded.data import random_scene
from cachedit.integrations.demo import mse, psnr_of_mse, ssim
from report import markdown_table, write_section


def settings_grid(steps: int) -> list[tuple[str, dict]]:
    rows = []
    for preset in ("fast", "ultra"):
        computed = sum(cachedit.steps_mask(steps, preset))
        for calibrator in ("none", "taylorseer", "foca", "dmd"):
            extra = {"taylorseer_order": 2} if calibrator == "taylorseer" else {}
            rows.append(
                (f"SCM {preset} static, {calibrator}", {"scm": preset, "scm_policy": "static", "calibrator": calibrator, **extra})
            )
        rows.append((f"budget {computed}/{steps}", {"budget": computed / steps}))
        rows.append((f"budget {computed}/{steps}, taylorseer", {"budget": computed / steps, "calibrator": "taylorseer", "taylorseer_order": 2}))
    rows.append(("DBCache t=0.08", {"threshold": 0.08}))
    rows.append(("DBCache t=0.15", {"threshold": 0.15}))
    for threshold in (0.08, 0.15, 0.25):
        rows.append((f"DBPrune p={threshold}", {"policy": "dbprune", "prune_threshold": threshold}))
    return rows


def block_work(record, blocks: int, fn: int) -> tuple[float, int]:
    """Blocks run over blocks in the model, over the request's steps; and its host reads.

    DBCache runs ``fn`` blocks on a cached step and reads once per step; DBPrune runs every block it did not
    prune and reads once per step plus once per block it decided on."""
    run = reads = 0
    for branch in record.branch_list:
        steps = len(branch.computed_steps) + len(branch.cached_steps)
        reads += steps
        if branch.pruned_blocks:  # dbprune
            run += steps * blocks - sum(len(p) for p in branch.pruned_blocks.values())
            reads += sum(len(d) for d in branch.block_diffs.values())
        else:
            run += len(branch.computed_steps) * blocks + len(branch.cached_steps) * fn
    return run / (record.steps * blocks), reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # policy="dbprune" compiles the DBPrune split, on which requests choose dbcache (the default here) or dbprune.
    cachedit.enable(pipe, Fn=1, Bn=0, warmup_steps=4, threshold=0.0, inner="eager", policy="dbprune")
    settings_default = {"policy": "dbcache"}
    blocks = sum(len(getattr(pipe.transformer, name)) for name in ("transformer_blocks", "single_transformer_blocks"))
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [random_scene(generator).caption for _ in range(args.prompts)]

    def images(settings: dict) -> list[np.ndarray]:
        out = []
        for k, prompt in enumerate(prompts):
            result = pipe(
                prompt,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(args.seed + k),
                output_type="np",
                cachedit={**settings_default, **settings},
            )
            out.append(np.asarray(result.images[0], dtype=np.float32))
        return out

    pipe(prompts[0], num_inference_steps=2, output_type="np")  # the compile, outside every timed row
    start = time.perf_counter()
    reference = images({})  # threshold 0: nothing cached
    uncached_seconds = time.perf_counter() - start
    table = []
    for name, settings in settings_grid(args.steps):
        before = len(cachedit.stats(pipe))
        start = time.perf_counter()
        got = images(settings)
        seconds = time.perf_counter() - start
        records = cachedit.stats(pipe)[before:]
        computed = np.mean([r.num_computed_steps for r in records])
        work, reads = zip(*(block_work(r, blocks, fn=1) for r in records))
        error = float(np.mean([mse(a, b) for a, b in zip(got, reference)]))
        similarity = float(np.mean([ssim(a, b) for a, b in zip(got, reference)]))
        table.append(
            [
                name,
                f"{computed:.1f}",
                f"{np.mean(work):.2f}",
                f"{np.mean(reads):.0f}",
                f"{seconds / uncached_seconds:.2f}",
                f"{psnr_of_mse(error):.2f}",
                f"{similarity:.4f}",
            ]
        )
        print(" | ".join(table[-1]), flush=True)
    body = (
        f"Embedded model (`cachedit.embedded`), {args.prompts} random captions (seed {args.seed}), {args.steps} steps, "
        "F1B0, warmup 4, inner eager, compiled with the DBPrune split (`policy=\"dbprune\"`; DBCache requests add the "
        f"blocks' residuals one by one); PSNR of the mean MSE and mean SSIM against the uncached images. Computed steps: "
        "DBPrune counts a step as computed when it pruned no block. Block work: blocks run / (steps x "
        f"{blocks} blocks). Host reads per request: DBCache one per step, DBPrune one per step and one per decided block. "
        "Time: wall time of the row's images over the uncached images' in the same run (1 thread; under load, noisy).\n\n"
        + markdown_table(["setting", "computed steps", "block work", "host reads", "time / uncached", "PSNR (dB)", "SSIM"], table)
    )
    print(body)
    if not args.no_write:
        write_section("Cache family", body)


if __name__ == "__main__":
    main()
