"""Rows of several requests in one batched forward (``cachedit.open_request`` + ``cachedit.rows``), on the
tiny real FluxTransformer2DModel of tests/models.py.

Each request is compared with the same request run alone (``cachedit.request``, its own compile).
Tolerance: the decisions must be equal; the latents within 1e-5. The head and the middle run on a bigger
batch than alone, and a CPU matmul blocks its rows differently with the row count, so values differ by
float32 reordering (seen 4.8e-7); a leaked or misrouted residual moves a latent by ~1e-1.
"""

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cachedit
from tests.models import get

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

SPEC = get("flux")
OPTIONS = dict(Fn=1, Bn=0, threshold=0.3, warmup_steps=2, inner="eager")
_BASE = SPEC.inputs(1.0, seed=0, batch=1)
IDS = dict(img_ids=_BASE["img_ids"], txt_ids=_BASE["txt_ids"])


@dataclasses.dataclass
class Req:
    seed: int
    steps: int
    settings: dict = dataclasses.field(default_factory=dict)
    rows: int = 2  # 2: a CFG pair (uncond, cond), as a pipeline batches it
    start: int = 0  # the batch iteration at which it joins

    def inputs(self):
        g = torch.Generator().manual_seed(self.seed)
        return dict(
            hidden_states=torch.randn(self.rows, 16, 16, generator=g),
            encoder_hidden_states=torch.randn(self.rows, 7, 32, generator=g),
            pooled_projections=torch.randn(self.rows, 32, generator=g),
            guidance=torch.full((self.rows,), 3.5),
        )


def _call(fast, batch: dict, timestep: torch.Tensor, dynamic: bool):
    kwargs = {**batch, "timestep": timestep, **IDS, "return_dict": False}
    if dynamic:
        for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "guidance", "timestep"):
            torch._dynamo.mark_dynamic(kwargs[key], 0)
    with torch.no_grad():
        return fast(**kwargs)[0]


def solo(req: Req):
    """``req`` alone under ``cachedit.request`` on a fresh compile: final latent, cached steps."""
    torch._dynamo.reset()
    model = SPEC.build()
    fast = torch.compile(model, backend="cachedit", options=OPTIONS)
    inputs = req.inputs()
    x = inputs.pop("hidden_states")
    with cachedit.request(model, num_inference_steps=req.steps, **req.settings):
        for t in SPEC.timesteps(req.steps):
            out = _call(fast, {**inputs, "hidden_states": x}, torch.full((req.rows,), t), dynamic=False)
            x = x - out / req.steps
    (record,) = cachedit.stats(model)
    torch._dynamo.reset()
    return x, list(record.branches["main"].cached_steps)


def batched(reqs: list[Req], dynamic: bool = True):
    """All of ``reqs`` in one batched forward per iteration, each joining at its ``start``."""
    torch._dynamo.reset()
    counters.clear()
    model = SPEC.build()
    fast = torch.compile(model, backend="cachedit", options=OPTIONS)
    state = {}  # index -> [handle, inputs, x, step]
    results, mixes = {}, []
    iteration = 0
    while len(results) < len(reqs):
        for i, r in enumerate(reqs):
            if r.start == iteration:
                inputs = r.inputs()
                x = inputs.pop("hidden_states")
                state[i] = [cachedit.open_request(model, num_inference_steps=r.steps, **r.settings), inputs, x, 0]
        live = sorted(state)
        batch = {
            key: torch.cat([state[i][1][key] for i in live]) for key in ("encoder_hidden_states", "pooled_projections", "guidance")
        }
        batch["hidden_states"] = torch.cat([state[i][2] for i in live])
        timestep = torch.cat([torch.full((reqs[i].rows,), SPEC.timesteps(reqs[i].steps)[state[i][3]]) for i in live])
        with cachedit.rows(model, [(state[i][0], reqs[i].rows) for i in live]):
            out = _call(fast, batch, timestep, dynamic)
        mixes.append({i: state[i][3] in state[i][0].stats.branches["main"].cached_steps for i in live})
        offset = 0
        for i in live:
            r = reqs[i]
            mine = out[offset : offset + r.rows]
            offset += r.rows
            state[i][2] = state[i][2] - mine / r.steps
            state[i][3] += 1
            if state[i][3] == r.steps:
                handle = state[i][0]
                handle.close()
                results[i] = (state.pop(i)[2], list(handle.stats.branches["main"].cached_steps), handle)
        iteration += 1
    return model, results, mixes


REQS = [
    Req(1, 8, {"threshold": 0.3}),
    Req(2, 8, {"threshold": 0.05}, start=1),  # stricter: computes where the others cache
    Req(3, 6, {"threshold": 0.6, "warmup_steps": 1}, rows=1, start=2),  # no CFG, joins late
    Req(4, 5, {"max_continuous_cached_steps": 1}, start=0),
]


def test_rows_of_several_requests_each_equal_their_solo_runs_and_the_middle_runs_on_computing_rows():
    expected = [solo(r) for r in REQS]
    assert any(steps for _, steps in expected), "nothing cached alone: the scenario tests nothing"
    model, results, mixes = batched(REQS)
    for i, (x, steps) in enumerate(expected):
        got, got_steps, _ = results[i]
        assert got_steps == steps, (i, got_steps, steps)
        torch.testing.assert_close(got, x, atol=1e-5, rtol=0)
    assert any(len(set(m.values())) == 2 for m in mixes), f"no step mixed cached and computed rows: {mixes}"
    plan = _middle_plan(model)  # the middle ran on the computing rows: streams and time embedding indexed
    assert plan.ok and {0, 1, 2} <= set(plan.indexed) and plan.sizes, plan
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # no recompile per batch size or mix
    assert all(r.bytes_held == 0 for r in cachedit.stats(model))


def test_a_static_batch_still_gives_each_request_its_own_result():
    """Traced without a dynamic batch the middle cannot run on a sub-batch: it runs on every row, and
    the cached rows still take their cached result (same decisions and latents as alone)."""
    reqs = REQS[:2]
    expected = [solo(r) for r in reqs]
    model, results, mixes = batched([dataclasses.replace(r, start=0) for r in reqs], dynamic=False)
    assert not _middle_plan(model).ok
    assert any(len(set(m.values())) == 2 for m in mixes), mixes
    for i, (x, steps) in enumerate(expected):
        assert results[i][1] == steps
        torch.testing.assert_close(results[i][0], x, atol=1e-5, rtol=0)


def test_rows_errors_name_the_group():
    model = SPEC.build()
    a = cachedit.open_request(model, num_inference_steps=4)
    with pytest.raises(ValueError, match="n_rows=0"):
        with cachedit.rows(model, [(a, 0)]):
            pass
    with pytest.raises(TypeError, match="rows group 0"):
        with cachedit.rows(model, [("a", 2)]):
            pass
    with pytest.raises(ValueError, match="appears twice"):
        with cachedit.rows(model, [(a, 1), (a, 1)]):
            pass
    fast = torch.compile(model, backend="cachedit", options=OPTIONS)
    inputs = Req(1, 4).inputs()
    with pytest.raises(ValueError, match="tags 3 rows"):
        with cachedit.rows(model, [(a, 3)]):
            _call(fast, inputs, torch.full((2,), 1.0), dynamic=False)
    a.close()
    with pytest.raises(ValueError, match="was closed"):
        with cachedit.rows(model, [(a, 2)]):
            pass


def _middle_plan(model):
    from cachedit.api import _graphs

    (graph,) = _graphs(model)
    return graph.module().middle._cachedit_rows


def test_a_mask_whose_batch_size_the_trace_keeps_apart_is_indexed_with_the_rows(caplog):
    """PixArt's attention mask meets the batch only in a view inside the attention, so Dynamo traces its
    batch as a symbol of its own (and the attention's repeat size as 2 x that symbol). The middle on the
    computing rows must index the mask and rescale that size too (it used to pass them whole and crash).
    Each request gets its own result: the batched call's rows equal each request's rows run alone (1e-5:
    float32 reordering), and no call fell back to running every row."""
    from tests.models import _pixart_inputs

    spec = get("pixart")
    thresholds = (0.0, 10.0, 0.0)  # the middle request caches from its second step, the others never
    # [request][step]: a latent that moves each step (the same latent again is a further call of one step)
    inputs = [[_pixart_inputs(torch.Generator().manual_seed(10 * i + step), 2) for step in range(4)] for i in range(3)]

    def run(groups):
        torch._dynamo.reset()
        model = spec.build()
        model.compile(backend="cachedit", options={**OPTIONS, "warmup_steps": 1})
        handles = [cachedit.open_request(model, num_inference_steps=4, threshold=thresholds[i]) for i in groups]
        outs = []
        for step in range(4):
            keys = ("hidden_states", "encoder_hidden_states", "encoder_attention_mask")
            x = {k: torch.cat([inputs[i][step][k] for i in groups]) for k in keys}
            t = torch.full((2 * len(groups),), 900.0 - 100 * step)
            for value in (*x.values(), t):
                torch._dynamo.mark_dynamic(value, 0)
            with torch.no_grad(), cachedit.rows(model, [(h, 2) for h in handles]):
                outs.append(model(**x, timestep=t, added_cond_kwargs=inputs[0][0]["added_cond_kwargs"], return_dict=False)[0])
        return torch.stack(outs), [h.stats.branch_list[0].cached_steps for h in handles]

    with caplog.at_level("WARNING", logger="cachedit"):
        together, cached = run([0, 1, 2])
    assert cached == [[], [1, 2, 3], []], cached
    assert not [r for r in caplog.records if "every row" in r.getMessage()], caplog.text
    for i in range(3):
        alone, alone_cached = run([i])
        assert alone_cached == [cached[i]]
        assert (together[:, 2 * i : 2 * i + 2] - alone).abs().max().item() <= 1e-5
