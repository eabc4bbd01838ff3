import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cachedit.integrations import demo


def test_psnr_and_ssim_in_float():
    rng = np.random.default_rng(0)
    ref = rng.random((32, 32, 3), dtype=np.float32)
    assert math.isinf(demo.psnr(ref, ref)) and demo.ssim(ref, ref) == pytest.approx(1.0)
    shifted = np.clip(ref + 0.1, 0, 1)
    assert demo.psnr(np.full_like(ref, 0.6), np.full_like(ref, 0.5)) == pytest.approx(20.0)
    noisy = np.clip(ref + rng.normal(0, 0.2, ref.shape), 0, 1).astype(np.float32)
    assert 0 < demo.ssim(noisy, ref) < demo.ssim(shifted, ref) < 1
    assert demo.ssim(ref, shifted) == pytest.approx(demo.ssim(shifted, ref))  # symmetric


def test_run_demo_table_and_grid(tmp_path):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    settings = [demo.Setting("baseline (eager)", None),
                demo.Setting("always cache", {"Fn": 1, "Bn": 0, "threshold": 1.0, "warmup_steps": 2, "inner": "eager"})]
    prompts = ["a large red circle in the center on a white background", "a small blue square at the top left"]
    rows = demo.run_demo(prompts, steps=6, settings=settings, progress=False)
    base, cached = rows
    assert base.computed == [6, 6] and base.cached == [0, 0]
    assert cached.computed == [2, 2] and cached.cached == [4, 4]  # threshold >= 1: every step after warmup
    assert all(math.isinf(p) for p in base.psnr) and all(0 < s < 1 for s in cached.ssim)
    table = demo.format_table(rows)
    assert "speedup" in table and "2.0/4.0" in table and "always cache" in table
    grid = demo.make_grid(rows, prompts, cell=64)
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64
    cell = np.asarray(grid)[-6 - 64 : -6, -6 - 64 : -6]  # bottom-right tile: last prompt, last setting
    assert cell.std() > 0  # a picture, not the white page


def test_cli_demo_end_to_end(tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "-m", "cachedit", "demo", "--steps", "4", "--prompts", "a red circle", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/image" in proc.stdout and "baseline (inductor)" in proc.stdout and "strongest" in proc.stdout
    with Image.open(out) as image:
        assert image.size[0] > 4 * 128


def test_cli_without_command_prints_help():
    from cachedit.__main__ import main

    assert main([]) == 2
