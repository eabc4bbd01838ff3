"""A real ``cachedit serve`` process on a free port, for the HTTP tests: started, waited for until
``/health`` answers, and stopped with SIGTERM (killed if it does not drain in time)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(args: Sequence[str], start_timeout: float = 240) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m cachedit serve --port P *args`` with one torch thread; yields its URL and process."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cachedit", "serve", "--port", str(port), "--threads", "1", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in Prometheus text; 0 when absent."""
    line = next((x for x in text.splitlines() if x.split(" ")[0] == name), None)
    return float(line.split()[-1]) if line else 0.0


def abandon_request(url: str, body: dict, running_for: float = 0.0) -> None:
    """Send ``body`` to ``/v1/images/generations`` on a raw socket, wait until the server runs it (and
    ``running_for`` seconds more), then close the socket: a client that dies mid-request. Returns once the
    server has nothing queued, running or held."""
    import json

    import httpx

    port = int(url.rsplit(":", 1)[1])
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").json()["active"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    time.sleep(running_for)
    sock.close()
    deadline = time.monotonic() + 60
    while (state := httpx.get(f"{url}/health").json()) != {"status": "ok", "queued": 0, "active": 0, "bytes_held": 0}:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
