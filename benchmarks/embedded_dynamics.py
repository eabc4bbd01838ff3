"""Step-to-step dynamics of the embedded model: trained weights vs random weights.

For one 28-step generation, the relative L1 change of the first block's residual (image stream,
``transformer_blocks[0]`` output minus input) between consecutive steps, the quantity DBCache F1
thresholds: ``mean|r_t - r_{t-1}| / mean|r_{t-1}|``. Prints a markdown table with ASCII bars.

    python benchmarks/embedded_dynamics.py [--model DIR] [--steps 28]
"""

from __future__ import annotations

import argparse

import torch

from cachedit.embedded import load_pipeline
from cachedit.embedded.pipeline import EmbeddedDiTPipeline
from cachedit.embedded.train import ModelConfig, build_models, make_pipeline

PROMPT = "a large red circle in the center on a white background"


def residual_curve(pipe: EmbeddedDiTPipeline, steps: int, seed: int = 0) -> list[float]:
    residuals: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        before = kwargs["hidden_states"]
        after = output[1]  # FluxTransformerBlock returns (encoder_hidden_states, hidden_states)
        residuals.append((after - before).detach().float())

    handle = pipe.transformer.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    finally:
        handle.remove()
    return [float((b - a).abs().mean() / a.abs().mean()) for a, b in zip(residuals, residuals[1:])]


def bar(value: float, scale: float, width: int = 30) -> str:
    return "#" * min(width, round(value / scale * width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="trained pipeline directory (default: shipped weights)")
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained = load_pipeline(args.model)
    torch.manual_seed(0)
    random = make_pipeline(*build_models(ModelConfig()))
    for pipe in (trained, random):
        pipe.set_progress_bar_config(disable=True)
    curves = {"trained": residual_curve(trained, args.steps), "random": residual_curve(random, args.steps)}
    scale = max(max(c) for c in curves.values())
    print(f"relative L1 change of transformer_blocks[0]'s residual, step t vs t-1 ({args.steps} steps, "
          f"prompt {PROMPT!r}, guidance 4.0, seed 0); bars share one scale (full = {scale:.3f})\n")
    print("| step | trained | random | trained | random |")
    print("|---:|---:|---:|:---|:---|")
    for i, (t, r) in enumerate(zip(curves["trained"], curves["random"]), start=1):
        print(f"| {i} | {t:.4f} | {r:.4f} | `{bar(t, scale):<30}` | `{bar(r, scale):<30}` |")
    for name, curve in curves.items():
        mid = curve[3:]
        print(f"\n{name}: mean {sum(mid) / len(mid):.4f} over steps 4-{len(curve)}, "
              f"steps below 0.05/0.12/0.3: {sum(v < 0.05 for v in curve)}/{sum(v < 0.12 for v in curve)}/"
              f"{sum(v < 0.3 for v in curve)} of {len(curve)}")


if __name__ == "__main__":
    main()
