"""Custom ops (``torch.ops.cachedit.*``): Triton on CUDA, a plain-torch reference as spec and CPU path.

Importing this package registers the ops. It imports nothing else of cachedit, and not triton (Note
[Lazy Triton] in ``_triton.py``).
"""

from cachedit.kernels.attention_lse import LseKernel, attention_with_lse, attention_with_lse_ref, lse_kernel
from cachedit.kernels.fp8 import (
    FP8_E4M3_MAX,
    FP8_SCALE_BYTES,
    fp8_dequantize,
    fp8_dequantize_ref,
    fp8_quantize,
    fp8_quantize_ref,
    fp8_wire_ratio,
)
from cachedit.kernels.merge_attention import merge_attention, merge_attention_ref
from cachedit.kernels.residual_diff import residual_diff, residual_diff_ref

__all__ = [
    "LseKernel",
    "attention_with_lse",
    "attention_with_lse_ref",
    "lse_kernel",
    "FP8_E4M3_MAX",
    "FP8_SCALE_BYTES",
    "fp8_dequantize",
    "fp8_dequantize_ref",
    "fp8_quantize",
    "fp8_quantize_ref",
    "fp8_wire_ratio",
    "merge_attention",
    "merge_attention_ref",
    "residual_diff",
    "residual_diff_ref",
]
