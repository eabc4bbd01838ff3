"""Residual-difference reduction for the step-cache check.

Given the previous and current head residuals (same shape, any strides, fp32/bf16/fp16), returns a
float32 tensor of shape [2]: ``[sum|prev - cur|, sum|prev|]``, accumulated in fp32. The gate divides
them (after an all-reduce under context parallelism) to get the relative L1 distance.
"""

from __future__ import annotations

import torch


def residual_diff_ref(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """The specification: fp32 sums of |prev - cur| and |prev|, as a [2] float32 tensor."""
    prev32 = prev.float()
    cur32 = cur.float()
    return torch.stack([(prev32 - cur32).abs().sum(), prev32.abs().sum()])


def _check(prev: torch.Tensor, cur: torch.Tensor) -> None:
    torch._check(
        prev.shape == cur.shape,
        lambda: f"cachedit::residual_diff needs equal shapes, got {tuple(prev.shape)} and {tuple(cur.shape)}",
    )
    torch._check(
        prev.dtype == cur.dtype and prev.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"cachedit::residual_diff needs two fp32/bf16/fp16 tensors of one dtype, got {prev.dtype} and {cur.dtype}",
    )


@torch.library.custom_op("cachedit::residual_diff", mutates_args=())
def residual_diff(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    _check(prev, cur)
    return residual_diff_ref(prev, cur)


@residual_diff.register_fake
def _(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    _check(prev, cur)
    return prev.new_empty((2,), dtype=torch.float32)
