"""The sharding plan and the rewrite's guard rail, in one process (no collectives run: shapes only)."""

from __future__ import annotations

import pytest
import torch

from cachedit.fxpasses import attention as attention_pass
from cachedit.fxpasses.attention import rewrite_attention
from cachedit.fxpasses.block_chain import find_block_chain
from cachedit.fxpasses.shard_plan import ShardDeclined, TokenDim, plan_sequence_sharding
from cachedit.runtime.parallel import Mesh, gather_tokens, rank_spans, shard_tokens
from cachedit.sharding import local_length
from tests import models

_GRAPHS: dict[str, torch.fx.GraphModule] = {}


def _graph(name: str) -> torch.fx.GraphModule:
    """The Dynamo graph of a tiny model (captured once per test session)."""
    if name not in _GRAPHS:
        spec = models.get(name)
        captured = []

        def capture(gm, example_inputs):
            captured.append(gm)
            return gm.forward

        with torch.no_grad():
            torch.compile(spec.build(), backend=capture, fullgraph=True)(**spec.inputs(spec.timesteps(4)[0]))
        torch._dynamo.reset()
        _GRAPHS[name] = captured[0]
    return _GRAPHS[name]


def _plan(name):
    gm = _graph(name)
    chain = find_block_chain(gm)
    return gm, chain, plan_sequence_sharding(gm, chain)


def _seeds(plan):
    return {t.layout for _, t in plan.seeds}


# (model, expected seed layouts, attentions with whole K/V): the facts the plan must derive unaided
EXPECTED = [
    ("flux", {(16,), (7,), (7, 16)}, 0),  # both streams; one rotary table refined to [text | image]
    ("sd3", {(16,), (7,)}, 0),
    ("qwenimage", {(16,), (7,)}, 0),
    ("wan", {(32,)}, 3),  # cross-attention to the text context keeps K/V whole
    ("hunyuanvideo", {(32,), (7,)}, 0),
    ("cogvideox", {(32,), (7,)}, 0),
    ("ltx", {(32,)}, 3),
    ("pixart", {(16,)}, 3),
    ("cogview4", {(16,), (7,)}, 0),  # rotary written in place into the image slice of [text | image]
]


@pytest.mark.parametrize("name,layouts,cross", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_plan_finds_streams_and_cross_attention(name, layouts, cross):
    gm, chain, plan = _plan(name)
    assert _seeds(plan) == layouts
    assert sum(a.kv is None for a in plan.attentions) == cross
    spec = models.get(name)
    assert [t.size for _, t in plan.gathers] == [spec.image_tokens]  # only the image stream leaves the chain
    assert len(list(gm.graph.nodes)) == len(list(_graph(name).graph.nodes))  # an analysis: no mutation


@pytest.mark.parametrize("name", ["flux", "wan", "cogview4"])
@pytest.mark.parametrize("world,rank", [(2, 1), (4, 3)])
def test_rewrite_passes_the_guard_rail_with_local_shapes(name, world, rank):
    gm, chain, plan = _plan(name)
    before = {n.name: n.meta["example_value"] for n in gm.graph.nodes if isinstance(n.meta.get("example_value"), torch.Tensor)}
    out = rewrite_attention(gm, chain, plan, Mesh(world, rank, world, 1, False, "0", "0", "0"))
    calls = [n for n in out.graph.nodes if n.op == "call_function"]
    assert sum(n.target is Mesh.attention for n in calls) == len(plan.attentions)
    assert sum(n.target is Mesh.shard_tokens for n in calls) == len(plan.seeds)
    assert sum(n.target is Mesh.gather_tokens for n in calls) == len(plan.gathers)
    assert not any("scaled_dot_product" in str(n.target) for n in calls)
    # the gathered output has its global shape again; chain values hold this rank's tokens
    (output,) = out.graph.find_nodes(op="output")
    for name_, t in plan.gathers:
        node = next(n for n in out.graph.nodes if n.name == name_)
        assert node.meta["example_value"].shape[t.dim] == sum(t.local(world, rank))
    assert {n.name: n.meta["example_value"].shape for n in gm.graph.nodes if n.name in before} == {
        k: v.shape for k, v in before.items()
    }, "the input graph must be left untouched"


def test_guard_rail_catches_a_missed_literal(monkeypatch):
    """Negative control: skip one reshape's rewrite and the plan must be declined, not run wrong."""
    gm, chain, plan = _plan("flux")
    real = attention_pass._localise
    skipped = []

    def skip_first_reshape(node, info, global_shapes, mesh):
        if node.target == "reshape" and not skipped:
            skipped.append(node.name)
            return
        real(node, info, global_shapes, mesh)

    monkeypatch.setattr(attention_pass, "_localise", skip_first_reshape)
    with pytest.raises(ShardDeclined, match="guard rail"):
        rewrite_attention(gm, chain, plan, Mesh(2, 0, 2, 1, False, "0", "0", "0"))
    assert skipped


def test_token_reduction_declines():
    """An op that reduces over tokens (a global pooling inside a block) has no sharded form."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)

        def forward(self, x):
            q = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)  # [B, H, S, D]
            o = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)
            return x + o + x.mean(dim=1, keepdim=True)  # mixes all tokens

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x * 2

    captured = []
    torch.compile(Model(), backend=lambda gm, ex: captured.append(gm) or gm.forward, fullgraph=True)(torch.randn(1, 6, 8))
    torch._dynamo.reset()
    gm = captured[0]
    with pytest.raises(ShardDeclined, match="reduces over the token dim"):
        plan_sequence_sharding(gm, find_block_chain(gm))


@pytest.mark.parametrize("layout,world", [((7, 16), 2), ((7, 16), 4), ((5,), 4), ((3, 1), 4)])
def test_shard_then_gather_spans_cover_every_token_once(layout, world):
    """``tensor_split`` sizes per segment; the gather order (segment-major) restores the global order."""
    positions = sorted(p for r in range(world) for s, n in rank_spans(layout, world, r) for p in range(s, s + n))
    assert positions == list(range(sum(layout)))
    x = torch.arange(sum(layout)).float().view(1, -1, 1)
    shards = [shard_tokens(x, 1, layout, world, r) for r in range(world)]
    assert [s.shape[1] for s in shards] == [sum(local_length(n, world, r) for n in layout) for r in range(world)]
    assert TokenDim(1, layout).local(world, 0) == tuple(local_length(n, world, 0) for n in layout)
    assert gather_tokens is Mesh.gather_tokens  # numerics of the gather run in tests/distributed
