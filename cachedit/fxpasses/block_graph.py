"""Read one transformer block's own graph: which inputs are its streams and which output continues which.

Note [Block graphs]
~~~~~~~~~~~~~~~~~~~
Background: when the blocks of a transformer do not sit in one Dynamo graph (regional compilation,
``compile_repeated_blocks``; a top-level forward that Dynamo skipped), each block's ``forward`` is a graph
of its own. Its ``nn_module_stack`` paths are relative to the block (``L['self'].attn``), its parameters
arrive as inputs, and with parameters lifted one graph serves every block of the class. The per-block
path (Note [Per-block path] in ``cachedit.runtime.per_block``) caches around such graphs; this pass only
reads the graph.

Algorithm:
  1. The graph must end where the block's ``forward`` returns, not at a graph break (a graph that ends
     at a break hands over the frame's live values, not the block's result).
  2. Every output must be a tensor that continues a user input of the same shape and dtype (the
     streams: image tokens, text tokens); ties are broken as in the whole-graph split (Note [Step-cache
     split], ``_match``). Inputs that no output continues (time embedding, rotary tables, masks) are the
     block's invariants.
  3. Streams are named by their input (``l_hidden_states_`` -> ``hidden_states``): the names tie the
     streams of blocks of different classes together (Flux's double and single blocks). The primary
     stream, whose change drives the decision, is ``hidden_states`` when there is one, else the largest.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from cachedit.fxpasses.block_chain import NoChain, is_static_input, shape_key
from cachedit.fxpasses.step_cache_gate import _match, _numel_hint


class NotABlock(Exception):
    """The graph cannot be cached as one whole block; the message says why."""


@dataclasses.dataclass(frozen=True)
class BlockGraphLayout:
    """What the per-block runtime needs to know about one block graph."""

    param: int  # index of the first parameter input: its identity names the block at run time
    streams: tuple[str, ...]  # name of the stream each output continues
    out_from: tuple[int, ...]  # graph input index each output continues
    shapes: tuple[tuple[str, ...], ...]  # sizes of each output, as text
    primary: int  # output index of the primary stream

    def describe(self) -> str:
        streams = ", ".join(
            f"{n} [{', '.join(s)}]" + (" (primary)" if i == self.primary else "")
            for i, (n, s) in enumerate(zip(self.streams, self.shapes))
        )
        return f"block streams: {streams}"


def graph_break_reason(gm: torch.fx.GraphModule) -> str | None:
    """Why Dynamo ended this graph at a graph break; None when the frame returned.

    The one reader of Dynamo's ``compile_subgraph_reason`` (internal, like ``nn_module_stack``).
    """
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    return str(getattr(reason, "reason", "a graph break")).splitlines()[0]


def stream_name(node: torch.fx.Node) -> str:
    """``l_hidden_states_`` / ``l_kwargs_hidden_states_`` -> ``hidden_states``."""
    return node.name.removeprefix("l_").removeprefix("kwargs_").removesuffix("_")


def _graph_inputs(gm: torch.fx.GraphModule) -> tuple[list[torch.fx.Node], list[int], list[tuple[int, torch.fx.Node]]]:
    """The placeholders, the indices of the parameter inputs, and the floating-point user inputs with
    their indices (the streams a block could continue)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    params = [i for i, n in enumerate(placeholders) if is_static_input(n)]
    user = [
        (i, n)
        for i, n in enumerate(placeholders)
        if not is_static_input(n)
        and isinstance(n.meta.get("example_value"), torch.Tensor)
        and n.meta["example_value"].is_floating_point()
    ]
    return placeholders, params, user


def _graph_outputs(gm: torch.fx.GraphModule) -> list:
    """The graph's outputs as a list (one output is a list of one)."""
    (output,) = gm.graph.find_nodes(op="output")
    outs = output.args[0]
    return list(outs) if isinstance(outs, (tuple, list)) else [outs]


def analyse_block_graph(gm: torch.fx.GraphModule) -> BlockGraphLayout:
    """The streams of a block's own graph (Note [Block graphs]); raises ``NotABlock`` with a reason."""
    broke = graph_break_reason(gm)
    if broke is not None:
        raise NotABlock(f"the graph ends at a graph break inside the block ({broke})")
    placeholders, params, user = _graph_inputs(gm)
    if not params:
        raise NotABlock("the graph has no parameter input to tell blocks apart")
    candidates = [n for _, n in user]
    outs = _graph_outputs(gm)
    if not outs:
        raise NotABlock("the block returns nothing")
    for out in outs:
        if not isinstance(out, torch.fx.Node) or not isinstance(out.meta.get("example_value"), torch.Tensor):
            raise NotABlock(f"the block returns a value that is not a tensor ({out}), which a cached step could not provide")
    try:
        matched = [candidates[_match(o, candidates, "a block output", "the block's inputs")] for o in outs]
    except NoChain as err:
        raise NotABlock(str(err)) from None
    if len(set(matched)) != len(matched):
        raise NotABlock("two block outputs continue the same input")
    index = {n: i for i, n in enumerate(placeholders)}
    names = tuple(stream_name(n) for n in matched)
    sizes = [_numel_hint(o.meta["example_value"]) for o in outs]
    primary = names.index("hidden_states") if "hidden_states" in names else max(range(len(outs)), key=sizes.__getitem__)
    return BlockGraphLayout(
        param=params[0],
        streams=names,
        out_from=tuple(index[n] for n in matched),
        shapes=tuple(shape_key(o)[0] for o in outs),
        primary=primary,
    )


def original_code(code):
    """The code of the function a Dynamo resume function continues (``torch_dynamo_resume_in_forward_at_N``),
    else ``code`` itself. The one reader of Dynamo's resume-function metadata (internal)."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache

        meta = ContinueExecutionCache.generated_code_metadata.get(code)
    except Exception:  # a torch without it: every code is its own
        meta = None
    return getattr(meta, "code", None) or code


@dataclasses.dataclass(frozen=True)
class PieceLayout:
    """One piece of a block that graph breaks split (Note [Per-block path]: pieces)."""

    inputs: tuple[tuple[str, int], ...]  # (name, graph input index) of each floating-point user input
    candidates: tuple[tuple[str, ...], ...]  # per output: names of the inputs of its shape and dtype
    outputs: tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]  # static (shape, dtype) per output, else None
    param: int | None  # index of the first parameter input, if any

    def describe(self) -> str:
        return f"piece inputs: {', '.join(n for n, _ in self.inputs) or 'none'}; outputs: {len(self.outputs)}"


def analyse_piece(gm: torch.fx.GraphModule) -> PieceLayout:
    """The inputs and outputs of a block piece: what a skipped piece must provide, and which inputs each
    output could continue (resolved at run time against the names the block's first piece received)."""
    _, params, user = _graph_inputs(gm)
    outs = _graph_outputs(gm)
    candidates, statics = [], []
    for out in outs:
        value = out.meta.get("example_value") if isinstance(out, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            candidates.append(())
            statics.append(None)
            continue
        key = shape_key(out)
        candidates.append(tuple(stream_name(n) for _, n in user if shape_key(n) == key))
        shape = tuple(value.shape)
        statics.append((shape, value.dtype) if all(isinstance(s, int) for s in shape) else None)
    return PieceLayout(
        inputs=tuple((stream_name(n), i) for i, n in user),
        candidates=tuple(candidates),
        outputs=tuple(statics),
        param=params[0] if params else None,
    )
