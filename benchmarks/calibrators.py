"""Cost of one calibrator forecast (a cached step) and one update (a computed step) per carried stream.

Each calibrator is fed computed steps 0..7 of a [1, 4096, 3072] stream (a FLUX.1 image stream at
1024x1024), then forecasts steps 8, 9, ...; the table gives the fastest of repeated calls (other work
shares the CPU cores), the bytes the calibrator holds, and, for DMD, the once-per-window fit that the
first forecast after an update pays. Prints a markdown table; BENCHMARKS.md is not touched.

    python benchmarks/calibrators.py [--shape 1 4096 3072] [--dtype float32] [--repeats 5] [--threads N]

On a shared CPU, ``--threads 1`` avoids OpenMP workers waiting on each other (a 2-thread run under a load
of 8 made the DMD fit 50x slower).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cachedit.runtime.calibrators import make_calibrator
from report import markdown_table, write_section

CASES = [
    ("none", {}),
    ("taylorseer", {"order": 1}),
    ("taylorseer", {"order": 2}),
    ("taylorseer", {"order": 3}),
    ("foca", {}),
    ("dmd", {"history": 6}),
]
COMPUTED_STEPS = 8


class CountOps(TorchDispatchMode):
    """The aten ops a forecast runs on tensors of the stream's size (the small DMD weights excluded)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(a, torch.Tensor) and a.numel() == self.numel for a in (*args, out)):
            self.ops.append(func.overloadpacket.__name__)
        return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, params: dict, shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]
    calibrator = make_calibrator(name, **params)
    update_s = []
    for step in range(COMPUTED_STEPS):
        value = values[step % 2] * (1 + 0.1 * step)
        start = time.perf_counter()
        calibrator.update(step, value)
        update_s.append(time.perf_counter() - start)
    steps = iter(range(COMPUTED_STEPS, 10**6))
    start = time.perf_counter()
    calibrator.forecast(next(steps))  # DMD fits its window here
    first_s = time.perf_counter() - start
    forecast_s = best_of(lambda: calibrator.forecast(next(steps)), repeats)
    with CountOps(values[0].numel()) as counter:
        calibrator.forecast(next(steps))
    label = name + "".join(f" {k}={v}" for k, v in params.items())
    return {
        "calibrator": label,
        "forecast_us": forecast_s * 1e6,
        "first_forecast_us": first_s * 1e6,
        "update_us": min(update_s[2:]) * 1e6,
        "held_mb": calibrator.nbytes() / 2**20,
        "ops": counter.ops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 4096, 3072])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help="print the table only (not into BENCHMARKS.md)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, dtype = tuple(args.shape), getattr(torch, args.dtype)
    tensor_mb = torch.empty(shape, dtype=dtype).nbytes / 2**20
    intro = (
        f"One {list(shape)} {args.dtype} stream ({tensor_mb:.0f} MiB), {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}; the fastest of {args.repeats} repeats. A cached step costs one "
        "forecast per carried stream (Note [Calibrators] in `cachedit/runtime/calibrators.py`)."
    )
    rows = []
    for name, params in CASES:
        r = measure(name, params, shape, dtype, args.repeats)
        rows.append(
            [
                r["calibrator"],
                f"{r['forecast_us']:,.0f}",
                f"{r['first_forecast_us']:,.0f}",
                f"{r['update_us']:,.0f}",
                f"{r['held_mb']:,.0f}",
                f"{len(r['ops'])}: {' '.join(r['ops']) or '-'}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "calibrator",
        "µs per forecast",
        "first forecast after an update (µs)",
        "µs per update",
        "held (MiB)",
        "full-size ops per forecast",
    ]
    body = intro + "\n\n" + markdown_table(header, rows)
    print(body)
    if not args.no_write:
        write_section("Calibrators", body)


if __name__ == "__main__":
    main()
