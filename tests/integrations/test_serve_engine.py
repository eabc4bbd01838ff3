"""The batching engine behind ``cachedit serve``, in process (embedded model, inner="eager").

Tolerance as in test_serve.py: the same decisions, and images within float32 reordering of the batched
matmuls (PSNR >= 40 dB of the PNGs; one 8-bit level everywhere is 48 dB).
"""

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("prometheus_client")

from cachedit.embedded import load_pipeline  # noqa: E402
from cachedit.integrations import engine as serving  # noqa: E402

pytestmark = [pytest.mark.usefixtures("fresh_dynamo"), pytest.mark.timeout(600)]


def _params(seed, steps, **settings):
    return serving.Params("a large red circle in the center", steps=steps, seed=seed, settings=settings)


def test_a_request_raising_inside_the_model_fails_alone_and_the_batch_finishes_as_alone():
    """A generation whose settings the step count cannot honour (a budget below the mandatory computes;
    the HTTP layer refuses it with a 400, the engine alone does not) raises in the gate of a batched call:
    it fails alone, and its batch-mates finish with their solo decisions, in one compiled graph."""
    torch.set_num_threads(1)
    engine = serving.BatchedEngine(load_pipeline(), {"Fn": 1, "Bn": 0, "warmup_steps": 2, "threshold": 0.3, "inner": "eager"})
    try:
        good = [_params(1, 6), _params(2, 8, threshold=0.5), _params(3, 5, max_continuous_cached_steps=1)]
        bad = _params(4, 4, budget=0.1)
        with engine.cond:  # all four queued before the worker admits any: one batch
            jobs = [engine.submit(p) for p in (good[0], bad, *good[1:])]
        with pytest.raises(ValueError, match="budget=0.1 of 4 steps"):
            jobs[1].future.result(timeout=300)
        together = [j.future.result(timeout=300) for j in (jobs[0], *jobs[2:])]
        alone = [engine.generate(p, timeout=300) for p in good]
        buckets = {
            line.split('le="')[1].split('"')[0]: float(line.split()[-1])
            for line in engine.metrics.text().decode().splitlines()
            if line.startswith("cachedit_batch_generations_bucket")
        }
        assert buckets["+Inf"] > buckets["1.0"], buckets  # some calls carried several generations
        for a, t in zip(alone, together):
            assert a["cachedit"]["cached_steps"] == t["cachedit"]["cached_steps"]
            assert a["data"] == t["data"] or _close(a, t)
        assert any(t["cachedit"]["cached_steps"] for t in together)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # no recompile per mix or size
        assert engine.health()["bytes_held"] == 0
    finally:
        engine.stop(timeout=60)


def _close(a, b) -> bool:
    import base64
    import io

    import numpy as np
    from PIL import Image

    from cachedit.integrations.demo import psnr

    def image(r):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["data"][0]["b64_json"]))), dtype=np.float64) / 255

    return psnr(image(a), image(b)) >= 40.0
