"""Attention that also returns the log-sum-exp of each query row, as ring attention needs it.

``attention_with_lse(q, k, v, mask, scale) -> (out, lse)``: ``q [B, H, Sq, D]``, ``k [B, H, Sk, D]``,
``v [B, H, Sk, Dv]``, optional ``mask`` broadcastable to ``[B, H, Sq, Sk]`` (bool: True attends; float:
added to the scores). Returns ``out [B, H, Sq, Dv]`` in q's dtype and ``lse [B, H, Sq]`` fp32 (any
strides), with ``lse = logsumexp_k(scale · q·k + mask)``; a fully masked row has ``lse = -inf``.

Note [LSE attention kernels]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Ring attention merges partial results by their LSE (``merge_attention``), so it needs a kernel that
returns it. PyTorch's fused SDPA kernels do, through their aten ops, and none of them materialises the
``[Sq, Sk]`` score matrix (a Wan-sized block is 40 × 9450 × 9450 fp32 = 13 GiB; the math path's
whole-sequence matrix would be 53 GiB):

  kernel      device  dtypes            head dims (D = Dv)        mask              lse layout
  cpu_flash   CPU     fp32/bf16/fp16    any                       additive          [B, H, Sq]
  flash       CUDA    bf16/fp16         multiple of 8, <= 256     none              [B, H, Sq]
  efficient   CUDA    fp32/bf16/fp16    multiples of 8 (D, Dv)    additive          [B, H, ceil32(Sq)]
  cudnn       CUDA    bf16/fp16         multiple of 8, <= 128     none              [B, H, Sq, 1]
  math        any     any               any                       any               [B, H, Sq]

``lse_kernel`` picks by dtype, head dim and mask in the order flash, efficient, cudnn (flash is the
fastest that fits; efficient takes masks and fp32; cudnn is what is left for 16-bit inputs when the other
two are switched off). On a real GPU it also asks PyTorch whether the kernel runs there
(``torch.backends.cuda.can_use_*``: the GPU's architecture, and any ``sdpa_kernel`` or
``enable_*_sdp(False)`` the user set); fake and meta tensors have no hardware to ask, so the table alone
decides, which is what ``tests/kernels/test_attention_lse.py`` checks. ``math`` is the documented
fallback for what no fused kernel takes (float64, head dims not a multiple of 8, devices other than
CPU and CUDA): it computes the full fp32 score matrix of the block. It is also the specification.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

_FLASH_MAX_HEAD_DIM = 256
_CUDNN_MAX_HEAD_DIM = 128
_HEAD_DIM_ALIGN = 8  # elements; the fused CUDA kernels read rows in 16-byte vectors
_BIAS_ALIGN = 16  # the efficient kernel reads the additive mask's rows in aligned vectors
_HALF = (torch.float16, torch.bfloat16)


class LseKernel(str, enum.Enum):
    """The kernel ``attention_with_lse`` runs (Note [LSE attention kernels])."""

    CPU_FLASH = "cpu_flash"
    FLASH = "flash"
    EFFICIENT = "efficient"
    CUDNN = "cudnn"
    MATH = "math"


def attention_with_lse_ref(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification (and the ``math`` fallback): full fp32 scores ``[B, H, Sq, Sk]``."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        s = s + _additive(mask, torch.float32)
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Sq]
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype), lse


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True attends) as 0 / -inf in ``dtype``; a float mask as ``dtype``."""
    if mask.dtype == torch.bool:
        # logical_not, not ``~``: Python operators need a device guard, which fake CUDA tensors on a
        # CPU-only build (tests/kernels/test_attention_lse.py) cannot have
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(torch.logical_not(mask), float("-inf"))
    return mask.to(dtype)


def lse_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> LseKernel:
    """The kernel for these inputs (Note [LSE attention kernels])."""
    if q.device.type == "cpu":
        return LseKernel.CPU_FLASH
    if q.device.type != "cuda":
        return LseKernel.MATH
    d, dv = q.shape[-1], v.shape[-1]
    aligned = d % _HEAD_DIM_ALIGN == 0 and dv % _HEAD_DIM_ALIGN == 0 and d > 0 and dv > 0
    if not aligned:
        return LseKernel.MATH
    if mask is None and q.dtype in _HALF and d == dv and d <= _FLASH_MAX_HEAD_DIM and _runs(LseKernel.FLASH, q, k, v):
        return LseKernel.FLASH
    if q.dtype in (torch.float32, *_HALF) and _runs(LseKernel.EFFICIENT, q, k, v, mask):
        return LseKernel.EFFICIENT
    if mask is None and q.dtype in _HALF and d == dv and d <= _CUDNN_MAX_HEAD_DIM and _runs(LseKernel.CUDNN, q, k, v):
        return LseKernel.CUDNN
    return LseKernel.MATH


def _runs(kernel: LseKernel, q, k, v, mask=None) -> bool:
    """Whether PyTorch can run ``kernel`` on this GPU with these inputs; True for fake and meta tensors."""
    if isinstance(q, torch._subclasses.FakeTensor) or q.is_meta:
        return True
    check = {
        LseKernel.FLASH: torch.backends.cuda.can_use_flash_attention,
        LseKernel.EFFICIENT: torch.backends.cuda.can_use_efficient_attention,
        LseKernel.CUDNN: torch.backends.cuda.can_use_cudnn_attention,
    }[kernel]
    return bool(check(torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, False), False))


def attention_with_lse(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Sq, Dv], lse [B, H, Sq] fp32)`` with the kernel ``lse_kernel`` picks."""
    kernel = lse_kernel(q, k, v, mask)
    if kernel is LseKernel.CPU_FLASH:
        bias = None if mask is None else _additive(mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse.float()
    if kernel is LseKernel.FLASH:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse
    if kernel is LseKernel.EFFICIENT:
        bias = None if mask is None else _efficient_bias(mask, q, k)
        out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)
        return out, lse.narrow(-1, 0, q.shape[-2])  # the kernel pads the query dim of the LSE to a multiple of 32
    if kernel is LseKernel.CUDNN:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
        return out, lse.reshape(out.shape[:-1])
    return attention_with_lse_ref(q, k, v, mask, scale)


def _efficient_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask as the efficient kernel takes it: additive, q's dtype, 4-d ``[B, H, Sq, Sk]`` (a broadcast
    view: a key-padding mask stays ``[B, 1, 1, Sk]`` in memory), rows padded to an aligned length."""
    bias = _additive(mask, q.dtype)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    sk = k.shape[-2]
    if sk % _BIAS_ALIGN:  # pad the small, unexpanded mask, then view it back to Sk columns
        bias = F.pad(bias, (0, _BIAS_ALIGN - sk % _BIAS_ALIGN)).narrow(-1, 0, sk)
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], sk)
