"""Does the embedded model follow its prompts? (``python -m cachedit.embedded.evaluate``)

Draws ``n`` scenes from a seed, generates one image per caption, reads colour, shape, position
and background back from the pixels with :func:`cachedit.embedded.data.read_scene`, and counts
agreements. ``checks`` is the fraction of the 3n (sample, attribute) checks of colour, shape and
position that agree; ``all`` is the stricter fraction of samples where all three agree.
"""

from __future__ import annotations

import argparse
import json

import torch

from cachedit.embedded import data

ATTRIBUTES = ("color", "shape", "position", "background")


def scenes(n: int, seed: int = 1234) -> list[data.Scene]:
    """The ``n`` scenes (captions with known attributes) a seed draws, in order."""
    scene_gen = torch.Generator().manual_seed(seed)
    return [data.random_scene(scene_gen) for _ in range(n)]


def agreement(drawn: list[data.Scene], images) -> dict[str, float]:
    """Agreement rates in [0, 1] of ``images`` ([3, H, W] in [0, 1], one per scene) with their scenes."""
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    for scene, image in zip(drawn, images, strict=True):
        read = data.read_scene(image)
        ok = {a: read[a] == getattr(scene, a) for a in ATTRIBUTES}
        ok["all"] = ok["color"] and ok["shape"] and ok["position"]
        for a, v in ok.items():
            hits[a] += int(v)
    n = len(drawn)
    rates = {a: h / n for a, h in hits.items()}
    rates["checks"] = (hits["color"] + hits["shape"] + hits["position"]) / (3 * n)
    return rates


def prompt_following(pipe, n: int = 60, steps: int = 28, guidance_scale: float = 4.0, seed: int = 1234,
                     batch_size: int = 30) -> dict[str, float]:
    """Agreement rates in [0, 1]: per attribute, over all colour/shape/position checks, and per sample."""
    drawn = scenes(n, seed)
    images = []
    for start in range(0, n, batch_size):
        chunk = drawn[start : start + batch_size]
        images.extend(
            pipe(
                [s.caption for s in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed + start),
                output_type="pt",
            ).images  # [B, 3, H, W] in [0, 1]
        )
    return agreement(drawn, images)


def main(argv: list[str] | None = None) -> None:
    from cachedit.embedded import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline directory (default: the shipped weights)")
    parser.add_argument("-n", type=int, default=60)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = prompt_following(pipe, args.n, args.steps, args.guidance_scale, args.seed)
    print(json.dumps({"n": args.n, "steps": args.steps, "guidance_scale": args.guidance_scale, **result}))


if __name__ == "__main__":
    main()
