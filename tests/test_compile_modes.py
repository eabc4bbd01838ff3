"""torch.compile's ``mode`` and Inductor options reach every part; stored residuals survive CUDA graph replays.

There is no GPU here, so CUDA graphs never record. What is checked: Inductor is asked for them (it counts
each part it had to skip, ``counters["inductor"]["cudagraph_skips"]``), the outputs the runtime keeps are
copied out of the part (Note [Stored outputs under CUDA graphs]), and, with the parts' outputs placed in
buffers that every call overwrites as a CUDA graph replay does, cached steps still compute what they
compute without that reuse.

Tolerances: Inductor against eager, 1e-4 of the output's scale (fp32 reordering, as in test_backend.py).
With ``inner="eager"`` runs are compared bitwise.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import cachedit
from cachedit.api import _graphs
from cachedit.backend import _inner_compiler
from cachedit.config import CacheditConfig
from tests.models import denoise, get

LOOSE = dict(Fn=1, Bn=1, threshold=0.9, warmup_steps=2, max_continuous_cached_steps=3)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def _top(model):
    (graph,) = [g for g in _graphs(model) if g.module is not None]
    return graph.module()


def test_mode_becomes_inductor_config_patches():
    from torch._inductor import list_mode_options

    for mode in ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"):
        config = CacheditConfig.resolve({"mode": mode, "inductor": {"epilogue_fusion": False}}, environ={})
        inner, cudagraphs = _inner_compiler(config)
        assert inner.keywords["config_patches"] == {**list_mode_options(mode), "epilogue_fusion": False}
        assert cudagraphs == (mode != "max-autotune-no-cudagraphs")
    inner, cudagraphs = _inner_compiler(CacheditConfig.resolve({}, environ={}))
    assert not hasattr(inner, "keywords") and not cudagraphs  # default: Inductor exactly as torch.compile runs it


def test_unknown_mode_fails_with_the_accepted_modes():
    spec = get("sd3")
    model = torch.compile(spec.build(), backend="cachedit", mode="fastest")
    with pytest.raises(Exception, match="'fastest' is not accepted; expected one of 'default', 'reduce-overhead'"):
        model(**spec.inputs(500.0))


def test_unknown_inductor_option_fails_with_a_suggestion():
    with pytest.raises(ValueError, match="'max_autotun', which is not an Inductor option.*'max_autotune'"):
        CacheditConfig.resolve({"inductor": {"max_autotun": True}}, environ={})


def test_inductor_options_reach_every_part():
    """``size_asserts=False`` removes the input checks Inductor writes at the top of each part's code."""
    spec = get("sd3")
    kwargs = spec.inputs(500.0)
    model = spec.build()
    fast = torch.compile(model, backend="cachedit", options={**LOOSE, "inductor": {"size_asserts": False}})
    _, codes = run_and_get_code(lambda: fast(**kwargs))
    assert len(codes) == 3 and not any("assert_size_stride(" in c for c in codes), len(codes)
    assert "inductor options: {'size_asserts': False}" in cachedit.explain(model)
    # the control, with Inductor's default size_asserts=True: test_reduce_overhead_from_torch_compile_mode


def test_reduce_overhead_from_torch_compile_mode(monkeypatch):
    """``torch.compile(mode=...)`` cannot be combined with ``options=``: settings come from the environment."""
    for key, value in LOOSE.items():
        monkeypatch.setenv(f"CACHEDIT_{key.upper()}", str(value))
    spec = get("sd3")
    model = spec.build()
    reference, _ = denoise(torch.compile(spec.build(), backend="cachedit", options={**LOOSE, "inner": "eager"}), spec, 12)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="cachedit", mode="reduce-overhead")
    # compile; the 2 steps end on a timestep the next run does not start with
    _, codes = run_and_get_code(lambda: denoise(fast, spec, 2))
    assert len(codes) == 3 and all("assert_size_stride(" in c for c in codes)  # Inductor's defaults otherwise
    assert counters["inductor"]["cudagraph_skips"] == 3, "Inductor was asked for CUDA graphs in head, middle, tail"
    assert "mode: reduce-overhead" in cachedit.explain(model)
    top = _top(model)
    n_middle = len(top.middle.graph_module.graph.find_nodes(op="output")[0].args[0])
    assert top.head.stored == (len(top.head.graph_module.graph.find_nodes(op="output")[0].args[0]) - 1,)
    assert top.middle.stored == tuple(range(n_middle // 2, n_middle)) and top.tail.stored == ()
    compiled_outs, part_outs = _spy(top, "compiled"), _spy(top, "forward")
    result, _ = denoise(fast, spec, 12)
    assert cachedit.stats(model)[-1].num_cached_steps > 0
    assert (result - reference).abs().max() <= 1e-4 * reference.abs().max()
    for name in ("head", "middle"):  # the stored outputs, and only they, are copies of what the part returned
        stored = getattr(top, name).stored
        for i, (out, raw) in enumerate(zip(part_outs[name], compiled_outs[name])):
            aliased = out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()
            assert aliased == (i not in stored), (name, i)


def _spy(top, attribute):
    """Record the last return value of ``top.<part>.<attribute>`` (the compiled function or the part)."""
    last = {}
    for name in ("head", "middle"):
        part = getattr(top, name)
        original = getattr(part, attribute)

        def spy(*args, _original=original, _name=name):
            last[_name] = _original(*args)
            return last[_name]

        object.__setattr__(part, attribute, spy)  # not Module.__setattr__: eager parts are submodules
    return last


def test_cached_steps_survive_outputs_overwritten_by_the_next_call():
    """Simulated CUDA graph replays: a part's outputs live in buffers its next call overwrites."""
    spec = get("sd3")
    options = {**LOOSE, "inner": "eager"}
    expected_model = spec.build()
    expected, _ = denoise(torch.compile(expected_model, backend="cachedit", options=options), spec, 16)
    cached = cachedit.stats(expected_model)[-1].branches["main"].cached_steps
    assert cached
    results = {}
    for keep in (True, False):
        torch._dynamo.reset()
        model = spec.build()
        fast = torch.compile(model, backend="cachedit", options=options)
        denoise(fast, spec, 2)  # compile; ends on a timestep the next run does not start with
        top = _top(model)
        _replay_in_place(top)
        if keep:
            _keep_stored(top)
        results[keep], _ = denoise(fast, spec, 16)
        if keep:
            assert cachedit.stats(model)[-1].branches["main"].cached_steps == cached
    assert torch.equal(results[True], expected)
    assert not torch.equal(results[False], expected), "the control: uncopied residuals are overwritten"


def _replay_in_place(top):
    """Each part writes its outputs into buffers allocated at its first call, and a new call of the model
    (the head) poisons every buffer of the previous call with NaN: CUDA graph trees give the parts of one
    call one memory pool and hand it over to the next call, so nothing of an earlier call stays valid."""
    every: list[torch.Tensor] = []
    for name in ("head", "middle", "tail"):
        part = getattr(top, name)
        original, buffers = part.compiled, []

        def replay(*args, _original=original, _buffers=buffers, _first=name == "head"):
            if _first:
                for buffer in every:
                    buffer.fill_(float("nan"))
            outs = _original(*args)
            if not _buffers:
                _buffers[:] = [torch.empty_like(o) for o in outs]
                every.extend(_buffers)
            for b, o in zip(_buffers, outs):
                b.copy_(o)
            return tuple(_buffers)

        object.__setattr__(part, "compiled", replay)  # not Module.__setattr__: eager parts are submodules


def _keep_stored(top):
    """What the backend sets when the parts run under CUDA graphs (see test_reduce_overhead_...)."""
    n_head = len(top.head.graph_module.graph.find_nodes(op="output")[0].args[0])
    n_middle = len(top.middle.graph_module.graph.find_nodes(op="output")[0].args[0])
    top.head.stored, top.middle.stored = (n_head - 1,), tuple(range(n_middle // 2, n_middle))
