"""Which compiled graphs belong to which model, for ``cachedit.stats``/``explain``/``request``.

The backend never sees the module, only its parameters (Dynamo lifts them as graph inputs), so a
compiled graph is filed under the ids of its parameters. Entries hold weak references: the compiled
module owns its ``CompiledGraph``, and a graph dropped by Dynamo disappears from here too.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from typing import Any

_lock = threading.Lock()
_by_param: dict[int, list[tuple[weakref.ref, weakref.ref]]] = {}  # id(tensor) -> (tensor, graph)
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
            lines += [f"  {line}" for line in self.layout.describe().splitlines()]
        if self.declined:
            lines.append(f"  not step-cached: {self.declined}")
        return "\n".join(lines)


def register(tensors, compiled: CompiledGraph) -> None:
    """File ``compiled`` under each of ``tensors`` (a model's parameters or buffers)."""
    with _lock:
        for tensor in tensors:
            refs = _by_param.setdefault(id(tensor), [])
            refs[:] = [(t, g) for t, g in refs if t() is not None and g() is not None]
            refs.append((weakref.ref(tensor), weakref.ref(compiled)))


def lookup(tensors) -> list[CompiledGraph]:
    """The live compiled graphs filed under any of ``tensors``, oldest first, each once.

    Entries are matched by identity, not only by ``id``: a freed tensor's id can be reused.
    """
    found: dict[int, CompiledGraph] = {}
    with _lock:
        for tensor in tensors:
            for tensor_ref, graph_ref in _by_param.get(id(tensor), ()):
                graph = graph_ref()
                if graph is not None and tensor_ref() is tensor:
                    found[id(graph)] = graph
    return sorted(found.values(), key=lambda g: g.order)
