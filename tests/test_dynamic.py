"""Step caching under dynamic shapes: ``torch.compile(..., dynamic=True)`` and Dynamo's automatic dynamic
recompile after a second input size (Note [Sizes across parts]).

Tolerances: with ``inner="eager"`` every part runs the same aten ops as eager (symbolic sizes change no
arithmetic), so outputs are compared bitwise, and a dynamic compile with caching must make the very same
decisions and outputs as a static one. Under Inductor the parts are fused differently from eager: 1e-4
of the output's scale, as in test_backend.py (~1e-6 observed).
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cachedit
from cachedit.api import _graphs
from tests.models import MODELS, denoise, get

CACHING = sorted(n for n, s in MODELS.items() if s.single_graph_when_warm)
SYMBOLIC = ["flux", "sd3", "wan", "hunyuanvideo", "zimage"]  # keep symbolic sizes under dynamic=True (checked)
EXACT = dict(Fn=1, Bn=1, threshold=0.0, warmup_steps=0, inner="eager")
LOOSE = dict(Fn=1, Bn=0, threshold=0.9, warmup_steps=2, max_continuous_cached_steps=3, inner="eager")


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def dynamic(model, **options):
    return torch.compile(model, backend="cachedit", dynamic=True, options=options)


@pytest.mark.parametrize("name", CACHING)
def test_dynamic_split_with_nothing_cached_is_bitwise_eager(name):
    spec = get(name)
    model = spec.build(warm=True)
    reference, _ = denoise(model, spec, num_steps=3)
    result, _ = denoise(dynamic(model, **EXACT), spec, num_steps=3)
    assert torch.equal(result, reference)
    report = cachedit.explain(model)
    assert "split F1B1" in report and "not step-cached" not in report, report
    # Dynamo may still specialise every size (CogVideoX: all are checked against parameter shapes);
    # graphs that keep symbols are the point of Note [Sizes across parts]: Flux, Wan, SD3, ... do.
    stats = cachedit.stats(model)[-1]
    assert stats.branches["main"].computed_steps == [0, 1, 2]


@pytest.mark.parametrize("name", SYMBOLIC)
def test_dynamic_caching_decides_and_computes_as_static(name):
    """Within one resolution a dynamic compile caches the same steps, with the same output, as a static one,
    and each part receives the symbols its sizes mention (else it would not compile)."""
    spec = get(name)
    static_model, dynamic_model = spec.build(warm=True), spec.build(warm=True)
    expected, _ = denoise(torch.compile(static_model, backend="cachedit", options=LOOSE), spec, num_steps=12)
    result, _ = denoise(dynamic(dynamic_model, **LOOSE), spec, num_steps=12)
    static_stats, dynamic_stats = cachedit.stats(static_model)[-1], cachedit.stats(dynamic_model)[-1]
    assert static_stats.num_cached_steps > 0, cachedit.explain(static_model)
    assert dynamic_stats.branches["main"].cached_steps == static_stats.branches["main"].cached_steps
    assert torch.equal(result, expected)
    graph = _graphs(dynamic_model)[-1]
    assert graph.dynamic and f"dynamic sizes: {graph.dynamic}" in cachedit.explain(dynamic_model)
    top, inputs = graph.module(), _size_inputs(graph.module())
    for part in ("head", "middle", "tail"):
        gm = getattr(top, part).graph_module
        names = {n.name for n in gm.graph.nodes}
        for node in gm.graph.nodes:
            for symbol in _free_symbols(node.meta.get("example_value")):
                assert symbol not in inputs or inputs[symbol] in names, f"{part} uses {symbol} without receiving it"


def _free_symbols(value):
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return free_symbols(value) if isinstance(value, (torch.Tensor, torch.SymInt)) else set()


def _size_inputs(top):
    """Symbol -> the name of the graph input that is that plain symbol (``s0``, ...)."""
    found = {}
    for node in top.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
            found[value.node.expr] = node.name
    return found


def _flux_inputs(tokens: int, text: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, tokens, 16, generator=g), encoder_hidden_states=torch.randn(1, text, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.randn(tokens, 3, generator=g),
        txt_ids=torch.zeros(text, 3), guidance=torch.full((1,), 3.5), return_dict=False,
    )


def _denoise_flux(model, tokens: int, steps: int = 10) -> torch.Tensor:
    kwargs = _flux_inputs(tokens)
    x = kwargs["hidden_states"]
    with torch.no_grad():
        for t in torch.linspace(1.0, 1.0 / steps, steps).tolist():
            out = model(**{**kwargs, "hidden_states": x, "timestep": torch.tensor([t])})[0]
            x = x - out / steps
    return x


def test_automatic_dynamic_recompile_caches_every_resolution():
    """Static graph at the first size, one dynamic graph after the second; both split and cache, and a
    third size runs on the dynamic graph without another compile."""
    spec = get("flux")
    model = spec.build()
    fast = torch.compile(model, backend="cachedit", options=LOOSE)
    results = {tokens: _denoise_flux(fast, tokens) for tokens in (16, 24, 40)}
    graphs = _graphs(model)
    assert len(graphs) == 2 and all(g.cache is not None for g in graphs), cachedit.explain(model)
    assert graphs[0].dynamic is None and "hidden_states[1]=" in graphs[1].dynamic, cachedit.explain(model)
    records = cachedit.stats(model)
    assert len(records) == 3 and all(r.num_cached_steps > 0 for r in records), records
    for tokens, result in results.items():  # each resolution alone, on a static compile of its own
        torch._dynamo.reset()
        alone = spec.build()
        expected = _denoise_flux(torch.compile(alone, backend="cachedit", options=LOOSE), tokens)
        assert torch.equal(result, expected), tokens


def test_dynamic_inductor_parts_match_eager():
    spec = get("flux")
    model = spec.build(warm=True)
    reference, _ = denoise(model, spec, num_steps=2)
    result, _ = denoise(dynamic(model, Fn=1, Bn=1, threshold=0.0, warmup_steps=0), spec, num_steps=2)
    assert (result - reference).abs().max() <= 1e-4 * reference.abs().max()
    graph = _graphs(model)[-1]
    assert graph.layout is not None and graph.dynamic, cachedit.explain(model)
    assert sum(counters["graph_break"].values()) == 0
