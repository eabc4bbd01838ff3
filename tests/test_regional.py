"""Regional compilation (diffusers' ``compile_repeated_blocks``): each block is compiled alone, uncached,
with the advice to compile the whole transformer given once (``inner="eager"``: outputs bitwise eager)."""

import logging

import torch
import torch._dynamo

import cachedit
from tests.models import denoise, get


def test_repeated_blocks_run_uncached_and_the_advice_is_given_once(caplog):
    from cachedit.backend import _advise_whole_model

    torch._dynamo.reset()
    _advise_whole_model.cache_clear()
    spec = get("flux")  # two repeated block classes: FluxTransformerBlock, FluxSingleTransformerBlock
    model = spec.build(warm=True)
    reference, _ = denoise(model, spec, num_steps=3)
    with caplog.at_level(logging.DEBUG, logger="cachedit"):
        model.compile_repeated_blocks(backend="cachedit", options={"inner": "eager", "Fn": 1})
        result, _ = denoise(model, spec, num_steps=3)
    assert torch.equal(result, reference)
    advice = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(advice) == 1 and "compile the whole transformer" in advice[0].getMessage(), advice
    report = cachedit.explain(model)
    for block in ("FluxTransformerBlock", "FluxSingleTransformerBlock"):
        assert f"not step-cached: one {block} block (regional compilation)" in report, report
    assert cachedit.stats(model) == []
    torch._dynamo.reset()


def test_a_whole_model_is_not_mistaken_for_a_block():
    torch._dynamo.reset()
    spec = get("sd3")
    model = spec.build()
    torch.compile(model, backend="cachedit", options={"inner": "eager", "Fn": 1})(**spec.inputs(500.0))
    report = cachedit.explain(model)
    torch._dynamo.reset()
    assert "regional" not in report and "split F1B0" in report, report
