import types

import torch

from cachedit.embedded import data
from cachedit.embedded.evaluate import prompt_following


class _Oracle:
    """A stand-in pipeline that draws exactly what the caption says (or always a red circle)."""

    def __init__(self, wrong_shape: bool = False):
        self.wrong_shape = wrong_shape

    def __call__(self, prompts, generator=None, output_type="pt", **_):
        images = []
        for prompt in prompts:
            attrs = data.parse_caption(prompt)
            if self.wrong_shape:
                attrs["shape"] = "circle"
            scene = data.Scene(attrs["shape"], attrs["color"], attrs["size"], attrs["position"], attrs["background"])
            images.append((data.render(scene, generator) + 1) / 2)
        return types.SimpleNamespace(images=torch.stack(images))


def test_oracle_scores_full_agreement():
    rates = prompt_following(_Oracle(), n=12, batch_size=5)
    assert rates == {"color": 1.0, "shape": 1.0, "position": 1.0, "background": 1.0, "all": 1.0, "checks": 1.0}


def test_wrong_shapes_are_counted():
    rates = prompt_following(_Oracle(wrong_shape=True), n=30)
    assert rates["color"] == rates["position"] == 1.0
    assert rates["shape"] == rates["all"] < 0.6  # only the circles agree
    assert abs(rates["checks"] - (2 + rates["shape"]) / 3) < 1e-9
