"""cachedit.kernels imports without importing triton, and runs its CPU path where triton is missing."""

import subprocess
import sys

IMPORT = """
import sys
import torch
import cachedit.kernels as K
# torch itself imports triton on the first custom-op call (torch._dynamo.utils), so check before that.
assert sys.modules.get("triton") is None, "importing cachedit.kernels imported triton"
"""
RUN_OPS = """
x = torch.randn(3, 5, 64)
K.residual_diff(x, x * 2)
K.fp8_dequantize(K.fp8_quantize(x), torch.bfloat16)
K.merge_attention(x, torch.randn(3, 5), x, torch.randn(3, 5))
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_kernels_does_not_import_triton():
    proc = run(IMPORT + RUN_OPS)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kernels_work_without_triton_installed():
    proc = run("import sys; sys.modules['triton'] = None  # import triton now fails\n" + IMPORT + RUN_OPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
