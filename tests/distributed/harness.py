"""Run context-parallel cases in real gloo processes launched the way torchrun launches them.

``launch(cases, world)`` starts ``world`` processes of this module with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the backend initialises the process group from it), each
with ``OMP_NUM_THREADS=1`` and a hard timeout: a hang fails the test. Every rank runs every case in one
process (imports dominate on a small machine) and saves ``{case id: result}``; ``reference(case)``
computes the single-process output the ranks must reproduce.

A case is a dict: ``model`` (a row of ``tests/models.py``), ``options`` (cachedit options: ulysses, ring,
fp8_comm, inner, ...), optional ``config`` (overrides of the row's diffusers config), ``shape`` (a latent
shape replacing the row's), ``steps`` (>1: a denoising loop with caching; returns per-rank stats).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list[dict], world: int, timeout: float = 240.0) -> list[dict]:
    """Run ``cases`` on ``world`` gloo ranks; returns one ``{case id: result}`` per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "cases.json"
        spec.write_text(json.dumps(cases))
        port = _free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=str(ROOT))
            env = {k: v for k, v in env.items() if not k.startswith("CACHEDIT_")}
            log = open(Path(tmp) / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "tests.distributed.harness", str(spec), tmp],
                                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        failed = None
        try:
            for rank, (p, _) in enumerate(procs):
                try:
                    if p.wait(timeout=timeout) != 0 and failed is None:
                        failed = f"rank {rank} exited with {p.returncode}"
                except subprocess.TimeoutExpired:
                    failed = failed or f"rank {rank} hung for more than {timeout:.0f} s"
                    break
        finally:
            for p, log in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                log.close()
        if failed:
            logs = "\n".join(f"--- rank {r} ---\n" + (Path(tmp) / f"rank{r}.log").read_text()[-3000:] for r in range(world))
            raise AssertionError(f"{failed}\n{logs}")
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


class _MaskBlock(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x, c, mask):
        joint = torch.cat([c, x], dim=1)  # [text | image]: rank-major order differs from global order
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(joint).chunk(3, dim=-1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask [1, 1, S, S]
        dc, dx = self.out(o.transpose(1, 2).flatten(2)).split([c.shape[1], x.shape[1]], dim=1)
        return x + dx, c + dc


class ToyMaskModel(torch.nn.Module):
    """Joint-attention blocks whose attention takes a full [1, 1, S, S] additive mask made in the prologue
    (no diffusers row has one): its rows and columns must follow the tokens each rank holds."""

    def __init__(self, width: int = 16, heads: int = 2, blocks: int = 3):
        super().__init__()
        self.proj_in = torch.nn.Linear(4, width)
        self.context_in = torch.nn.Linear(4, width)
        self.blocks = torch.nn.ModuleList([_MaskBlock(width, heads) for _ in range(blocks)])
        self.proj_out = torch.nn.Linear(width, 4)

    def forward(self, hidden_states, context, bias, timestep):
        x = self.proj_in(hidden_states) + timestep[:, None, None]
        c = self.context_in(context)
        mask = torch.tril(bias) - 0.5 * torch.triu(bias, diagonal=1)  # asymmetric, so order matters
        for block in self.blocks:
            x, c = block(x, c, mask[None, None])
        return self.proj_out(x)


@dataclasses.dataclass(frozen=True)
class _ToySpec:
    tokens: int = 13  # image tokens; with 5 text tokens neither is divisible by 2 or 4
    text: int = 5

    def build(self):
        torch.manual_seed(0)
        return ToyMaskModel().eval()

    def timesteps(self, n):
        return [1.0 - i / n for i in range(n)]

    def inputs(self, t, seed=0):
        g = torch.Generator().manual_seed(seed)
        n = self.tokens + self.text
        return {"hidden_states": torch.randn(1, self.tokens, 4, generator=g),
                "context": torch.randn(1, self.text, 4, generator=g),
                "bias": 3 * torch.randn(n, n, generator=g),
                "timestep": torch.tensor([t])}

    def out_to_latent(self, out):
        return out


def _spec(case: dict):
    from tests import models

    if case["model"] == "toy-mask":
        return _ToySpec()
    spec = models.get(case["model"])
    if case.get("config"):
        spec = dataclasses.replace(spec, config={**spec.config, **case["config"]})
    return spec


def _inputs(spec, case: dict, t: float):
    kwargs = spec.inputs(t, seed=case.get("seed", 0), **({"batch": case["batch"]} if "batch" in case else {}))
    if case.get("shape"):
        g = torch.Generator().manual_seed(1)
        kwargs[spec.latent_key] = torch.randn(case["shape"], generator=g)
    return kwargs


def reference(case: dict) -> torch.Tensor | dict:
    """The single-process output of ``case`` (eager, uncompiled)."""
    spec = _spec(case)
    model = spec.build()
    if case.get("steps", 1) > 1:
        return _denoise(model, spec, case)
    with torch.no_grad():
        return spec.out_to_latent(model(**_inputs(spec, case, spec.timesteps(4)[1])))


def _denoise(model, spec, case) -> dict:
    outs = []
    for request in range(case.get("requests", 1)):
        x, _ = _loop(model, spec, case)
        outs.append(x)
    return {"out": torch.stack(outs)}


def _loop(model, spec, case):
    steps = case["steps"]
    base = _inputs(spec, case, spec.timesteps(steps)[0])
    x = spec.latent(base)
    with torch.no_grad():
        for t in spec.timesteps(steps):
            x = x - spec.out_to_latent(model(**spec.with_step(base, x, t))) / steps
    return x, None


def local(case: dict) -> dict:
    """``case`` compiled with cachedit in this one process (no context parallelism): the cache reference."""
    options = {k: v for k, v in case["options"].items() if k not in ("ulysses", "ring", "fp8_comm")}
    return _run_case({**case, "options": options}, [])


def _run_case(case: dict, keep: list):
    import time

    import cachedit

    start = time.perf_counter()

    spec = _spec(case)
    model = spec.build()
    keep.append(model)
    os.environ.update(case.get("env", {}))  # read by the backend when it compiles (first call below)
    compiled = torch.compile(model, backend="cachedit", fullgraph=True, options=case["options"] or None)
    if case.get("steps", 1) > 1:
        outs = []
        for _ in range(case.get("requests", 1)):
            x, _ = _loop(compiled, spec, case)
            outs.append(x)
        stats = [
            {name: (b.computed_steps, b.cached_steps) for name, b in r.branches.items()} for r in cachedit.stats(model)
        ]
        result = {"out": torch.stack(outs), "stats": stats}
    else:
        with torch.no_grad():
            kwargs = _inputs(spec, case, spec.timesteps(4)[1])
            result = {"out": spec.out_to_latent(compiled(**kwargs))}
            times = []
            for _ in range(case.get("repeat", 0)):  # wall time per forward, for benchmarks/comm.py
                t0 = time.perf_counter()
                compiled(**kwargs)
                times.append(time.perf_counter() - t0)
            if times:
                result["forward_ms"] = 1000 * sorted(times)[len(times) // 2]
    for key in case.get("env", {}):
        del os.environ[key]
    result["explain"] = cachedit.explain(model)
    result["graphs"] = len(cachedit.api._graphs(model))
    result["seconds"] = time.perf_counter() - start
    torch._dynamo.reset()
    return result


def main(spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    keep: list = []  # models stay alive: the registry files graphs by id(parameter), and ids get reused
    cases = json.loads(Path(spec_path).read_text())
    results = {}
    for case in cases:
        try:
            results[case["id"]] = _run_case(case, keep)
        except Exception as err:  # report per case; a collective mismatch would hang, not raise
            import traceback

            traceback.print_exc()
            results[case["id"]] = {"error": f"{type(err).__name__}: {err}"}
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
