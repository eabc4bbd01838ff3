"""Merge two partial attention results by their log-sum-exp (ring attention).

``merge_attention(out_a, lse_a, out_b, lse_b) -> (out, lse)``: ``out_*`` are ``[..., D]`` (fp32/bf16/fp16,
one dtype), ``lse_*`` are fp32 ``[...]`` with ``lse.shape == out.shape[:-1]``; any strides. For SDPA
layouts that is ``out [B, H, S, D]`` with ``lse [B, H, S]``; for flash layouts ``out [B, S, H, D]``
takes ``lse.transpose(1, 2)`` (a view). Per row, in fp32::

    lse = logaddexp(lse_a, lse_b)
    out = sigmoid(lse_a - lse_b) · out_a + sigmoid(lse_b - lse_a) · out_b   (returned in the dtype of out_a)

which is ``out_a - sigmoid(lse_b - lse_a) · (out_a - out_b)`` written as a convex combination, so that it
cannot overflow where the inputs do not. The weights come from the difference of the two LSEs, not from
``exp(lse_a - lse)``: that would carry the rounding error of ``lse`` (1e-6 at |lse| ~ 16) into them.

``-inf`` LSE (a fully masked or empty block) is safe: that side contributes nothing, whatever its ``out``
holds (a fully masked softmax may leave NaN there), so merging with it returns the other side exactly;
two ``-inf`` sides give ``out = 0``, ``lse = -inf``. A NaN LSE makes the row's ``out`` and ``lse`` NaN. ``+inf``
is no log-sum-exp of finite scores and is outside the contract. Outputs are contiguous.

Kernel layout: the leading dims of the six tensors are collapsed to [n0, n1, n2] (``collapse_dims``) with
each tensor's own strides, so views are read in place; a program merges BLOCK_R rows as a
[BLOCK_R, BLOCK_D] tile, BLOCK_D = next power of two >= D.
"""

from __future__ import annotations

import torch

from cachedit.kernels._triton import collapse_dims, lazy_jit, triton_available

tl = None  # triton.language, bound at the first launch (Note [Lazy Triton] in _triton.py)

MERGE_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 4096  # elements per program tile: BLOCK_R = _TILE // BLOCK_D rows
_NUM_WARPS = 4
_MAX_BLOCK_D = 65536  # longer rows (far beyond any head dim) take the reference path on CUDA


def merge_attention_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of ``merge_attention``."""
    lse_a, lse_b = lse_a.float(), lse_b.float()  # [...]
    lse = torch.logaddexp(lse_a, lse_b)  # -inf and -inf give -inf
    empty_a = (lse_a == float("-inf")).unsqueeze(-1)  # [..., 1]
    empty_b = (lse_b == float("-inf")).unsqueeze(-1)
    part_a = torch.sigmoid(lse_a - lse_b).unsqueeze(-1) * out_a.float()  # [..., D]
    part_b = torch.sigmoid(lse_b - lse_a).unsqueeze(-1) * out_b.float()
    out = torch.where(empty_a, 0.0, part_a) + torch.where(empty_b, 0.0, part_b)
    return out.to(out_a.dtype).contiguous(), lse.contiguous()


@lazy_jit
def _merge_attention_kernel(
    out_a_ptr,
    lse_a_ptr,
    out_b_ptr,
    lse_b_ptr,
    out_ptr,
    lse_ptr,
    rows,
    D,
    n1,
    n2,  # leading dims collapsed to [n0, n1, n2]
    a_s0,
    a_s1,
    a_s2,
    a_sd,
    b_s0,
    b_s1,
    b_s2,
    b_sd,
    o_s0,
    o_s1,
    o_s2,
    o_sd,
    la_s0,
    la_s1,
    la_s2,
    lb_s0,
    lb_s1,
    lb_s2,
    lo_s0,
    lo_s1,
    lo_s2,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_mask = r < rows
    r2 = r % n2
    r1 = (r // n2) % n1
    r0 = r // (n1 * n2)
    lse_a = tl.load(lse_a_ptr + r0 * la_s0 + r1 * la_s1 + r2 * la_s2, mask=r_mask, other=0.0)
    lse_b = tl.load(lse_b_ptr + r0 * lb_s0 + r1 * lb_s1 + r2 * lb_s2, mask=r_mask, other=0.0)
    empty_a = lse_a == float("-inf")
    empty_b = lse_b == float("-inf")
    diff = lse_b - lse_a  # NaN when both are empty; every use below is guarded
    lse = tl.maximum(lse_a, lse_b) + tl.log(1.0 + tl.exp(-tl.abs(diff)))  # logaddexp for finite sides
    lse = tl.where(empty_a, lse_b, tl.where(empty_b, lse_a, lse))
    w_a = 1.0 / (1.0 + tl.exp(diff))  # sigmoid(lse_a - lse_b), [BLOCK_R]
    w_b = 1.0 / (1.0 + tl.exp(-diff))
    d = tl.arange(0, BLOCK_D)
    mask = r_mask[:, None] & (d < D)[None, :]
    a_row = r0 * a_s0 + r1 * a_s1 + r2 * a_s2
    b_row = r0 * b_s0 + r1 * b_s1 + r2 * b_s2
    o_row = r0 * o_s0 + r1 * o_s1 + r2 * o_s2
    out_a = tl.load(out_a_ptr + a_row[:, None] + d[None, :] * a_sd, mask=mask, other=0.0).to(tl.float32)
    out_b = tl.load(out_b_ptr + b_row[:, None] + d[None, :] * b_sd, mask=mask, other=0.0).to(tl.float32)
    part_a = tl.where(empty_a[:, None], 0.0, w_a[:, None] * out_a)  # NaN in an empty side is dropped
    part_b = tl.where(empty_b[:, None], 0.0, w_b[:, None] * out_b)
    out = part_a + part_b
    tl.store(out_ptr + o_row[:, None] + d[None, :] * o_sd, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + r0 * lo_s0 + r1 * lo_s1 + r2 * lo_s2, lse, mask=r_mask)


def merge_attention_triton(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_merge_attention_kernel``: the op's CUDA implementation.

    Device-agnostic, so tests run it on CPU tensors under ``TRITON_INTERPRET=1``. Expects checked inputs.
    """
    d = out_a.shape[-1]
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=lse_a.device)
    rows = lse.numel()
    if rows == 0:
        return out, lse

    def layout():
        tensors = (out_a, out_b, out, lse_a, lse_b, lse)
        lead = [t.stride()[: lse.dim()] for t in tensors]
        return collapse_dims(lse.shape, lead, 3)

    collapsed = layout()
    if collapsed is None:
        out_a, lse_a, out_b, lse_b = (t.contiguous() for t in (out_a, lse_a, out_b, lse_b))
        collapsed = layout()
        assert collapsed is not None, "contiguous tensors collapse to one leading dim"
    sizes, (a_s, b_s, o_s, la_s, lb_s, lo_s) = collapsed
    block_d = 1 << max(d - 1, 0).bit_length()
    block_r = max(1, _TILE // block_d)
    _merge_attention_kernel[(-(-rows // block_r),)](
        out_a,
        lse_a,
        out_b,
        lse_b,
        out,
        lse,
        rows,
        d,
        sizes[1],
        sizes[2],
        *a_s,
        out_a.stride(-1),
        *b_s,
        out_b.stride(-1),
        *o_s,
        out.stride(-1),
        *la_s,
        *lb_s,
        *lo_s,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )
    return out, lse


def _check(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    torch._check(
        out_a.shape == out_b.shape and out_a.dtype == out_b.dtype and out_a.dtype in MERGE_OUT_DTYPES,
        lambda: "cachedit::merge_attention needs out_a and out_b of one shape and one fp32/bf16/fp16 dtype, "
        f"got {tuple(out_a.shape)} {out_a.dtype} and {tuple(out_b.shape)} {out_b.dtype}",
    )
    torch._check(
        out_a.dim() >= 1 and out_a.shape[-1] >= 1,
        lambda: f"cachedit::merge_attention needs outputs [..., D] with D >= 1, got {tuple(out_a.shape)}",
    )
    torch._check(
        lse_a.shape == out_a.shape[:-1] and lse_b.shape == out_a.shape[:-1],
        lambda: f"cachedit::merge_attention needs lse_a and lse_b of shape out.shape[:-1] = {tuple(out_a.shape[:-1])}, "
        f"got {tuple(lse_a.shape)} and {tuple(lse_b.shape)} (flash layouts: pass lse.transpose(1, 2))",
    )
    torch._check(
        lse_a.dtype == torch.float32 and lse_b.dtype == torch.float32,
        lambda: f"cachedit::merge_attention needs float32 LSEs, got {lse_a.dtype} and {lse_b.dtype}",
    )
    torch._check(
        len({out_a.device, lse_a.device, out_b.device, lse_b.device}) == 1,
        lambda: "cachedit::merge_attention needs all four tensors on one device, got "
        f"{out_a.device}, {lse_a.device}, {out_b.device}, {lse_b.device}",
    )


@torch.library.custom_op("cachedit::merge_attention", mutates_args=())
def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged ``(out, lse)`` of two partial attentions. CPU and other devices: the reference."""
    _check(out_a, lse_a, out_b, lse_b)
    return merge_attention_ref(out_a, lse_a, out_b, lse_b)


@merge_attention.register_kernel("cuda")
def _(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(out_a, lse_a, out_b, lse_b)
    if not triton_available() or out_a.shape[-1] > _MAX_BLOCK_D:
        return merge_attention_ref(out_a, lse_a, out_b, lse_b)
    return merge_attention_triton(out_a, lse_a, out_b, lse_b)


@merge_attention.register_fake
def _(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(out_a, lse_a, out_b, lse_b)
    return torch.empty_like(out_a, memory_format=torch.contiguous_format), torch.empty_like(
        lse_a, memory_format=torch.contiguous_format
    )
