"""``cachedit serve`` under load, and the cost of a batched step whose rows disagree (issue 14).

Part 1 (``load``): a real ``cachedit serve`` process per setting (batching on/off x caching on/off) on the
embedded model, CPU, inner="eager"; 1, 4 and 16 concurrent httpx clients each send requests back to back
(32x32, 16 steps, CFG, a fixed seed per request). Throughput = finished requests / wall time; latency =
per request, submission to response.

Part 2 (``mixed``): one compiled embedded transformer, 8 CFG requests in one batch (16 rows) tagged with
``cachedit.rows``; requests forced to compute (threshold 0) or to cache (threshold 1) so that k of 8
compute. Median seconds per step against the proportional cost
``cached + k/8 * (full - cached)`` (head and tail always run on every row; the middle on the k rows).

Part 3 (``pipeline``): ``--model DIR`` of a whole tiny FluxPipeline, its generations' transformer calls merged
(``--max-batch 8``) against one generation after another (``--max-batch 1``), at 1, 4 and 16 clients.

    python benchmarks/serve.py            # every part; writes each section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue square at the top left on a gray background",
    "a large yellow triangle at the bottom right on a black background",
    "a small green circle at the top right on a white background",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(batch: int, threshold: float, threads: int, extra: tuple[str, ...] = ()):
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "cachedit", "serve", "--port", str(port), "--inner", "eager", "--threads", str(threads),
           "--max-batch", str(batch), "--max-queue", "256", "--threshold", str(threshold), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.5)


def _load(url: str, clients: int, per_client: int, steps: int, size: int | None = None) -> tuple[float, list[float], int]:
    import httpx

    def client(c: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                body = {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "seed": 100 * c + i, "num_inference_steps": steps}
                if size:
                    body["size"] = f"{size}x{size}"
                start = time.perf_counter()
                r = http.post(f"{url}/v1/images/generations", json=body)
                r.raise_for_status()
                out.append((time.perf_counter() - start, len(r.json()["cachedit"]["cached_steps"])))
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - start
    return wall, [lat for lat, _ in results], sum(c for _, c in results)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def load_part(threads: int, steps: int) -> str:
    rows = []
    for batching in (True, False):
        for caching in (True, False):
            proc, url = _start(16 if batching else 1, 0.3 if caching else 0.0, threads)
            try:
                for clients in (1, 4, 16):
                    per_client = {1: 8, 4: 4, 16: 2}[clients]
                    wall, lat, cached = _load(url, clients, per_client, steps)
                    n = clients * per_client
                    rows.append([
                        "on" if batching else "off", "on (t=0.3)" if caching else "off", clients, n,
                        f"{n / wall:.2f}", f"{_pct(lat, 0.5):.2f}", f"{_pct(lat, 0.95):.2f}",
                        f"{cached / (n * steps):.0%}",
                    ])
                    print(rows[-1], flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    table = markdown_table(
        ["batching", "caching", "clients", "requests", "images/s", "p50 s", "p95 s", "steps cached"], rows
    )
    return (
        f"A `cachedit serve` process per setting (embedded model, inner eager, {threads} torch thread(s), "
        f"32x32, {steps} steps, guidance 4, `--max-batch 16` or 1); each client sends its requests back to back. "
        f"Load average at the end: {os.getloadavg()[0]:.1f}.\n\n"
        + table
    )


def pipeline_part(threads: int, steps: int) -> str:
    """``--model DIR`` of a whole tiny FluxPipeline (tests/flux_pipeline.py): merged calls against one
    generation after another, caching on."""
    import tempfile

    from tests.flux_pipeline import save_tiny_flux_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        save_tiny_flux_pipeline(model_dir)
        extra = ("--model", model_dir, "--default-size", "64", "--Fn", "1", "--Bn", "0", "--warmup-steps", "2")
        for batch in (8, 1):
            proc, url = _start(batch, 0.3, threads, extra)
            try:
                for clients in (1, 4, 16):
                    per_client = {1: 8, 4: 4, 16: 2}[clients]
                    wall, lat, cached = _load(url, clients, per_client, steps, size=64)
                    n = clients * per_client
                    rows.append([
                        f"merged (--max-batch {batch})" if batch > 1 else "one at a time", clients, n, f"{n / wall:.2f}",
                        f"{_pct(lat, 0.5):.2f}", f"{_pct(lat, 0.95):.2f}", f"{cached / (n * steps):.0%}",
                    ])
                    print(rows[-1], flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    table = markdown_table(["calls", "clients", "requests", "images/s", "p50 s", "p95 s", "steps cached"], rows)
    return (
        "A `cachedit serve --model DIR` process per setting on a whole tiny FluxPipeline saved to a directory "
        "(CLIP + T5 text encoders with tokenizers, a VAE, a 2 + 4 block Flux transformer of width 32; "
        f"64x64, 16 image + 512 text tokens, {steps} steps, threshold 0.3, F1B0, inner eager, {threads} torch "
        "thread(s)); each client sends its requests back to back. The model is small enough that Python and "
        "the text encoders weigh as much as the transformer: this measures the merging machinery more than "
        f"a GPU's batching gain. Load average at the end: {os.getloadavg()[0]:.1f}.\n\n" + table
    )


def mixed_part(threads: int, size: int, repeats: int) -> str:
    import cachedit
    from cachedit.embedded import load_pipeline
    from cachedit.embedded.pipeline import image_ids

    torch.set_num_threads(threads)
    pipe = load_pipeline()
    model = pipe.transformer
    model.compile(backend="cachedit", options={"Fn": 1, "Bn": 0, "warmup_steps": 1, "inner": "eager"})
    patch = pipe.patch_size
    tokens = (size // patch) ** 2
    g = torch.Generator().manual_seed(0)
    rows, groups = 16, 8
    x = torch.randn(rows, tokens, 3 * patch * patch, generator=g)
    embeds, pooled = pipe.encode_prompt(PROMPTS * 4)
    embeds, pooled = embeds[:rows], pooled[:rows]
    img, txt = image_ids(size, size, patch), torch.zeros(embeds.shape[1], 3)

    def run(k: int) -> float:
        handles = [cachedit.open_request(model, threshold=0.0 if i < k else 1.0) for i in range(groups)]
        times = []
        with torch.no_grad():
            for step in range(repeats + 3):
                t = torch.full((rows,), 1.0 - step / (repeats + 4))
                args = [x + 0.01 * step, embeds, pooled, t]
                for a in args:
                    torch._dynamo.mark_dynamic(a, 0)
                start = time.perf_counter()
                with cachedit.rows(model, [(h, 2) for h in handles]):
                    model(hidden_states=args[0], encoder_hidden_states=args[1], pooled_projections=args[2], timestep=args[3],
                          img_ids=img, txt_ids=txt, return_dict=False)
                if step >= 3:  # step 0 computes everywhere (nothing to reuse yet)
                    times.append(time.perf_counter() - start)
        for h in handles:
            assert len(h.stats.branch_list[0].computed_steps) == (repeats + 3 if h in handles[:k] else 1), h
            h.close()
        return statistics.median(times)

    run(8)  # trace and warm
    full, none = run(8), run(0)
    table_rows = [["8 of 8 (full)", f"{full * 1e3:.2f}", "-", "-"], ["0 of 8", f"{none * 1e3:.2f}", "-", "-"]]
    for k in (1, 2, 4, 6):
        t = run(k)
        expected = none + k / groups * (full - none)
        table_rows.append([f"{k} of 8", f"{t * 1e3:.2f}", f"{expected * 1e3:.2f}", f"{(t - expected) * 1e3:+.2f}"])
        print(table_rows[-1], flush=True)
    table = markdown_table(["requests computing", "ms / step", "proportional ms", "overhead ms"], table_rows)
    return (
        f"8 CFG requests (16 rows) in one forward of the embedded transformer ({size}x{size}, {tokens} image tokens, "
        f"F1B0, inner eager, {threads} thread(s)), median of {repeats} steps; k requests compute, the rest cache. "
        "Proportional = all-cached + k/8 x (full - all-cached): head and tail run on all 16 rows, the middle "
        "(7 of 8 blocks) on the 2k computing rows; the overhead is the indexing of the middle's inputs and the "
        f"scatter of its outputs. Load average at the end: {os.getloadavg()[0]:.1f}.\n\n" + table
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("load", "mixed", "pipeline", "all"), default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side for the mixed-step part")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)  # other jobs share the cores
    if args.part in ("mixed", "all"):
        write_section("Serve: mixed batched steps", mixed_part(args.threads, args.size, args.repeats))
    if args.part in ("load", "all"):
        write_section("Serve: load", load_part(args.threads, args.steps))
    if args.part in ("pipeline", "all"):
        write_section("Serve: any diffusers pipeline", pipeline_part(args.threads, args.steps))


if __name__ == "__main__":
    main()
