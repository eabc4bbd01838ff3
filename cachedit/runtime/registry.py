"""Which compiled graphs and request state belong to which model, for ``cachedit.stats``/``explain``/``request``.

The backend never sees the module, only its parameters (Dynamo lifts them as graph inputs), so a
compiled graph is filed under the ids of its parameters. Entries hold weak references: the compiled
module owns its ``CompiledGraph``, and a graph dropped by Dynamo disappears from here too; an entry
whose tensor or graph dies is removed by its weak reference's callback.

``shared`` finds the one request-state object of a model instance and split, so that every graph
Dynamo compiles for that model (a concurrent first call, a recompile for a new guard) serves the same
requests. The graphs own that object; this index only finds it (Note [Requests and branches]).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_by_param: dict[int, list[tuple[weakref.ref, weakref.ref]]] = {}  # id(tensor) -> (tensor, graph)
_dead: list[int] = []  # keys whose tensor or graph died since the last purge
_order = itertools.count()


@dataclasses.dataclass(eq=False)
class CompiledGraph:
    """What the backend did with one Dynamo graph: the parts, the chain, or why it declined."""

    config: Any
    chain: str | None = None
    lists: tuple = ()
    layout: Any = None
    declined: str | None = None
    cache: Any = None  # the StepCache, when the graph is step-cached
    module: Any = None  # weak reference to the stitched top-level module, when step-cached
    parallel: str | None = None  # the context-parallel plan applied, or why it was declined
    compile_seconds: float = 0.0
    dynamic: str | None = None  # the graph inputs whose sizes are symbolic, and their symbols
    list_layouts: list = dataclasses.field(default_factory=list)  # block_lists="separate": (path, layout) after the first
    order: int = dataclasses.field(default_factory=lambda: next(_order))

    def describe(self) -> str:
        compiler = f"inner: {self.config.inner.value}"
        mode = getattr(self.config, "mode", None)
        if mode is not None and self.config.inner.value == "inductor":
            compiler += f", mode: {mode.value}"
            if self.config.inductor:
                compiler += f", inductor options: {self.config.inductor.as_dict()}"
        elif mode is not None and (mode.value != "default" or self.config.inductor):
            compiler += f", mode: {mode.value} (not applied: the inner compiler is not Inductor)"
        lines = [f"graph #{self.order} ({compiler}, compiled in {self.compile_seconds:.1f} s)"]
        lines.append(f"  dynamic sizes: {self.dynamic}" if self.dynamic else "  sizes: static")
        for path, count, verdict in self.lists:
            lines.append(f"  block list {path} [{count}]: {verdict}")
        if self.chain:
            lines.append(f"  chain: {self.chain}")
        if self.parallel:
            lines.append(f"  context parallel: {self.parallel}")
        if self.layout is not None:
            if not getattr(self.layout, "per_block", False):
                lines.append("  path: whole graph (the chain in one graph; Note [Step-cache split])")
            described = self.layout.describe()
            source = getattr(self.cache, "timestep_source", None)
            if source:  # Note [Timestep from the caller]
                described = described.replace(
                    "timestep input: none (caches only inside cachedit.request)",
                    f"timestep input: none in this graph; detected requests read {source}",
                )
            lines += [f"  {line}" for line in described.splitlines()]
        for path, layout in self.list_layouts:  # a later block list decides on its own (block_lists="separate")
            split, carried = layout.describe().splitlines()[:2]
            lines += [f"  block list {path}, its own state: {split}", f"    {carried}"]
        if self.declined:
            lines.append(f"  not step-cached: {self.declined}")
        if self.cache is not None:
            states = self.cache.states_for(None)
            requests = sum(len(s.requests()) for s in states)
            held = sum(s.bytes_held() for s in states)
            lines.append(f"  requests holding state: {requests}, residual bytes held: {held}")
        return "\n".join(lines)


def register(tensors, compiled: CompiledGraph) -> None:
    """File ``compiled`` under each of ``tensors`` (a model's parameters or buffers)."""
    with _lock:
        for tensor in tensors:
            key = id(tensor)
            refs = _by_param.setdefault(key, [])
            refs[:] = [(t, g) for t, g in refs if t() is not None and g() is not None]
            drop = lambda _ref, key=key: _dead.append(key)  # noqa: E731  (a callback may run inside _lock)
            refs.append((weakref.ref(tensor, drop), weakref.ref(compiled, drop)))
        _purge()


def _purge() -> None:
    """Remove the entries whose tensor or graph died (called under ``_lock``)."""
    while _dead:
        key = _dead.pop()
        refs = [(t, g) for t, g in _by_param.get(key, ()) if t() is not None and g() is not None]
        if refs:
            _by_param[key] = refs
        else:
            _by_param.pop(key, None)


def filed(tensors) -> int:
    """How many of ``tensors`` have entries, live or not yet purged (for tests of the clean-up)."""
    with _lock:
        _purge()
        return sum(id(t) in _by_param for t in tensors)


_shared: dict[tuple[int, Any], weakref.ref] = {}  # (id(param), split) -> the state object


def shared(param, split: Any, create: Callable[[], Any]) -> Any:
    """The state object filed under ``param`` and ``split``, made by ``create()`` when there is none.

    The object must have a ``param`` attribute (a weak reference to ``param``) so that an entry whose
    parameter died and whose id was reused is not mistaken for this one.
    """
    key = (id(param), split)
    with _lock:
        ref = _shared.get(key)
        state = ref() if ref is not None else None
        if state is None or state.param() is not param:
            state = create()
            _shared[key] = weakref.ref(state)
        for k in [k for k, r in _shared.items() if r() is None]:
            del _shared[k]
        return state


def lookup(tensors) -> list[CompiledGraph]:
    """The live compiled graphs filed under any of ``tensors``, oldest first, each once.

    Entries are matched by identity, not only by ``id``: a freed tensor's id can be reused.
    """
    found: dict[int, CompiledGraph] = {}
    with _lock:
        _purge()
        for tensor in tensors:
            for tensor_ref, graph_ref in _by_param.get(id(tensor), ()):
                graph = graph_ref()
                if graph is not None and tensor_ref() is tensor:
                    found[id(graph)] = graph
    return sorted(found.values(), key=lambda g: g.order)
