"""torchao int8 weight-only weights (``quantize_(model, Int8WeightOnlyConfig())``) under cachedit.

The quantized linears are tensor subclasses; Dynamo still records ``nn_module_stack``, so the chain and
the split are found as for float weights.

Tolerance for the Inductor run against torchao + plain Inductor (no caching): the cached steps differ
from computed ones by design, so the bound is the caching error itself, measured exactly (inner eager,
same decisions) on the same quantized model, plus 1e-4 of the output's scale for Inductor's fp32
reordering (as in test_backend.py). Uncached, the split equals plain Inductor within that 1e-4.
"""

import warnings

import pytest
import torch
import torch._dynamo
from torchao.quantization import Int8WeightOnlyConfig, quantize_

import cachedit
from cachedit.api import _graphs
from tests.models import denoise, get

LOOSE = dict(Fn=1, Bn=0, threshold=0.9, warmup_steps=2, max_continuous_cached_steps=3)
STEPS = 12


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's notes about kernels this CPU build lacks
        yield
    torch._dynamo.reset()


def _quantized(spec):
    model = spec.build(warm=True)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def test_int8_weight_only_finds_the_chain_and_caches_within_the_caching_error():
    spec = get("sd3")
    exact_model = _quantized(spec)
    assert type(exact_model.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    uncached_eager, _ = denoise(exact_model, spec, num_steps=STEPS)
    cached_eager, _ = denoise(
        torch.compile(exact_model, backend="cachedit", options={**LOOSE, "inner": "eager"}), spec, num_steps=STEPS
    )
    decisions = cachedit.stats(exact_model)[-1].branches["main"].cached_steps
    assert decisions, cachedit.explain(exact_model)
    caching_error = (cached_eager - uncached_eager).abs().max()

    torch._dynamo.reset()
    model = _quantized(spec)
    plain, _ = denoise(torch.compile(model), spec, num_steps=STEPS)  # torchao + Inductor, no caching
    torch._dynamo.reset()
    result, _ = denoise(torch.compile(model, backend="cachedit", options=LOOSE), spec, num_steps=STEPS)
    graph = _graphs(model)[-1]
    assert graph.chain == "transformer_blocks[3]" and graph.layout is not None, cachedit.explain(model)
    assert cachedit.stats(model)[-1].branches["main"].cached_steps == decisions
    scale = plain.abs().max()
    assert (result - plain).abs().max() <= caching_error + 1e-4 * scale
    assert (plain - uncached_eager).abs().max() <= 1e-4 * scale  # the reordering allowance is enough
