"""The ops inside torch.compile (Inductor, CPU): traced as custom ops into the generated code, no graph break."""

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

import cachedit.kernels  # noqa: F401  registers torch.ops.cachedit.*


def step(prev, cur, q, out_a, lse_a, out_b, lse_b):
    """A gate check, an FP8 round trip and a ring merge, with ordinary ops around each."""
    sums = torch.ops.cachedit.residual_diff(prev, cur * 2)
    diff = sums[0] / sums[1]
    payload = torch.ops.cachedit.fp8_quantize(q + 1)
    q2 = torch.ops.cachedit.fp8_dequantize(payload, torch.bfloat16)
    out, lse = torch.ops.cachedit.merge_attention(out_a, lse_a, out_b, lse_b)
    return diff, q2.float() * 2, out + 1, lse


def test_ops_appear_in_inductor_code_without_graph_break():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, 17, 64, generator=gen),  # prev   [B, S, C]
        torch.randn(2, 17, 64, generator=gen),  # cur
        torch.randn(2, 17, 3, 64, generator=gen).bfloat16(),  # q [B, S, H, D]
        torch.randn(2, 3, 17, 64, generator=gen),  # out_a  [B, H, S, D]
        torch.randn(2, 3, 17, generator=gen),  # lse_a  [B, H, S]
        torch.randn(2, 3, 17, 64, generator=gen),  # out_b
        torch.randn(2, 3, 17, generator=gen),  # lse_b
    )
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    # The code must be generated now, not loaded: Inductor's cache key leaves out custom ops' fake output
    # metadata (pytorch/pytorch#160472), so code cached before an op's format changed would be reused.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got, codes = run_and_get_code(compiled, *args)
    code = "\n".join(codes)
    assert counter.frame_count == 1, "one graph: no graph break"
    for op in ("residual_diff", "fp8_quantize", "fp8_dequantize", "merge_attention"):
        assert f"torch.ops.cachedit.{op}.default" in code, f"cachedit::{op} is not in Inductor's code"
    for g, w in zip(got, step(*args)):
        # The custom ops are opaque to Inductor; only the surrounding pointwise ops may be fused.
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
