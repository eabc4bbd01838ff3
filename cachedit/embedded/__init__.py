"""The embedded default model: a small Flux transformer trained on procedural shapes.

``load_pipeline()`` returns the shipped ``EmbeddedDiTPipeline`` (weights in ``weights/``, loaded
with diffusers' ``from_pretrained``); nothing is downloaded. See ``train.py`` for how they were made.
"""

from __future__ import annotations

import os

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")


def load_pipeline(path: str | None = None, **kwargs):
    """``EmbeddedDiTPipeline.from_pretrained(path or the shipped weights)``."""
    from cachedit.embedded.pipeline import EmbeddedDiTPipeline

    path = path or WEIGHTS_DIR
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"no diffusers pipeline at {path!r} (model_index.json missing); the shipped weights live in "
            f"{WEIGHTS_DIR}; retrain them with `python -m cachedit.embedded.train`"
        )
    kwargs.setdefault("low_cpu_mem_usage", False)  # the weights are small; needs no `accelerate`
    return EmbeddedDiTPipeline.from_pretrained(path, **kwargs)


__all__ = ["WEIGHTS_DIR", "load_pipeline"]
