"""Find the chain of transformer blocks in a Dynamo graph (an analysis: it never mutates the graph).

Note [Block chain]
~~~~~~~~~~~~~~~~~~
Background: Dynamo records, on every node, the stack of modules whose ``forward`` produced it
(``meta["nn_module_stack"]``). A transformer block is a child of an ``nn.ModuleList`` whose items are
repeated modules of one class, so the blocks can be found without knowing the model.

Algorithm:
  1. Parse each node's module stack into a dotted path (``single_transformer_blocks.1.attn``); the
     outermost ``<list>.<int>`` prefix whose item class is not a torch builtin names the node's block.
  2. A list is a candidate when it has at least two items of one class whose node ranges do not
     interleave (block i ends before block i + 1 starts), and every block attends: an attention op
     (``scaled_dot_product_attention``, ``flex_attention``, or a ``softmax``) is among its nodes. A
     list of bare layers (BriaFibo's ``caption_projection`` of per-block text projections, MoE
     experts) is never the chain, however long.
  3. The main list is the candidate that does the most work: the parameter elements its blocks read,
     then its node count (a text refiner or a text-only encoder of two blocks loses to the 40 blocks
     that carry the image, whatever the list lengths).
  4. The chain grows from the main list to an adjacent list when the two are *joined*: the streams of
     the later list (inputs of its first block shaped like what that block hands to its second) come
     straight from the last block of the earlier list, except streams that come straight from the last
     block of a list that ran before it (a stream with blocks of its own: Flux.3's text mode blocks),
     at least one comes from the earlier list, and the earlier list's outputs feed nothing else.
     Flux's double then single blocks are joined, and so are Flux.3's image mode blocks and its joint
     single blocks (the text stream enters those from ``txt_mode_blocks``, which run first); text
     refiners (HunyuanVideo, Z-Image, Lumina2) and Kandinsky 5's text blocks, whose output meets an
     image stream that comes from the prologue, are not, nor is Flux.3's ``txt_mode_blocks`` (the
     image mode blocks never read the text stream). Lists handing over through glue between the blocks
     (BriaFibo re-concatenates text and image before every single block) are not joined either: the
     stream changes shape between them, so a residual across both lists has no single shape.

Debugging: ``cachedit.explain(model)`` prints the lists found and why each was or was not chained.
"""

from __future__ import annotations

import dataclasses
import re

import torch.fx

_PATH_TOKEN = re.compile(r"\['([^']*)'\]|\.?([A-Za-z_][A-Za-z_0-9]*|\d+)")
_SKIP_TOKENS = {"L", "self", "__dict__", "_modules", "_parameters", "_buffers"}


class NoChain(Exception):
    """The graph has no usable block chain; the message is the reason the backend logs."""


def module_path(node: torch.fx.Node) -> tuple[str, ...]:
    """The innermost module path of ``node`` as name components; ``()`` for top-level code.

    This is the one place that parses Dynamo's ``nn_module_stack`` format (an internal detail), e.g.
    ``"L['self'].__dict__['_modules']['single_transformer_blocks'].1.attn"`` ->
    ``("single_transformer_blocks", "1", "attn")``.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ()
    path, _cls = list(stack.values())[-1]
    return _parse_path(path)


def is_static_input(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a graph input Dynamo marked static: a parameter or buffer of the model.

    The one place that reads Dynamo's marking (an internal detail, like ``nn_module_stack``).
    """
    return node.op == "placeholder" and "_dynamo_static_input_type" in (node.meta.get("tensor_dict") or {})


def _parse_path(path: str) -> tuple[str, ...]:
    tokens = [a or b for a, b in _PATH_TOKEN.findall(path)]
    return tuple(t for t in tokens if t not in _SKIP_TOKENS)


def _module_classes(node: torch.fx.Node) -> dict[tuple[str, ...], type]:
    stack = node.meta.get("nn_module_stack") or {}
    return {_parse_path(path): cls for path, cls in stack.values()}


@dataclasses.dataclass(frozen=True)
class Block:
    """One block: ``list_path[index]``, occupying graph node positions ``first..last``."""

    list_path: str
    index: int
    cls_name: str
    first: int
    last: int


@dataclasses.dataclass(frozen=True)
class BlockChain:
    """The blocks that run in sequence on the carried state, in execution order."""

    blocks: tuple[Block, ...]
    # node name -> position of its block in ``blocks``; nodes outside the chain are absent
    block_of: dict[str, int]
    # every candidate list seen, with the reason it is or is not in the chain
    lists: tuple[tuple[str, int, str], ...]

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def list_paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.list_path for b in self.blocks))

    def only(self, path: str) -> "BlockChain":
        """The chain of one of its lists (``block_lists="separate"`` splits each list on its own)."""
        keep = [i for i, b in enumerate(self.blocks) if b.list_path == path]
        new = {old: k for k, old in enumerate(keep)}
        block_of = {name: new[i] for name, i in self.block_of.items() if i in new}
        return BlockChain(blocks=tuple(self.blocks[i] for i in keep), block_of=block_of, lists=self.lists)

    def describe(self) -> str:
        counts = {p: sum(b.list_path == p for b in self.blocks) for p in self.list_paths}
        return " -> ".join(f"{p}[{n}]" for p, n in counts.items())


def _block_key(node: torch.fx.Node) -> tuple[str, int, str] | None:
    """(list path, index, block class name) of the outermost list item containing ``node``."""
    path = module_path(node)
    classes = _module_classes(node)
    for i in range(1, len(path)):
        if path[i].isdigit():
            cls = classes.get(path[: i + 1])
            if cls is None or cls.__module__.startswith("torch."):
                continue  # a list of builtin layers (Linear, Dropout, ...), not blocks
            return ".".join(path[:i]), int(path[i]), cls.__qualname__
    return None


def find_block_chain(gm: torch.fx.GraphModule) -> BlockChain:
    """Return the block chain of ``gm``; raises ``NoChain`` with a reason when there is none.

    Invariant: the graph is not modified.
    """
    nodes = list(gm.graph.nodes)
    spans: dict[str, dict[int, list]] = {}  # list path -> index -> [cls, first, last]
    node_block: dict[torch.fx.Node, tuple[str, int]] = {}
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "output"):
            continue
        key = _block_key(node)
        if key is None:
            continue
        lst, idx, cls = key
        span = spans.setdefault(lst, {}).setdefault(idx, [cls, i, i])
        span[2] = i
        node_block[node] = (lst, idx)

    members: dict[tuple[str, int], list[torch.fx.Node]] = {}
    for node, key in node_block.items():
        members.setdefault(key, []).append(node)
    candidates: dict[str, list[Block]] = {}
    verdicts: dict[str, str] = {}
    for lst, items in spans.items():
        blocks = [Block(lst, idx, cls, first, last) for idx, (cls, first, last) in sorted(items.items())]
        if len(blocks) < 2:
            verdicts[lst] = "fewer than two blocks"
        elif len({b.cls_name for b in blocks}) > 1:
            verdicts[lst] = "items of different classes"
        elif any(a.last >= b.first for a, b in zip(blocks, blocks[1:])):
            verdicts[lst] = "blocks interleave or run out of order"
        elif not all(any(_attends(n) for n in members[(lst, b.index)]) for b in blocks):
            verdicts[lst] = f"no attention in its {blocks[0].cls_name} items: bare layers, not blocks"
        else:
            candidates[lst] = blocks
    if not candidates:
        found = ", ".join(f"{k} ({v})" for k, v in verdicts.items()) or "none"
        raise NoChain(f"no nn.ModuleList of repeated blocks found in the graph (lists seen: {found})")

    work = {lst: _work(candidates[lst], members) for lst in candidates}
    order = sorted(candidates, key=lambda lst: candidates[lst][0].first)
    main = max(order, key=lambda lst: work[lst])  # ties: the earliest list
    chain = [main]
    k = order.index(main)
    while k > 0 and _joined(candidates[order[k - 1]], candidates[order[k]], nodes, node_block, order[: k - 1], candidates):
        k -= 1
        chain.insert(0, order[k])
    k = order.index(main)
    while k + 1 < len(order) and _joined(candidates[order[k]], candidates[order[k + 1]], nodes, node_block, order[:k], candidates):
        k += 1
        chain.append(order[k])
    for lst in order:
        params, count = work[lst]
        size = f"{params} parameter elements, {count} nodes"
        if lst == main:
            verdicts[lst] = f"in the chain (main list: the most work, {size})"
        elif lst in chain:
            verdicts[lst] = f"in the chain (joined: carries the main list's streams, {size})"
        else:
            verdicts[lst] = f"not joined to the main list ({size})"

    blocks = tuple(b for lst in chain for b in candidates[lst])
    index_of = {(b.list_path, b.index): i for i, b in enumerate(blocks)}
    block_of = {n.name: index_of[key] for n, key in node_block.items() if key in index_of}
    lists = tuple((lst, len(spans[lst]), verdicts[lst]) for lst in spans)
    return BlockChain(blocks=blocks, block_of=block_of, lists=lists)


def _joined(
    earlier: list[Block],
    later: list[Block],
    nodes: list[torch.fx.Node],
    node_block: dict[torch.fx.Node, tuple[str, int]],
    before: list[str],
    candidates: dict[str, list[Block]],
) -> bool:
    """Whether ``later`` continues the carried state of ``earlier`` (see Note [Block chain]).

    The streams of ``later`` are the inputs of its first block that have the shape of a value that
    block hands to the second one; at least one must be an output of the last block of ``earlier``,
    the others outputs of the last block of a list in ``before`` (lists that ran earlier still), and
    the outputs of ``earlier`` must feed nothing but ``later``.
    """
    last, first, second = earlier[-1], later[0], later[1]
    if last.last >= first.first:
        return False
    key = lambda b: (b.list_path, b.index)  # noqa: E731
    members = lambda b: [n for n in nodes[b.first : b.last + 1] if node_block.get(n) == key(b)]  # noqa: E731
    last_nodes, first_nodes, second_nodes = members(last), set(members(first)), set(members(second))
    outputs = {n for n in last_nodes if any(node_block.get(u) != key(last) for u in n.users)}
    if any(node_block.get(u, ("",))[0] != first.list_path for n in outputs for u in n.users if u not in last_nodes):
        return False
    handed_on = {shape_key(n) for n in first_nodes if any(u in second_nodes for u in n.users)}
    inputs = {a for n in first_nodes for a in n.all_input_nodes if a not in first_nodes}
    streams = [a for a in inputs if shape_key(a) in handed_on and a.op != "placeholder"]
    ends_before = {key(candidates[lst][-1]) for lst in before}
    ours = [a for a in streams if a in outputs]
    return bool(ours) and all(a in outputs or node_block.get(a) in ends_before for a in streams)


# ``context_parallel_attention``: what the context-parallel rewrite puts in SDPA's place before the chain is
# looked for (Note [Attention rewrite]); the blocks attend all the same.
_ATTENTION_OPS = ("scaled_dot_product_attention", "flex_attention", "softmax", "context_parallel_attention")


def _attends(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an attention op: SDPA, flex attention, or the softmax of a hand-written one."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "") or str(target)
    return node.op in ("call_function", "call_method") and any(op in name for op in _ATTENTION_OPS)


def _work(blocks: list[Block], members: dict[tuple[str, int], list[torch.fx.Node]]) -> tuple[int, int]:
    """(parameter elements read, nodes) of a list's blocks: how much of the forward the list is."""
    params: dict[torch.fx.Node, int] = {}
    count = 0
    for b in blocks:
        for node in members[(b.list_path, b.index)]:
            count += 1
            for a in node.all_input_nodes:
                value = a.meta.get("example_value")
                if is_static_input(a) and isinstance(value, torch.Tensor):
                    params[a] = value.numel() if isinstance(value.numel(), int) else 0
    return sum(params.values()), count


def shape_key(node: torch.fx.Node) -> tuple | None:
    """A hashable (shape, dtype) of a tensor node; symbolic sizes by name, so comparing adds no guard."""
    value = node.meta.get("example_value")
    return (tuple(str(d) for d in value.shape), value.dtype) if isinstance(value, torch.Tensor) else None
