"""``benchmarks/vs_cache_dit.py --quick``: every system runs on the same static mask and the counts it reports hold.

Run as a separate process: cache-dit's ``set_compile_configs`` changes Inductor's global configuration,
which must not leak into other tests. ``--quick`` compiles with Dynamo's ``eager`` backend, so graphs and
graph breaks are Dynamo's real ones without Inductor's codegen; no timing is asserted (BENCHMARKS.md has them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_graphs_breaks_and_the_same_cached_steps(tmp_path):
    pytest.importorskip("cache_dit", reason="compares with cache-dit: pip install cache-dit==1.5.3")
    systems = ["eager", "cache-dit+compile", "cachedit"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    report = tmp_path / "figures.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vs_cache_dit.py"), "--quick", "--no-write", "--no-rss",
         "--threads", "1", "--json", str(report), "--systems", *systems],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(report.read_text())
    got = figures["systems"]
    assert got.keys() == set(systems)
    assert got["eager"]["graphs"] == got["eager"]["breaks"] == 0
    assert (got["cachedit"]["graphs"], got["cachedit"]["breaks"]) == (1, 0)  # one Dynamo graph, split in the backend
    assert got["cache-dit+compile"]["breaks"] > 0  # cache-dit's decision code is torch.compiler.disable'd
    # 8 steps, mask "fast" = 11101001: the same 3 cached steps in both systems, none in eager.
    assert figures["mask"] == [1, 1, 1, 0, 1, 0, 0, 1]
    assert {n: r["cached"] for n, r in got.items()} == {"eager": 0, "cache-dit+compile": 3, "cachedit": 3}
    # Same cached steps, same residuals: final latents agree to fp32 reordering (one step cached differently
    # moves them by more than 1e-2).
    assert figures["max_abs_delta_vs_cachedit"]["cache-dit+compile"] < 1e-4
    assert figures["recompiles"] == 0
    # With cfg="batched" (cache-dit's enable_separate_cfg=False) a static mask needs no host read in either system.
    assert got["cachedit"]["reads_per_step"] == got["cache-dit+compile"]["reads_per_step"] == got["eager"]["reads_per_step"]
    for r in got.values():
        assert len(r["seconds"]) == 1 and r["seconds"][0] > 0
