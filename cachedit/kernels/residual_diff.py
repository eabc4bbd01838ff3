"""Residual-difference reduction for the step-cache check.

Given the previous and current head residuals (same shape, any strides, fp32/bf16/fp16), returns a
float32 tensor of shape [2]: ``[sum|prev - cur|, sum|prev|]``, accumulated in fp32. The gate divides
them (after an all-reduce under context parallelism) to get the relative L1 distance.

Kernel layout: both tensors are addressed through ``collapse_dims`` as [n0, n1, n2, n3] with their own
strides (a dense tensor, or two tensors of the same dense layout, collapse to one dim of stride 1 and take
the contiguous fast path), so views are read in place: one pass over both tensors, no copy. Program
``p`` reads elements ``[p * BLOCK * ITERS, (p + 1) * BLOCK * ITERS)`` in flat order, keeps per-lane fp32
sums and writes its two partial sums to ``partials[p, :]`` ([P, 2] float32); the launcher adds the
partials with one ``sum`` (deterministic: no atomics, so a step's decision does not depend on timing).
Infinities and NaN propagate into the sums as in the reference.
"""

from __future__ import annotations

import torch

from cachedit.kernels._triton import collapse_dims, lazy_jit, triton_available

tl = None  # triton.language, bound at the first launch (Note [Lazy Triton] in _triton.py)

RESIDUAL_DIFF_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024  # elements per lane group and iteration: 8 per thread with 4 warps (16-byte loads in bf16)
_ITERS = 8  # unrolled iterations per program: 8192 elements, enough loads in flight per thread
_NUM_WARPS = 4
_NDIM = 4  # views with more dims that do not collapse are copied to contiguous first


def residual_diff_ref(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """The specification: fp32 sums of |prev - cur| and |prev|, as a [2] float32 tensor."""
    prev32 = prev.float()
    cur32 = cur.float()
    return torch.stack([(prev32 - cur32).abs().sum(), prev32.abs().sum()])


@lazy_jit
def _residual_diff_kernel(
    prev_ptr,
    cur_ptr,
    partials_ptr,  # [P, 2] float32, contiguous
    n,  # number of elements
    n1,
    n2,
    n3,  # collapsed shape [n0, n1, n2, n3]; n0 = n / (n1 * n2 * n3)
    p_s0,
    p_s1,
    p_s2,
    p_s3,
    c_s0,
    c_s1,
    c_s2,
    c_s3,
    CONTIGUOUS: tl.constexpr,  # both tensors collapse to one dim of stride 1
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    lanes = tl.arange(0, BLOCK)
    acc_diff = tl.zeros([BLOCK], dtype=tl.float32)
    acc_prev = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        idx = base + i * BLOCK + lanes
        mask = idx < n
        if CONTIGUOUS:
            p_off = idx
            c_off = idx
        else:
            i3 = idx % n3
            rest = idx // n3
            i2 = rest % n2
            rest = rest // n2
            i1 = rest % n1
            i0 = rest // n1
            p_off = i0 * p_s0 + i1 * p_s1 + i2 * p_s2 + i3 * p_s3
            c_off = i0 * c_s0 + i1 * c_s1 + i2 * c_s2 + i3 * c_s3
        p = tl.load(prev_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cur_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
        acc_diff += tl.abs(p - c)
        acc_prev += tl.abs(p)
    tl.store(partials_ptr + 2 * pid, tl.sum(acc_diff, axis=0))
    tl.store(partials_ptr + 2 * pid + 1, tl.sum(acc_prev, axis=0))


def residual_diff_triton(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Launch ``_residual_diff_kernel``: the op's CUDA implementation.

    Device-agnostic, so tests run it on CPU tensors under ``TRITON_INTERPRET=1``. Expects checked inputs.
    """
    n = prev.numel()
    if n == 0:
        return torch.zeros(2, dtype=torch.float32, device=prev.device)
    layout = collapse_dims(prev.shape, [prev.stride(), cur.stride()], _NDIM)
    if layout is None:
        prev, cur = prev.contiguous(), cur.contiguous()
        layout = collapse_dims(prev.shape, [prev.stride(), cur.stride()], _NDIM)
        assert layout is not None, "contiguous tensors collapse to one dim"
    sizes, (p_strides, c_strides) = layout
    contiguous = sizes[:-1] == [1] * (_NDIM - 1) and p_strides[-1] == 1 and c_strides[-1] == 1
    programs = -(-n // (_BLOCK * _ITERS))
    partials = torch.empty((programs, 2), dtype=torch.float32, device=prev.device)
    _residual_diff_kernel[(programs,)](
        prev,
        cur,
        partials,
        n,
        *sizes[1:],
        *p_strides,
        *c_strides,
        CONTIGUOUS=contiguous,
        BLOCK=_BLOCK,
        ITERS=_ITERS,
        num_warps=_NUM_WARPS,
    )
    return partials.sum(dim=0)


def _check(prev: torch.Tensor, cur: torch.Tensor) -> None:
    torch._check(
        prev.shape == cur.shape,
        lambda: f"cachedit::residual_diff needs equal shapes, got {tuple(prev.shape)} and {tuple(cur.shape)}",
    )
    torch._check(
        prev.dtype == cur.dtype and prev.dtype in RESIDUAL_DIFF_DTYPES,
        lambda: f"cachedit::residual_diff needs two fp32/bf16/fp16 tensors of one dtype, got {prev.dtype} and {cur.dtype}",
    )
    torch._check(
        prev.device == cur.device,
        lambda: f"cachedit::residual_diff needs both tensors on one device, got {prev.device} and {cur.device}",
    )


@torch.library.custom_op("cachedit::residual_diff", mutates_args=())
def residual_diff(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """``[sum|prev - cur|, sum|prev|]`` in fp32. CPU and other devices: the reference."""
    _check(prev, cur)
    return residual_diff_ref(prev, cur)


@residual_diff.register_kernel("cuda")
def _(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    _check(prev, cur)
    if not triton_available():
        return residual_diff_ref(prev, cur)
    return residual_diff_triton(prev, cur)


@residual_diff.register_fake
def _(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    _check(prev, cur)
    return prev.new_empty((2,), dtype=torch.float32)
