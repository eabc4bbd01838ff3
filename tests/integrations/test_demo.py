import math
import os
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


def test_psnr_of_a_set_with_one_identical_image_is_finite():
    """A setting that cached nothing on one prompt has one image equal to the baseline's: the set's PSNR
    is that of the mean MSE, finite, never the mean of per-image PSNRs (which that one image makes inf)."""
    rng = np.random.default_rng(1)
    references = [rng.random((32, 32, 3), dtype=np.float32) for _ in range(3)]
    near = [references[0], np.clip(references[1] + 0.01, 0, 1), np.clip(references[2] - 0.02, 0, 1)]
    rows = [demo.Row(demo.Setting("baseline", None), [1.0] * 3, [6] * 3, [0] * 3, references),
            demo.Row(demo.Setting("cached", {}), [0.5] * 3, [6, 3, 3], [0, 3, 3], near)]
    demo.score(rows)
    base, cached = rows
    assert math.isinf(cached.psnr[0]) and math.isinf(base.mean_psnr)  # per image, and a set of equal images
    expected = 10 * math.log10(1 / np.mean([demo.mse(a, b) for a, b in zip(near, references)]))
    assert math.isfinite(cached.mean_psnr) and cached.mean_psnr == pytest.approx(expected)
    assert f"{cached.mean_psnr:.1f}" in demo.format_table(rows).splitlines()[-1]
    assert demo.column_label(rows, 1).endswith(f"2.00x, PSNR {cached.mean_psnr:.1f} dB")
    assert demo.column_label(rows, 0).endswith("1.00x, reference")


def test_demo_help_shows_defaults(capsys):
    from cachedit.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "``" not in text and "(default: 28)" in text and "(default: inductor" in text
    assert "--seed SEED generator seed" in text and "(default: 0)" in text
    assert f"./{demo.DEFAULT_OUT}, never overwritten" in text and "--threads N" in text


def test_default_grid_path_never_overwrites(tmp_path):
    path = str(tmp_path / "cachedit_demo.png")
    assert demo.free_path(path) == path
    (tmp_path / "cachedit_demo.png").write_bytes(b"x")
    assert demo.free_path(path) == str(tmp_path / "cachedit_demo-2.png")
    (tmp_path / "cachedit_demo-2.png").write_bytes(b"x")
    assert demo.free_path(path) == str(tmp_path / "cachedit_demo-3.png")


@pytest.mark.parametrize("busy, requested, threads", [(1.6, None, 1), (1.6, 2, 2), (0.1, None, None)])
def test_a_busy_machine_gets_fewer_threads_and_a_warning(monkeypatch, busy, requested, threads):
    # busy_cpus is the measurement (of other processes' load), stood in for here to test the policy on it
    monkeypatch.setattr(demo, "busy_cpus", lambda: busy)
    monkeypatch.setattr(demo, "_usable_cores", lambda: 2)
    chosen, warning = demo.choose_threads(requested)
    if threads is None:  # idle: every core, no warning
        assert chosen == 2 and warning is None
    else:
        assert chosen == threads and "busy" in warning and "--threads" in warning and f"{busy:.1f}" in warning


def test_busy_cpus_is_a_cpu_count():
    assert 0 <= demo.busy_cpus(0.05) <= (os.cpu_count() or 1) + 1e-6


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
    # Run in an empty folder holding a previous grid: the default path must not overwrite it.
    (tmp_path / demo.DEFAULT_OUT).write_bytes(b"an earlier grid")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "cachedit", "demo", "--steps", "4", "--prompts", "a red circle"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/image" in proc.stdout and "baseline (inductor)" in proc.stdout and "strongest" in proc.stdout
    out = tmp_path / "cachedit_demo-2.png"
    assert f"grid: {out} " in proc.stdout and "load average" in proc.stdout
    assert (tmp_path / demo.DEFAULT_OUT).read_bytes() == b"an earlier grid"
    with Image.open(out) as image:
        assert image.size[0] > 4 * 128


def test_cli_without_command_prints_help():
    from cachedit.__main__ import main

    assert main([]) == 2
