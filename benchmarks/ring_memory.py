"""Largest single allocation of one Ring attention forward on the CUDA path, at Wan 2.1 14B sizes.

Runs ``cachedit.runtime.parallel.ring_attention_impl`` (the body of ``cachedit::ring_attention``) on
fake CUDA tensors (shapes only: the aten SDPA ops have meta implementations, so no GPU is needed) over a
fake process group, under a dispatch mode that records the storage of every tensor an op returns. The
"math" column is the same block computed by the documented fallback (``attention_with_lse_ref``), which
is what every non-CPU device ran before the LSE kernels (Note [LSE attention kernels]).

Wan 2.1 14B: 40 heads of 128. 18900 tokens = 9 x 30 x 70 latent patches; 32760 = 21 x 30 x 52 (480 x 832,
81 frames, patch 1 x 2 x 2). Run: ``python benchmarks/ring_memory.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import markdown_table, write_section  # noqa: E402
from cachedit.kernels import attention_with_lse_ref, lse_kernel  # noqa: E402
from cachedit.runtime import parallel  # noqa: E402

HEADS, HEAD_DIM = 40, 128


class LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = (0, "", ())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest[0]:
                self.largest = (t.untyped_storage().nbytes(), func.__name__.removesuffix(".default"), tuple(t.shape))
        return out


def measure(tokens: int, ring: int, dtype: torch.dtype, key_mask: bool) -> list[object]:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ring)
    try:
        lengths = [tokens // ring + (1 if r < tokens % ring else 0) for r in range(ring)]
        with FakeTensorMode():
            q = torch.empty(1, HEADS, lengths[0], HEAD_DIM, dtype=dtype, device="cuda")
            k, v = torch.empty_like(q), torch.empty_like(q)
            mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool, device="cuda") if key_mask else None
            kernel = lse_kernel(q, k, v, None if mask is None else mask.narrow(-1, 0, lengths[0]))
            with LargestAllocation() as ring_path:
                parallel.ring_attention_impl(q, k, v, mask, None, dist.group.WORLD.group_name, lengths, False)
            with LargestAllocation() as math_path:
                attention_with_lse_ref(q, k, v, None if mask is None else mask.narrow(-1, 0, lengths[0]), None)
    finally:
        dist.destroy_process_group()
    size, op, shape = ring_path.largest
    return [
        f"{tokens}", f"Ring-{ring}", str(dtype).removeprefix("torch."), "key padding" if key_mask else "none",
        kernel.value, f"{op} {list(shape)}", f"{size / 2**20:.0f} MiB", f"{math_path.largest[0] / 2**30:.1f} GiB",
    ]


def main() -> None:
    rows = [
        measure(tokens, ring, dtype, mask)
        for tokens in (18900, 32760)
        for ring in (2, 4)
        for dtype, mask in ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True))
    ]
    body = "\n".join(
        [
            "Largest single allocation of one Ring attention forward on one rank, CUDA path, at Wan 2.1 14B sizes "
            "(40 heads x 128), measured on fake CUDA tensors with a dispatch mode recording every op's output "
            "(module docstring of `benchmarks/ring_memory.py`). \"math\" is the largest allocation of the documented "
            "fallback for one key block (the [H, S/P, S/P] fp32 scores), which non-CPU devices ran before.",
            "",
            markdown_table(
                ["tokens", "mesh", "dtype", "mask", "kernel", "largest op output", "largest", "math fallback"], rows
            ),
            "",
            "The largest allocation of the fused path is the [K | V] block sent around the ring, O(S/P): nothing "
            "of O(S^2). GPU time and memory peaks of the kernels themselves are unmeasured: no GPU was lent to "
            "this run.",
        ]
    )
    write_section("Ring attention memory", body)
    print(body)


if __name__ == "__main__":
    main()
