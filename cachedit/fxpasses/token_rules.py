"""Forward rules of the sharding plan: where an op puts the token dim of its inputs (Note [Sequence sharding plan]).

One table from op name to rule, shared by the two walks of ``plan_sequence_sharding``: forward from the
seeds (``strict``: an op that mixes sharded and unsharded tokens declines) and backward from each query
(lenient: the other operands are merely unknown yet). Ops are matched by name, so ``torch.cat``,
``Tensor.reshape`` and ``operator.getitem`` need no separate entries; an op missing here declines the
plan whenever it touches the token path, which is the safe default.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from cachedit.sharding import local_length  # shared with the runtime, which must shard the same way


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


# --- op tables ------------------------------------------------------------------------------------------

_ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "sin", "cos", "tanh",
    "sigmoid", "silu", "gelu", "relu", "dropout", "float", "half", "bfloat16", "to", "type_as", "contiguous",
    "clone", "masked_fill", "where", "clamp", "abs", "square", "detach", "empty_like", "zeros_like",
    "ones_like", "softplus", "erf", "mish", "iadd", "imul", "isub", "rsub", "radd", "rmul", "type",
    "leaky_relu", "hardtanh", "log", "reciprocal", "maximum", "minimum",
}
# elementwise ops whose other tensor arguments give a dtype or device, not data
DATA_FIRST_ONLY = {"type_as", "to", "empty_like", "zeros_like", "ones_like", "type", "new_empty"}
FIRST_ARG = {"linear", "layer_norm", "rms_norm"}  # token dim passes through; last dims are features
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
        if name in FIRST_ARG:
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
        if op_name(node) in DATA_FIRST_ONLY:
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
        first = next(i for i in infos if i is not None)
        if any(i is None for i in infos):  # cat does not broadcast: the other operand has all the tokens
            self.decline(node, "it concatenates sharded tokens with an unsharded tensor")
        if dim == first.dim:
            if any(i.dim != dim for i in infos):
                self.decline(node, "its operands hold tokens on different dims")
            return TokenDim(dim, tuple(s for i in infos for s in i.layout))
        for a, i in zip(tensors, infos):
            if i != first:
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
