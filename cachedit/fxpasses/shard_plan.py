"""Derive a sequence-sharding plan for the block chain of a Dynamo graph (an analysis: no mutation).

Note [Sequence sharding plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Background: under context parallelism each of P ranks holds a share of the tokens. Only the block
chain is sharded: the prologue (embeddings, rotary tables) and the epilogue (final norm, projection,
unpatchify) run replicated at full size, so their shape literals never change. We shard the chain's
token-carrying inputs where they enter block 0 and gather the chain's token-carrying outputs where
they leave the last block. Dynamo bakes sizes into the graph as literals, so the plan also records,
for every node on the token path, where its token dim is: the rewrite (``rewrite_attention``) turns
token-axis literals into local sizes from that.

Algorithm:
  1. Seeds: from each attention's query (dim 2 of ``[B, H, S, D]``) walk back through the chain,
     inverting the forward rules below, to the values defined before block 0 (streams, rotary
     tables, per-token side inputs). Keys and values are not walked: K/V that derive from no seed
     (cross-attention to a text context) stay whole on every rank.
  2. Segments: a token dim may be a concatenation (joint attention ``[text | image]``). Every seed is
     one segment; ``cat`` on the token dim concatenates layouts and a split or slice there must fall
     on a segment boundary. Each segment is sharded on its own (``tensor_split``: the first ranks hold
     one token more), so a split back into text and image stays a local split with local sizes. A
     seed that meets a finer layout of the same length in an elementwise op (Flux: one rotary table
     for ``[text | image]``) is refined to that layout and the propagation restarts.
  3. Forward rules: a table from op to where the token dim goes (elementwise with broadcasting,
     linear/norms on the first argument, permutes, reshapes with the token dim as the outer factor of
     one output dim, getitem, split/chunk/unbind, cat/stack, SDPA, setitem). An op with no rule on the
     token path declines the plan, and so does an op that mixes a sharded operand with an unsharded
     one of full token length (that would silently mix tokens).
  4. Gathers: token-path values of the chain used after it.

Debugging: ``cachedit.explain(model)`` prints the plan or the reason it was declined; tests assert on
``ShardPlan.describe()``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from cachedit.fxpasses.block_chain import BlockChain, is_static_input
from cachedit.fxpasses.token_rules import (
    DATA_FIRST_ONLY,
    FIRST_ARG,
    ShardDeclined,
    TokenDim,
    _Refine,
    _Rules,
    _shape,
    _view_ndim,
    is_sdpa,
    op_name,
    sdpa_args,
)
from cachedit.sharding import local_length

MAX_REFINEMENTS = 16  # restarts of the propagation after a seed layout was refined


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One SDPA of the chain: its query layout, and the K/V layout (None: K/V stay whole)."""

    node: str
    q: TokenDim
    kv: TokenDim | None
    heads: int
    mask: bool


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Where to shard and gather, and the token dim of every value on the token path."""

    seeds: tuple[tuple[str, TokenDim], ...]  # values defined before block 0, sharded before it
    gathers: tuple[tuple[str, TokenDim], ...]  # chain values used after the chain, gathered after it
    tokens: dict[str, TokenDim | tuple[TokenDim | None, ...]]  # node name -> its token dim(s)
    attentions: tuple[AttentionSite, ...]
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        seeds = ", ".join(f"{n}[dim {t.dim}: {'+'.join(map(str, t.layout))}]" for n, t in self.seeds)
        gathers = ", ".join(f"{n}[dim {t.dim}: {'+'.join(map(str, t.layout))}]" for n, t in self.gathers)
        cross = sum(a.kv is None for a in self.attentions)
        text = (
            f"shard {seeds}; gather {gathers}; {len(self.attentions)} attentions "
            f"({cross} with whole K/V), {len(self.tokens)} token-path nodes"
        )
        return text + "".join(f"; note: {n}" for n in self.notes)


# --- the analysis ----------------------------------------------------------------------------------------


def plan_sequence_sharding(gm: torch.fx.GraphModule, chain: BlockChain) -> ShardPlan:
    """Return the sharding plan of ``gm``'s chain; raises ``ShardDeclined`` with a reason when none is safe.

    Invariant: the graph is not modified.
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    lo, hi = chain.blocks[0].first, chain.blocks[-1].last
    region = [n for n in nodes[lo : hi + 1] if n.op in ("call_function", "call_method")]
    other = [n for n in nodes[lo : hi + 1] if n.op not in ("call_function", "call_method", "get_attr")]
    if other:
        raise ShardDeclined(f"the chain holds {other[0].op} node {other[0].name}; only function calls can be sharded")
    sdpas = [n for n in region if is_sdpa(n)]
    if not sdpas:
        raise ShardDeclined("the chain calls no scaled_dot_product_attention")

    seeds = _find_seeds(nodes, pos, lo, sdpas)
    layouts: dict[str, tuple[int, ...]] = {s.name: (_shape(s)[d],) for s, d in seeds.items()}
    origin: dict[str, str] = {}  # token value -> the seed it derives from with that seed's layout
    for _ in range(MAX_REFINEMENTS):
        try:
            tokens = _propagate(region, seeds, layouts, origin)
            break
        except _Refine as r:
            _refine(r, origin, layouts)
    else:
        raise ShardDeclined(f"seed layouts did not settle after {MAX_REFINEMENTS} refinements")

    def info(a):
        return tokens.get(a.name) if isinstance(a, torch.fx.Node) else None

    attentions = tuple(_check_attention(n, info) for n in sdpas)
    gathers = []
    for n in region:
        t = tokens.get(n.name)
        if t is None or isinstance(t, tuple):
            continue
        if any(u.op == "output" or pos[u] > hi for u in n.users):
            gathers.append((n.name, t))
    if not gathers:
        raise ShardDeclined("no token-path value of the chain reaches the epilogue")
    notes = _leftover_literals(region, tokens, {t.size for _, t in gathers} | {s for l in layouts.values() for s in l})
    return ShardPlan(
        seeds=tuple((s.name, TokenDim(d, layouts[s.name])) for s, d in seeds.items()),
        gathers=tuple(gathers),
        tokens=tokens,
        attentions=attentions,
        notes=notes,
    )


def _find_seeds(nodes, pos, lo, sdpas) -> dict[torch.fx.Node, int]:
    """Walk each query's token dim back to the values defined before the chain (Note step 1)."""
    rules = _Rules(_decline, strict=False)
    seeds: dict[torch.fx.Node, int] = {}
    seen: dict[torch.fx.Node, int] = {}
    work = [(sdpa_args(n)["query"], 2) for n in sdpas]
    while work:
        node, dim = work.pop()
        if node in seen:
            if seen[node] != dim:
                raise ShardDeclined(f"{node.name} reaches the attention with tokens on two dims ({seen[node]} and {dim})")
            continue
        seen[node] = dim
        if pos[node] < lo:
            if is_static_input(node):
                raise ShardDeclined(f"the token dim leads back to the parameter {node.name}")
            seeds[node] = dim
            continue
        if node.op == "get_attr":
            raise ShardDeclined(f"the token dim leads back to the constant {node.name}")
        work.extend(_backward(node, dim, rules))
        for user in node.users:  # in-place writes feed the value too (Wan's rotary: out[..., 0::2] = ...)
            if op_name(user) == "setitem" and user.args[0] is node and isinstance(user.args[2], torch.fx.Node):
                work.extend(_candidates_value(user, user.args[2], dim, rules))
    return dict(sorted(seeds.items(), key=lambda kv: pos[kv[0]]))


def _decline(node, why):
    raise ShardDeclined(f"{node.name} ({op_name(node)}) is on the token path, but {why}")


def _backward(node: torch.fx.Node, dim: int, rules: _Rules) -> list[tuple[torch.fx.Node, int]]:
    """Inputs (and their dims) whose token dim the forward rules map to ``dim`` of ``node``."""
    if op_name(node) == "getitem" and isinstance(node.args[0], torch.fx.Node) and _shape(node.args[0]) is None:
        src, index = node.args  # an element of a split/chunk/unbind
        return _candidates(src, lambda t: (rules.apply(src, t) or (None,) * (index + 1))[index], dim)
    return _candidates(node, lambda t: rules.apply(node, t), dim)


def _candidates(node, forward, dim):
    found = []
    operands = [a for a in node.all_input_nodes if _shape(a) is not None]
    if op_name(node) in FIRST_ARG or op_name(node) in DATA_FIRST_ONLY:
        operands = operands[:1]
    for a in operands:
        if is_static_input(a):
            continue  # a parameter
        shape = _shape(a)
        for d in range(len(shape)):
            if shape[d] == 1:
                continue
            trial = TokenDim(d, (shape[d],))
            try:
                out = forward(lambda x, a=a, trial=trial: trial if x is a else None)
            except (ShardDeclined, _Refine, AssertionError, TypeError, IndexError, ValueError):
                continue
            if isinstance(out, TokenDim) and out.dim == dim:
                found.append((a, d))
    if not found:
        raise ShardDeclined(f"cannot follow the token dim {dim} of {node.name} ({op_name(node)}) back to its inputs")
    return found


def _candidates_value(node, value, dim, rules):
    """The value written by ``target[index] = value`` holds tokens where the indexed view of target does."""
    shape = _shape(value)
    tshape = _shape(node.args[0])
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    try:
        view, _ = rules.index(node, TokenDim(dim, (tshape[dim],)), tshape, index)
    except ShardDeclined:
        return []
    view_ndim = _view_ndim(tshape, index)
    d = view.dim - (view_ndim - len(shape))
    return [(value, d)] if 0 <= d < len(shape) and shape[d] == view.size else []


def _propagate(region, seeds, layouts, origin):
    """Token info of every chain node from the seeds (Note step 3); raises ``_Refine`` on a coarse seed."""
    tokens: dict[str, object] = {s.name: TokenDim(d, layouts[s.name]) for s, d in seeds.items()}
    origin.clear()
    origin.update({s.name: s.name for s in seeds})
    rules = _Rules(_decline)

    def info(a):
        return tokens.get(a.name) if isinstance(a, torch.fx.Node) else None

    for node in region:
        inputs = [a for a in node.all_input_nodes if a.name in tokens]
        if op_name(node) == "setitem":
            if inputs:
                rules.apply(node, info)
            continue
        if not inputs:
            continue
        result = rules.apply(node, info)
        if result is not None:
            tokens[node.name] = result
            # a value derived from one seed with its layout unchanged can have that seed refined
            srcs = {origin.get(a.name) for a in inputs}
            if len(srcs) == 1 and None not in srcs and isinstance(result, TokenDim):
                src = srcs.pop()
                if result.layout == layouts[src]:
                    origin[node.name] = src
    return tokens


def _refine(r: _Refine, origin_of: dict[str, str], layouts: dict[str, tuple[int, ...]]) -> None:
    a, b = r.a, r.b
    if a.dim != b.dim or a.size != b.size:
        raise ShardDeclined(f"{r.node.name} ({op_name(r.node)}) combines tokens on different dims or counts")
    bounds_a = {sum(a.layout[:k]) for k in range(len(a.layout) + 1)}
    bounds_b = {sum(b.layout[:k]) for k in range(len(b.layout) + 1)}
    fine = tuple(b - a for a, b in zip(sorted(bounds_a | bounds_b), sorted(bounds_a | bounds_b)[1:]))
    refined = False
    for operand in (*r.node.all_input_nodes,):
        src = origin_of.get(operand.name)
        if src is not None and layouts[src] != fine and len(layouts[src]) == 1 and sum(fine) == layouts[src][0]:
            layouts[src] = fine
            refined = True
    if not refined:
        raise ShardDeclined(
            f"{r.node.name} ({op_name(r.node)}) combines token layouts {a.layout} and {b.layout} that no seed refinement reconciles"
        )


def _check_attention(node, info) -> AttentionSite:
    args = sdpa_args(node)
    q, k, v = info(args["query"]), info(args["key"]), info(args["value"])
    where = f"attention {node.name}"
    if q is None or q.dim != 2 or len(_shape(args["query"])) != 4:
        raise ShardDeclined(f"{where}: the query does not hold tokens on dim 2 of [B, H, S, D]")
    if (k is None) != (v is None) or (k is not None and (k != v or k.dim != 2)):
        raise ShardDeclined(f"{where}: key and value are sharded differently ({k} vs {v})")
    if args["dropout_p"] not in (0, 0.0) or args["is_causal"] or args["enable_gqa"]:
        raise ShardDeclined(f"{where}: dropout, causal masking or GQA is not supported under context parallelism")
    mask = args["attn_mask"]
    if isinstance(mask, torch.fx.Node):
        if info(mask) is not None:
            raise ShardDeclined(f"{where}: the attention mask derives from sharded tokens")
        ms = _shape(mask)
        kv_len = _shape(args["key"])[2]
        if len(ms) != 4 or ms[-1] not in (1, kv_len) or ms[-2] not in (1, q.size):
            raise ShardDeclined(f"{where}: attention mask of shape {ms} is not [B|1, H|1, Sq|1, Sk|1]")
    heads = _shape(args["query"])[1]
    if _shape(args["key"])[1] != heads:
        raise ShardDeclined(f"{where}: key heads differ from query heads")
    return AttentionSite(node.name, q, k, heads, isinstance(mask, torch.fx.Node))


_SHAPE_LITERAL_OPS = {
    "view", "reshape", "expand", "split", "split_with_sizes", "ones", "zeros", "full", "empty", "arange",
    "new_ones", "new_zeros", "new_full", "new_empty", "repeat", "unflatten",
}


def _leftover_literals(region, tokens, sizes) -> tuple[str, ...]:
    """Integer literals off the token path equal to a global token count: worth a look, rarely a bug."""
    found = []
    for n in region:
        if n.name in tokens or op_name(n) not in _SHAPE_LITERAL_OPS:
            continue
        flat: list = []
        torch.fx.node.map_aggregate((n.args, n.kwargs), lambda x: flat.append(x) or x)
        hits = [x for x in flat if isinstance(x, int) and not isinstance(x, bool) and x in sizes and x > 1]
        if hits:
            found.append(f"unsharded {n.name} ({op_name(n)}) keeps literal {hits[0]}")
    return tuple(found[:4])


__all__ = [
    "AttentionSite",
    "ShardDeclined",
    "ShardPlan",
    "TokenDim",
    "is_sdpa",
    "op_name",
    "plan_sequence_sharding",
    "sdpa_args",
]
