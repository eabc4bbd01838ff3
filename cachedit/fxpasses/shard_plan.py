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
import math

import torch
import torch.fx

from cachedit.fxpasses.block_chain import BlockChain

MAX_REFINEMENTS = 16  # restarts of the propagation after a seed layout was refined


class ShardDeclined(Exception):
    """No safe sharding plan (or rewrite) exists; the message is the reason the backend logs."""


@dataclasses.dataclass(frozen=True)
class TokenDim:
    """Where a value holds tokens: dimension ``dim``, made of segments of global ``layout`` lengths."""

    dim: int
    layout: tuple[int, ...]

    @property
    def size(self) -> int:
        return sum(self.layout)

    def local(self, world: int, rank: int) -> tuple[int, ...]:
        return tuple(local_length(n, world, rank) for n in self.layout)


def local_length(n: int, world: int, rank: int) -> int:
    """Tokens of an ``n``-token segment held by ``rank`` (``torch.tensor_split`` sizes)."""
    return n // world + (1 if rank < n % world else 0)


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

    @property
    def min_tokens(self) -> int:
        return min(min(t.layout) for _, t in self.seeds)

    @property
    def min_heads(self) -> int:
        return min(a.heads for a in self.attentions)

    def describe(self) -> str:
        seeds = ", ".join(f"{n}[dim {t.dim}: {'+'.join(map(str, t.layout))}]" for n, t in self.seeds)
        gathers = ", ".join(f"{n}[dim {t.dim}: {'+'.join(map(str, t.layout))}]" for n, t in self.gathers)
        cross = sum(a.kv is None for a in self.attentions)
        text = (
            f"shard {seeds}; gather {gathers}; {len(self.attentions)} attentions "
            f"({cross} with whole K/V), {len(self.tokens)} token-path nodes"
        )
        return text + "".join(f"; note: {n}" for n in self.notes)


# --- op tables ------------------------------------------------------------------------------------------

_ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "sin", "cos", "tanh",
    "sigmoid", "silu", "gelu", "relu", "dropout", "float", "half", "bfloat16", "to", "type_as", "contiguous",
    "clone", "masked_fill", "where", "clamp", "abs", "square", "detach", "empty_like", "zeros_like",
    "ones_like", "softplus", "erf", "mish", "iadd", "imul", "isub", "rsub", "radd", "rmul", "type",
    "leaky_relu", "hardtanh", "log", "reciprocal", "maximum", "minimum",
}
# elementwise ops whose other tensor arguments give a dtype or device, not data
_DATA_FIRST_ONLY = {"type_as", "to", "empty_like", "zeros_like", "ones_like", "type", "new_empty"}
_FIRST_ARG = {"linear", "layer_norm", "rms_norm"}  # token dim passes through; last dims are features
_REDUCTIONS = {"mean", "sum", "amax", "amin", "norm", "var", "std"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as_complex", "view_as_real"}
_SDPA = {"scaled_dot_product_attention"}


def op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(value) -> tuple[int, ...] | None:
    v = value.meta.get("example_value") if isinstance(value, torch.fx.Node) else value
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) in _SDPA


def sdpa_args(node: torch.fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    return {n: _arg(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))}


# --- the forward rules ------------------------------------------------------------------------------------

Info = TokenDim | None


class _Rules:
    """Forward rules: given the token info of a node's inputs, its output token info."""

    def __init__(self, decline, strict: bool = True):
        self.decline = decline
        self.strict = strict  # False while walking back: other operands are merely unknown, not unsharded

    def apply(self, node: torch.fx.Node, info) -> object:
        name = op_name(node)
        out = _shape(node)
        if name in _SDPA:
            return info(sdpa_args(node)["query"])
        if name == "getitem":
            return self.getitem(node, info)
        if name == "setitem":
            return self.setitem(node, info)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node, info)
        if name == "stack":
            return self.stack(node, info)
        if name in ("split", "split_with_sizes", "chunk", "tensor_split", "unbind"):
            return self.split(node, info)
        src = node.args[0] if node.args else None
        t = info(src)
        if name in _ELEMENTWISE:
            return self.elementwise(node, info)
        if t is None:
            self.decline(node, "its token-path operand is not its first argument")
        in_shape = _shape(src)
        if name in _FIRST_ARG:
            normalized = 1 if name == "linear" else len(_arg(node, 1, "normalized_shape"))
            if t.dim >= len(in_shape) - normalized:
                self.decline(node, "it mixes tokens (the token dim is a feature dim)")
            return t
        if name == "softmax" or name == "log_softmax":
            if _norm_dim(_arg(node, 1, "dim"), len(in_shape)) == t.dim:
                self.decline(node, "it normalizes over the token dim")
            return t
        if name in _REDUCTIONS:
            return self.reduction(node, t, in_shape)
        if name in ("permute",):
            dims = node.args[1:] if not isinstance(_arg(node, 1, "dims"), (list, tuple)) else _arg(node, 1, "dims")
            dims = [_norm_dim(d, len(in_shape)) for d in dims]
            return TokenDim(dims.index(t.dim), t.layout)
        if name in ("transpose", "swapaxes"):
            a, b = (_norm_dim(d, len(in_shape)) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
            return TokenDim(b if t.dim == a else a if t.dim == b else t.dim, t.layout)
        if name == "unsqueeze":
            d = _norm_dim(_arg(node, 1, "dim"), len(in_shape) + 1)
            return TokenDim(t.dim + (d <= t.dim), t.layout)
        if name == "squeeze":
            return self.reshape(node, t, in_shape, out)
        if name in _RESHAPES:
            return self.reshape(node, t, in_shape, out)
        if name == "expand":
            return TokenDim(t.dim + len(out) - len(in_shape), t.layout)
        if name == "repeat_interleave" or name == "repeat":
            if out[t.dim] != in_shape[t.dim] or len(out) != len(in_shape):
                self.decline(node, "it repeats along the token dim")
            return t
        self.decline(node, "no sharding rule for this op")

    def elementwise(self, node, info):
        out = _shape(node)
        if out is None:
            self.decline(node, "an elementwise op without a tensor result")
        found: TokenDim | None = None
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if op_name(node) in _DATA_FIRST_ONLY:
            operands = operands[:1]
        for a in operands:
            t, shape = info(a), _shape(a)
            if t is None:
                continue
            d = t.dim + len(out) - len(shape)
            cand = TokenDim(d, t.layout)
            if found is None:
                found = cand
            elif found != cand:
                self.merge(node, found, cand, a)
        if found is None or not self.strict:
            return found
        for a in operands:
            shape = _shape(a)
            if info(a) is None and shape is not None:
                aligned = found.dim - (len(out) - len(shape))
                if aligned >= 0 and shape[aligned] != 1:
                    self.decline(node, f"it mixes the sharded token dim with {a.name}, which is unsharded at full length")
        return found

    def merge(self, node, a: TokenDim, b: TokenDim, operand) -> None:
        """Two token operands disagree: a coarser seed layout may be refined (Note step 2), else decline."""
        if a.dim != b.dim:
            self.decline(node, "its operands hold tokens on different dims")
        if a.size != b.size:
            self.decline(node, "its operands hold different token counts")
        raise _Refine(node, a, b, operand)

    def reduction(self, node, t, in_shape):
        dims = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None:
            self.decline(node, "it reduces over all dims, tokens included")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [_norm_dim(d, len(in_shape)) for d in dims]
        if t.dim in dims:
            self.decline(node, "it reduces over the token dim")
        return TokenDim(t.dim - (0 if keep else sum(d < t.dim for d in dims)), t.layout)

    def reshape(self, node, t, in_shape, out):
        pre = math.prod(in_shape[: t.dim])
        for j in range(len(out)):
            if math.prod(out[:j]) == pre and out[j] % in_shape[t.dim] == 0 and out[j] != 1:
                if out[j] != in_shape[t.dim]:
                    self.decline(node, "it merges the token dim with a feature dim")
                return TokenDim(j, t.layout)
            if math.prod(out[:j]) > pre:
                break
        self.decline(node, "it splits the token dim")

    def getitem(self, node, info):
        src, index = node.args
        t = info(src)
        if isinstance(t, tuple):
            return t[index]
        if t is None:
            if isinstance(index, (tuple, list)) and any(isinstance(i, torch.fx.Node) and info(i) is not None for i in index):
                self.decline(node, "it indexes with a sharded tensor")
            return None
        return self.index(node, t, _shape(src), index)[0]

    def index(self, node, t, in_shape, index):
        """Token info after ``x[index]``; also the token slice (start, stop) in global positions, if any."""
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, torch.fx.Node) for i in items):
            self.decline(node, "it indexes with a tensor")
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded = []
        for i in items:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(in_shape) - n_real))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None)))
        src_dim = out_dim = 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if src_dim == t.dim:
                if isinstance(i, int):
                    self.decline(node, "it selects a single token")
                start, stop, step = i.indices(in_shape[src_dim])
                if step != 1:
                    self.decline(node, "it slices the token dim with a step")
                return TokenDim(out_dim, self.sub_layout(node, t.layout, start, stop)), (start, stop)
            src_dim += 1
            out_dim += 0 if isinstance(i, int) else 1
        raise AssertionError(f"{node.name}: the token dim {t.dim} was not reached by index {index}")

    def sub_layout(self, node, layout, start, stop):
        if not self.strict:
            return (stop - start,)
        bounds = [sum(layout[:k]) for k in range(len(layout) + 1)]
        if start not in bounds or stop not in bounds:
            self.decline(node, f"it slices tokens [{start}:{stop}] inside a segment of layout {layout}")
        return layout[bounds.index(start) : bounds.index(stop)]

    def setitem(self, node, info):
        target, index, value = node.args
        t = info(target)
        if t is None:
            if isinstance(value, torch.fx.Node) and info(value) is not None:
                self.decline(node, "it writes sharded tokens into an unsharded tensor")
            return None
        view, _ = self.index(node, t, _shape(target), index)  # a token slice must fall on segment bounds
        if isinstance(value, torch.fx.Node):
            vt, vshape = info(value), _shape(value)
            view_ndim = _view_ndim(_shape(target), index)
            if vt is None:
                aligned = view.dim - (view_ndim - len(vshape))
                if aligned >= 0 and vshape[aligned] != 1:
                    self.decline(node, "it writes unsharded full-length tokens into a sharded tensor")
            elif vt.dim + view_ndim - len(vshape) != view.dim or vt.layout != view.layout:
                self.merge(node, view, TokenDim(vt.dim + view_ndim - len(vshape), vt.layout), value)
        return None

    def cat(self, node, info):
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        out = _shape(node)
        dim = _norm_dim(dim, len(out))
        infos = [info(a) for a in tensors]
        if all(i is None for i in infos):
            return None
        if not self.strict:
            t = next(i for i in infos if i is not None)
            return TokenDim(t.dim, (out[t.dim],))
        if any(i is None for i in infos):
            if dim == next(i for i in infos if i is not None).dim:
                self.decline(node, "it concatenates unsharded tokens to sharded ones")
            for a, i in zip(tensors, infos):
                if i is None and _shape(a)[next(x for x in infos if x is not None).dim] != 1:
                    self.decline(node, f"it concatenates {a.name}, which is unsharded at full length")
        if dim == infos[0].dim if infos[0] is not None else False:
            if any(i.dim != dim for i in infos):
                self.decline(node, "its operands hold tokens on different dims")
            return TokenDim(dim, tuple(s for i in infos for s in i.layout))
        first = next(i for i in infos if i is not None)
        for a, i in zip(tensors, infos):
            if i is not None and i != first:
                self.merge(node, first, i, a)
        return first

    def stack(self, node, info):
        tensors = _arg(node, 0, "tensors")
        out = _shape(node)
        dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
        infos = [info(a) for a in tensors]
        if all(i is None for i in infos):
            return None
        if not self.strict:
            t = next(i for i in infos if i is not None)
            return TokenDim(t.dim + (dim <= t.dim), t.layout)
        if any(i is None for i in infos):
            self.decline(node, "it stacks sharded with unsharded tensors")
        for a, i in zip(tensors, infos):
            if i != infos[0]:
                self.merge(node, infos[0], i, a)
        t = infos[0]
        return TokenDim(t.dim + (dim <= t.dim), t.layout)

    def split(self, node, info):
        name = op_name(node)
        src = node.args[0]
        t = info(src)
        if t is None:
            return None
        in_shape = _shape(src)
        outs = node.meta.get("example_value")
        if name == "unbind":
            dim = _norm_dim(_arg(node, 1, "dim", 0), len(in_shape))
            if dim == t.dim:
                self.decline(node, "it unbinds the token dim")
            return tuple(TokenDim(t.dim - (dim < t.dim), t.layout) for _ in outs)
        dim = _norm_dim(_arg(node, 2, "dim", 0) if name != "split_with_sizes" else _arg(node, 2, "dim", 0), len(in_shape))
        if dim != t.dim:
            return tuple(t for _ in outs)
        if name == "tensor_split":
            self.decline(node, "it tensor_splits the token dim")
        sizes = [o.shape[dim] for o in outs]
        bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        return tuple(TokenDim(dim, self.sub_layout(node, t.layout, a, b)) for a, b in zip(bounds, bounds[1:]))


def _view_ndim(shape, index) -> int:
    """Dims of ``x[index]`` for basic indexing (ints drop a dim, None adds one)."""
    items = index if isinstance(index, tuple) else (index,)
    return len(shape) - sum(isinstance(i, int) for i in items) + sum(i is None for i in items)


class _Refine(Exception):
    def __init__(self, node, a, b, operand):
        super().__init__(node.name)
        self.node, self.a, self.b, self.operand = node, a, b, operand


# --- the analysis ----------------------------------------------------------------------------------------


def _chain_span(chain: BlockChain) -> tuple[int, int]:
    return chain.blocks[0].first, chain.blocks[-1].last


def plan_sequence_sharding(gm: torch.fx.GraphModule, chain: BlockChain) -> ShardPlan:
    """Return the sharding plan of ``gm``'s chain; raises ``ShardDeclined`` with a reason when none is safe.

    Invariant: the graph is not modified.
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    lo, hi = _chain_span(chain)
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
            if node.op == "placeholder" and "_dynamo_static_input_type" in (node.meta.get("tensor_dict") or {}):
                raise ShardDeclined(f"the token dim leads back to the parameter {node.name}")
            seeds[node] = dim
            continue
        if node.op == "get_attr":
            raise ShardDeclined(f"the token dim leads back to the constant {node.name}")
        work.extend(_backward(node, dim, rules))
        for user in node.users:  # in-place writes feed the value too (Wan's rotary: out[..., 0::2] = ...)
            if op_name(user) == "setitem" and user.args[0] is node and isinstance(user.args[2], torch.fx.Node):
                work.extend(_backward_setitem(user, dim, rules))
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
    if op_name(node) in _FIRST_ARG or op_name(node) in _DATA_FIRST_ONLY:
        operands = operands[:1]
    for a in operands:
        if "_dynamo_static_input_type" in (a.meta.get("tensor_dict") or {}):
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


def _backward_setitem(node, dim, rules):
    target, index, value = node.args
    return [(a, d) for a, d in _candidates_value(node, value, dim, rules)]


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
    "local_length",
    "op_name",
    "plan_sequence_sharding",
    "sdpa_args",
]
