"""attention_with_lse: the kernel table (Note [LSE attention kernels]) and what the CUDA ring path allocates.

There is no GPU here. The CUDA path is run on fake CUDA tensors (shapes only: the aten SDPA ops have
meta implementations) under a dispatch mode that records every tensor an op returns, so the largest
allocation of a Wan-sized Ring-2 forward is measured exactly, without compute. Numerics of the CPU path
are checked against the reference; the CUDA kernels' numerics need a GPU.
"""

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from kernel_strategies import FAST
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cachedit.kernels import LseKernel, attention_with_lse, attention_with_lse_ref, lse_kernel
from cachedit.runtime import parallel

# Wan 2.1 14B attention: 40 heads of 128; 18900 tokens is 9 x 30 x 70 latent patches. Ring-2: each rank
# holds half the queries and sees the keys in two blocks of half.
WAN_HEADS, WAN_HEAD_DIM, WAN_TOKENS = 40, 128, 18900


class LargestAllocation(TorchDispatchMode):
    """Records the bytes of every tensor storage an op returns; ``largest`` is (bytes, op, shape)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None, None)
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest[0]:
                self.largest = (t.untyped_storage().nbytes(), func.__name__, tuple(t.shape))
        return out


@pytest.fixture
def fake_ring_group():
    """A fake two-rank process group (point-to-point calls return at once): shapes only, no numerics."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized(), "a process group leaked from another test"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def _qkv(dtype, device, tokens=WAN_TOKENS // 2, heads=WAN_HEADS, d=WAN_HEAD_DIM, dv=None):
    q = torch.empty(1, heads, tokens, d, dtype=dtype, device=device)
    return q, torch.empty_like(q), torch.empty(1, heads, tokens, dv or d, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "dtype, d, dv, mask, expected",
    [
        (torch.bfloat16, 128, 128, None, LseKernel.FLASH),
        (torch.float16, 64, 64, None, LseKernel.FLASH),
        (torch.bfloat16, 128, 128, "key_padding", LseKernel.EFFICIENT),  # flash takes no mask
        (torch.float32, 128, 128, None, LseKernel.EFFICIENT),  # flash is 16-bit only
        (torch.bfloat16, 512, 512, None, LseKernel.EFFICIENT),  # above flash's 256
        (torch.bfloat16, 128, 64, None, LseKernel.EFFICIENT),  # flash needs D == Dv
        (torch.bfloat16, 72, 72, None, LseKernel.FLASH),
        (torch.bfloat16, 12, 12, None, LseKernel.MATH),  # not a multiple of 8: the documented fallback
        (torch.float64, 128, 128, None, LseKernel.MATH),
    ],
)
def test_cuda_kernel_is_chosen_by_dtype_head_dim_and_mask(dtype, d, dv, mask, expected):
    with FakeTensorMode():
        q, k, v = _qkv(dtype, "cuda", tokens=64, heads=2, d=d, dv=dv)
        m = torch.ones(1, 1, 1, 64, dtype=torch.bool, device="cuda") if mask else None
        assert lse_kernel(q, k, v, m) is expected
        out, lse = attention_with_lse(q, k, v, m, None)
    assert (out.shape, out.dtype, out.device.type) == ((1, 2, 64, dv), dtype, "cuda")
    assert (lse.shape, lse.dtype) == ((1, 2, 64), torch.float32)


def test_cpu_and_other_devices():
    q, k, v = _qkv(torch.float32, "cpu", tokens=4, heads=1, d=8)
    assert lse_kernel(q, k, v, None) is LseKernel.CPU_FLASH
    q, k, v = _qkv(torch.float32, "meta", tokens=4, heads=1, d=8)
    assert lse_kernel(q, k, v, None) is LseKernel.MATH


@pytest.mark.parametrize(
    "dtype, mask, kernel",
    [(torch.bfloat16, False, "flash"), (torch.float32, False, "efficient"), (torch.bfloat16, True, "efficient")],
)
def test_cuda_ring2_at_wan_size_allocates_nothing_quadratic(fake_ring_group, dtype, mask, kernel):
    s = WAN_TOKENS // 2  # per rank, and per key block
    with FakeTensorMode():
        q, k, v = _qkv(dtype, "cuda")
        m = torch.ones(1, 1, 1, WAN_TOKENS, dtype=torch.bool, device="cuda") if mask else None
        with LargestAllocation() as recorder:
            out = parallel.ring_attention_impl(q, k, v, m, None, fake_ring_group, [s, s], False)
    assert out.shape == q.shape
    assert f"_scaled_dot_product_{kernel}_attention.default" in recorder.ops, recorder.ops
    linear = WAN_HEADS * s * 2 * WAN_HEAD_DIM * 4  # the [K | V] send buffer in fp32: O(S)
    assert recorder.largest[0] <= linear, recorder.largest
    assert recorder.largest[0] < WAN_HEADS * s * s, f"O(S^2) allocation: {recorder.largest}"


def test_the_math_fallback_is_what_the_recorder_catches():
    """The negative control: the reference materialises the [H, S, S] fp32 scores of a block."""
    s = WAN_TOKENS // 2
    with FakeTensorMode():
        q, k, v = _qkv(torch.bfloat16, "cuda")
        with LargestAllocation() as recorder:
            attention_with_lse_ref(q, k, v, None, None)
    assert recorder.largest[0] >= WAN_HEADS * s * s * 4, recorder.largest


@FAST
@given(
    heads=st.integers(1, 3),
    sq=st.integers(1, 40),
    sk=st.integers(1, 40),
    d=st.sampled_from([4, 8, 16, 24]),
    mask=st.sampled_from([None, "bool", "float"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_path_matches_the_reference(heads, sq, sk, d, mask, seed):
    """fp32; 2e-6 covers the flash kernel's blocked summation order against one matmul (~3e-7 seen)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, d, generator=g) for n in (sq, sk, sk))
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, sq, sk, generator=g) < 0.8
        m[..., 0] = True  # every query row attends somewhere
    elif mask == "float":
        m = torch.randn(2, 1, 1, sk, generator=g)
    out, lse = attention_with_lse(q, k, v, m, None)
    want_out, want_lse = attention_with_lse_ref(q, k, v, m, None)
    torch.testing.assert_close(lse, want_lse, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out, want_out, rtol=2e-6, atol=2e-6)
