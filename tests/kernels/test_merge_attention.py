"""cachedit::merge_attention: ring-attention merge of two partial results by their log-sum-exp."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_strategies import DTYPES, FAST, INTERPRETED, LAYOUTS, arrange, assert_within_one_step, shapes, tensors
from torch._subclasses.fake_tensor import FakeTensorMode

from cachedit.kernels import merge_attention_ref
from cachedit.kernels.merge_attention import merge_attention_triton

merge = torch.ops.cachedit.merge_attention
NEG_INF = float("-inf")


def partial_attention(q, k, v):
    """Attention of q over the keys k, v in float64: (out [B, H, S, D], lse [B, H, S])."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def lse_values(shape, seed: int, spread: float) -> torch.Tensor:
    """LSEs around 0: random, with about one row in 8 set to -inf (an empty or fully masked block)."""
    gen = torch.Generator().manual_seed(seed)
    lse = torch.randn(shape, generator=gen) * spread
    return torch.where(torch.randint(0, 8, shape, generator=gen) == 0, NEG_INF, lse)


@st.composite
def merge_inputs(draw):
    shape = draw(shapes(min_dims=1, max_dims=4, max_numel=2000, min_last=1))
    dtype = draw(st.sampled_from(DTYPES))
    out_a, out_b = draw(tensors(shape, dtype)), draw(tensors(shape, dtype))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.0, 1.0, 30.0, 300.0]))  # ties, near, far apart, one side negligible
    lse_a = arrange(lambda s: lse_values(s, seed, spread), shape[:-1], draw(st.sampled_from(LAYOUTS)), seed)
    lse_b = arrange(lambda s: lse_values(s, seed + 1, spread), shape[:-1], draw(st.sampled_from(LAYOUTS)), seed)
    # Whatever a fully masked softmax left in an empty side must not leak into the result.
    out_a = torch.where((lse_a == NEG_INF).unsqueeze(-1), float("nan"), out_a)
    return out_a, lse_a, out_b, lse_b


def assert_merged_close(got, want, inputs=None):
    """Within 1e-6 in fp32; for bf16/fp16 outputs within one step of the dtype (see below).

    With ``inputs`` the fp32 output's bound is 1e-6 of the magnitude of the two weighted terms, not of
    their sum: where w_a·out_a and w_b·out_b nearly cancel, a one-ulp difference in a weight is large
    against the small result (hypothesis found such a case at ±3e38).
    """
    (out, lse), (want_out, want_lse) = got, want
    assert (out.shape, out.dtype) == (want_out.shape, want_out.dtype)
    assert (lse.shape, lse.dtype) == (want_lse.shape, torch.float32)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(out.isnan(), want_out.isnan())
    big = torch.finfo(out.dtype).max  # at ±max, a one-ulp difference in exp may or may not overflow
    out, want_out = (t.nan_to_num(0.0, posinf=big, neginf=-big) for t in (out, want_out))
    if out.dtype == torch.float32 and inputs is None:
        torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    elif out.dtype == torch.float32:
        out_a, lse_a, out_b, lse_b = (t.double() for t in inputs)
        w_a = torch.sigmoid(lse_a - lse_b).nan_to_num(0.0).unsqueeze(-1)  # [..., 1]
        w_b = torch.sigmoid(lse_b - lse_a).nan_to_num(0.0).unsqueeze(-1)  # not 1 - w_a: that rounds to 0
        terms = w_a * out_a.abs().nan_to_num(0.0, posinf=big) + w_b * out_b.abs().nan_to_num(0.0, posinf=big)
        err = (out.double() - want_out.double()).abs()
        assert (err <= 1e-6 * terms + 1e-6).all(), f"max excess {(err - 1e-6 * terms - 1e-6).max().item():.3g}"
    else:
        # fp32 results 1e-6 apart can round to neighbouring bf16/fp16 values, and the interpreter truncates
        # fp32 -> bf16 where a GPU rounds to nearest even: one step of the output dtype at most.
        assert_within_one_step(out, want_out)


# ---- the op (CPU: the reference) ----------------------------------------------------------------------


def test_merging_two_key_halves_gives_full_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    full_out, full_lse = partial_attention(q, k, v)
    out_a, lse_a = partial_attention(q, k[..., :7, :], v[..., :7, :])
    out_b, lse_b = partial_attention(q, k[..., 7:, :], v[..., 7:, :])
    out, lse = merge(out_a.float(), lse_a.float(), out_b.float(), lse_b.float())
    # fp32 inputs against a float64 truth: a few fp32 roundings of O(1) values.
    torch.testing.assert_close(out.double(), full_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse.double(), full_lse, rtol=0, atol=1e-6)


@given(st.integers(0, 2**31 - 1), st.sampled_from([1.0, 30.0]))
@FAST
def test_matches_the_sigmoid_form_of_cache_semantics(seed, spread):
    gen = torch.Generator().manual_seed(seed)
    out_a, out_b = torch.randn(4, 5, 16, generator=gen), torch.randn(4, 5, 16, generator=gen)
    lse_a, lse_b = torch.randn(4, 5, generator=gen) * spread, torch.randn(4, 5, generator=gen) * spread
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    a, b, la, lb = out_a.double(), out_b.double(), lse_a.double(), lse_b.double()
    want_out = a - torch.sigmoid(lb - la).unsqueeze(-1) * (a - b)
    want_lse = la - torch.nn.functional.logsigmoid(la - lb)
    # Evaluated in float64: in fp32 the form cancels (lse_a - logsigmoid(...) loses ulp(|lse_a|)).
    torch.testing.assert_close(out.double(), want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_empty_side_returns_the_other_exactly(dtype):
    out_a, out_b = torch.randn(3, 8).to(dtype), torch.full((3, 8), float("nan"), dtype=dtype)
    lse_a, lse_b = torch.randn(3), torch.full((3,), NEG_INF)
    for args, want in [((out_a, lse_a, out_b, lse_b), (out_a, lse_a)), ((out_b, lse_b, out_a, lse_a), (out_a, lse_a))]:
        out, lse = merge(*args)
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


def test_two_empty_sides_give_zero_and_minus_inf():
    nan = torch.full((2, 4), float("nan"))
    out, lse = merge(nan, torch.full((2,), NEG_INF), nan, torch.full((2,), NEG_INF))
    assert torch.equal(out, torch.zeros(2, 4)) and torch.equal(lse, torch.full((2,), NEG_INF))


def test_a_nan_lse_gives_a_nan_row():
    out, lse = merge(torch.ones(2, 4), torch.tensor([0.0, float("nan")]), torch.ones(2, 4), torch.zeros(2))
    assert not out[0].isnan().any() and out[1].isnan().all() and lse.isnan().tolist() == [False, True]


def test_flash_layout_through_a_transposed_lse():
    gen = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(2, 9, 3, 16, generator=gen), torch.randn(2, 9, 3, 16, generator=gen)  # [B, S, H, D]
    lse_a, lse_b = torch.randn(2, 3, 9, generator=gen), torch.randn(2, 3, 9, generator=gen)  # [B, H, S]
    out, lse = merge(out_a, lse_a.transpose(1, 2), out_b, lse_b.transpose(1, 2))
    want_out, want_lse = merge(out_a, lse_a.transpose(1, 2).contiguous(), out_b, lse_b.transpose(1, 2).contiguous())
    # Not bitwise: torch's CPU sigmoid takes a vectorized or a scalar path by layout, an ulp apart.
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 5), torch.zeros(2)), "one shape"),
        ((torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 4).half(), torch.zeros(2)), "one fp32/bf16/fp16"),
        ((torch.zeros(2, 4), torch.zeros(4), torch.zeros(2, 4), torch.zeros(4)), r"out.shape\[:-1\]"),
        ((torch.zeros(2, 4), torch.zeros(2).half(), torch.zeros(2, 4), torch.zeros(2)), "float32 LSEs"),
        ((torch.zeros(2, 0), torch.zeros(2), torch.zeros(2, 0), torch.zeros(2)), "D >= 1"),
    ],
)
def test_rejects_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        merge(*args)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_shape_dtype_device(device, dtype):
    with FakeTensorMode():
        o = torch.empty(2, 24, 4096, 128, dtype=dtype, device=device)  # [B, H, S, D]
        lse = torch.empty(2, 24, 4096, device=device)
        out, merged_lse = merge(o, lse, o, lse)
    assert (out.shape, out.dtype, out.device.type) == (o.shape, dtype, device)
    assert (merged_lse.shape, merged_lse.dtype, merged_lse.device.type) == (lse.shape, torch.float32, device)


def test_opcheck():
    out_a, out_b = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    lse_a, lse_b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    torch.library.opcheck(merge.default, (out_a, lse_a, out_b, lse_b))
    torch.library.opcheck(merge.default, (out_a.bfloat16(), lse_a.mT.contiguous().mT, out_b.bfloat16(), lse_b))


# ---- the Triton kernel, interpreted on the CPU --------------------------------------------------------


@pytest.mark.interpreted
@given(merge_inputs())
@INTERPRETED
def test_kernel_matches_reference(inputs):
    assert_merged_close(merge_attention_triton(*inputs), merge_attention_ref(*inputs), inputs)


@pytest.mark.interpreted
def test_kernel_on_flash_layout_and_empty_sides():
    out_a, out_b = torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)  # [B, S, H, D]
    lse_a, lse_b = torch.randn(2, 3, 9), torch.randn(2, 3, 9)  # [B, H, S]
    lse_a[0, 1, :4] = NEG_INF
    lse_b[0, 1, 2:6] = NEG_INF
    out_a[0, :4, 1] = float("nan")
    lse_a[1, 2, 3] = float("nan")
    args = (out_a, lse_a.transpose(1, 2), out_b, lse_b.transpose(1, 2))
    got, want = merge_attention_triton(*args), merge_attention_ref(*args)
    assert_merged_close(got, want)
    assert torch.equal(got[0][0, :2, 1], out_b[0, :2, 1])  # a empty (and NaN): b exactly
    assert torch.equal(got[0][0, 2:4, 1], torch.zeros(2, 16))  # both sides empty
    assert torch.equal(got[0][0, 4:6, 1], out_a[0, 4:6, 1])  # b empty: a exactly
