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

from cachedit.config import CacheditConfig
from cachedit.fxpasses.block_chain import NoChain, find_block_chain
from cachedit.fxpasses.step_cache_gate import insert_step_cache_gate
from cachedit.runtime import registry
from cachedit.runtime.step_cache import Gate, Reuse, StepCache

log = logging.getLogger("cachedit")


class CompiledPart(torch.nn.Module):
    """One part of the split graph after the inner compiler; keeps the graph for printing."""

    def __init__(self, graph_module: torch.fx.GraphModule, compiled: Callable):
        super().__init__()
        self.graph_module = graph_module
        self.compiled = compiled

    def forward(self, *args):
        return self.compiled(*args)


def _example_inputs(part: torch.fx.GraphModule) -> list[Any]:
    return [n.meta["example_value"] for n in part.graph.nodes if n.op == "placeholder"]


def cachedit_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None, **_: Any
) -> Callable:
    """torch.compile backend: ``torch.compile(model, backend="cachedit", options={...})``."""
    try:
        config = CacheditConfig.resolve(options)
    except (ValueError, TypeError) as err:  # Note [Option errors at the first call]
        raise CacheditOptionError(str(err), inspect.currentframe()) from None
    log.setLevel(config.log.value.upper())
    inner = lookup_backend(config.inner.value)
    record = registry.CompiledGraph(config=config)
    # Filed under the model being compiled now; the gate files it under any other model instance that
    # later runs through the same graph (Dynamo shares graphs between instances of one class).
    registry.register([x for x in example_inputs if isinstance(x, torch.nn.Parameter)], record)
    start = time.perf_counter()

    def uncached(reason: str) -> Callable:
        record.declined = reason
        log.log(logging.INFO if config.disable else logging.WARNING, f"cachedit: running uncached: {reason}")
        compiled = inner(gm, example_inputs)
        record.compile_seconds = time.perf_counter() - start
        return _Keep(compiled, record)

    if config.disable:
        return uncached("disabled by configuration (CACHEDIT_DISABLE / disable=True)")
    # -- context parallelism (issue 3): shard the chain before the split (Note [Attention rewrite]) --
    mesh = None
    if config.ulysses * config.ring > 1:
        gm, mesh = _context_parallel(gm, config, record)
    # -- end context parallelism --
    try:
        chain = find_block_chain(gm)
        record.chain, record.lists = chain.describe(), chain.lists
        # Graphs of one model with the same split share its requests (Note [Requests and branches]).
        split = (config.Fn, config.Bn, chain.describe())
        cache = StepCache(config, split, on_new_owner=lambda param: registry.register([param], record))
        if mesh is not None:
            cache.reduce_sums = mesh.reduce_sums  # every rank decides on the global diff sums
        top, layout = insert_step_cache_gate(
            gm,
            chain,
            config.Fn,
            config.Bn,
            make_gate=lambda layout: Gate(cache),
            make_reuse=lambda layout: Reuse(cache, layout.residual_of),
        )
    except NoChain as reason:
        return uncached(str(reason))
    except Exception as err:  # a pass failed on a graph we did not foresee: never break the user's compile
        log.debug("cachedit: pass failed", exc_info=True)
        return uncached(f"the step-cache split failed ({type(err).__name__}: {err})")
    record.layout, record.cache = layout, cache
    for name in ("head", "middle", "tail"):
        part = getattr(top, name, None)
        if part is not None:
            setattr(top, name, CompiledPart(part, inner(part, _example_inputs(part))))
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
    heads = min(a.heads for a in plan.attentions)
    if mesh.ulysses > heads:  # correct (uneven head split), but those ranks idle during attention
        record.parallel += f"; note: ulysses={mesh.ulysses} > {heads} heads, some ranks hold no head (prefer USP)"
    log.log(logging.INFO, f"cachedit: {record.parallel}")
    return rewritten, mesh
