"""``cachedit serve`` as a real uvicorn process on a free port, driven by httpx (issue 14).

The server runs the embedded model with inner="eager" (no Inductor compile: seconds to start) and one
torch thread. A generation served among others is compared with the same generation served alone by the
same server. Tolerance: PSNR >= 40 dB and the same computed/cached steps. Alone and batched, a generation
makes the same decisions; its rows meet other rows only in batched matmuls, whose float32 results differ
from the solo ones by reordering (~1e-6), far below one 8-bit PNG level (PSNR of a one-level error:
48 dB); a misrouted residual or a leaked state changes a decision or moves pixels by many levels.
"""

import base64
import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
from PIL import Image  # noqa: E402

from cachedit.integrations.demo import psnr  # noqa: E402
from tests.integrations.server_process import ROOT, abandon_request, metric, serve  # noqa: E402

MAX_QUEUE = 24
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server():
    with serve(["--inner", "eager", "--max-batch", "16", "--max-queue", str(MAX_QUEUE), "--threshold", "0.3"]) as running:
        yield running


def _image(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.float64) / 255.0


def _post(url, body, timeout=120):
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


BODIES = [
    {"prompt": prompt, "seed": seed, "num_inference_steps": steps, "n": n, "guidance_scale": guidance, "cachedit": settings}
    for prompt, seed, steps, n, guidance, settings in [
        ("a large red circle in the center on a white background", 1, 8, 1, 4.0, {}),
        ("a small blue square at the top left on a gray background", 2, 6, 1, 4.0, {"threshold": 0.15}),
        ("a large yellow triangle at the bottom right on a black background", 3, 10, 2, 4.0, {"threshold": 0.5}),
        ("a small green circle at the top right on a white background", 4, 8, 1, 1.0, {}),  # no CFG: one row
        ("a large purple square at the bottom left on a black background", 5, 4, 1, 4.0, {"threshold": 0.0}),
        ("a small orange triangle in the center on a gray background", 6, 12, 1, 3.0, {"max_continuous_cached_steps": 1}),
        ("a large red square in the center on a black background", 7, 8, 1, 4.0, {"warmup_steps": 4}),
        ("a small blue circle at the bottom left on a white background", 8, 6, 2, 1.0, {"threshold": 0.4}),
        ("a large green triangle at the top right on a gray background", 9, 8, 1, 4.0, {"scm": "fast", "scm_policy": "static"}),
        ("a small yellow square at the top left on a black background", 10, 10, 1, 4.0, {"budget": 0.5}),
        ("a large red circle in the center on a white background", 11, 8, 1, 4.0, {"threshold": 0.25}),
        ("a small purple circle at the bottom right on a white background", 12, 5, 1, 2.0, {}),
        ("a large orange square at the top left on a gray background", 13, 8, 1, 4.0, {"max_cached_steps": 2}),
        ("a small blue triangle in the center on a black background", 14, 9, 1, 4.0, {"threshold": 0.35}),
        ("a large yellow circle at the bottom left on a gray background", 15, 7, 1, 4.0, {}),
        ("a small green square at the top right on a white background", 16, 8, 1, 4.0, {"calibrator": "taylorseer"}),
    ]
]


def test_sixteen_concurrent_requests_each_equal_their_solo_runs_and_health_answers_throughout(server):
    url, _ = server
    alone = []
    for body in BODIES:
        response = _post(url, body)
        assert response.status_code == 200, response.text
        alone.append(response.json())
    assert sum(len(r["cachedit"]["cached_steps"]) for r in alone) >= 8, "hardly anything cached: the test tests little"

    health, stop = [], threading.Event()

    def poll():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                start = time.perf_counter()
                health.append((client.get(f"{url}/health").status_code, time.perf_counter() - start))
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(BODIES)) as pool:
            together = list(pool.map(lambda b: _post(url, b), BODIES))
    finally:
        stop.set()
        poller.join(timeout=30)
    for body, solo, response in zip(BODIES, alone, together):
        assert response.status_code == 200, response.text
        got = response.json()
        for key in ("cached_steps", "computed_steps", "seed"):
            assert got["cachedit"][key] == solo["cachedit"][key], (body, key, got["cachedit"][key], solo["cachedit"][key])
        assert len(got["data"]) == body["n"]
        for a, b in zip(got["data"], solo["data"]):
            assert psnr(_image(a), _image(b)) >= 40.0, body
        assert set(got["cachedit"]["timing"]) == {"queued_s", "run_s", "total_s"}
    assert health and all(code == 200 for code, _ in health), health
    metrics = httpx.get(f"{url}/metrics").text
    batched = [line for line in metrics.splitlines() if line.startswith("cachedit_batch_generations_bucket")]
    one = next(float(line.split()[-1]) for line in batched if 'le="1.0"' in line)
    total = next(float(line.split()[-1]) for line in batched if 'le="+Inf"' in line)
    assert total > one, "no transformer call carried two generations: nothing was batched"
    assert "cachedit_steps_total{kind=\"cached\"}" in metrics and "cachedit_request_latency_seconds_bucket" in metrics


BAD = [
    (b"{not json", 400, None),
    ({"prompt": "a red circle", "colour": "red"}, 400, "colour"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "a red circle", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": "a red circle", "num_inference_steps": 10**6}, 400, "num_inference_steps"),
    ({"prompt": "a red circle", "size": "30x30"}, 400, "size"),  # the embedded model's patch is 4
    ({"prompt": "a red circle", "size": "big"}, 400, "size"),
    ({"prompt": "a red circle", "n": 99}, 400, "n"),
    ({"prompt": "a red circle", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "a red circle", "guidance_scale": "high"}, 400, "guidance_scale"),
    ({"prompt": "a red circle", "seed": -1}, 400, "seed"),
    ({"prompt": "a red circle", "cachedit": {"threshold": -0.1}}, 400, "cachedit.threshold"),
    ({"prompt": "a red circle", "cachedit": {"treshold": 0.1}}, 400, "cachedit.treshold"),
    ({"prompt": "a red circle", "cachedit": {"Fn": 2}}, 400, "cachedit.Fn"),
    ({"prompt": "a red circle", "num_inference_steps": 4, "cachedit": {"budget": 0.1}}, 400, "cachedit.budget"),
    ({"prompt": "a red circle", "model": "dall-e-3"}, 400, "model"),
    ({"prompt": "a red circle", "cachedit": {"policy": "dbprune"}}, 400, "cachedit.policy"),  # a batched step decides per request
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[str(f) if f else "json" for _, _, f in BAD])
def test_bad_input_gets_a_4xx_naming_the_field(server, body, status, field):
    url, _ = server
    if isinstance(body, bytes):
        response = httpx.post(f"{url}/v1/images/generations", content=body, headers={"content-type": "application/json"})
    else:
        response = _post(url, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field
    if field:
        assert field.split(".")[-1] in error["message"], error


def test_a_killed_client_leaves_no_state(server):
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    # returns once nothing is queued, running or held (its residuals freed)
    abandon_request(url, {"prompt": "a large red circle", "num_inference_steps": 200, "seed": 3}, running_for=0.5)
    after = httpx.get(f"{url}/metrics").text
    cancelled, ok = 'cachedit_requests_total{status="cancelled"}', 'cachedit_requests_total{status="ok"}'
    assert metric(after, cancelled) == metric(before, cancelled) + 1  # dropped, not finished
    assert metric(after, ok) == metric(before, ok)


def test_a_full_queue_answers_429_with_retry_after(server):
    url, _ = server
    body = {"prompt": "a small blue square", "num_inference_steps": 3, "guidance_scale": 1.0}
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda _: _post(url, body), range(64)))  # > 16 running + 24 queued
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1 and "queue" in rejected.json()["error"]["message"]


def test_models_endpoint(server):
    url, _ = server
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "cachedit-embedded"


def test_sigterm_drains_in_flight_requests_then_exits(server):
    """Last: it stops the module's server."""
    url, proc = server
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, url, {"prompt": "a large green circle", "num_inference_steps": 40, "seed": 5})
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").json()["active"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        response = pending.result(timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["cachedit"]["computed_steps"]) + len(response.json()["cachedit"]["cached_steps"]) == 40
    # uvicorn re-raises the signal after its graceful shutdown, so the status says "ended by SIGTERM"
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "drained, stopped" in proc.stdout.read()


def test_generate_writes_an_image_of_the_embedded_model(tmp_path):
    out = tmp_path / "square.png"
    done = subprocess.run(
        [sys.executable, "-m", "cachedit", "generate", "a small blue square at the top left", "--out", str(out),
         "--steps", "8", "--inner", "eager", "--setting", "threshold=0.3"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert Image.open(out).size == (32, 32)  # the embedded model's default size
    assert "cached steps [" in done.stdout and "cached steps []" not in done.stdout, done.stdout
