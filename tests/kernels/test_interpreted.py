"""The Triton kernels against their references, on the CPU, under TRITON_INTERPRET=1.

Each kernel test file's ``interpreted`` tests run in a child pytest with the variable set before triton is
imported, so the interpreter never leaks into this process (see conftest.py).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed: no kernel to interpret"
)


@pytest.mark.parametrize("test_file", ["test_residual_diff.py", "test_fp8.py", "test_merge_attention.py"])
def test_kernels_match_references_under_interpreter(test_file):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "interpreted", "-p", "no:cacheprovider", str(HERE / test_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"interpreted kernel tests of {test_file} failed (exit {proc.returncode}); rerun with\n"
        f"  TRITON_INTERPRET=1 {' '.join(cmd[1:])}\n{proc.stdout[-10000:]}\n{proc.stderr[-3000:]}"
    )
