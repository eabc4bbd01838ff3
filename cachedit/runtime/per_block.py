"""Step caching when each transformer block is a graph of its own: the per-block path.

Note [Per-block path]
~~~~~~~~~~~~~~~~~~~~~
Background: the whole-graph path (Note [Step-cache split]) needs the chain of blocks inside one Dynamo
graph. Two common set-ups never give it one: diffusers' regional compilation
(``transformer.compile_repeated_blocks(backend="cachedit")``, or ``torch.compile`` on each block), and a
top-level forward that Dynamo skips (a data-dependent branch or an ``.item()`` in it: HunyuanVideo 1.5,
Framepack), after which Dynamo compiles each block's ``forward`` as its own frame. One mechanism serves
both: every block graph is compiled whole by the inner compiler and wrapped in a ``BlockRunner``; the
runners of one model share a ``ModelBlocks`` that follows each forward through the chain and asks the
same ``StepCache`` as the whole-graph path for the decision.

Which block a call is: with parameters lifted as inputs one graph serves every block of a class, so a
call is named by the identity of its first parameter. ``ModelBlocks`` maps every parameter of every
block of a model to ``(list path, index)``; it is built once per model instance from the model's
``nn.ModuleList``s of repeated modules (outermost lists only: MoE experts inside a block are not
blocks). The model itself is found on the Python call stack, where its ``forward`` is calling the
block: the outermost frame whose ``self`` is a module with a block list holding that parameter. So a
block graph is recognised by what its parameters are, and a model that calls no list of blocks (the
whole transformer in one graph) never matches.

The chain, and a forward: the first forward of a model computes every block and learns the chain: the
longest run of consecutive block calls in which each block's primary stream is (the same tensor as) an
output of the block before it; Flux's 19 double and 38 single blocks are one run, a text refiner or a
list of caption projections is not. Blocks outside the chain run as they are. A forward starts when the
chain's first block is called (in the first forward: when a block is called a second time); forwards
are tracked per execution context (thread or asyncio task), like detected requests.

Per forward, at chain position ``p`` of ``N`` (``Fn`` head, ``Bn`` tail blocks):
  - ``p < Fn``: the block runs. At ``p = Fn - 1`` the head residual (primary stream after it minus the
    primary stream entering block 0) goes to ``StepCache.gate``, with the timestep: the one host read
    of the step, as on the whole-graph path.
  - ``Fn <= p < N - Bn`` on a cached step: the block's graph does not run; it returns its stream inputs
    unchanged, and the last middle block returns the streams that entered block ``Fn`` plus the cached
    residuals (or the calibrator's forecast) through ``StepCache.reuse``. On a computed step the blocks
    run and the last one stores ``output - stream entering block Fn`` per stream, through ``reuse``.
  - ``p >= N - Bn``: the block runs.
The first forward's step is recorded when the second forward starts (its chain was not known before):
the head residual and the middle residuals are computed then from references kept during the first
forward (bounded: the streams entering block 0, leaving block Fn - 1, and leaving the last Bn + 1
blocks of the longest run so far).

Request signals: blocks see the time embedding, not the timestep. The timestep is read from the
model's own ``forward`` frame (a local named ``timestep``, ``timesteps``, ``t``, ``sigma`` or
``sigmas``), found once per forward on the call stack; a monotone rescaling in the forward (Flux's
``timestep * 1000``) keeps the equality and direction the request rules use. No latent or conditioning
tensor reaches the blocks unchanged, so CFG calls pair by a repeated timestep (Note [Requests and
branches], the rule without a latent signal); without a timestep local, only ``cachedit.request`` caches.

Blocks that graph breaks split (Mochi's ``nonzero``, HiDream's and Nucleus MoE's expert dispatch):
Dynamo then compiles, per block, its ``forward`` up to the first break (``start``), the resume functions
of that forward (``mid``; ``end`` returns the block's result), and frames nested inside the block
(``inner``: attention processors, MoE gates and experts), with eager Python between them. A piece is
placed by its parameters, or, without any (a resume function that only adds a gated output), as a piece
of the block in progress in its context; ``start`` records the block's inputs by name and ``end``'s
outputs are matched to them by name and shape. On a cached step a middle block's ``start`` and ``mid``
pieces return zeros of their outputs' shapes instead of running, ``inner`` pieces run (on those zeros),
and ``end`` returns the streams as a whole block does. Cost: the Python between pieces still runs on a
skipped block, and with it any host read the model itself makes there (MoE routing's ``.cpu()`` /
``.tolist()``: those are the model's, once per block, cached step or not); Mochi's attention processor,
which Dynamo runs eagerly, runs on zeros. cachedit itself still reads the host once per step.

Differences from the whole-graph path: every stream a middle block hands on is cached (Flux also
keeps the text stream's residual with ``Bn = 0``, where the whole graph keeps only the image stream;
the outputs are the same). Python runs around each block call (a dict lookup and a few comparisons).
Context parallelism needs the whole graph and is declined here.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import sys
import threading
import weakref
from typing import Any

import torch

from cachedit.runtime import rows
from cachedit.runtime.step_cache import _ACTIVE, StepCache, _execution_context, timestep_local

log = logging.getLogger("cachedit")

_MAX_FRAMES = 400  # how far up the call stack a model's frame is looked for


def block_lists(model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The outermost ``nn.ModuleList``s of ``model`` holding two or more modules of one non-torch class."""
    found: dict[str, torch.nn.ModuleList] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue  # inside a block of an outer list (MoE experts, a block's own sub-layers)
        classes = {type(m) for m in module}
        if len(classes) != 1 or next(iter(classes)).__module__.startswith("torch."):
            continue
        found[name] = module
    return found


@dataclasses.dataclass(eq=False)
class _Run:
    """A run of consecutive joined block calls in a model's first forward (Note [Per-block path])."""

    h0: torch.Tensor  # primary stream entering its first block
    keys: list = dataclasses.field(default_factory=list)
    fn_out: dict | None = None  # streams leaving its block Fn - 1
    fn_runner: Any = None  # the runner of that block: its StepCache gates
    last: collections.deque | None = None  # streams leaving its last Bn + 1 blocks at positions >= Fn
    prev_outs: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Forward:
    """One forward of one execution context through the chain."""

    timestep: torch.Tensor | None
    token: Any  # the explicit request open when it started
    pos: int = 0
    h0: torch.Tensor | None = None
    gated: tuple | None = None
    entering: dict | None = None
    current: tuple | None = None  # the block in progress
    inputs: dict | None = None  # its inputs by name, as its first piece received them
    skip: bool = False  # its graphs do not run (a middle block on a cached step)
    # the learning forward only (chain unknown):
    seen: set = dataclasses.field(default_factory=set)
    run: _Run | None = None
    best: _Run | None = None


class ModelBlocks:
    """One model instance: its blocks by parameter, the learned chain, the forwards in flight."""

    def __init__(self, model: torch.nn.Module, lists: dict[str, torch.nn.ModuleList]):
        self.model = weakref.ref(model)
        self.owner = weakref.ref(next(model.parameters()))  # names the model to StepCache
        self.sizes = {path: len(lst) for path, lst in lists.items()}
        self.of_param: dict[int, tuple[tuple[str, int], weakref.ref]] = {}
        for path, lst in lists.items():
            for i, block in enumerate(lst):
                for p in block.parameters():
                    self.of_param[id(p)] = ((path, i), weakref.ref(p))
        self.code = None  # the code of the model's frame that calls the blocks
        self.chain: tuple | None = None
        self.position: dict = {}
        self.fn = self.bn = 0
        self.note: str | None = None  # why nothing is cached, once known
        self.forwards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()
        self.warned = False
        self.timestep_source = "not read yet"
        self.ref = weakref.ref(self)

    def key_of(self, param: torch.Tensor) -> tuple[str, int] | None:
        entry = self.of_param.get(id(param))
        return entry[0] if entry is not None and entry[1]() is param else None

    def module(self, key: tuple[str, int]) -> torch.nn.Module | None:
        model = self.model()
        return None if model is None else model.get_submodule(key[0])[key[1]]

    def describe(self) -> str:
        if self.chain is None:
            return "chain: not learned yet (the first forward computes every block and learns it)"
        if not self.chain:
            return f"chain: none ({self.note})"
        counts = collections.Counter(k[0] for k in self.chain)
        n, fn, bn = len(self.chain), self.fn, self.bn
        text = " -> ".join(f"{p}[{c}]" for p, c in counts.items())
        return (
            f"chain (learned at the first forward): {text}; split F{fn}B{bn}: middle blocks {fn}..{n - bn - 1} of {n}"
            f"\ntimestep: {self.timestep_source}"
        )

    # -- the model's frame ------------------------------------------------------------------------

    def _model_locals(self) -> dict | None:
        """The locals of the model's frame that is calling the blocks, found on the call stack."""
        model = self.model()
        frame = sys._getframe(2)
        fallback = None
        for _ in range(_MAX_FRAMES):
            if frame is None:
                break
            code = frame.f_code
            if code is self.code:
                return frame.f_locals
            if fallback is None and code.co_argcount and code.co_varnames[0] == "self":
                if code.co_filename != torch.nn.Module.__call__.__code__.co_filename and frame.f_locals.get("self") is model:
                    fallback = frame.f_locals  # the innermost frame of the model (a resume function, ...)
            frame = frame.f_back
        return fallback

    def _timestep(self) -> torch.Tensor | None:
        """The timestep the model's forward holds now (``timestep_local``); None when it holds none."""
        found = timestep_local(self._model_locals() or {})
        if found is not None:
            self.timestep_source = f"the local {found[0]!r} of the model's forward"
            return found[1]
        self.timestep_source = (
            "none: no 0-d/1-d local named timestep, timesteps, t, sigma or sigmas in the model's forward when "
            "its blocks run (caches only inside cachedit.request / cachedit.enable)"
        )
        return None

    # -- a block call -----------------------------------------------------------------------------

    def call(self, runner: BlockRunner, key: tuple[str, int], args: tuple) -> Any:
        kind = runner.kind
        if kind == INNER:
            return runner.compiled(*args)
        rows.one_request_only(self.owner())
        context = _execution_context()
        if self.chain is None:
            return self._learn(runner, key, args, context)
        pos = self.position.get(key)
        if pos is None:
            return runner.compiled(*args)  # a block outside the chain
        fwd = self.forwards.get(context)
        n, fn, bn = len(self.chain), self.fn, self.bn
        if kind in (WHOLE, START):  # the block begins
            if pos == 0:
                fwd = self.forwards[context] = _Forward(self._timestep(), _ACTIVE.get())
            elif fwd is None or fwd.pos != pos:
                if fwd is not None and fwd.skip:
                    log.warning(f"cachedit: block {key[0]}[{key[1]}] ran out of the chain's order on a cached step")
                self.forwards.pop(context, None)
                return runner.compiled(*args)
            fwd.pos, fwd.current = pos + 1, key
            _current[context] = self.ref
            fwd.inputs = runner.inputs_of(args)
            if pos == 0:
                fwd.h0 = runner.keep(fwd.inputs[runner.primary_in(fwd.inputs)])
            if pos == fn:
                fwd.entering = {name: runner.keep(t) for name, t in fwd.inputs.items()}
            fwd.skip = fn <= pos < n - bn and fwd.gated is not None and fwd.gated[0].cache
            if kind == START:
                return runner.fake(args) if fwd.skip else runner.compiled(*args)
        elif fwd is None or fwd.current != key:
            return runner.compiled(*args)  # a piece of a block whose beginning was not seen
        elif kind == MID:
            return runner.fake(args) if fwd.skip else runner.compiled(*args)
        # The block ends here (WHOLE or END): its outputs are streams.
        names = runner.stream_names(fwd.inputs)
        if names is None:  # the outputs do not continue the block's inputs: nothing to cache around
            return runner.compiled(*args)
        if pos < fn:
            outs = runner.compiled(*args)
            if pos == fn - 1:
                residual = outs[runner.primary_out(names)] - fwd.h0
                fwd.gated = _gate(runner.cache, residual, fwd.timestep, self.owner())
            return outs
        if pos >= n - bn or fwd.gated is None:
            if pos == n - 1:
                self.forwards.pop(context, None)
            return runner.compiled(*args)
        if pos < n - bn - 1:
            return [fwd.inputs[name] for name in names] if fwd.skip else runner.compiled(*args)
        # The last middle block: reuse the cached residuals, or run and store them.
        entering = [fwd.entering[name] for name in names]

        def middle(*inputs):
            outs = runner.compiled(*args)
            return (*outs, *(o - x for o, x in zip(outs, inputs)))

        outs = runner.cache.reuse(fwd.gated, middle, 0, _segment(len(entering)), entering)
        if bn == 0:
            self.forwards.pop(context, None)
        return list(outs)

    def _learn(self, runner: BlockRunner, key: tuple[str, int], args: tuple, context: object) -> Any:
        """A block call while the chain is unknown: run it and follow the runs of joined blocks."""
        kind = runner.kind
        fwd = self.forwards.get(context)
        if kind in (WHOLE, START):
            if fwd is None or key in fwd.seen:  # a new forward
                if fwd is not None:
                    self._finish_learning(fwd)
                    if self.chain is not None:
                        return self.call(runner, key, args)
                self.fn, self.bn = runner.cache.config.Fn, runner.cache.config.Bn
                fwd = self.forwards[context] = _Forward(self._timestep(), _ACTIVE.get())
            fwd.seen.add(key)
            fwd.current, fwd.inputs = key, runner.inputs_of(args)
            _current[context] = self.ref
            primary_in = fwd.inputs[runner.primary_in(fwd.inputs)]
            run = fwd.run
            if run is None or not any(primary_in is o for o in run.prev_outs):
                self._close_run(fwd)
                run = fwd.run = _Run(runner.keep(primary_in), last=collections.deque(maxlen=self.bn + 1))
            run.keys.append(key)
            if kind == START:
                return runner.compiled(*args)
        elif fwd is None or fwd.current != key or kind == MID:
            return runner.compiled(*args)
        outs = runner.compiled(*args)
        names = runner.stream_names(fwd.inputs)
        run = fwd.run
        if names is None or run is None:
            self._close_run(fwd)
            return outs
        pos = len(run.keys) - 1
        named = {name: runner.keep(o) for name, o in zip(names, outs)}
        if pos == self.fn - 1:
            run.fn_out, run.fn_runner = named, (runner, names)
        if pos >= self.fn:
            run.last.append((named, runner))
        run.prev_outs = list(outs)
        return outs

    @staticmethod
    def _close_run(fwd: _Forward) -> None:
        run, fwd.run = fwd.run, None
        if run is not None:
            run.prev_outs = []
            if fwd.best is None or len(run.keys) > len(fwd.best.keys):
                fwd.best = run

    def _finish_learning(self, fwd: _Forward) -> None:
        """The first forward ended: fix the chain and record its step (Note [Per-block path])."""
        self._close_run(fwd)
        best, fn, bn = fwd.best, self.fn, self.bn
        with self.lock:
            if self.chain is not None:
                return  # another context learned it first; this forward's step is not recorded
            if best is None or len(best.keys) <= fn + bn:
                found = len(best.keys) if best is not None else 0
                self.note = (
                    f"the longest run of joined blocks has {found}; Fn={fn} + Bn={bn} must leave a middle block: "
                    f"lower Fn or Bn"
                )
                self.chain = ()
                log.warning(f"cachedit: per-block path caches nothing: {self.note}")
                return
            last_named, last_runner = best.last[0]
            if not set(last_named) <= set(best.fn_out):
                self.note = (
                    f"the streams leaving the middle ({', '.join(last_named)}) are not all among those entering it "
                    f"({', '.join(best.fn_out)})"
                )
                self.chain = ()
                log.warning(f"cachedit: per-block path caches nothing: {self.note}")
                return
            self.chain = tuple(best.keys)
            self.position = {k: i for i, k in enumerate(self.chain)}
        log.info(f"cachedit: per-block {self.describe()}")
        if _ACTIVE.get() is not fwd.token or self.owner() is None:
            return  # the request that made the first forward is over: nothing of it to record
        runner, fn_names = best.fn_runner
        primary = fn_names[runner.primary_out(fn_names)]
        gated = _gate(runner.cache, best.fn_out[primary] - best.h0, fwd.timestep, self.owner())
        if gated[0].cache:  # step 0 of a request always computes; a later step was never seen here
            return
        names = list(last_named)
        entering = [best.fn_out[name] for name in names]
        outs = [last_named[name] for name in names]
        last_runner.cache.reuse(
            gated, lambda *inputs: (*outs, *(o - x for o, x in zip(outs, inputs))), 0, _segment(len(names)), entering
        )


def _gate(cache, residual, timestep, param) -> tuple:
    """``cache.gate`` for this path, which runs one request per call, also under ``cachedit.rows``."""
    tagged = rows.active(param)
    if tagged is not None:
        return rows.gate_one_request(cache, tagged, residual, timestep, param)
    return cache.gate(residual, timestep, param, None, None)


@dataclasses.dataclass(frozen=True)
class _Segment:
    """What ``StepCache.reuse`` needs of the one gated part: output j continues stream j."""

    residual_of: tuple[int, ...]
    primary: int = 0


def _segment(n: int) -> _Segment:
    return _Segment(tuple(range(n)))


_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ModelBlocks, or None: no lists
_by_param: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(block parameter) -> (parameter, ModelBlocks)
_lock = threading.Lock()
_current: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # context -> the ModelBlocks of its block in progress
piece_codes: dict = {}  # forward code of a block body whose graph a break split -> block class name


def _blocks_of(module: torch.nn.Module) -> ModelBlocks | None:
    with _lock:
        if module in _models:
            return _models[module]
    lists = block_lists(module)
    blocks = ModelBlocks(module, lists) if lists else None
    with _lock:
        _models.setdefault(module, blocks)
        return _models[module]


def find_block(param: torch.Tensor) -> tuple[ModelBlocks, tuple[str, int]] | None:
    """The model and block that ``param`` belongs to, found on the call stack; None when no frame of a
    model with a block list holding ``param`` is calling (Note [Per-block path])."""
    found = None
    frame = sys._getframe(1)
    module_file = torch.nn.Module.__call__.__code__.co_filename
    seen: set[int] = set()
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self" and code.co_filename != module_file:
            owner = frame.f_locals.get("self")
            wrapper = type(owner).__module__.startswith("torch.")  # OptimizedModule, DDP: the model is inside
            if isinstance(owner, torch.nn.Module) and not wrapper and id(owner) not in seen:
                seen.add(id(owner))  # the innermost frame of each module is the one calling its children
                blocks = _blocks_of(owner)
                if blocks is not None and blocks.key_of(param) is not None:
                    found = blocks  # keep walking: the outermost model wins (a block's own lists are not the chain)
                    if blocks.code is None:
                        blocks.code = code
        frame = frame.f_back
    if found is None:
        return None
    with _lock:
        for pid in [pid for pid, (ref, _) in _by_param.items() if ref() is None]:
            del _by_param[pid]  # parameters of models that died
        for pid, (_key, ref) in found.of_param.items():
            _by_param[pid] = (ref, weakref.ref(found))
    return found, found.key_of(param)


def _none() -> None:
    return None


def _lookup(param: torch.Tensor) -> tuple[ModelBlocks | None, tuple[str, int] | None]:
    entry = _by_param.get(id(param))
    if entry is not None and entry[0]() is param:
        blocks = entry[1]()
        return (blocks, blocks.key_of(param)) if blocks is not None else (None, None)
    site = find_block(param)
    if site is None:
        with _lock:  # remember the miss: no stack walk on every call
            _by_param[id(param)] = (weakref.ref(param), _none)
        return None, None
    return site


WHOLE, START, MID, END, INNER = "whole", "start", "mid", "end", "inner"


class BlockRunner:
    """What Dynamo calls for one block graph, or one piece of a block: placed in its model's chain.

    ``kind``: ``whole`` (the block's forward in one graph), or a piece of a block that graph breaks split:
    ``start`` (its forward up to the first break), ``mid`` and ``end`` (the resume functions of that
    forward; ``end`` returns the block's result), ``inner`` (a frame nested inside the block: always runs).
    ``layout``: a ``BlockGraphLayout`` (whole) or a ``PieceLayout`` (pieces).
    """

    def __init__(self, compiled, layout, cache: StepCache, record, kind: str = WHOLE, clone: bool = False):
        self.compiled = compiled
        self.layout = layout
        self.cache = cache
        self.kind = kind
        self.cachedit_record = record  # the runner owns the record (the registry holds it weakly)
        self.clone = clone  # CUDA graphs: outputs live in a pool the next replay overwrites
        self.served: weakref.WeakSet = weakref.WeakSet()
        self.can_fake = kind != WHOLE and all(o is not None for o in getattr(layout, "outputs", (None,)))

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A stream kept past this call within the forward (cloned out of a CUDA graph pool)."""
        return tensor.clone() if self.clone else tensor

    def inputs_of(self, args: tuple) -> dict[str, torch.Tensor]:
        if self.kind == WHOLE:
            return {name: args[i] for name, i in zip(self.layout.streams, self.layout.out_from)}
        return {name: args[i] for name, i in self.layout.inputs}

    @staticmethod
    def primary_in(inputs: dict[str, torch.Tensor]) -> str:
        return "hidden_states" if "hidden_states" in inputs else max(inputs, key=lambda k: inputs[k].numel())

    def primary_out(self, names: tuple[str, ...]) -> int:
        if self.kind == WHOLE:
            return self.layout.primary
        return names.index("hidden_states") if "hidden_states" in names else 0

    def stream_names(self, inputs: dict[str, torch.Tensor]) -> tuple[str, ...] | None:
        """The stream each output continues, by name; None when an output continues none of ``inputs``."""
        if self.kind == WHOLE:
            return self.layout.streams
        names = []
        for options in self.layout.candidates:
            found = next((name for name in options if name in inputs), None)
            if found is None or found in names:
                return None
            names.append(found)
        return tuple(names)

    def fake(self, args: tuple) -> list[torch.Tensor]:
        """What a piece of a skipped block returns instead of running: zeros of its outputs' shapes (the
        Python between pieces still runs on them; their results are discarded at the block's end)."""
        if not self.can_fake:
            return self.compiled(*args)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in self.layout.outputs]

    def __call__(self, *args):
        param = self.layout.param
        if param is None:  # a piece without parameters: the block in progress in this context
            context = _execution_context()
            ref = _current.get(context)
            blocks = ref() if ref is not None else None
            fwd = blocks.forwards.get(context) if blocks is not None else None
            if fwd is None or fwd.current is None:
                return self.compiled(*args)
            return blocks.call(self, fwd.current, args)
        blocks, key = _lookup(args[param])
        if blocks is None:
            return self.compiled(*args)
        if blocks not in self.served:
            self.served.add(blocks)
        return blocks.call(self, key, args)


class PerBlockView:
    """What ``explain`` prints for one block graph."""

    per_block = True

    def __init__(self, runner: BlockRunner, block: str):
        self.runner = weakref.ref(runner)
        self.block = block

    def describe(self) -> str:
        lines = [f"path: per-block ({self.block} blocks are graphs of their own; Note [Per-block path])"]
        runner = self.runner()
        if runner is not None:
            lines.append(runner.layout.describe())
            lines += sorted({b.describe() for b in list(runner.served)})
        return "\n".join(lines)


def block_body(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` does a block's work: the block, or the only child holding all of its
    parameters when the block merely wraps one (HiDream's ``HiDreamBlock.block``), recursively."""
    while True:
        children = list(module.children())
        if len(children) != 1 or len(list(children[0].parameters())) != len(list(module.parameters())):
            return module
        module = children[0]


def forward_code(module: torch.nn.Module):
    """The code object of ``module``'s own ``forward`` (decorators unwrapped)."""
    return inspect.unwrap(type(module).forward).__code__
