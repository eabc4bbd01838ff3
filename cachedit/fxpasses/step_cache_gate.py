"""Split a Dynamo graph around its block chain and put a step-cache gate between the parts.

Note [Step-cache split]
~~~~~~~~~~~~~~~~~~~~~~~
Background: DBCache always runs the first ``Fn`` blocks (the head), decides from their residual
whether the middle blocks must run, and always runs the last ``Bn`` blocks (the tail). We cut the one
Dynamo graph into three graphs at those block boundaries, so each is compiled on its own and plain
Python between them decides; the model's forward is never patched and nothing breaks the graph.

Algorithm:
  1. Assign nodes by position: before block ``Fn`` -> head, before block ``N - Bn`` -> middle, the
     rest -> tail. Middle-range nodes that depend on no middle block (an invariant computed lazily
     between block lists) are hoisted into the head, so a skipped middle never starves the tail.
  2. Values crossing head -> middle are *carried* (they depend on a chain block: the streams) or
     *invariants* (time embedding, rotary tables, masks). Every middle output must match a carried
     input by shape and dtype: the middle also returns ``output - input`` for it, the residual that a
     cached step adds to fresh head output.
  3. The *primary* stream is the one the epilogue consumes after the chain (Flux: the image tokens).
     The head also returns its residual ``primary after block Fn-1 - primary entering block 0``,
     which the gate compares against the last computed step.

Note [DBPrune split]
~~~~~~~~~~~~~~~~~~~~
DBPrune (``policy="dbprune"``) decides per middle block, so with ``per_block`` the middle is cut again at
every block boundary: one part per block, each behind its own reuse node, in chain order. A part's
carried inputs are the streams from the head or an earlier part; every value it hands to a later part
must continue one of them by shape (so a pruned block can rebuild it as input + residual), which holds
for every chain whose blocks map streams to streams; a graph where it does not (a long skip connection
between blocks) declines the DBPrune split and the backend falls back to the one-part middle with a
logged reason. The same parts serve DBCache requests: a cached step adds each part's own residual, whose
sum over the parts is the middle's residual of the same computed step (fp32 rounding of the sums apart).
Each part returns its residuals after its outputs, as the one-part middle does.

Note [Sizes across parts]
~~~~~~~~~~~~~~~~~~~~~~~~~
Under dynamic shapes (``dynamic=True``, or Dynamo's automatic dynamic recompile after a second input
size) the graph carries sizes as SymInts: graph inputs ``s0, s1, ...`` and nodes computing with them
(``sym_sum``, ``floordiv``, ``.item()`` of a float attribute). Two rules keep every part compilable:
  - a part receives every symbol that the sizes of its values mention, from the graph input or node
    that defines it (as ``split_module`` does), so Inductor can bind each size of each piece;
  - non-tensor values crossing into the middle are invariants, never carried state (they have no
    residual). Non-tensor values leaving the middle decline the split, since a cached step could not
    provide them; no zoo model has one (sizes are all computed in the prologue).
A change of input size is a new request (the runtime's rule), so a residual never meets another shape.

Before / after (printed):
    x = embed(inp); x = block0(x); x = block1(x); x = block2(x); out = proj(x)
  ->
    head = self.head(inp, ...);  h = head[0];  r = head[1]
    cachedit_gate = self.cachedit_gate(r, timestep, some_parameter)
    middle = self.middle
    cachedit_reuse = self.cachedit_reuse(cachedit_gate, middle, h, ...)
    tail = self.tail(cachedit_reuse[0], ...)
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable

import torch
import torch.fx

from cachedit.fxpasses.block_chain import BlockChain, NoChain, is_static_input, shape_key

_TIMESTEP_NAME = re.compile(r"^l_(?:kwargs_)?(timesteps?|t|sigmas?)_$")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One gated part of the middle: all middle blocks (DBCache), or one block (DBPrune split, DBPrune).

    Its compiled part takes ``carried`` (the streams entering it) first and returns its outputs, then one
    residual per output: ``output j - carried[residual_of[j]]``.
    """

    part: str  # the submodule of the compiled part: "middle", or "middle<i>" per block
    reuse: str  # the node that runs it or rebuilds its outputs: "cachedit_reuse", or "cachedit_reuse<i>"
    blocks: tuple[int, ...]  # chain positions of its blocks
    carried: tuple[str, ...]
    residual_of: tuple[int, ...]
    primary: int  # index into ``carried`` of the primary stream (DBPrune compares it with the last computed step's)


@dataclasses.dataclass(frozen=True)
class StepCacheLayout:
    """How the parts connect: what the gate and the reuse node need to know about the split."""

    fn: int
    bn: int
    chain_len: int
    carried: tuple[str, ...]  # middle inputs 0..len-1: the streams entering the middle
    carried_shapes: tuple[tuple[str, ...], ...]  # sizes as text: symbolic sizes by name
    invariants: tuple[str, ...]  # head values the middle reads that do not change across blocks
    residual_of: tuple[int, ...]  # middle output j is a residual of carried input residual_of[j]
    primary: int  # index into carried of the stream whose head residual drives the decision
    timestep: str | None  # the graph input read to detect requests and CFG pairs
    latent: str | None  # the graph input the primary stream comes from: the same tensor again = a CFG call
    conditioning: str | None  # the largest other input (text embedding): made once per generation
    part_sizes: dict[str, int]  # nodes per part, for explain and tests
    segments: tuple[Segment, ...] = ()  # the gated parts in order (one, or one per middle block)

    @property
    def dbprune_split(self) -> bool:
        """The middle is cut per block (Note [DBPrune split]); not the per-block path of runtime/per_block.py."""
        return len(self.segments) > 1 or (len(self.segments) == 1 and self.segments[0].part != "middle")

    def describe(self) -> str:
        carried = ", ".join(
            f"{n} [{', '.join(s)}]" + (" (primary)" if i == self.primary else "")
            for i, (n, s) in enumerate(zip(self.carried, self.carried_shapes))
        )
        sizes = " | ".join(f"{p} {n} nodes" for p, n in self.part_sizes.items() if not p.startswith("middle") or p == "middle")
        if self.dbprune_split:
            n = sum(v for p, v in self.part_sizes.items() if p.startswith("middle"))
            sizes = sizes.replace(" | tail", f" | middle {n} nodes in {len(self.segments)} parts, one per block | tail")
        return "\n".join(
            [
                f"split F{self.fn}B{self.bn} of {self.chain_len} blocks: {sizes}",
                f"carried: {carried}",
                f"invariants: {', '.join(self.invariants) or 'none'}",
                f"timestep input: {self.timestep or 'none (caches only inside cachedit.request)'}",
                f"request signals: latent {self.latent or 'none'}, conditioning {self.conditioning or 'none'}",
            ]
        )


def find_timestep(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The graph input holding the denoising timestep, by name, else the first 0/1-d float input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if _TIMESTEP_NAME.match(node.name):
            return node
    for node in placeholders:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and not is_static_input(node) and value.is_floating_point() and value.dim() <= 1:
            return node
    return None


def find_request_inputs(
    gm: torch.fx.GraphModule, stream: torch.fx.Node, timestep: torch.fx.Node | None
) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    """The user inputs that tell requests and CFG calls apart (Note [Requests and branches]).

    latent: the largest floating-point input ``stream`` is computed from (the noisy latent);
    conditioning: the largest other floating-point input of three or more dims (the text embedding),
    else of two.
    Parameters and buffers are not user inputs.
    """
    user = [
        n
        for n in gm.graph.nodes
        if n.op == "placeholder"
        and n is not timestep
        and isinstance(n.meta.get("example_value"), torch.Tensor)
        and n.meta["example_value"].is_floating_point()
        and not _is_module_input(n)
    ]
    ancestors, frontier = set(), [stream]
    while frontier:
        node = frontier.pop()
        if node not in ancestors:
            ancestors.add(node)
            frontier += node.all_input_nodes
    by_size = sorted(user, key=lambda n: -_numel_hint(n.meta["example_value"]))
    # The model predicts something shaped like its latent: an input of the output's shape comes first, so a
    # condition larger than the latent (MiniMax Music 3's 2048-wide condition) is not taken for it.
    (output,) = gm.graph.find_nodes(op="output")
    returned: list[torch.fx.Node] = []
    torch.fx.node.map_arg(output.args[0], returned.append)
    out_key = shape_key(returned[0]) if returned else None
    by_size.sort(key=lambda n: out_key is None or shape_key(n) != out_key)  # stable: sizes order the rest
    latent = next((n for n in by_size if n in ancestors), None)
    # Batched embeddings ([B, L, D]) first: a 2-d input can be a position table the pipeline also makes
    # once per generation, but the text embedding is what differs between two requests.
    others = sorted((n for n in by_size if n is not latent), key=lambda n: n.meta["example_value"].dim() < 3)
    conditioning = next((n for n in others if n.meta["example_value"].dim() >= 2), None)
    return latent, conditioning


def _is_module_input(node: torch.fx.Node) -> bool:
    """A parameter or buffer (Dynamo marks them static), or another input read from the module itself."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return is_static_input(node) or (source is not None and "self" in source.name)


def _numel_hint(value: torch.Tensor) -> int:
    numel = value.numel()
    if isinstance(numel, int):
        return numel
    hint = getattr(getattr(numel, "node", None), "hint", None)  # a symbolic size under dynamic shapes
    return int(hint) if hint is not None else 0


def insert_step_cache_gate(
    gm: torch.fx.GraphModule,
    chain: BlockChain,
    fn: int,
    bn: int,
    make_gate: Callable[[StepCacheLayout], torch.nn.Module],
    make_reuse: Callable[[StepCacheLayout, int], torch.nn.Module],
    per_block: bool = False,
) -> tuple[torch.fx.GraphModule, StepCacheLayout]:
    """Return a top-level GraphModule: ``head`` -> ``cachedit_gate`` -> ``cachedit_reuse(middle)`` -> ``tail``.

    With ``per_block`` the middle is one part per block, each behind its own reuse node
    (``cachedit_reuse<i>(middle<i>)``, Note [DBPrune split]); ``make_reuse(layout, k)`` makes the k-th.
    Invariant: with the gate always computing, the top-level module computes exactly what ``gm`` does
    (the same nodes run in the same order; only the residual subtractions are added).
    Raises ``NoChain`` when the chain cannot be split at ``fn``/``bn``; ``gm`` is never modified.
    """
    n_blocks = len(chain)
    if fn + bn >= n_blocks:
        raise NoChain(
            f"Fn={fn} + Bn={bn} leaves no middle block to cache in a chain of {n_blocks} blocks "
            f"({chain.describe()}); lower Fn or Bn so that Fn + Bn < {n_blocks}"
        )
    nodes = list(gm.graph.nodes)
    cut_a = chain.blocks[fn].first
    cut_b = chain.blocks[n_blocks - bn].first if bn else chain.blocks[-1].last + 1

    middle_blocks = list(range(fn, n_blocks - bn))
    groups = [[b] for b in middle_blocks] if per_block else [middle_blocks]
    names = [f"middle{g[0]}" for g in groups] if per_block else ["middle"]
    starts = [chain.blocks[g[0]].first for g in groups]
    part: dict[torch.fx.Node, str] = {}
    in_middle_block: set[torch.fx.Node] = set()
    in_chain_block: set[torch.fx.Node] = set()
    for pos, node in enumerate(nodes):
        if node.op in ("placeholder", "output"):
            part[node] = node.op
            continue
        block = chain.block_of.get(node.name)
        if block is not None or any(a in in_chain_block for a in node.all_input_nodes):
            in_chain_block.add(node)
        if pos < cut_a:
            part[node] = "head"
        elif pos < cut_b:
            middle_dep = (
                (block is not None and fn <= block < n_blocks - bn)
                or any(a in in_middle_block for a in node.all_input_nodes)
                or _side_effect(node)  # keeps its place: the end of a vmap level the middle opened
            )
            if middle_dep:
                in_middle_block.add(node)
            # hoist invariants into the head; the rest goes to the segment whose range holds it
            part[node] = names[sum(pos >= start for start in starts) - 1] if middle_dep else "head"
        else:
            part[node] = "tail"

    needs = _part_inputs(nodes, part, ["head", *names, "tail", "output"])

    def uses(src: str, dst: str) -> list[torch.fx.Node]:
        return [n for n in needs[dst] if part[n] == src]

    middle_in = [n for name in names for n in uses("head", name)]
    middle_in = list(dict.fromkeys(middle_in))
    # Per segment: the streams entering it (from the head or an earlier segment), and what it hands on.
    seg_carried, seg_out = [], []
    for k, name in enumerate(names):
        earlier = {"head", *names[:k]}
        coming = [n for n in needs[name] if part[n] in earlier]
        seg_carried.append([n for n in coming if n in in_chain_block and isinstance(n.meta.get("example_value"), torch.Tensor)])
        later = {*names[k + 1 :], "tail", "output"}
        seg_out.append(list(dict.fromkeys(n for dst in later for n in needs[dst] if part[n] == name)))
        # A stream with blocks of its own outside the chain (Flux.3's text mode blocks run before the chain)
        # enters without depending on a chain block; the segment still changes it, so it is carried.
        for out in seg_out[-1]:
            if not any(shape_key(c) == shape_key(out) for c in seg_carried[-1]):
                promoted = [
                    n
                    for n in coming
                    if n not in seg_carried[-1] and isinstance(n.meta.get("example_value"), torch.Tensor)
                    and shape_key(n) == shape_key(out)
                ]
                if len(promoted) == 1:
                    seg_carried[-1].append(promoted[0])
    carried = seg_carried[0]
    invariants = [n for n in middle_in if n not in carried]  # and the sizes (SymInts) the middle reads
    middle_out = [n for outs in seg_out for n in outs if any(part[u] in ("tail", "output") for u in n.users)]
    if not carried or not middle_out:
        raise NoChain(f"the middle blocks exchange no stream with the head and tail ({chain.describe()})")
    not_tensors = [n.name for outs in seg_out for n in outs if not isinstance(n.meta.get("example_value"), torch.Tensor)]
    if not_tensors:  # a skipped middle could not provide them (not seen in any zoo model)
        raise NoChain(
            f"the blocks after the middle read non-tensor values computed inside it ({', '.join(not_tensors)}), "
            "which a cached step could not provide; compile with static shapes (dynamic=False)"
        )
    seg_residual_of = [
        tuple(_match(out, ins, "a middle output", "the streams entering the middle") for out in outs)
        for ins, outs in zip(seg_carried, seg_out)
    ]
    residual_of = seg_residual_of[0]
    # The primary stream: what the last block hands to the epilogue.
    last = chain.blocks[-1]
    final = [
        n
        for n in nodes[last.first : last.last + 1]
        if chain.block_of.get(n.name) == n_blocks - 1 and any(chain.block_of.get(u.name) is None for u in n.users)
    ]
    if not final:
        raise NoChain(f"the last block's output reaches no epilogue ({chain.describe()})")
    primary = _match(final[0], carried, "the stream leaving the chain", "the streams entering the middle")
    first = chain.blocks[0]
    entering = [
        a
        for n in nodes[first.first : first.last + 1]
        if chain.block_of.get(n.name) == 0
        for a in n.all_input_nodes
        if chain.block_of.get(a.name) is None
    ]
    entering = list(dict.fromkeys(entering))
    h0 = entering[_match(carried[primary], entering, "the primary stream", "the values entering block 0")]
    segments = tuple(
        Segment(
            part=name,
            reuse="cachedit_reuse" + name.removeprefix("middle"),
            blocks=tuple(group),
            carried=tuple(n.name for n in ins),
            residual_of=res,
            primary=_match(final[0], ins, "the stream leaving the chain", f"the streams entering {name}"),
        )
        for name, group, ins, res in zip(names, groups, seg_carried, seg_residual_of)
    )

    timestep = find_timestep(gm)
    latent, conditioning = find_request_inputs(gm, h0, timestep)
    layout = StepCacheLayout(
        fn=fn,
        bn=bn,
        chain_len=n_blocks,
        carried=tuple(n.name for n in carried),
        carried_shapes=tuple(shape_key(n)[0] for n in carried),
        invariants=tuple(n.name for n in invariants),
        residual_of=residual_of,
        primary=primary,
        timestep=timestep.name if timestep is not None else None,
        latent=latent.name if latent is not None else None,
        conditioning=conditioning.name if conditioning is not None else None,
        part_sizes={p: sum(v == p for v in part.values()) for p in ("head", *names, "tail")},
        segments=segments,
    )

    placeholders = [n for n in nodes if n.op == "placeholder"]
    head_out = middle_in + [n for n in uses("head", "tail") if n not in middle_in]
    head_out += [n for n in uses("head", "output") if n not in head_out]
    head_out = list(dict.fromkeys(head_out))
    head = _extract(
        gm,
        nodes,
        part,
        needs,
        "head",
        placeholders,
        head_out,
        extra=lambda g, env: [g.call_function(operator.sub, (env[carried[primary]], env[h0]))],
    )
    middles = []
    for name, ins, outs, res in zip(names, seg_carried, seg_out, seg_residual_of):
        others = [n for n in needs[name] if n not in ins and n.op != "placeholder"]  # invariants, sizes
        middles.append(
            _extract(
                gm,
                nodes,
                part,
                needs,
                name,
                ins + others + placeholders,
                outs,
                extra=lambda g, env, outs=outs, ins=ins, res=res: [
                    g.call_function(operator.sub, (env[out], env[ins[j]])) for out, j in zip(outs, res)
                ],
                first_inputs=len(ins) + len(others),
            )
        )
    tail_values = middle_out + [n for n in head_out if n in needs["tail"]]
    tail_out_nodes = [n for n in nodes if part[n] == "tail" and any(part[u] == "output" for u in n.users)]
    tail = _extract(gm, nodes, part, needs, "tail", tail_values + placeholders, tail_out_nodes, first_inputs=len(tail_values))

    top = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in placeholders:
        env[p] = top.placeholder(p.name)
        env[p].meta = dict(p.meta)
    *head_values, residual = _call_part(top, "head", head, env)
    env.update(zip(head_out, head_values))
    owner = env[_first_parameter(placeholders)]  # names the model instance at run time
    signals = [env[n] if n is not None else None for n in (timestep, latent, conditioning)]
    gate = top.call_module("cachedit_gate", (residual, signals[0], owner, *signals[1:]))
    for segment, outs, (_, inputs) in zip(segments, seg_out, middles):
        reuse = top.call_module(segment.reuse, (gate, top.get_attr(segment.part), *(env[n] for n in inputs)))
        for j, out in enumerate(outs):
            env[out] = top.call_function(operator.getitem, (reuse, j))
    if tail_out_nodes:
        env.update(zip(tail_out_nodes, _call_part(top, "tail", tail, env)))
    (out_node,) = [n for n in nodes if n.op == "output"]
    top.output(torch.fx.map_arg(out_node.args[0], lambda a: env[a]))

    modules = {"head": head[0], "cachedit_gate": make_gate(layout)}
    for k, (segment, (module, _)) in enumerate(zip(segments, middles)):
        modules[segment.part], modules[segment.reuse] = module, make_reuse(layout, k)
    if tail_out_nodes:
        modules["tail"] = tail[0]
    result = torch.fx.GraphModule(modules, top, class_name="CacheditStepCached")
    result.graph.lint()
    result.recompile()
    return result, layout


def _side_effect(node: torch.fx.Node) -> bool:
    """A call that opens or closes a functorch level (``torch.func.vmap``, jvp) rather than computing a value.

    It must run where it stands: hoisted out of the middle, a level's close would pair with nothing
    (Kandinsky 6 SR's flex-attention masks are built under vmap in every block), and a cached step would
    skip its open. Other impure nodes keep the usual rule: the functional collectives of context
    parallelism (``wait_tensor``) that depend on no middle block are still hoisted with their inputs.
    """
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and name.endswith(("_increment_nesting", "_decrement_nesting"))


def _first_parameter(placeholders: list[torch.fx.Node]) -> torch.fx.Node:
    for node in placeholders:
        if is_static_input(node):
            return node
    raise NoChain("the graph has no parameter input to tell model instances apart")


def _match(value: torch.fx.Node, candidates: list[torch.fx.Node], what: str, among: str) -> int:
    """Index of the candidate that ``value`` continues: same shape and dtype.

    When several candidates share the shape (text and image token counts can coincide, more so per
    rank under context parallelism), prefer the one ``value`` reaches through same-shaped ancestors
    only: the residual path of its own stream, which the other stream joins only through reshapes.
    """
    key = shape_key(value)
    same = [i for i, c in enumerate(candidates) if key is not None and shape_key(c) == key]
    if not same:
        raise NoChain(f"{what} {value.name} {key} matches none of {among} by shape and dtype")
    if len(same) > 1:
        reached, frontier = set(), [value]
        while frontier:
            node = frontier.pop()
            if node in reached:
                continue
            reached.add(node)
            frontier += [a for a in node.all_input_nodes if shape_key(a) == key]
        own = [i for i in same if candidates[i] in reached]
        if len(own) == 1:
            return own[0]
    return same[0]


def _part_inputs(
    nodes: list[torch.fx.Node], part: dict[torch.fx.Node, str], names: list[str]
) -> dict[str, list[torch.fx.Node]]:
    """Per part, the values of other parts (and graph inputs) it reads, in graph order.

    Under dynamic shapes a part also needs every symbol its values' sizes mention (Note [Sizes across
    parts]): the graph input or node that defines the symbol is added as an input, as ``split_module``
    does, so that Inductor can bind each size of each piece.
    """
    defines: dict[object, torch.fx.Node] = {}
    for node in nodes:
        value = node.meta.get("example_value")
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) and value.node.expr.is_Symbol:
            defines.setdefault(value.node.expr, node)
    needs: dict[str, dict[torch.fx.Node, None]] = {name: {} for name in names}
    for node in nodes:
        name = part[node]
        if name not in needs:
            continue
        wanted = [a for a in node.all_input_nodes if part[a] != name]
        for value in [node, *wanted] if name != "output" else []:
            for symbol in _free_symbols(value.meta.get("example_value")):
                definer = defines.get(symbol)
                if definer is not None and part[definer] != name:
                    wanted.append(definer)
        needs[name].update(dict.fromkeys(wanted))
    order = {n: i for i, n in enumerate(nodes)}
    return {name: sorted(found, key=order.__getitem__) for name, found in needs.items()}


def _free_symbols(value) -> set:
    from torch.fx.experimental.symbolic_shapes import free_symbols

    if isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, tuple, list)):
        return set(free_symbols(value))
    return set()


def _extract(gm, nodes, part, needs, name, inputs, outputs, extra=None, first_inputs=None):
    """Copy the nodes of one part into a new GraphModule taking ``inputs`` and returning ``outputs``.

    Of ``inputs``, the first ``first_inputs`` are always kept (the cross-part values, in a fixed order);
    graph placeholders after them are kept only when the part uses them.
    """
    members = [n for n in nodes if part[n] == name]
    used = set(needs[name])
    keep = first_inputs if first_inputs is not None else 0
    chosen = [n for i, n in enumerate(inputs) if i < keep or n in used]
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in chosen:
        env[n] = g.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for n in members:
        env[n] = g.node_copy(n, lambda a: env[a])
    results = [env[o] for o in outputs] + (extra(g, env) if extra else [])
    g.output(tuple(results))
    module = torch.fx.GraphModule(gm, g, class_name=f"Cachedit{name.capitalize()}")
    module.graph.lint()
    module.recompile()
    return module, chosen


def _call_part(top, name, extracted, env) -> list[torch.fx.Node]:
    """Call part ``name`` on its inputs and return one ``getitem`` node per output."""
    module, inputs = extracted
    call = top.call_module(name, tuple(env[n] for n in inputs))
    n_out = len(module.graph.find_nodes(op="output")[0].args[0])
    return [top.call_function(operator.getitem, (call, i)) for i in range(n_out)]
