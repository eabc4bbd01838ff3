"""Custom ops (``torch.ops.cachedit.*``): Triton on CUDA, a plain-torch reference as spec and CPU path.

Importing this package registers the ops. It imports nothing else of cachedit.
"""

from cachedit.kernels.residual_diff import residual_diff, residual_diff_ref

__all__ = ["residual_diff", "residual_diff_ref"]
