"""Bytes communicated per denoising step per rank under context parallelism, against the analytical minimum.

Runs the real attention functions of ``cachedit.runtime.parallel`` on fake tensors (shapes only, no
compute) with the collectives replaced by counters, for a FLUX.1-dev-sized transformer: 19 double + 38
single blocks (57 joint attentions), 24 heads of 128, 512 text + 4096 image tokens (1024x1024), bf16.
Counted: the bytes a rank hands to other ranks (its own all-to-all split stays local and is not
counted), per attention and per step including the one all-gather of the image stream after the chain.

Analytical minimum per attention per rank, n = S/P tokens held, E = H·D·2 bytes per token (bf16):
- Ulysses: Q, K, V out and O back, each (P-1)/P of n·E: 4·(P-1)/P·n·E
- Ring: every other rank's K and V must reach this one: 2·(P-1)·n·E
- USP u x r: Ulysses inside the group, 4·(u-1)/u·n·E, plus the ring of K/V blocks of u·n tokens and
  H/u heads across r groups, 2·(r-1)·n·E
FP8 halves Q, V and O (plus 1 byte of scale per token and head); K stays bf16 (in the all-to-all
and around the ring).

CPU wall times of the tiny Flux (tests/models.py) at P = 2 are a record only: 2 shared cores cannot
show scaling. Run: ``python benchmarks/comm.py [--no-wall]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import markdown_table, write_section  # noqa: E402
from cachedit.kernels import fp8_wire_ratio  # noqa: E402
from cachedit.runtime import parallel  # noqa: E402

HEADS, HEAD_DIM, TEXT, IMAGE, HIDDEN = 24, 128, 512, 4096, 3072
ATTENTIONS = 19 + 38
BYTES = 2  # bf16


class _P2P:
    def __init__(self, op, tensor, group=None, group_peer=None):
        self.op, self.tensor = op, tensor


@contextlib.contextmanager
def counting(rank: int):
    """Replace the collectives by counters of the bytes this rank sends to other ranks."""
    sent = {"bytes": 0}

    def all_to_all(x, out_splits, in_splits, group):
        me = rank_in_group[0]
        sent["bytes"] += (sum(in_splits) - in_splits[me]) * x.element_size()
        return x.new_empty(sum(out_splits))

    def batch(ops):
        for op in ops:
            if op.op is torch.distributed.isend:
                sent["bytes"] += op.tensor.numel() * op.tensor.element_size()
        return []

    rank_in_group = [0, 0]  # [index in the Ulysses group, index in the ring], set by the caller
    with mock.patch.object(parallel, "_all_to_all", all_to_all), mock.patch.object(
        parallel, "_ring", parallel.ring_attention_impl  # the op body, not its fake: it must send
    ), mock.patch.object(
        parallel.dist, "batch_isend_irecv", batch
    ), mock.patch.object(parallel.dist, "P2POp", _P2P), mock.patch.object(
        parallel.dist.distributed_c10d, "_resolve_process_group", lambda name: None
    ), mock.patch.object(
        parallel.dist, "get_rank", lambda group=None: rank_in_group[1]
    ):
        yield sent, rank_in_group


def attention_bytes(u: int, r: int, fp8: bool, rank: int = 0) -> int:
    """Bytes one rank sends for one joint attention of the FLUX.1-dev shape."""
    world = u * r
    layout = (TEXT, IMAGE)
    with FakeTensorMode(), counting(rank) as (sent, where):
        where[0], where[1] = rank % u, rank // u
        n = parallel.local_tokens(layout, world, rank)
        q = torch.empty(1, HEADS, n, HEAD_DIM, dtype=torch.bfloat16)
        mesh = (world, rank, u, r, "u", "r", fp8)
        parallel.context_parallel_attention(q, q, q, None, None, layout, layout, mesh)
    return sent["bytes"]


def minimum(u: int, r: int) -> float:
    world = u * r
    n = (TEXT + IMAGE) / world
    e = HEADS * HEAD_DIM * BYTES
    return 4 * (u - 1) / u * n * e + 2 * (r - 1) * n * e


def gather_bytes(world: int) -> float:
    """The all-gather of the image stream after the chain: each rank sends its shard to P-1 others."""
    return (world - 1) * IMAGE / world * HIDDEN * BYTES


def wall_times() -> list[list[object]]:
    from tests.distributed.harness import launch

    base = {"inner": "eager", "threshold": 0.0, "Fn": 1}
    modes = {
        "Ulysses-2": {"ulysses": 2},
        "Ring-2": {"ring": 2},
        "Ulysses-2 FP8": {"ulysses": 2, "fp8_comm": True},
        "Ring-2 FP8": {"ring": 2, "fp8_comm": True},
    }
    cases = [{"id": k, "model": "flux", "options": {**base, **v}, "repeat": 20} for k, v in modes.items()]
    results = launch(cases, 2, timeout=600)
    rows = []
    for case in cases:
        ms = [r[case["id"]]["forward_ms"] for r in results]
        rows.append([case["id"], f"{min(ms):.1f}", f"{max(ms):.1f}"])
    snr = {}
    for mode in ("Ulysses-2", "Ring-2"):
        exact, quantized = results[0][mode]["out"], results[0][f"{mode} FP8"]["out"]
        snr[mode] = 10 * torch.log10(exact.pow(2).sum() / (quantized - exact).pow(2).sum()).item()
    return rows, snr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-wall", action="store_true", help="skip the CPU wall times (gloo processes)")
    args = parser.parse_args()
    rows = []
    for world in (2, 4, 8):
        meshes = [(world, 1), (1, world)] + [(u, world // u) for u in (2, 4) if 1 < u < world and world % u == 0]
        for u, r in meshes:
            name = f"Ulysses-{u}" if r == 1 else f"Ring-{r}" if u == 1 else f"USP {u}x{r}"
            low = minimum(u, r)
            for fp8 in (False, True):
                per = max(attention_bytes(u, r, fp8, rank) for rank in range(world))
                step = per * ATTENTIONS + gather_bytes(world)
                rows.append(
                    [name, "FP8" if fp8 else "bf16", f"{per / 2**20:.2f}", f"{low / 2**20:.2f}", f"{per / low:.3f}",
                     f"{step / 2**20:.0f}"]
                )
    body = [
        "Bytes one rank sends per step for a FLUX.1-dev-sized model (57 joint attentions, 24 heads x 128, "
        "512 text + 4096 image tokens, bf16), counted by running `cachedit.runtime.parallel` on fake tensors with "
        "the collectives replaced by counters (busiest rank). The minimum is the analytical volume of each "
        "scheme (module docstring of `benchmarks/comm.py`); FP8 goes below it because it changes the payload.",
        "",
        markdown_table(
            ["mesh", "payload", "MiB / attention", "minimum MiB / attention", "ratio", "MiB / step (+ gather)"], rows
        ),
    ]
    if not args.no_wall:
        start = time.perf_counter()
        wall, snr = wall_times()
        body += [
            "",
            "CPU wall time of one forward of the tiny Flux (3 + 3 blocks, 23 tokens) on 2 gloo ranks, inner "
            "compiler eager, median of 20 after one warm-up, per rank (min / max over ranks). A record only: the "
            "2 cores are shared and the model is far too small for communication to pay off.",
            "",
            markdown_table(["mode", "ms (fastest rank)", "ms (slowest rank)"], wall),
            "",
            f"(wall-time launch took {time.perf_counter() - start:.0f} s)",
            "",
            "FP8 communication error on the tiny Flux, output against the unquantized run: "
            f"Ulysses-2 (Q, V, O in FP8) {snr['Ulysses-2']:.1f} dB, Ring-2 (V in FP8) {snr['Ring-2']:.1f} dB "
            f"(head dim 16, so the packed scales make an FP8 payload {fp8_wire_ratio(16):.3f}x bf16 there; "
            f"{fp8_wire_ratio(128):.3f}x at head dim 128).",
        ]
    body += [
        "",
        "No GPU was lent to this run: the single-GPU overhead of the rewritten graph at P = 1 is unmeasured.",
    ]
    write_section("Context parallelism", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
