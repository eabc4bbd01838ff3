"""The cachedit backend end to end on tiny real diffusers transformers.

Tolerances: with ``inner="eager"`` the parts run the very same aten ops in the same order as eager, so
outputs are compared bitwise. Under Inductor the parts are fused differently from eager, so outputs
differ by fp32 reordering: 1e-4 relative to the output's scale is orders of magnitude above that
(~1e-6 observed) and far below what skipping a block would change.
"""

import os
import subprocess
import sys
import textwrap
import threading
import traceback

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cachedit
from cachedit.api import _graphs
from tests.models import MODELS, denoise, get

NAMES = sorted(MODELS)
MULTI_GRAPH = sorted(n for n, s in MODELS.items() if not s.single_graph_when_warm)
EXACT = dict(Fn=1, Bn=1, threshold=0.0, warmup_steps=0, inner="eager")


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def compiled(model, **options):
    return torch.compile(model, backend="cachedit", options=options)


def top_module(model):
    (graph,) = [g for g in _graphs(model) if g.module is not None]
    return graph.module()


@pytest.mark.parametrize("name", NAMES)
def test_gate_forced_to_compute_is_bitwise_eager(name):
    spec = get(name)
    model = spec.build(warm=True)
    reference, _ = denoise(model, spec, num_steps=3)
    result, _ = denoise(compiled(model, **EXACT), spec, num_steps=3)
    assert torch.equal(result, reference)
    # The README's "captured as one graph" for every single-graph row, at no extra cost: these three calls
    # were Dynamo's only compiles (tests/test_models.py re-checks cold and warm with TEST_GRAPH_COUNTS=1).
    graphs = counters["stats"]["unique_graphs"]
    assert (graphs == 1) == spec.single_graph_when_warm, f"{name}: {graphs} Dynamo graphs"
    report = cachedit.explain(model)
    if name in MULTI_GRAPH:
        return  # checked in test_models_dynamo_cannot_capture_whole_still_run
    assert "split F1B1" in report, report
    top = top_module(model)
    code = top.code
    assert "cachedit_gate" in code and "cachedit_reuse" in code and "self.middle" in code
    layout = _graphs(model)[-1].layout
    assert all(layout.part_sizes[p] > 0 for p in ("head", "middle", "tail"))
    stats = cachedit.stats(model)[-1]
    assert stats.branches["main"].computed_steps == [0, 1, 2] and stats.num_cached_steps == 0


@pytest.mark.parametrize("name", MULTI_GRAPH)
def test_models_dynamo_cannot_capture_whole_still_run(name):
    """Graph breaks inside diffusers: every piece still compiles and the output is eager's, bitwise.

    A piece that holds the chain but no timestep input (Lumina2, OmniGen) reads the timestep of the
    model's forward that runs it (Note [Timestep from the caller]), so detected requests cache too. Where
    a break falls inside every block (Mochi, HiDream), the blocks cache through their pieces (the
    per-block path, tests/test_per_block.py): Mochi from detected requests too, HiDream (whose forward
    rebinds its timestep) inside a request only.
    """
    spec = get(name)
    model = spec.build(warm=True)
    options = dict(Fn=1, Bn=0, threshold=0.9, warmup_steps=2, inner="eager")
    reference, _ = denoise(model, spec, num_steps=6)
    fast = compiled(model, **options)
    result, _ = denoise(fast, spec, num_steps=6)
    pieces = _graphs(model)
    per_block = [g for g in pieces if g.cache is not None and getattr(g.layout, "per_block", False)]
    detected = [r for r in cachedit.stats(model) if r.source != "explicit"]
    if name == "hidream":
        assert torch.equal(result, reference)
        assert all(r.num_cached_steps == 0 for r in detected)
    else:
        assert sum(r.num_cached_steps for r in detected) > 0, cachedit.explain(model)
    assert len(pieces) > 1 and all(g.declined or g.layout is not None for g in pieces)
    with cachedit.request(model, num_inference_steps=12):
        denoise(fast, spec, num_steps=12)
    assert [g for g in pieces if g.cache is not None], cachedit.explain(model)  # every row caches somewhere
    assert cachedit.stats(model)[-1].source == "explicit" and cachedit.stats(model)[-1].num_cached_steps > 0
    assert bool(per_block) == (name in ("mochi", "hidream")), cachedit.explain(model)


@pytest.mark.parametrize("name", ["flux", "wan", "hunyuanvideo"])
def test_inductor_parts_match_eager(name):
    spec = get(name)
    model = spec.build(warm=True)
    reference, _ = denoise(model, spec, num_steps=2)
    result, _ = denoise(compiled(model, Fn=1, Bn=1, threshold=0.0, warmup_steps=0), spec, num_steps=2)
    scale = reference.abs().max()
    assert (result - reference).abs().max() <= 1e-4 * scale
    assert _graphs(model)[-1].layout is not None, cachedit.explain(model)


def test_inductor_cached_steps_match_eager_parts():
    """Cached steps under Inductor: the tail gets ``h + residual`` in the layout it was compiled for.

    Flux's last single block hands the epilogue a strided slice of the joint [text | image] stream
    (visible with batch 2), so a plain ``h + residual`` would be contiguous, which the tail's input
    assertions reject.
    """
    spec = get("flux")
    options = dict(Fn=1, Bn=0, threshold=0.9, warmup_steps=2)
    eager_model, inductor_model = spec.build(), spec.build()
    expected, _ = denoise(compiled(eager_model, inner="eager", **options), spec, num_steps=10, batch=2)
    result, _ = denoise(compiled(inductor_model, **options), spec, num_steps=10, batch=2)
    eager_stats, inductor_stats = cachedit.stats(eager_model)[-1], cachedit.stats(inductor_model)[-1]
    assert inductor_stats.num_cached_steps > 0
    assert inductor_stats.branches["main"].cached_steps == eager_stats.branches["main"].cached_steps
    assert (result - expected).abs().max() <= 1e-4 * expected.abs().max()


class _Recorder:
    """Wraps the reuse node and the tail to capture what crosses the part boundaries at each step."""

    def __init__(self, top):
        self.steps = []
        self.middle_calls = 0
        reuse, tail, middle = top.cachedit_reuse, top.tail, top.middle
        original_reuse, original_tail, original_middle = reuse.forward, tail.forward, middle.forward

        def record_middle(*args):
            self.middle_calls += 1
            return original_middle(*args)

        def record_reuse(gated, middle_part, *inputs):
            states = original_reuse(gated, middle_part, *inputs)
            self.steps.append({"decision": gated[0], "inputs": inputs, "states": states})
            return states

        def record_tail(*args):
            out = original_tail(*args)
            self.steps[-1].update(tail_args=args, tail_out=out)
            return out

        middle.forward, reuse.forward, tail.forward = record_middle, record_reuse, record_tail


@pytest.mark.parametrize("name", [n for n in NAMES if n not in MULTI_GRAPH])
def test_cached_steps_reuse_the_residual_of_the_last_computed_step(name):
    spec = get(name)
    model = spec.build(warm=True)
    fast = compiled(model, Fn=1, Bn=1, threshold=0.9, warmup_steps=2, max_continuous_cached_steps=3, inner="eager")
    denoise(fast, spec, num_steps=1)  # compile, then record a fresh request
    recorder = _Recorder(top_module(model))
    denoise(fast, spec, num_steps=20, seed=1)
    layout = _graphs(model)[-1].layout
    tail = top_module(model).tail.graph_module
    cached = [k for k, s in enumerate(recorder.steps) if s["decision"].cache]
    computed = [k for k, s in enumerate(recorder.steps) if not s["decision"].cache]
    assert cached, f"{name}: no step cached at threshold 0.9: {cachedit.stats(model)[-1].branches}"
    assert recorder.middle_calls == len(computed), "a cached step must not run the middle blocks"
    for k in cached:
        last = recorder.steps[max(c for c in computed if c < k)]
        now = recorder.steps[k]
        for j, i in enumerate(layout.residual_of):
            residual = last["states"][j] - last["inputs"][i]
            assert torch.equal(now["states"][j], now["inputs"][i] + residual)
        # the tail ran on exactly those states (and the fresh head values)
        expected = tail(*now["states"], *now["tail_args"][len(now["states"]) :])
        assert all(torch.equal(a, b) for a, b in zip(expected, now["tail_out"]))
    assert cachedit.stats(model)[-1].num_cached_steps == len(cached)


def test_two_requests_compile_once_without_graph_breaks():
    spec = get("flux")
    model = spec.build()
    fast = compiled(model, Fn=1, Bn=0, threshold=0.9, warmup_steps=2, inner="eager")
    first, _ = denoise(fast, spec, num_steps=20, seed=0)
    second, _ = denoise(fast, spec, num_steps=20, seed=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    records = cachedit.stats(model)
    assert len(records) == 2 and records[0].num_cached_steps > 0
    assert records[0].branches["main"].cached_steps == records[1].branches["main"].cached_steps
    assert torch.equal(first, second)


def test_interleaved_requests_from_two_threads_match_their_solo_runs():
    spec = get("sd3")
    model = spec.build()
    options = dict(Fn=1, Bn=0, threshold=0.9, warmup_steps=2, inner="eager")
    solo_model = spec.build()
    solo = compiled(solo_model, **options)
    alone = {seed: denoise(solo, spec, num_steps=12, seed=seed)[0] for seed in (1, 2)}
    assert cachedit.stats(solo_model)[0].num_cached_steps > 0
    shared = compiled(model, **options)
    denoise(shared, spec, num_steps=1)  # compile outside the threads
    turns = {1: threading.Semaphore(1), 2: threading.Semaphore(0)}
    results, errors = {}, []

    def run(seed, other):
        def call(m, kwargs):
            turns[seed].acquire()  # strict alternation of calls: 1, 2, 1, 2, ...
            try:
                return spec.out_to_latent(m(**kwargs))
            finally:
                turns[other].release()

        try:
            results[seed] = denoise(shared, spec, num_steps=12, seed=seed, call=call)[0]
        except Exception as err:  # surfaced below
            errors.append(err)
            turns[other].release()

    threads = [threading.Thread(target=run, args=(1, 2)), threading.Thread(target=run, args=(2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for seed in (1, 2):
        assert torch.equal(results[seed], alone[seed])


def test_no_chain_runs_uncached_with_a_reason(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    with caplog.at_level("WARNING", logger="cachedit"):
        out = compiled(model, inner="eager")(x)
    assert torch.equal(out, model(x))
    assert "no nn.ModuleList of repeated blocks" in cachedit.explain(model)
    assert any("running uncached" in r.message for r in caplog.records)


def test_fn_plus_bn_covering_the_chain_declines_with_the_fix():
    spec = get("sd3")
    model = spec.build()
    out = compiled(model, Fn=2, Bn=1, inner="eager")(**spec.inputs(500.0))
    assert torch.equal(spec.out_to_latent(out), spec.out_to_latent(model(**spec.inputs(500.0))))
    assert "Fn=2 + Bn=1 leaves no middle block" in cachedit.explain(model)


def test_disable_compiles_whole(monkeypatch):
    monkeypatch.setenv("CACHEDIT_DISABLE", "1")
    spec = get("sd3")
    model = spec.build()
    compiled(model, inner="eager")(**spec.inputs(500.0))
    assert "disabled by configuration" in cachedit.explain(model)


@pytest.mark.parametrize(
    "options, env, first_line",
    [
        ({"Fn": "x"}, {}, "cachedit option Fn='x' is not an integer"),
        ({"fn": 1}, {}, "unknown cachedit option 'fn'. Did you mean 'Fn'?"),
        ({}, {"CACHEDIT_THRESHOLD": "lots"}, "environment variable CACHEDIT_THRESHOLD='lots' is not a number"),
    ],
    ids=["bad-value", "typo", "bad-env"],
)
def test_bad_option_fails_the_first_call_naming_it_without_dynamo_frames(monkeypatch, options, env, first_line):
    """torch.compile only stores the options (Note [Option errors at the first call]), so the first call
    fails: its message starts with what the user wrote, and no frame of Dynamo's tracer or of its backend
    plumbing is in the traceback (only torch.compile's call wrappers in eval_frame.py, then ours)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = get("sd3")
    with pytest.raises(ValueError) as err:
        compiled(spec.build(), **options)(**spec.inputs(500.0))
    assert str(err.value).splitlines()[0].startswith(first_line), str(err.value)
    frames = traceback.extract_tb(err.value.__traceback__)
    dynamo = [f"{f.filename}:{f.name}" for f in frames if f"{os.sep}_dynamo{os.sep}" in f.filename]
    assert all(f.split(":")[0].endswith("eval_frame.py") for f in dynamo), dynamo
    assert frames[-1].filename.endswith(os.path.join("cachedit", "backend.py")), frames[-1]


def test_registered_without_import_in_a_fresh_interpreter(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, %r)
        from tests.models import get
        spec = get("flux")
        model = spec.build()
        kw = spec.inputs(0.5)
        assert "cachedit" not in sys.modules
        out = torch.compile(model, backend="cachedit", options={"inner": "eager", "Fn": 1})(**kw)
        assert "cachedit.backend" in sys.modules
        assert torch.equal(out[0], model(**kw)[0])
        print("ok")
        """
        % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEDIT_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_new_resolution_recompiles_dynamic_and_still_splits():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()

    def inputs(tokens):
        g = torch.Generator().manual_seed(0)
        return dict(
            hidden_states=torch.randn(1, tokens, 16, generator=g), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.randn(tokens, 3, generator=g),
            txt_ids=torch.zeros(7, 3), timestep=torch.tensor([0.5]), return_dict=False,
        )

    fast = compiled(model, **EXACT)
    with torch.no_grad():
        for tokens in (16, 24, 40):
            assert torch.equal(fast(**inputs(tokens))[0], model(**inputs(tokens))[0])
    graphs = _graphs(model)
    assert len(graphs) == 2 and all(g.layout is not None for g in graphs), cachedit.explain(model)
    assert not graphs[1].layout.carried_shapes[0][1].isdigit(), "the second graph has a symbolic token count"


def test_a_piece_without_a_timestep_input_reads_the_forward_timestep():
    """Lumina2's block chain sits in a graph after a break, with no timestep input: its gate reads the
    forward's ``timestep`` from the call stack (Note [Timestep from the caller]), so two back-to-back
    generations are two detected requests with the same decisions and the same output."""
    spec = get("lumina2")
    model = spec.build(warm=True)
    fast = compiled(model, Fn=1, Bn=0, threshold=0.9, warmup_steps=2, inner="eager")
    first, _ = denoise(fast, spec, num_steps=6)
    second, _ = denoise(fast, spec, num_steps=6)
    records = [r for r in cachedit.stats(model)]
    assert [(r.source, r.steps) for r in records] == [("timestep", 6)] * 2, records
    assert records[0].branches["main"].cached_steps == records[1].branches["main"].cached_steps != []
    assert torch.equal(first, second)
    assert "detected requests read the local 'timestep' of Lumina2Transformer2DModel.forward" in cachedit.explain(model)
