"""Hypothesis strategies shared by the kernel tests: shapes, dtypes, special values and memory layouts."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VALUE_KINDS = ("gaussian", "zeros", "max", "tiny", "mixed")
LAYOUTS = ("contiguous", "permuted", "strided", "offset", "broadcast")

# Few examples and no deadline: the suite has ~3 minutes on 2 cores, and the interpreter is slow.
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
INTERPRETED = settings(max_examples=75, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes(draw, min_dims: int = 1, max_dims: int = 4, max_numel: int = 3000, min_last: int = 1) -> tuple[int, ...]:
    """Odd sizes, ones, head-dim-like sizes, sometimes an empty first dim; at most ``max_numel`` elements."""
    ndim = draw(st.integers(min_dims, max_dims))
    sizes: list[int] = []
    budget = max_numel
    for i in range(ndim):
        low = min_last if i == ndim - 1 else 1
        cap = max(low, min(budget, 130))
        sizes_here = st.one_of(
            st.integers(low, max(low, min(cap, 9))),
            st.sampled_from([s for s in (1, 33, 64, 127) if low <= s <= cap] or [low]),
        )
        if i == 0 and (ndim > 1 or min_last == 0):
            sizes_here = st.one_of(sizes_here, st.just(0))
        size = draw(sizes_here)
        sizes.append(size)
        budget = max(1, budget // max(size, 1))
    return tuple(sizes)


def fill(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """Contiguous values of one kind: Gaussian at a random scale, zeros, ±max, ±tiny, or a mix."""
    gen = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    signs = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "max":
        return (signs * finfo.max).to(dtype)
    if kind == "tiny":
        return (signs * finfo.tiny).to(dtype)
    scale = 10.0 ** torch.randint(-3, 4, (), generator=gen).item()
    x = torch.randn(shape, generator=gen) * scale
    if kind == "mixed":
        pick = torch.randint(0, 8, shape, generator=gen)
        x = torch.where(pick == 0, 0.0, x)
        x = torch.where(pick == 1, -0.0, x)
        x = torch.where(pick == 2, signs * finfo.max, x)
        x = torch.where(pick == 3, signs * finfo.tiny, x)
    return x.to(dtype)


def arrange(
    values_for: Callable[[tuple[int, ...]], torch.Tensor], shape: tuple[int, ...], layout: str, perm_seed: int
) -> torch.Tensor:
    """A tensor of ``shape`` in the given memory layout; ``values_for(shape)`` makes contiguous storage."""
    if layout == "contiguous" or len(shape) == 0:
        return values_for(shape)
    if layout == "permuted":
        perm = torch.randperm(len(shape), generator=torch.Generator().manual_seed(perm_seed)).tolist()
        base = values_for(tuple(shape[p] for p in perm))
        return base.permute([perm.index(d) for d in range(len(shape))])
    if layout == "strided":
        base = values_for(tuple(2 * s for s in shape))
        return base[tuple(slice(None, None, 2) for _ in shape)]
    if layout == "broadcast":  # stride 0 in the first dim
        return values_for((1, *shape[1:])).expand(shape)
    assert layout == "offset", f"unknown layout {layout!r}"
    base = values_for((shape[0] + 1, *shape[1:]))
    return base[1:]


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype, kind: str | None = None) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` with drawn values and layout."""
    kind = kind or draw(st.sampled_from(VALUE_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(LAYOUTS))
    t = arrange(lambda s: fill(s, dtype, kind, seed), shape, layout, seed)
    assert t.shape == shape, f"arrange made {tuple(t.shape)}, wanted {shape}"
    return t


def ordinal(t: torch.Tensor) -> torch.Tensor:
    """Floats (or float8 payload bytes) as positions on the number line: neighbours differ by 1, ±0 give 0."""
    signed = {1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    bits = t.contiguous().view(signed).to(torch.int64)
    magnitude = bits & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def assert_within_one_step(got: torch.Tensor, want: torch.Tensor) -> None:
    """Finite bf16/fp16 tensors at most one representable step apart.

    In bf16, values that are fp32 subnormals on both sides are exempt: the interpreter converts those wrongly
    (fp32 1e-39 -> bf16 4.2e-39, 5.9e-39 -> 0 in triton 3.9); a GPU converts them exactly.
    """
    ok = (ordinal(got) - ordinal(want)).abs() <= 1
    if got.dtype == torch.bfloat16:
        tiny = torch.finfo(torch.float32).tiny
        ok |= (got.float().abs() < tiny) & (want.float().abs() < tiny)
    assert ok.all(), f"{(~ok).sum().item()} values more than one step apart, e.g. {got[~ok][:4]} vs {want[~ok][:4]}"


def with_nonfinite(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` with about one element in 50 replaced by +inf, -inf or NaN (in place for views)."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, 150, x.shape, generator=gen)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=x.dtype)
    x[pick < 3] = specials[pick[pick < 3]]
    return x


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``y`` as an approximation of ``x``, in dB."""
    x64, y64 = x.double(), y.double()
    return 10 * math.log10(x64.square().sum().item() / (x64 - y64).square().sum().item())
