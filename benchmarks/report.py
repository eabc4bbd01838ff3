"""Write one benchmark's table into its own section of ``benchmarks/BENCHMARKS.md``.

Each script owns one ``## <title>`` section; rewriting it leaves the other sections alone. Every
section records the machine, the torch version and the date, and the command that produced it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).with_name("BENCHMARKS.md")
HEADER = "# cachedit benchmarks\n\nEach section is written by the script named in it; rerun the command to refresh it.\n"


def machine() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}; {datetime.date.today()}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, body: str, command: str | None = None) -> None:
    """Replace (or append) the ``## title`` section of BENCHMARKS.md."""
    command = command or "python " + " ".join(sys.argv)
    section = f"## {title}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n{body.strip()}\n"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS_MD.write_text(text)


@contextlib.contextmanager
def count_host_reads():
    """Count Tensor -> Python conversions (each one is a device sync on a GPU)."""
    names = ["item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"]
    originals = {n: getattr(torch.Tensor, n) for n in names}
    counter = {"reads": 0}

    def wrap(fn):
        def counted(self, *a, **k):
            counter["reads"] += 1
            return fn(self, *a, **k)

        return counted

    for n, fn in originals.items():
        setattr(torch.Tensor, n, wrap(fn))
    try:
        yield counter
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)
