"""Apply a ``ShardPlan``: shard the chain's inputs, localise token-axis literals, swap SDPA for parallel attention.

Note [Attention rewrite]
~~~~~~~~~~~~~~~~~~~~~~~~
Background: Dynamo (static shapes) records token counts as literals: the reshapes that restore
``[B, S, H·D]`` after attention, the split of a joint attention output into text and image, the slices
of single-stream blocks. After sharding, each rank holds its own local counts, so each rank rewrites
its own copy of the graph (each rank compiles its own graph anyway).

Algorithm (on a copy; ``gm`` is never modified):
  1. Before block 0, ``shard_tokens`` each seed; only chain users see the shard (the prologue and the
     epilogue keep the full value).
  2. After the last block, ``gather_tokens`` each value the epilogue reads.
  3. Localise literals on the token path: ``view``/``reshape``/``unflatten`` become a ``reshape`` to the
     local shape, ``expand`` gets local sizes, ``split``/``chunk`` on the token dim become
     ``split_with_sizes`` with local segment sizes, token slices get local segment bounds.
  4. Each SDPA becomes ``mesh.attention(q, k, v, mask, scale, q_layout, kv_layout, mesh.args)``.
  5. Guard rail: fake-tensor shape propagation of the rewritten graph; every chain node must have its
     global shape with the token dim at the local size (other nodes: unchanged). A mismatch declines
     the whole rewrite (``ShardDeclined``), so the model runs replicated rather than wrong. The
     propagated values become the nodes' ``example_value``, which the step-cache split reads.

Before / after (printed, rank 0 of 2, Flux-like joint attention of 7 text + 16 image tokens):
    img = linear(x); ...; q = cat([tq, iq], 1); r = reshape(q, 1, 23, 2, -1, 2); o = sdpa(q, k, v)
    hs = split_with_sizes(o, [7, 16], 1); out = proj(hs[1])
  ->
    img = linear(x); img_s = shard_tokens(img, 1, (16,), 2, 0); ...; r = reshape(q, 1, 12, 2, 8, 2)
    o = context_parallel_attention(q, k, v, None, None, (7, 16), (7, 16), (2, 0, 2, 1, ...))
    hs = split_with_sizes(o, [4, 8], 1); h = gather_tokens(hs[1], 1, (16,), 2, "0"); out = proj(h)
"""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from cachedit.fxpasses.block_chain import BlockChain
from cachedit.fxpasses.shard_plan import (
    ShardDeclined,
    ShardPlan,
    TokenDim,
    is_sdpa,
    op_name,
    sdpa_args,
)
from cachedit.sharding import local_length


def _local(t: TokenDim, mesh) -> int:
    return sum(t.local(mesh.world, mesh.rank))


def _local_shape(shape, t: TokenDim | None, mesh) -> tuple[int, ...]:
    shape = list(shape)
    if t is not None:
        shape[t.dim] = _local(t, mesh)
    return tuple(shape)


def _local_bound(layout: tuple[int, ...], bound: int, mesh) -> int:
    """A segment boundary in global positions -> the same boundary in this rank's local positions."""
    acc = local = 0
    for n in layout:
        if acc == bound:
            return local
        acc += n
        local += local_length(n, mesh.world, mesh.rank)
    assert acc == bound, f"bound {bound} is not a boundary of layout {layout}"
    return local


def rewrite_attention(gm: torch.fx.GraphModule, chain: BlockChain, plan: ShardPlan, mesh) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` whose chain runs on this rank's tokens (Note [Attention rewrite]).

    ``mesh`` gives ``world``, ``rank``, ``args`` and the functions ``shard_tokens``, ``gather_tokens``
    and ``attention`` to insert (``cachedit.runtime.parallel.Mesh``).
    Invariant: the output (after the gathers) equals ``gm``'s; raises ``ShardDeclined`` instead of
    returning a graph whose shapes disagree with the plan.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    old = list(gm.graph.nodes)
    region = {env[n] for n in old[chain.blocks[0].first : chain.blocks[-1].last + 1]}
    first = env[old[chain.blocks[0].first]]
    last = env[old[chain.blocks[-1].last]]
    global_shapes = {env[n]: n.meta.get("example_value") for n in old if n in env}

    for name, t in plan.seeds:  # 1. shard
        seed = by_name[name]
        with graph.inserting_before(first):
            shard = graph.call_function(mesh.shard_tokens, (seed, t.dim, t.layout, mesh.world, mesh.rank))
        seed.replace_all_uses_with(shard, delete_user_cb=lambda user: user in region)
    anchor = last
    for name, t in plan.gathers:  # 2. gather
        value = by_name[name]
        with graph.inserting_after(anchor):
            gather = graph.call_function(mesh.gather_tokens, (value, t.dim, t.layout, mesh.world, mesh.world_group))
        anchor = gather
        value.replace_all_uses_with(gather, delete_user_cb=lambda user: user not in region and user is not gather)

    def info(a):
        return plan.tokens.get(a.name) if isinstance(a, torch.fx.Node) else None

    attentions = {a.node: a for a in plan.attentions}
    for node in list(region):  # 3. literals, 4. attention
        if node.name in attentions:
            _swap_attention(graph, node, attentions[node.name], mesh)
        elif info(node) is not None or any(info(a) is not None for a in node.all_input_nodes):
            _localise(node, info, global_shapes, mesh)

    graph.lint()
    result = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    result.meta = dict(getattr(gm, "meta", {}))
    _guard_rail(result, region, info, global_shapes, mesh)
    result.recompile()
    return result


def _swap_attention(graph: torch.fx.Graph, node: torch.fx.Node, site, mesh) -> None:
    args = sdpa_args(node)
    with graph.inserting_before(node):
        call = graph.call_function(
            mesh.attention,
            (
                args["query"],
                args["key"],
                args["value"],
                args["attn_mask"],
                args["scale"],
                site.q.layout,
                site.kv.layout if site.kv is not None else None,
                mesh.args,
            ),
        )
    call.meta = dict(node.meta)  # keeps nn_module_stack: the call stays in its block
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _localise(node: torch.fx.Node, info, global_shapes, mesh) -> None:
    """Rewrite the token-axis literals of one chain node (Note [Attention rewrite], step 3)."""
    name = op_name(node)
    t = info(node)
    src = node.args[0] if node.args else None
    if name in ("view", "reshape", "unflatten") and isinstance(t, TokenDim):
        shape = _local_shape(global_shapes[node].shape, t, mesh)
        node.op, node.target = "call_method", "reshape"
        node.args, node.kwargs = (src, *shape), {}
    elif name == "expand" and isinstance(t, TokenDim):
        node.args, node.kwargs = (src, *_local_shape(global_shapes[node].shape, t, mesh)), {}
    elif name in ("split", "split_with_sizes", "chunk") and isinstance(t, tuple):
        st = info(src)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = dim + len(global_shapes[src].shape) if dim < 0 else dim
        if st is not None and dim == st.dim:
            sizes = [_local(x, mesh) for x in t]
            node.op, node.target = "call_method", "split_with_sizes"
            node.args, node.kwargs = (src, sizes), {"dim": dim}
    elif name == "getitem" and isinstance(info(src), TokenDim):
        node.args = (src, _local_index(node.args[1], info(src), global_shapes[src].shape, mesh))
    elif name == "setitem" and isinstance(info(src), TokenDim):
        node.args = (src, _local_index(node.args[1], info(src), global_shapes[src].shape, mesh), node.args[2])


def _local_index(index, t: TokenDim, shape, mesh):
    """``index`` with a slice of the token dim moved to local segment bounds."""
    items = list(index) if isinstance(index, tuple) else [index]
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    dim, out = 0, []
    for i in items:
        if i is Ellipsis:
            span = len(shape) - n_real
            if dim <= t.dim < dim + span:
                pass  # the token dim sits under the ellipsis: a full slice, nothing to localise
            dim += span
            out.append(i)
            continue
        if i is None:
            out.append(i)
            continue
        if dim == t.dim and isinstance(i, slice):
            start, stop, _ = i.indices(shape[dim])
            i = slice(_local_bound(t.layout, start, mesh), _local_bound(t.layout, stop, mesh), None)
        out.append(i)
        dim += 1
    return tuple(out) if isinstance(index, tuple) else out[0]


def _fresh(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    return value


def _guard_rail(gm: torch.fx.GraphModule, region, info, global_shapes, mesh) -> None:
    """Fake-propagate ``gm``; every chain node must have its planned local shape (Note step 5)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode()  # fresh: Dynamo's inputs may come from more than one fake mode
    with mode:
        values = [_fresh(n.meta.get("example_value")) for n in placeholders]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*values)
    except Exception as err:  # a literal we missed: the rewritten graph does not even trace
        raise ShardDeclined(f"guard rail: the rewritten graph fails shape propagation ({type(err).__name__}: {err})") from None
    for node in gm.graph.nodes:
        if node not in global_shapes:
            continue
        new, before = node.meta.get("val"), global_shapes[node]
        t = info(node)
        if isinstance(before, torch.Tensor):
            expected = _local_shape(before.shape, t if node in region and isinstance(t, TokenDim) else None, mesh)
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != expected:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ShardDeclined(f"guard rail: {node.name} ({op_name(node)}) has shape {got}, expected {expected}")
        elif isinstance(before, (tuple, list)) and isinstance(t, tuple) and node in region:
            for k, (b, x) in enumerate(zip(before, t)):
                expected = _local_shape(b.shape, x, mesh)
                if tuple(new[k].shape) != expected:
                    raise ShardDeclined(f"guard rail: {node.name}[{k}] has shape {tuple(new[k].shape)}, expected {expected}")
    for node in gm.graph.nodes:  # Dynamo's own metadata key; placeholders keep Dynamo's values
        value = node.meta.pop("val", None)
        if value is not None and node.op != "placeholder":
            node.meta["example_value"] = value


__all__ = ["rewrite_attention", "is_sdpa"]
