"""The ``cachedit`` torch.compile backend.

Note [cachedit backend]
~~~~~~~~~~~~~~~~~~~~~~~
Background: Dynamo hands a backend one FX graph of the whole forward, with parameters as inputs and
``nn_module_stack`` on every node. Like Dynamo's DDPOptimizer we cut that graph into parts, compile
each part with an inner compiler, and return a stitched module; between the parts runs the step-cache
gate, plain Python, so cached and computed steps share one compiled artefact (no graph break, no
recompile).

Algorithm:
  1. Resolve the configuration (options > CACHEDIT_* environment > defaults).
  2. ``find_block_chain`` -> ``insert_step_cache_gate`` (Note [Step-cache split]).
  3. Compile ``head``, ``middle`` and ``tail`` with the inner compiler on fake example inputs taken
     from each part's placeholders.
  4. File the result under the model's parameters for ``stats``/``explain``/``request``.
Any graph the passes cannot handle is compiled whole by the inner compiler, and the reason is logged
once: a model is never left uncompiled or wrong because of us.

Debugging: ``CACHEDIT_INNER=eager`` runs the parts eagerly (bitwise equal to eager when nothing is
cached); ``CACHEDIT_LOG=debug`` logs every decision; ``cachedit.explain(model)`` prints the split.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._dynamo.exc
import torch.fx
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import to_fake_tensor
from torch._subclasses.fake_tensor import FakeTensor

from cachedit.config import BlockLists, CacheditConfig, CachePolicy, CompileMode, Inner
from cachedit.fxpasses.block_chain import NoChain, find_block_chain, is_static_input
from cachedit.fxpasses.block_graph import NotABlock, analyse_block_graph, analyse_piece, graph_break_reason, original_code
from cachedit.fxpasses.step_cache_gate import insert_step_cache_gate
from cachedit.runtime import per_block, registry
from cachedit.runtime.step_cache import Gate, ListCache, Reuse, StepCache

log = logging.getLogger("cachedit")


class CompiledPart(torch.nn.Module):
    """One part of the split graph after the inner compiler; keeps the graph for printing.

    ``stored``: indices of the outputs the runtime keeps past this step (residuals); they are copied
    out of the compiled part's memory when that memory is reused by the next call (CUDA graphs, Note
    [Stored outputs under CUDA graphs]).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, compiled: Callable, stored: tuple[int, ...] = ()):
        super().__init__()
        self.graph_module = graph_module
        self.compiled = compiled
        self.stored = stored

    def forward(self, *args):
        outs = self.compiled(*args)
        if not self.stored:
            return outs
        outs = list(outs)
        for i in self.stored:
            outs[i] = outs[i].clone()  # out of the CUDA graph pool, which the next replay overwrites
        return tuple(outs)


# Note [Stored outputs under CUDA graphs]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# With mode="reduce-overhead" (or "max-autotune", or Inductor's triton.cudagraphs) every part replays a
# CUDA graph, and its outputs live in the graph's memory pool: the next replay of the same part writes
# over them. Values used within one step (streams, invariants, the tail's inputs) are safe, since one
# call runs head -> middle -> tail once. What the runtime keeps for a later step is not: the head's
# residual (compared at the next step) and the middle's residuals (added on cached steps). Those
# outputs, and only those, are cloned as they leave the part; ``CompiledPart.stored`` lists them. The
# gate and the reuse node are plain Python between the parts, so CUDA graphs see no graph break of ours
# beyond the part boundaries. Without CUDA graphs nothing is copied.


def _compile_parts(top: torch.fx.GraphModule, layout, inner: Callable, graph_inputs: dict[str, Any], cudagraphs: bool) -> None:
    """Compile every part of a split with the inner compiler; a tail that is the split of a later block
    list (``block_lists="separate"``) has its own parts compiled in turn."""
    # What the runtime keeps past a step (Note [Stored outputs under CUDA graphs]).
    outputs = lambda name: len(getattr(top, name).graph.find_nodes(op="output")[0].args[0])  # noqa: E731
    stored = {s.part: tuple(range(len(s.residual_of), outputs(s.part))) for s in layout.segments}
    stored = {"head": (outputs("head") - 1,), **stored} if cudagraphs else {}
    for name in ("head", *(s.part for s in layout.segments), "tail"):
        part = getattr(top, name, None)
        nested = getattr(part, "cachedit_layout", None)
        if nested is not None:
            _compile_parts(part, nested, inner, graph_inputs, cudagraphs)
        elif part is not None:
            compiled = inner(part, _example_inputs(part, graph_inputs))
            setattr(top, name, CompiledPart(part, compiled, stored.get(name, ())))


def _split_later_lists(top: torch.fx.GraphModule, leader: StepCache, base: CacheditConfig) -> list:
    """Split each block list after the first inside the tail before it (Note [Block lists]); returns
    ``(list path, layout)`` per list split. A list the split cannot take stays in its tail, uncached."""
    found = []
    while getattr(top, "tail", None) is not None:
        tail = top.tail
        try:
            chain = find_block_chain(tail)
            path = chain.list_paths[0]
            config = base.replace(**base.list_settings.for_list(path))
            lists = ListCache(leader, path, config)
            lists.copy_inputs, lists.reduce_sums = leader.copy_inputs, leader.reduce_sums  # the same mesh
            sub, layout = insert_step_cache_gate(
                tail,
                chain.only(path),
                config.Fn,
                config.Bn,
                lambda layout: Gate(lists),
                lambda layout, k: Reuse(lists, k, layout.segments[k]),
            )
        except NoChain as reason:
            if not found:
                log.warning(f"cachedit: block_lists='separate' found no second block list to cache after the first: {reason}")
            break
        lists.parts = len(layout.segments)
        sub.cachedit_layout = layout
        top.tail = sub
        found.append((path, layout))
        top = sub
    return found


def _example_inputs(part: torch.fx.GraphModule, graph_inputs: dict[str, Any]) -> list[Any]:
    """A part's example inputs: the model's own inputs as Dynamo handed them (``graph_inputs``), and the
    ``example_value`` of every value another part computes (same node names as in the whole graph)."""
    placeholders = part.graph.find_nodes(op="placeholder")
    return [graph_inputs.get(n.name, n.meta["example_value"]) for n in placeholders]


def _graph_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, Any]:
    """The graph's tensor inputs, faked in the fake mode Dynamo opened for the backend, by placeholder name.

    Dynamo hands a backend real example inputs and a fresh fake mode that shares its ShapeEnv. Faking
    them there with Dynamo's symbolic context (as its own backends do) keeps what ``.item()`` of a float
    attribute returns under ``dynamic=True``; Inductor would re-fake the nodes' ``example_value`` fakes
    (Dynamo's own mode) without that context, and fail on the ``.item()``. Values computed inside the
    graph keep their ``example_value``: re-faking them keeps their symbolic sizes (same ShapeEnv).
    """
    context = torch._guards.TracingContext.try_get()
    mode = context.fake_mode if context is not None else None
    found = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if mode is not None and isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            found[node.name] = to_fake_tensor(value, mode)
    return found


def cachedit_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    **unexpected: Any,
) -> Callable:
    """torch.compile backend: ``torch.compile(model, backend="cachedit", options={...})``.

    ``torch.compile(..., mode=...)`` arrives as ``mode`` (torch.compile takes ``mode`` or ``options``,
    never both; ``options={"mode": ...}`` is the same setting for users who also pass options).
    """
    if mode is not None:
        options = {**(options or {}), "mode": mode}
    try:
        config = CacheditConfig.resolve(options)
    except (ValueError, TypeError) as err:  # Note [Option errors at the first call]
        raise CacheditOptionError(str(err), inspect.currentframe()) from None
    log.setLevel(config.log.value.upper())
    if unexpected:
        log.warning(f"cachedit: ignoring backend arguments torch.compile passed that cachedit does not know: {sorted(unexpected)}")
    inner, cudagraphs = _inner_compiler(config)
    record = registry.CompiledGraph(config=config, dynamic=_dynamic_sizes(gm))
    # Filed under the model being compiled now; the gate files it under any other model instance that
    # later runs through the same graph (Dynamo shares graphs between instances of one class).
    registry.register([x for x in example_inputs if isinstance(x, torch.nn.Parameter)], record)
    start = time.perf_counter()

    def uncached(reason: str, level: int = logging.WARNING) -> Callable:
        record.declined = reason
        log.log(logging.INFO if config.disable else level, f"cachedit: running uncached: {reason}")
        compiled = inner(gm, example_inputs)
        record.compile_seconds = time.perf_counter() - start
        return _Keep(compiled, record)

    if config.disable:
        return uncached("disabled by configuration (CACHEDIT_DISABLE / disable=True)")
    # -- per-block path (issue 16): a graph of one block of a model's block list (Note [Per-block path]) --
    site = _block_site(gm, example_inputs)
    if site is not None:
        return _per_block(gm, example_inputs, config, record, inner, cudagraphs, site, uncached, start)
    piece = _parameterless_piece(gm, example_inputs, config, record, inner)
    if piece is not None:
        return piece
    # -- end per-block path --
    # -- context parallelism (issue 3): shard the chain before the split (Note [Attention rewrite]) --
    mesh = None
    if config.ulysses * config.ring > 1:
        gm, mesh = _context_parallel(gm, config, record)
    # -- end context parallelism --
    try:
        chain = find_block_chain(gm)
        record.chain, record.lists = chain.describe(), chain.lists
        # Graphs of one model with the same split share its requests (Note [Requests and branches]).
        separate = config.block_lists is BlockLists.SEPARATE
        if separate:  # the first list is cut by its own Fn/Bn (Note [Block lists])
            base, chain = config, chain.only(chain.list_paths[0])
            config = config.replace(**config.list_settings.for_list(chain.list_paths[0]))
        split = (config.Fn, config.Bn, chain.describe(), config.block_lists)
        per_block = config.policy is CachePolicy.DBPRUNE
        cache = StepCache(config, split + (per_block,), on_new_owner=lambda param: registry.register([param], record))
        if mesh is not None:
            cache.reduce_sums = mesh.reduce_sums  # every rank decides on the global diff sums
        split_args = (gm, chain, config.Fn, config.Bn, lambda layout: Gate(cache), lambda layout, k: Reuse(cache, k, layout.segments[k]))
        try:
            top, layout = insert_step_cache_gate(*split_args, per_block=per_block)
        except NoChain as reason:
            if not per_block:
                raise
            log.warning(f"cachedit: policy='dbprune' declined, caching with dbcache instead: the DBPrune split failed: {reason}")
            cache.config = config = config.replace(policy=CachePolicy.DBCACHE)
            record.config = config
            top, layout = insert_step_cache_gate(*split_args)
        cache.parts, cache.dbprune_split, cache.copy_inputs = len(layout.segments), layout.dbprune_split, cudagraphs
        cache.timestep_from_caller = layout.timestep is None  # Note [Timestep from the caller]
        cache.resumed = _resumed()
        if separate:
            record.list_layouts = _split_later_lists(top, cache, base)
            cache.has_later_lists = bool(record.list_layouts)
    except NoChain as reason:
        return uncached(str(reason))
    except Exception as err:  # a pass failed on a graph we did not foresee: never break the user's compile
        log.debug("cachedit: pass failed", exc_info=True)
        return uncached(f"the step-cache split failed ({type(err).__name__}: {err})")
    record.layout, record.cache = layout, cache
    _compile_parts(top, layout, inner, _graph_inputs(gm, example_inputs), cudagraphs)
    top.cachedit_record = record  # the top module owns the record (the registry holds it weakly)
    record.module = weakref.ref(top)
    record.compile_seconds = time.perf_counter() - start
    log.log(logging.INFO, f"cachedit: step-cached {chain.describe()}: {layout.describe()}")
    return top


# Note [Option errors at the first call]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torch.compile(backend="cachedit", options=...) only stores the options (torch 2.13: in
# ``_TorchCompileWrapper.kwargs``); nothing of ours runs until Dynamo has traced the first call and hands
# us the graph, so a bad option cannot fail at torch.compile (``cachedit.enable`` checks its options
# itself, before compiling). Dynamo wraps any other exception from a backend in BackendCompilerFailed,
# whose traceback starts deep in Dynamo; a ``ShortenTraceback`` passes through unwrapped and is re-raised
# with the frames above ``first_useful_frame`` cut. So the user sees their call, torch.compile's four
# wrapper frames and this module's line, then the message, whose first line names the option (Dynamo
# appends a hint about TORCHDYNAMO_VERBOSE). Checked on torch 2.13: 21 lines in all, against 46 that
# ended in "BackendCompilerFailed: backend='cachedit' raised:" and only then named the option. A torch
# without ShortenTraceback gets the plain error, wrapped as before.
_PASS_THROUGH = (torch._dynamo.exc.ShortenTraceback,) if hasattr(torch._dynamo.exc, "ShortenTraceback") else ()


class CacheditOptionError(*_PASS_THROUGH, ValueError, TypeError):
    """A bad cachedit option, environment variable or config object, found when the model was compiled."""

    def __init__(self, message: str, frame: types.FrameType | None):
        if _PASS_THROUGH:
            super().__init__(message, first_useful_frame=frame)
        else:
            super().__init__(message)


# -- per-block path (issue 16) -----------------------------------------------------------------------------


def _block_site(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """``(ModelBlocks, (list path, index))`` when every parameter of ``gm`` belongs to one block of a model
    that is calling it and the graph holds no block chain of its own (Note [Per-block path]); None
    otherwise (the whole-graph path)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    params = [v for n, v in zip(placeholders, example_inputs) if is_static_input(n) and isinstance(v, torch.Tensor)]
    if not params:
        return None
    try:
        find_block_chain(gm)
        return None  # the graph holds a chain of its own: a whole transformer (say, one of a ModuleList of them)
    except Exception:
        pass
    site = per_block.find_block(params[0])
    if site is None or any(site[0].key_of(p) != site[1] for p in params):
        return None
    return site


def _per_block(gm, example_inputs, config, record, inner, cudagraphs, site, uncached, start) -> Callable:
    """Compile one block's graph whole and wrap it in a ``BlockRunner`` (Note [Per-block path])."""
    blocks, key = site
    module = blocks.module(key)
    name = type(module).__name__
    context = torch._guards.TracingContext.try_get()
    code = context.traced_code[0] if context is not None and context.traced_code else None
    record.chain = f"per-block: one {name} block of {key[0]}[{blocks.sizes[key[0]]}]"
    if config.ulysses * config.ring > 1:
        return uncached(f"{name} is compiled on its own; context parallelism needs the whole transformer in one graph")
    broke = graph_break_reason(gm)
    body = per_block.block_body(module)
    forwards = {per_block.forward_code(module), per_block.forward_code(body)}
    resumed = original_code(code) if code is not None else None
    if code is None or (code in forwards and broke is None):
        kind = per_block.WHOLE
    elif code in forwards:
        kind = per_block.START
    elif resumed in forwards:
        kind = per_block.END if broke is None else per_block.MID
    else:
        kind = per_block.INNER  # a frame nested inside the block (attention processor, MoE experts)
    try:
        layout = analyse_block_graph(gm) if kind == per_block.WHOLE else analyse_piece(gm)
    except NotABlock as err:
        level = logging.DEBUG if blocks.warned else logging.WARNING  # said once per model, not per graph
        blocks.warned = True
        return uncached(f"{name}: {err}; the per-block path needs the block's outputs to continue its inputs", level)
    if kind != per_block.WHOLE:
        record.chain += f" ({kind} piece: {code.co_name}, graph breaks split the block)"
    if kind == per_block.START:
        per_block.piece_codes[code] = name
    if config.policy is CachePolicy.DBPRUNE:  # DBPrune's DBPrune split lives in the whole graph
        log.warning("cachedit: policy='dbprune' needs the whole transformer in one graph; caching with dbcache")
        config = config.replace(policy=CachePolicy.DBCACHE)
        record.config = config
    split = ("per-block", config.Fn, config.Bn)  # every block graph of a model serves the same requests
    cache = StepCache(config, split, on_new_owner=lambda param: registry.register([param], record))
    compiled = inner(gm, example_inputs)
    runner = per_block.BlockRunner(compiled, layout, cache, record, kind=kind, clone=cudagraphs)
    record.cache, record.layout = cache, per_block.PerBlockView(runner, name)
    record.compile_seconds = time.perf_counter() - start
    log.log(logging.INFO, f"cachedit: per-block: {name} ({layout.describe()})")
    return runner


def _parameterless_piece(gm, example_inputs, config, record, inner) -> Callable | None:
    """A resume function of a split block's ``forward`` that uses no parameter (Nucleus MoE's
    ``hidden_states + gate * mlp_output`` after the expert dispatch): at run time it belongs to the block
    in progress in the calling context. None for any other graph."""
    context = torch._guards.TracingContext.try_get()
    code = context.traced_code[0] if context is not None and context.traced_code else None
    if code is None or code in per_block.piece_codes:
        return None
    name = per_block.piece_codes.get(original_code(code))
    if name is None or any(is_static_input(n) for n in gm.graph.find_nodes(op="placeholder")):
        return None
    kind = per_block.END if graph_break_reason(gm) is None else per_block.MID
    layout = analyse_piece(gm)
    cache = StepCache(config, ("per-block", config.Fn, config.Bn))
    runner = per_block.BlockRunner(inner(gm, example_inputs), layout, cache, record, kind=kind)
    record.chain = f"per-block: a {kind} piece of a {name} block without parameters ({code.co_name})"
    record.layout = per_block.PerBlockView(runner, name)
    return runner


def _resumed() -> bool:
    """Whether Dynamo is compiling the code after a graph break (a resume function), not a frame's start."""
    context = torch._guards.TracingContext.try_get()
    code = context.traced_code[0] if context is not None and context.traced_code else None
    return code is not None and code.co_name.startswith("torch_dynamo_resume_in_")


def _dynamic_sizes(gm: torch.fx.GraphModule) -> str | None:
    """The graph inputs with symbolic sizes, e.g. ``hidden_states[1]=s0, encoder_hidden_states[1]=s1``."""
    found, in_tensors, scalars = [], set(), []
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        name = node.name.removeprefix("l_").removeprefix("kwargs_").removesuffix("_")
        if isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.free_symbols:
                    found.append(f"{name}[{d}]={size}")
                    in_tensors |= size.node.expr.free_symbols
        elif isinstance(value, torch.SymInt) and value.node.expr.free_symbols:
            scalars.append((name, value))
    for name, v in scalars:  # integer inputs (sizes Dynamo lifted as inputs of their own)
        if not v.node.expr.free_symbols <= in_tensors:
            found.append(f"{name}={v}" if name != str(v) else f"integer input {v}")
    return ", ".join(found) or None


def _inner_compiler(config: CacheditConfig) -> tuple[Callable, bool]:
    """The compiler for each part, with the user's mode and Inductor options; and whether it uses CUDA graphs.

    The mode's Inductor settings are those torch.compile itself applies (``list_mode_options``), with
    ``options={"inductor": {...}}`` on top, passed as ``config_patches`` to this compile only (never as
    Inductor globals).
    """
    inner = lookup_backend(config.inner.value)
    if config.inner is not Inner.INDUCTOR:
        if config.mode is not CompileMode.DEFAULT or config.inductor:
            log.warning(
                f"cachedit: mode={config.mode.value!r} and Inductor options {config.inductor.as_dict()} do not apply "
                f"to inner={config.inner.value!r}; the parts run uncompiled by Inductor (unset CACHEDIT_INNER to use them)"
            )
        return inner, False
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    patches = {**list_mode_options(config.mode.value), **config.inductor.as_dict()}
    cudagraphs = bool(patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs))
    return (functools.partial(inner, config_patches=patches) if patches else inner), cudagraphs


class _Keep:
    """A plain compiled function that also keeps its ``CompiledGraph`` record alive."""

    def __init__(self, compiled: Callable, record: registry.CompiledGraph):
        self.compiled = compiled
        self.cachedit_record = record

    def __call__(self, *args):
        return self.compiled(*args)


# -- context parallelism (issue 3) -------------------------------------------------------------------------


def _context_parallel(gm: torch.fx.GraphModule, config: CacheditConfig, record: registry.CompiledGraph):
    """Shard ``gm``'s chain over the ``ulysses × ring`` mesh; ``(gm, None)`` (replicated) when no plan is safe.

    A bad mesh (``u·r`` is not the world size, more ranks than tokens) raises before any collective.
    Every rank must take the same branch, so the ranks agree on the outcome before using it.
    """
    from cachedit.fxpasses.attention import rewrite_attention
    from cachedit.fxpasses.shard_plan import ShardDeclined, plan_sequence_sharding
    from cachedit.runtime.parallel import context_parallel_mesh

    mesh = context_parallel_mesh(config)
    rewritten, reason, plan = gm, None, None
    try:
        chain = find_block_chain(gm)
        plan = plan_sequence_sharding(gm, chain)
    except (NoChain, ShardDeclined) as err:
        reason = str(err)
    except Exception as err:  # a graph we did not foresee: run replicated, never break the compile
        reason = f"the sharding plan failed ({type(err).__name__}: {err})"
    if plan is not None:
        mesh.check_sizes(min(a.q.size for a in plan.attentions), "the smallest attention")  # same on every rank
        try:
            rewritten = rewrite_attention(gm, chain, plan, mesh)
        except ShardDeclined as err:
            reason = str(err)
        except Exception as err:
            reason = f"the attention rewrite failed ({type(err).__name__}: {err})"
    if not mesh.agree(reason is None):
        reason = reason or "another rank declined its plan"
        record.parallel = f"replicated on {mesh.world} ranks ({mesh.mode} declined): {reason}"
        log.log(logging.WARNING, f"cachedit: context parallelism declined, running replicated: {reason}")
        return gm, None
    record.parallel = f"{mesh.describe()}: {plan.describe()}"
    if mesh.ring > 1:
        record.parallel += f"; ring attention kernel: {_ring_kernels(gm, plan)}"
    heads = min(a.heads for a in plan.attentions)
    if mesh.ulysses > heads:  # correct (uneven head split), but those ranks idle during attention
        record.parallel += f"; note: ulysses={mesh.ulysses} > {heads} heads, some ranks hold no head (prefer USP)"
    log.log(logging.INFO, f"cachedit: {record.parallel}")
    return rewritten, mesh


def _ring_kernels(gm: torch.fx.GraphModule, plan) -> str:
    """The LSE kernels Ring attention runs for the plan's attentions, judged from their example inputs
    (Note [LSE attention kernels]); the kernel is chosen again per call from the real tensors."""
    from cachedit.kernels.attention_lse import lse_kernel

    nodes = {n.name: n for n in gm.graph.nodes}
    found = set()
    for site in plan.attentions:
        node = nodes.get(site.node)
        if node is None:
            continue
        named = ("query", "key", "value", "attn_mask")
        args = [node.args[i] if i < len(node.args) else node.kwargs.get(name) for i, name in enumerate(named)]
        q, k, v, mask = (a.meta.get("example_value") if isinstance(a, torch.fx.Node) else None for a in args)
        if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            found.add(lse_kernel(q, k, v, mask).value)
    return ", ".join(sorted(found)) or "not determined at compile time"
