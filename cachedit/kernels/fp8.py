"""FP8 payloads for communication: per-(token, head) power-of-two scaling to float8_e4m3fn.

``fp8_quantize(x)``: ``x`` is ``[..., D]`` (fp32/bf16/fp16, any strides, D >= 1); each row of D values
(one token of one head) gets its own scale 2**e. The result is one contiguous uint8 payload ``[..., D + 1]``
so that a single all-to-all carries values and scales together (gloo cannot send float8, uint8 it can)::

    payload[..., :D]  float8_e4m3fn bits of clamp(x * 2**-e, -448, 448), rounded to nearest even
    payload[..., D]   e + 127: the scale as an 8-bit biased exponent (OCP MX's E8M0; 0xFF: a poisoned row)
    e = the smallest integer with amax(|x|) <= 448 * 2**e, and at least -126

so amax lands in (224, 448] on the FP8 grid. e4m3fn's relative step is the same in every normal binade,
so a power-of-two scale costs nothing against an exact amax / 448 scale except at the subnormal bottom
of the row (values below 2**-6 of the row's top binade), and multiplying by 2**-e is exact, so the kernel
and the reference agree bit for bit. ``e`` comes from amax's fp32 bits without a division: with
amax = m * 2**E, e = E - 8 if m <= 1.75 (448 = 1.75 * 2**8), else E - 7.

``fp8_dequantize(payload, dtype)``: ``[..., D + 1]`` uint8 -> ``[..., D]`` of ``dtype``, computed as
``clamp(fp8 value as fp32 * 2**e, ±max of dtype).to(dtype)``. The clamp matters only next to the
dtype's largest value: rounding to the FP8 grid can lift it by up to 2**-4 (fp16's 65504 comes back as
65536 before the clamp), and the sender had a finite value. Bytes on the wire per row: D + 1 against
2·D for bf16, a ratio of (D + 1) / (2·D) (``fp8_wire_ratio``): 0.508 at D = 64, 0.504 at D = 128 (issue
4's bound of 0.53 holds from D = 17 on).

Special values (enforced by both kernels and the reference, checked by the tests):
- zeros: an all-zero row gets scale FP8_SCALE_MIN = 2**-126 and zero bytes, and dequantizes to exact
  zeros (-0.0 keeps its sign). A row with amax below 448 * 2**-126 uses FP8_SCALE_MIN too: never a
  subnormal scale (a GPU may flush it to zero), at the cost of precision in rows below 1e-35.
- ±max of the input dtype round-trips exactly (through the dequantize clamp above).
- infinities and NaN: a row holding any ±inf or NaN is poisoned as a whole: its value bytes are the
  e4m3fn NaN (0x7F), its scale byte is 0xFF, and it dequantizes to all-NaN. float8_e4m3fn has no
  infinity and a non-finite row has no finite scale; saturating would hand the receiver finite values the
  sender never had. Other rows are unaffected, and the policy needs no host synchronisation.

Kernel layout: the leading dims of ``x`` and of the payload are collapsed to [n0, n1, n2] (``collapse_dims``)
so views are read in place. A program quantizes BLOCK_R rows at once as a [BLOCK_R, BLOCK_D] tile,
BLOCK_D = next power of two >= D, and writes each row's scale byte after its values.

Note [Exact FP8 cast]
~~~~~~~~~~~~~~~~~~~~~
The quantize kernel rounds each value onto the float8_e4m3fn grid in fp32 arithmetic before it casts, so
the cast itself is exact and its rounding mode never matters. With |v| <= 448 in binade 2**E, the grid
step is 2**(max(E, -6) - 3) (-6: e4m3fn's smallest normal exponent; below it the subnormal step 2**-9
holds). Adding c = 2**(max(E, -6) + 20) to |v| leaves a sum whose fp32 ulp is exactly that step, so the
fp32 adder rounds |v| to nearest-even on the grid, and subtracting c back is exact; the sign is put back
afterwards so that -0.0 and small negatives that round to zero keep it, as torch's cast does. On a GPU this
equals the hardware's round-to-nearest-even conversion bit for bit. It is needed under TRITON_INTERPRET=1:
triton 3.9's interpreter rounds fp32 -> fp8 by adding the first cut-off bit without carrying a mantissa
overflow into the exponent, so a value that rounds up to a power of two with an odd exponent field comes
back as half that power (31.4 -> 16 instead of 32): 2.4% of clamped Gaussian values in our check, nearly
all a whole binade (8 steps) off, so "within one FP8 step" could not be checked there either.
"""

from __future__ import annotations

import torch

from cachedit.kernels._triton import collapse_dims, lazy_jit, triton_available

tl = None  # triton.language, bound at the first launch (Note [Lazy Triton] in _triton.py)

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
FP8_SCALE_MIN = torch.finfo(torch.float32).tiny  # 2**-126, the smallest normal fp32
FP8_SCALE_BYTES = 1  # one biased power-of-two exponent per row, after the row's D value bytes
FP8_SCALE_BIAS = 127  # scale = 2**(byte - 127), as fp32's exponent field
FP8_SCALE_NAN_BYTE = 0xFF  # the scale byte of a poisoned row
FP8_E4M3_NAN_BYTE = 0x7F  # float8_e4m3fn NaN (S.1111.111)
FP8_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_EXP = -126  # FP8_SCALE_MIN's exponent
_MAX_MANTISSA_BITS = 0x600000  # fp32 mantissa field of 1.75, the mantissa of FP8_E4M3_MAX = 1.75 * 2**8
_MAX_EXP = 8  # FP8_E4M3_MAX's exponent
_E4M3_MIN_NORMAL_EXP_BITS = (127 - 6) << 23  # fp32 exponent field of 2**-6, e4m3fn's smallest normal
_E4M3_GRID_SHIFT_BITS = (23 - 3) << 23  # 2**20 in the exponent field: fp32 minus e4m3 mantissa bits
_TILE = 4096  # elements per program tile: BLOCK_R = _TILE // BLOCK_D rows
_NUM_WARPS = 4
_MAX_BLOCK_D = 65536  # longer rows (far beyond any head dim) take the reference path on CUDA
_MIN_CUDA_CAPABILITY = (8, 9)  # Triton's float8e4nv needs Ada/Hopper; older GPUs use the reference


def fp8_wire_ratio(d: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Payload bytes over the bytes of the unquantized ``[..., d]`` tensor: (d + 1) / (d · itemsize)."""
    return (d + FP8_SCALE_BYTES) / (d * torch.empty((), dtype=dtype).element_size())


def fp8_scale_exponent_ref(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``e`` per row from fp32 ``amax >= 0``: the smallest with amax <= 448 * 2**e, at least -126."""
    bits = amax.view(torch.int32)
    exponent = (bits >> 23) - 127  # E of amax = m * 2**E (fp32 exponent field; amax >= 0 has no sign bit)
    e = exponent - _MAX_EXP + ((bits & 0x7FFFFF) > _MAX_MANTISSA_BITS).int()
    return e.clamp(min=_MIN_EXP)


def _power_of_two(e: torch.Tensor) -> torch.Tensor:
    """fp32 2**e for int32 ``e`` in [-126, 127], built from its exponent field (exact)."""
    return ((e + 127) << 23).view(torch.float32)


def fp8_quantize_ref(x: torch.Tensor) -> torch.Tensor:
    """The specification of ``fp8_quantize``: ``[..., D]`` -> uint8 ``[..., D + 1]``."""
    x32 = x.float()  # [..., D]
    finite = torch.isfinite(x32).all(dim=-1, keepdim=True)  # [..., 1]
    e = fp8_scale_exponent_ref(x32.abs().amax(dim=-1, keepdim=True))  # [..., 1] int32; poisoned rows: any
    q = (x32 * _power_of_two(-e)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(finite, q, FP8_E4M3_NAN_BYTE)
    scale_byte = torch.where(finite, e + FP8_SCALE_BIAS, FP8_SCALE_NAN_BYTE).to(torch.uint8)  # [..., 1]
    return torch.cat([q, scale_byte], dim=-1).contiguous()


def fp8_scales_ref(payload: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., 1]``: each row's scale 2**e, NaN for a poisoned row."""
    byte = payload[..., -FP8_SCALE_BYTES:].int()
    scale = _power_of_two(byte - FP8_SCALE_BIAS)
    return torch.where(byte == FP8_SCALE_NAN_BYTE, float("nan"), scale)


def fp8_dequantize_ref(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The specification of ``fp8_dequantize``: uint8 ``[..., D + 1]`` -> ``[..., D]`` of ``dtype``."""
    d = payload.shape[-1] - FP8_SCALE_BYTES
    q = payload[..., :d].contiguous().view(torch.float8_e4m3fn).float()  # [..., D]
    big = torch.finfo(dtype).max
    return (q * fp8_scales_ref(payload)).clamp(-big, big).to(dtype)  # clamp keeps NaN


@lazy_jit
def _fp8_quantize_kernel(
    x_ptr,
    out_ptr,  # uint8 payload
    rows,
    D,
    n1,
    n2,  # leading dims collapsed to [n0, n1, n2]
    x_s0,
    x_s1,
    x_s2,
    x_sd,
    o_s0,
    o_s1,
    o_s2,
    o_sd,
    FP8_MAX: tl.constexpr,
    MAX_EXP: tl.constexpr,
    MAX_MANTISSA_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    NAN_BYTE: tl.constexpr,
    SCALE_NAN_BYTE: tl.constexpr,
    GRID_MIN_EXP_BITS: tl.constexpr,
    GRID_SHIFT_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_mask = row < rows
    r2 = row % n2
    r1 = (row // n2) % n1
    r0 = row // (n1 * n2)
    x_row = r0 * x_s0 + r1 * x_s1 + r2 * x_s2
    o_row = r0 * o_s0 + r1 * o_s1 + r2 * o_s2
    d = tl.arange(0, BLOCK_D)
    mask = r_mask[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + x_row[:, None] + d[None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    row_bad = tl.max(bad.to(tl.int32), axis=1) > 0  # [BLOCK_R]; explicit: GPU max may drop NaN
    amax_bits = tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True)  # [BLOCK_R]
    e = (amax_bits >> 23) - 127 - MAX_EXP + ((amax_bits & 0x7FFFFF) > MAX_MANTISSA_BITS).to(tl.int32)
    e = tl.maximum(e, MIN_EXP)
    inv_scale = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e, exact
    v = tl.clamp(x * inv_scale[:, None], -FP8_MAX, FP8_MAX)  # [BLOCK_R, BLOCK_D]
    # Round onto the e4m3fn grid so that the cast below is exact: Note [Exact FP8 cast].
    a = tl.abs(v)
    exp_bits = tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, GRID_MIN_EXP_BITS)
    c = (exp_bits + GRID_SHIFT_BITS).to(tl.float32, bitcast=True)
    r = (a + c) - c
    r = tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)  # the sign bit, so -0.0 stays -0.0
    q = r.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    q = tl.where(row_bad[:, None], NAN_BYTE, q)
    tl.store(out_ptr + o_row[:, None] + d[None, :] * o_sd, q, mask=mask)
    scale_byte = tl.where(row_bad, SCALE_NAN_BYTE, e + 127).to(tl.uint8)
    tl.store(out_ptr + o_row + D * o_sd, scale_byte, mask=r_mask)


@lazy_jit
def _fp8_dequantize_kernel(
    payload_ptr,
    out_ptr,
    rows,
    D,
    n1,
    n2,  # leading dims collapsed to [n0, n1, n2]
    p_s0,
    p_s1,
    p_s2,
    p_sd,
    o_s0,
    o_s1,
    o_s2,
    o_sd,
    OUT_MAX: tl.constexpr,
    SCALE_BIAS: tl.constexpr,
    SCALE_NAN_BYTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_mask = r < rows
    r2 = r % n2
    r1 = (r // n2) % n1
    r0 = r // (n1 * n2)
    p_row = r0 * p_s0 + r1 * p_s1 + r2 * p_s2
    o_row = r0 * o_s0 + r1 * o_s1 + r2 * o_s2
    byte = tl.load(payload_ptr + p_row + D * p_sd, mask=r_mask, other=0).to(tl.int32)  # [BLOCK_R]
    scale = ((byte - SCALE_BIAS + 127) << 23).to(tl.float32, bitcast=True)
    scale = tl.where(byte == SCALE_NAN_BYTE, float("nan"), scale)
    d = tl.arange(0, BLOCK_D)
    mask = r_mask[:, None] & (d < D)[None, :]
    q = tl.load(payload_ptr + p_row[:, None] + d[None, :] * p_sd, mask=mask, other=0)
    x = q.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    x = tl.where(x > OUT_MAX, OUT_MAX, tl.where(x < -OUT_MAX, -OUT_MAX, x))  # comparisons keep NaN
    tl.store(out_ptr + o_row[:, None] + d[None, :] * o_sd, x.to(out_ptr.dtype.element_ty), mask=mask)


def _row_layout(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """``src`` (made contiguous where its leading dims do not collapse to 3), those dims as [n0, n1, n2],
    and the strides of ``src`` and ``dst`` over them."""
    layout = collapse_dims(src.shape[:-1], [src.stride()[:-1], dst.stride()[:-1]], 3)
    if layout is None:
        src = src.contiguous()
        layout = collapse_dims(src.shape[:-1], [src.stride()[:-1], dst.stride()[:-1]], 3)
        assert layout is not None, "contiguous tensors collapse to one leading dim"
    sizes, (src_strides, dst_strides) = layout
    return src, sizes, src_strides, dst_strides


def _blocks(d: int) -> tuple[int, int]:
    block_d = 1 << max(d - 1, 0).bit_length()
    return max(1, _TILE // block_d), block_d


def fp8_quantize_triton(x: torch.Tensor) -> torch.Tensor:
    """Launch ``_fp8_quantize_kernel``: the op's CUDA implementation.

    Device-agnostic, so tests run it on CPU tensors under ``TRITON_INTERPRET=1``. Expects checked inputs.
    """
    d = x.shape[-1]
    out = torch.empty((*x.shape[:-1], d + FP8_SCALE_BYTES), dtype=torch.uint8, device=x.device)
    rows = out.numel() // out.shape[-1]
    if rows == 0:
        return out
    x, sizes, x_strides, o_strides = _row_layout(x, out)
    block_r, block_d = _blocks(d)
    _fp8_quantize_kernel[(-(-rows // block_r),)](
        x,
        out,
        rows,
        d,
        sizes[1],
        sizes[2],
        *x_strides,
        x.stride(-1),
        *o_strides,
        out.stride(-1),
        FP8_MAX=FP8_E4M3_MAX,
        MAX_EXP=_MAX_EXP,
        MAX_MANTISSA_BITS=_MAX_MANTISSA_BITS,
        MIN_EXP=_MIN_EXP,
        NAN_BYTE=FP8_E4M3_NAN_BYTE,
        SCALE_NAN_BYTE=FP8_SCALE_NAN_BYTE,
        GRID_MIN_EXP_BITS=_E4M3_MIN_NORMAL_EXP_BITS,
        GRID_SHIFT_BITS=_E4M3_GRID_SHIFT_BITS,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )
    return out


def fp8_dequantize_triton(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Launch ``_fp8_dequantize_kernel``: the op's CUDA implementation (see ``fp8_quantize_triton``)."""
    d = payload.shape[-1] - FP8_SCALE_BYTES
    out = torch.empty((*payload.shape[:-1], d), dtype=dtype, device=payload.device)
    rows = out.numel() // d
    if rows == 0:
        return out
    payload, sizes, p_strides, o_strides = _row_layout(payload, out)
    block_r, block_d = _blocks(d)
    _fp8_dequantize_kernel[(-(-rows // block_r),)](
        payload,
        out,
        rows,
        d,
        sizes[1],
        sizes[2],
        *p_strides,
        payload.stride(-1),
        *o_strides,
        out.stride(-1),
        OUT_MAX=torch.finfo(dtype).max,
        SCALE_BIAS=FP8_SCALE_BIAS,
        SCALE_NAN_BYTE=FP8_SCALE_NAN_BYTE,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )
    return out


def _use_triton(t: torch.Tensor, d: int) -> bool:
    return (
        triton_available()
        and torch.version.hip is None  # ROCm GPUs have the fnuz fp8 variants: the reference there
        and torch.cuda.get_device_capability(t.device) >= _MIN_CUDA_CAPABILITY
        and d <= _MAX_BLOCK_D
    )


def _check_quantize(x: torch.Tensor) -> None:
    torch._check(
        x.dtype in FP8_INPUT_DTYPES,
        lambda: f"cachedit::fp8_quantize needs a fp32/bf16/fp16 tensor, got {x.dtype}",
    )
    torch._check(
        x.dim() >= 1 and x.shape[-1] >= 1,
        lambda: f"cachedit::fp8_quantize needs rows [..., D] with D >= 1, got shape {tuple(x.shape)}",
    )


def _check_dequantize(payload: torch.Tensor, dtype: torch.dtype) -> None:
    torch._check(
        payload.dtype == torch.uint8,
        lambda: f"cachedit::fp8_dequantize needs the uint8 payload of fp8_quantize, got {payload.dtype}",
    )
    torch._check(
        payload.dim() >= 1 and payload.shape[-1] > FP8_SCALE_BYTES,
        lambda: f"cachedit::fp8_dequantize needs a payload [..., D + {FP8_SCALE_BYTES}] with D >= 1, "
        f"got shape {tuple(payload.shape)}",
    )
    torch._check(
        dtype in FP8_INPUT_DTYPES,
        lambda: f"cachedit::fp8_dequantize dequantizes to fp32/bf16/fp16, got {dtype}",
    )


@torch.library.custom_op("cachedit::fp8_quantize", mutates_args=())
def fp8_quantize(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> uint8 payload ``[..., D + 1]``. CPU and other devices: the reference."""
    _check_quantize(x)
    return fp8_quantize_ref(x)


@fp8_quantize.register_kernel("cuda")
def _(x: torch.Tensor) -> torch.Tensor:
    _check_quantize(x)
    if not _use_triton(x, x.shape[-1]):
        return fp8_quantize_ref(x)
    return fp8_quantize_triton(x)


@fp8_quantize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    _check_quantize(x)
    return x.new_empty((*x.shape[:-1], x.shape[-1] + FP8_SCALE_BYTES), dtype=torch.uint8)


@torch.library.custom_op("cachedit::fp8_dequantize", mutates_args=())
def fp8_dequantize(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 payload ``[..., D + 1]`` -> ``[..., D]`` of ``dtype``. CPU and other devices: the reference."""
    _check_dequantize(payload, dtype)
    return fp8_dequantize_ref(payload, dtype)


@fp8_dequantize.register_kernel("cuda")
def _(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize(payload, dtype)
    if not _use_triton(payload, payload.shape[-1] - FP8_SCALE_BYTES):
        return fp8_dequantize_ref(payload, dtype)
    return fp8_dequantize_triton(payload, dtype)


@fp8_dequantize.register_fake
def _(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize(payload, dtype)
    return payload.new_empty((*payload.shape[:-1], payload.shape[-1] - FP8_SCALE_BYTES), dtype=dtype)
