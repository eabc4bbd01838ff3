"""cachedit::residual_diff: the op (CPU reference), its fake, and the Triton kernel under the interpreter."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_strategies import DTYPES, FAST, INTERPRETED, shapes, tensors
from torch._subclasses.fake_tensor import FakeTensorMode

from cachedit.kernels.residual_diff import residual_diff_triton

FLOAT32_MAX = torch.finfo(torch.float32).max


def assert_matches_float64(got: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor) -> None:
    """Within 1e-6 relative of the float64 sums; a sum beyond fp32's range must be inf (fp32 accumulation)."""
    p64, c64 = prev.double(), cur.double()
    want = torch.stack([(p64 - c64).abs().sum(), p64.abs().sum()])
    assert got.dtype == torch.float32 and got.shape == (2,)
    for g, w in zip(got.tolist(), want.tolist()):
        if w > FLOAT32_MAX * (1 + 2**-24):  # rounds to inf in fp32
            assert g == float("inf"), f"expected fp32 overflow to inf, got {g} (float64: {w})"
        else:
            assert abs(g - w) <= 1e-6 * w, f"got {g}, float64 gives {w}: relative error {abs(g - w) / w:.2e}"


@st.composite
def pairs(draw, max_numel=3000):
    shape = draw(shapes(min_dims=1, max_dims=4, max_numel=max_numel, min_last=0))
    dtype = draw(st.sampled_from(DTYPES))
    return draw(tensors(shape, dtype)), draw(tensors(shape, dtype))


# ---- the op (CPU: the reference) ----------------------------------------------------------------------


@given(pairs())
@FAST
def test_op_matches_float64(pair):
    prev, cur = pair
    assert_matches_float64(torch.ops.cachedit.residual_diff(prev, cur), prev, cur)


def test_op_propagates_inf_and_nan():
    prev = torch.tensor([1.0, float("inf"), 2.0])
    assert torch.ops.cachedit.residual_diff(prev, torch.zeros(3)).isinf().all()
    prev[1] = float("nan")
    assert torch.ops.cachedit.residual_diff(prev, torch.zeros(3)).isnan().all()


@pytest.mark.parametrize(
    "prev, cur, match",
    [
        (torch.zeros(3), torch.zeros(4), "equal shapes"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.float16), "one dtype"),
        (torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), "fp32/bf16/fp16"),
    ],
)
def test_op_rejects_bad_inputs(prev, cur, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.cachedit.residual_diff(prev, cur)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_shape_dtype_device(device, dtype):
    with FakeTensorMode():
        x = torch.empty(2, 77, 3072, dtype=dtype, device=device)
        out = torch.ops.cachedit.residual_diff(x, x)
    assert (out.shape, out.dtype, out.device.type) == ((2,), torch.float32, device)


def test_opcheck():
    prev, cur = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    torch.library.opcheck(torch.ops.cachedit.residual_diff.default, (prev, cur))
    torch.library.opcheck(torch.ops.cachedit.residual_diff.default, (prev.bfloat16().mT, cur.bfloat16().mT))


# ---- the Triton kernel, interpreted on the CPU --------------------------------------------------------


@pytest.mark.interpreted
@given(pairs())
@INTERPRETED
def test_kernel_matches_float64(pair):
    prev, cur = pair
    assert_matches_float64(residual_diff_triton(prev, cur), prev, cur)


@pytest.mark.interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_over_several_programs(dtype):
    # 3 programs of 8192 elements and a ragged tail, contiguous (fast path) and as views (strided path).
    prev, cur = torch.randn(5, 4099, dtype=dtype), torch.randn(5, 4099, dtype=dtype)
    assert_matches_float64(residual_diff_triton(prev, cur), prev, cur)
    assert_matches_float64(residual_diff_triton(prev.t(), cur.t()), prev.t(), cur.t())
    assert_matches_float64(residual_diff_triton(prev, cur.flip(0)), prev, cur.flip(0))


@pytest.mark.interpreted
def test_kernel_copies_views_with_more_than_four_dims():
    prev = torch.randn(2, 3, 4, 5, 6, 7)[:, ::2, :, ::2, :, ::2]  # 6 dims that do not collapse
    cur = torch.randn(2, 2, 4, 3, 6, 4)
    assert_matches_float64(residual_diff_triton(prev, cur), prev, cur)


@pytest.mark.interpreted
def test_kernel_propagates_inf_and_nan():
    prev = torch.tensor([1.0, float("inf"), 2.0])
    assert residual_diff_triton(prev, torch.zeros(3)).isinf().all()
    prev[1] = float("nan")
    assert residual_diff_triton(prev, torch.zeros(3)).isnan().all()
    empty = torch.zeros(0, 3)
    assert torch.equal(residual_diff_triton(empty, empty), torch.zeros(2))
