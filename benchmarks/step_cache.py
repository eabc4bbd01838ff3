"""Step-cache overhead and speedup on a CPU-sized Flux-like transformer (issue: the cachedit backend).

Measures, side by side in one process:
  * caching off (threshold 0) vs plain ``torch.compile(backend="inductor")``: run-time and compile-time
    ratios (targets <= 1.02 and <= 1.3);
  * caching on: measured speedup over the ideal speedup implied by the blocks actually run
    (``steps * N / (computed * N + cached * (Fn + Bn))``, target >= 0.95);
  * host reads (``item``/``tolist``/``bool``/...) per step in cachedit's glue (target 1).

    python benchmarks/step_cache.py [--steps 28] [--threshold 0.5] [--no-write]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo
import torch._inductor.config
from diffusers import FluxTransformer2DModel

import cachedit
from report import count_host_reads, markdown_table, write_section

SIDE = 32  # 32 x 32 = 1024 image tokens
TEXT = 32
DOUBLE, SINGLE = 4, 12  # 16 blocks


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24),
    ).eval()


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(SIDE * SIDE, 1), ids.float()], dim=1)
    return dict(
        hidden_states=torch.randn(1, SIDE * SIDE, 64, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT, 64, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT, 3),
        return_dict=False,
    )


def generate(model, kw: dict, steps: int) -> torch.Tensor:
    x = kw["hidden_states"]
    with torch.no_grad():
        for k in range(steps):
            sigma = 1.0 - k / steps
            out = model(**{**kw, "hidden_states": x}, timestep=torch.tensor([sigma]))[0]
            x = x - out / steps
    return x


def compile_time(compiled, kw: dict) -> float:
    t0 = time.perf_counter()
    generate(compiled, kw, 1)  # the first call compiles
    return time.perf_counter() - t0


def interleaved_run_times(variants: dict, kw: dict, steps: int, rounds: int) -> dict[str, float]:
    """Fastest full generation of each variant; rounds alternate the variants so load drifts hit all alike."""
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, compiled in variants.items():
            t0 = time.perf_counter()
            generate(compiled, kw, steps)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threshold", type=float, default=0.5, help="random weights: diffs run 0.3-0.6")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest counts")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch._inductor.config.fx_graph_cache = False  # compile times must not come from the disk cache
    torch.set_num_threads(torch.get_num_threads())
    kw = inputs()
    model = build()
    n_blocks = DOUBLE + SINGLE
    cfg = dict(Fn=1, Bn=0, warmup_steps=4, max_continuous_cached_steps=3)

    variants, compile_s = {}, {}
    settings = {"inductor": None, "caching off": 0.0, f"cachedit F1B0 W4 MC3 τ{args.threshold}": args.threshold}
    for name, threshold in settings.items():  # distinct backends/options: each compiles its own entry
        if threshold is None:
            variants[name] = torch.compile(model, backend="inductor")
        else:
            variants[name] = torch.compile(model, backend="cachedit", options={**cfg, "threshold": threshold})
        compile_s[name] = compile_time(variants[name], kw)
    run_s = interleaved_run_times(variants, kw, args.steps, args.repeats)
    base, off, on = settings
    with count_host_reads() as reads:
        generate(variants[on], kw, args.steps)
    last = cachedit.stats(model)[-1]
    cached, computed = last.num_cached_steps, last.num_computed_steps
    ideal = args.steps * n_blocks / (computed * n_blocks + cached * (cfg["Fn"] + cfg["Bn"]))
    measured = run_s[off] / run_s[on]
    rows = [
        ["caching off / inductor: run time", f"{run_s[off] / run_s[base]:.3f}", "<= 1.02"],
        ["caching off / inductor: compile time", f"{compile_s[off] / compile_s[base]:.3f}", "<= 1.3"],
        [f"caching on: cached steps of {args.steps}", f"{cached}", ""],
        ["caching on: measured speedup over caching off", f"{measured:.3f}", ""],
        ["caching on: ideal speedup from blocks run", f"{ideal:.3f}", ""],
        ["caching on: measured / ideal", f"{measured / ideal:.3f}", ">= 0.95"],
        ["host reads per step (cachedit glue)", f"{reads['reads'] / args.steps:.2f}", "1"],
    ]
    times = [[name, f"{compile_s[name]:.1f}", f"{run_s[name]:.2f}"] for name in settings]
    body = (
        f"Flux-like transformer, {DOUBLE} double + {SINGLE} single blocks, width 128, {SIDE * SIDE} image + {TEXT} "
        f"text tokens, {args.steps} steps, fp32. CPU times are a record of ratios, not absolute figures.\n\n"
        + markdown_table(["measure", "value", "target"], rows)
        + "\n\n"
        + markdown_table(["setting", "first call incl. compile (s)", f"{args.steps} steps (s)"], times)
    )
    print(body)
    if not args.no_write:
        write_section("Step cache", body, "python benchmarks/step_cache.py")


if __name__ == "__main__":
    main()
