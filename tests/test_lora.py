"""LoRA adapters (diffusers' PEFT integration) on a model compiled with cachedit.

Adapters are built with peft on the tiny Flux (rank 4 on the attention projections, random A and B so
they change the output). Outputs are compared bitwise with the same model run eagerly with the same
adapters: ``inner="eager"`` and threshold 0 run the very same aten ops. The recompile counts are what
Dynamo does on torch 2.13 (README, "Using cachedit with LoRA"): an adapter set, a scale or the LoRA
layers' structure that Dynamo has not seen is a guard failure and one new graph; one it has seen reuses
its graph; hotswapping weights into a compiled adapter recompiles nothing.
"""

import warnings

import pytest
import torch
import torch._dynamo
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch._dynamo.utils import counters

import cachedit
from tests.models import denoise, get

EXACT = dict(Fn=1, Bn=1, threshold=0.0, warmup_steps=0, inner="eager")
LOOSE = dict(Fn=1, Bn=0, threshold=0.9, warmup_steps=2, max_continuous_cached_steps=3, inner="eager")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about adapter names and torchao's kernels
        yield
    torch._dynamo.reset()


def _add_adapter(model, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config, adapter_name=name)


def _adapter_state(name: str, seed: int) -> dict:
    """A diffusers-format LoRA state dict, as ``load_lora_adapter`` takes it."""
    source = get("flux").build()
    _add_adapter(source, name, seed)
    return get_peft_model_state_dict(source, adapter_name=name)


def _step(fast, model, spec) -> int:
    """Run 2 steps compiled and eagerly; assert bitwise equality; return the new Dynamo graphs."""
    before = counters["stats"]["unique_graphs"]
    result, _ = denoise(fast, spec, num_steps=2)
    reference, _ = denoise(model, spec, num_steps=2)
    assert torch.equal(result, reference)
    return counters["stats"]["unique_graphs"] - before


def test_load_switch_scale_unload_equal_eager_with_counted_recompiles():
    spec = get("flux")
    model = spec.build(warm=True)
    _add_adapter(model, "a", 1)
    _add_adapter(model, "b", 2)
    model.set_adapters(["a"], [1.0])
    fast = torch.compile(model, backend="cachedit", options=EXACT)
    recompiles = {"first compile": _step(fast, model, spec)}
    for what, change in [
        ("switch to b", lambda: model.set_adapters(["b"], [1.0])),
        ("switch back to a", lambda: model.set_adapters(["a"], [1.0])),
        ("scale a to 0.5", lambda: model.set_adapters(["a"], [0.5])),
        ("scale a to 0.7", lambda: model.set_adapters(["a"], [0.7])),
        ("load c", lambda: model.load_lora_adapter(_adapter_state("c", 3), adapter_name="c", prefix=None)),
        ("unload every adapter", lambda: model.delete_adapters(["a", "b", "c"])),
    ]:
        change()
        recompiles[what] = _step(fast, model, spec)
    assert recompiles == {
        "first compile": 1,
        "switch to b": 1,  # active_adapter is guarded
        "switch back to a": 0,  # that graph exists
        "scale a to 0.5": 1,  # the scaling float changed: Dynamo recompiles it as a dynamic input
        "scale a to 0.7": 0,  # ... which then serves any scale
        "load c": 1,  # a new adapter is active after loading (diffusers sets it)
        "unload every adapter": 1,  # the LoRA layers are gone: a new module structure
    }, recompiles
    assert all(g.layout is not None for g in cachedit.api._graphs(model)), cachedit.explain(model)


def test_hotswap_recompiles_nothing_and_still_caches():
    spec = get("flux")
    states = {name: _adapter_state(name, seed) for name, seed in (("a", 1), ("b", 2))}
    model = spec.build(warm=True)
    model.enable_lora_hotswap(target_rank=4)
    model.load_lora_adapter(states["a"], adapter_name="lora", prefix=None)
    fast = torch.compile(model, backend="cachedit", options=EXACT)
    assert _step(fast, model, spec) == 1
    for name in ("b", "a", "b"):
        model.load_lora_adapter(states[name], adapter_name="lora", prefix=None, hotswap=True)
        assert _step(fast, model, spec) == 0, f"hotswapping {name} recompiled"

    torch._dynamo.reset()
    counters.clear()
    cached_model = spec.build(warm=True)
    cached_model.enable_lora_hotswap(target_rank=4)
    cached_model.load_lora_adapter(states["a"], adapter_name="lora", prefix=None)
    cached = torch.compile(cached_model, backend="cachedit", options=LOOSE)
    denoise(cached, spec, num_steps=12)
    cached_model.load_lora_adapter(states["b"], adapter_name="lora", prefix=None, hotswap=True)
    denoise(cached, spec, num_steps=12)
    records = cachedit.stats(cached_model)
    assert len(records) == 2 and all(r.num_cached_steps > 0 for r in records), records
    assert counters["stats"]["unique_graphs"] == 1
