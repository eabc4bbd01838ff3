"""``cachedit serve --model DIR`` with a diffusers pipeline that is not the embedded one (issue 14): a whole
tiny ``FluxPipeline`` (CLIP and T5 text encoders with their tokenizers, a VAE, the transformer) saved
to a directory and loaded by the server process with ``DiffusionPipeline.from_pretrained``, offline.

Its VAE is a custom component shipped in the directory (``vae/size_fault_vae.py``, loaded with
``--trust-remote-code``) that raises for images 48 pixels wide: a failure inside the model that a client
can trigger on purpose, to see one generation fail with a 500 while the others finish.

The server merges the transformer calls of concurrent generations (its default ``--max-batch 8``);
``cachedit generate`` runs one generation (``--max-batch 1``: a plain ``cachedit.request``).

Tolerance: the served generation and the same call of ``cachedit.enable(pipe)`` alone in this process make
the same cached/computed steps and give PNGs within PSNR >= 40 dB. Both run the same weights, seed and
settings with inner="eager"; they differ by float32 reordering (~1e-6: the merged matmuls have more rows,
the processes other thread counts), far below one 8-bit level (48 dB); a leaked state, a row given to
the wrong request or a wrong setting changes a decision or moves pixels by many levels.
"""

import base64
import concurrent.futures
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
from PIL import Image  # noqa: E402

import cachedit  # noqa: E402
from cachedit.integrations.demo import psnr  # noqa: E402
from tests.integrations.server_process import ROOT, abandon_request, metric, serve  # noqa: E402
from tests.flux_pipeline import save_tiny_flux_pipeline  # noqa: E402

OPTIONS = {"inner": "eager", "Fn": 1, "Bn": 0, "warmup_steps": 2, "threshold": 0.3}  # the server's flags below
FAULT_WIDTH = 48
FAULTY_VAE = f'''
from diffusers import AutoencoderKL


class SizeFaultVAE(AutoencoderKL):
    """An AutoencoderKL that raises when it decodes an image {FAULT_WIDTH} pixels wide."""

    def decode(self, z, *args, **kwargs):
        if z.shape[-1] * 8 == {FAULT_WIDTH}:
            raise RuntimeError("SizeFaultVAE: cannot decode {FAULT_WIDTH}-pixel-wide images")
        return super().decode(z, *args, **kwargs)
'''
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flux")
    save_tiny_flux_pipeline(path)
    (path / "vae" / "size_fault_vae.py").write_text(FAULTY_VAE)
    index = json.loads((path / "model_index.json").read_text())
    index["vae"] = ["size_fault_vae", "SizeFaultVAE"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    flags = ["--model", str(model_dir), "--trust-remote-code", "--default-size", "64", "--max-queue", "8",
             "--inner", "eager", "--Fn", "1", "--Bn", "0", "--warmup-steps", "2", "--threshold", "0.3"]
    with serve(flags) as running:
        yield running


def _post(url, body, timeout=120):
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float64) / 255.0


BODIES = [
    {"prompt": "a red circle", "seed": 1, "num_inference_steps": 12, "cachedit": {}},
    {"prompt": "a small blue square", "seed": 2, "num_inference_steps": 10, "guidance_scale": 2.0, "cachedit": {"threshold": 0.5}},
    {"prompt": "a green triangle", "seed": 3, "num_inference_steps": 12, "n": 2, "cachedit": {"threshold": 0.0}},
    {"prompt": "a large yellow circle", "seed": 4, "num_inference_steps": 12,
     "cachedit": {"scm": "fast", "scm_policy": "static"}},
]


def test_a_diffusers_pipeline_directory_serves_what_the_pipeline_makes_alone(server, model_dir):
    """Four concurrent requests with different settings, steps, guidance and n, their transformer calls merged
    (Note [Merged pipeline calls]): each equals the same call of the pipeline under ``cachedit.enable`` alone
    in this process."""
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    with concurrent.futures.ThreadPoolExecutor(len(BODIES)) as pool:
        served = list(pool.map(lambda b: _post(url, b), BODIES))
    after = httpx.get(f"{url}/metrics").text
    calls = {le: metric(after, f'cachedit_batch_generations_bucket{{le="{le}"}}')
             - metric(before, f'cachedit_batch_generations_bucket{{le="{le}"}}') for le in ("1.0", "+Inf")}
    assert calls["+Inf"] > calls["1.0"], "no transformer call carried two generations: nothing was merged"
    from diffusers import DiffusionPipeline

    torch._dynamo.reset()
    pipe = cachedit.enable(DiffusionPipeline.from_pretrained(str(model_dir), trust_remote_code=True), **OPTIONS)
    pipe.set_progress_bar_config(disable=True)
    cached_any = False
    for body, response in zip(BODIES, served):
        assert response.status_code == 200, response.text
        got = response.json()
        images = pipe(
            body["prompt"], height=64, width=64, num_inference_steps=body["num_inference_steps"],
            guidance_scale=body.get("guidance_scale", 3.5), num_images_per_prompt=body.get("n", 1),
            generator=torch.Generator().manual_seed(body["seed"]), cachedit=body["cachedit"],
        ).images
        alone = cachedit.stats(pipe)[-1].branch_list[0]
        assert got["cachedit"]["cached_steps"] == alone.cached_steps, body
        assert got["cachedit"]["computed_steps"] == alone.computed_steps, body
        assert len(got["data"]) == len(images) == body.get("n", 1)
        for item, image in zip(got["data"], images):
            assert psnr(_image(item["b64_json"]), np.asarray(image, dtype=np.float64) / 255.0) >= 40.0, body
        cached_any |= bool(alone.cached_steps)
    assert cached_any, "nothing cached: the comparison tests little"
    assert served[2].json()["cachedit"]["cached_steps"] == []  # threshold 0 never caches
    torch._dynamo.reset()


def test_a_generation_raising_inside_the_pipeline_fails_alone_with_a_500(server):
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    bodies = [{"prompt": "a red circle", "seed": s, "num_inference_steps": 6, "size": size}
              for s, size in ((1, "64x64"), (2, f"{FAULT_WIDTH}x64"), (3, "64x48"))]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: _post(url, b), bodies))
    assert [r.status_code for r in responses] == [200, 500, 200], [r.text[:200] for r in responses]
    error = responses[1].json()["error"]
    assert error["type"] == "server_error" and "SizeFaultVAE" in error["message"], error
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "queued": 0, "active": 0, "bytes_held": 0}
    after = httpx.get(f"{url}/metrics").text
    assert metric(after, 'cachedit_requests_total{status="error"}') == metric(before, 'cachedit_requests_total{status="error"}') + 1
    assert metric(after, 'cachedit_requests_total{status="ok"}') == metric(before, 'cachedit_requests_total{status="ok"}') + 2


def test_a_killed_client_cancels_its_generation_at_the_next_step(server):
    """The pipeline's ``callback_on_step_end`` stops the generation: far fewer than its 200 steps run."""
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    abandon_request(url, {"prompt": "a red circle", "num_inference_steps": 200, "seed": 3})  # returns once nothing is held
    after = httpx.get(f"{url}/metrics").text
    cancelled = 'cachedit_requests_total{status="cancelled"}'
    assert metric(after, cancelled) == metric(before, cancelled) + 1
    steps = metric(after, "cachedit_batch_generations_count") - metric(before, "cachedit_batch_generations_count")
    assert 0 < steps < 150, steps  # stopped at a step boundary, long before its end


@pytest.mark.parametrize("body,field", [
    ({"prompt": "a red circle", "size": "40x40"}, "size"),  # VAE 8 x 2x2 packing: multiples of 16
    ({"prompt": "a red circle", "n": 5}, "n"),
    ({"prompt": "a red circle", "cachedit": {"threshold": -1}}, "cachedit.threshold"),
    ({"prompt": "a red circle", "model": "cachedit-embedded"}, "model"),
    ({"prompt": "a red circle", "cachedit": {"policy": "dbprune"}}, "cachedit.policy"),  # compiled without the split
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_is_refused_for_the_pipeline_it_serves(server, body, field):
    url, _ = server
    response = _post(url, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_models_names_the_directory(server, model_dir):
    url, _ = server
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == model_dir.name


def test_generate_writes_the_image_of_a_pipeline_directory(model_dir, tmp_path):
    out = tmp_path / "circle.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "cachedit", "generate", "a red circle", "--model", str(model_dir), "--trust-remote-code",
         "--size", "64x64", "--steps", "8", "--inner", "eager", "--Fn", "1", "--Bn", "0", "--setting", "threshold=0.5",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert Image.open(out).size == (64, 64)
    assert "cached steps [" in done.stdout


def test_a_pipeline_without_a_transformer_is_refused_by_name():
    from cachedit.integrations.engine import engine_for

    class UNetPipeline:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="UNetPipeline has no `transformer` module"):
        engine_for(UNetPipeline())


def test_a_pixart_pipeline_with_batched_guidance_and_the_old_callback_is_served_in_process(tmp_path):
    """The second family, through the engine alone: PixArt-Sigma runs CFG in one batched transformer call,
    steps DPM-Solver and reports steps through ``callback``. Three generations submitted together (their
    uncond/cond rows merged into calls of up to 6 rows) each equal the pipeline's own call under
    ``cachedit.enable``, and a cancelled one stops at a step boundary and leaves no state."""
    from diffusers import DiffusionPipeline

    from cachedit.integrations.engine import Cancelled, Params, PipelineEngine, engine_for
    from tests.pixart_pipeline import SIZE, save_tiny_pixart_pipeline

    torch.set_num_threads(1)
    torch._dynamo.reset()
    save_tiny_pixart_pipeline(tmp_path)
    options = {"inner": "eager", "Fn": 1, "Bn": 0, "warmup_steps": 2, "threshold": 0.3}
    engine = engine_for(DiffusionPipeline.from_pretrained(str(tmp_path)), options)
    try:
        assert isinstance(engine, PipelineEngine) and engine.default_size == SIZE and engine.size_multiple == 16
        assert (engine.default_steps, engine.default_guidance) == (20, 4.5)  # the pipeline's own defaults
        cases = [Params("a red circle", height=SIZE, width=SIZE, steps=10, guidance=4.5, seed=1, settings=s)
                 for s in ({}, {"threshold": 0.6}, {"scm": "fast", "scm_policy": "static"})]
        with engine.cond:  # queued together: their calls merge, two CFG rows per generation
            jobs = [engine.submit(p) for p in cases]
        served = [j.future.result(timeout=300) for j in jobs]
        assert metric(engine.metrics.text().decode(), "cachedit_batch_rows_bucket{le=\"4.0\"}") < \
            metric(engine.metrics.text().decode(), "cachedit_batch_rows_count"), "no call carried 6 rows"
        steps = []
        cancelled = engine.submit(
            Params("a blue square", height=SIZE, width=SIZE, steps=200, guidance=4.5, seed=2),
            on_step=lambda step: steps.append(step),
        )
        while not steps:
            time.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(Cancelled):
            cancelled.future.result(timeout=300)
        assert len(steps) < 150 and engine.health()["bytes_held"] == 0
    finally:
        engine.stop(timeout=60)
    torch._dynamo.reset()
    pipe = cachedit.enable(DiffusionPipeline.from_pretrained(str(tmp_path)), **options)
    pipe.set_progress_bar_config(disable=True)
    cached_any = False
    for params, got in zip(cases, served):
        image = pipe(params.prompt, height=SIZE, width=SIZE, num_inference_steps=params.steps, guidance_scale=params.guidance,
                     generator=torch.Generator().manual_seed(params.seed), cachedit=dict(params.settings)).images[0]
        alone = cachedit.stats(pipe)[-1].branch_list[0]
        assert got["cachedit"]["cached_steps"] == alone.cached_steps, params.settings
        assert psnr(_image(got["data"][0]["b64_json"]), np.asarray(image, dtype=np.float64) / 255.0) >= 40.0
        cached_any |= bool(alone.cached_steps)
    assert cached_any, "nothing cached: the comparison tests little"
    torch._dynamo.reset()
