"""How ``CallMerger`` groups, merges and splits transformer calls (Note [Merged pipeline calls]), on small
tensors (exact comparisons) and on every core model of tests/models.py; its use in a server is tested in
test_serve_pipeline.py."""

import dataclasses
import inspect
import threading

import pytest
import torch

import cachedit
from cachedit.integrations.merge_calls import CallMerger, _Call, _groups, _split
from tests.models import MODELS


def forward(hidden_states, timestep=None, img_ids=None, img_shapes=None, attention_kwargs=None, return_dict=True):
    raise AssertionError("only bound, never run")


SIGNATURE = inspect.signature(forward)


def call(rows: int, tokens: int = 4, ids=None, **kwargs) -> _Call:
    bound = SIGNATURE.bind(
        torch.randn(rows, tokens, 8), timestep=torch.full((rows,), 0.5),
        img_ids=ids if ids is not None else torch.zeros(tokens, 3), img_shapes=[(1, 2, 2)] * rows, **kwargs,
    )
    return _Call(caller=object(), bound=bound, rows=rows)


def test_calls_of_one_image_size_share_a_group_and_others_get_their_own():
    a, b, c = call(2), call(1), call(2, tokens=9)  # c: another image size
    d = call(2, ids=torch.ones(4, 3))  # other rotary ids: shared arguments must be equal
    e = call(2, attention_kwargs={"scale": 2.0})
    assert _groups([a, b, c, d, e]) == [[a, b], [c], [d], [e]]


@dataclasses.dataclass
class Output:
    sample: torch.Tensor
    note: str


def test_outputs_are_cut_back_by_rows_and_shared_values_handed_to_each():
    out = torch.arange(5.0).view(5, 1)
    first, second = _split((out, torch.zeros(3)), [2, 3], 5)
    assert torch.equal(first[0], out[:2]) and torch.equal(second[0], out[2:])
    assert first[1] is second[1]  # not of the batch: the same tensor to each
    one, two = _split(Output(out, "x"), [4, 1], 5)
    assert torch.equal(one.sample, out[:4]) and two.note == "x"


class Recorder(torch.nn.Module):
    """A stand-in transformer that records what the merged call received."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, hidden_states, timestep=None, img_ids=None, img_shapes=None, attention_kwargs=None, return_dict=True):
        self.seen.append((hidden_states.shape[0], timestep.shape[0], img_ids.shape[0], len(img_shapes)))
        return (hidden_states * 2,)


class Caller:
    def __init__(self, model):
        self.handle = cachedit.open_request(model, num_inference_steps=2)


def test_a_round_waits_for_every_joined_generation_and_merges_their_calls():
    """Two generations: the first call waits until the second arrives, then one call carries both."""
    model = Recorder()
    merger = CallMerger(model)
    a, b = Caller(model), Caller(model)
    merger.joined.add(b)  # b has joined (made a call before) but has not called yet this round
    results = {}

    def run(caller, rows, seed):
        x = torch.randn(rows, 4, 8, generator=torch.Generator().manual_seed(seed))
        (out,) = merger.call(caller, (x,), dict(timestep=torch.full((rows,), 0.5), img_ids=torch.zeros(4, 3),
                                                 img_shapes=[(1, 2, 2)] * rows, return_dict=False))
        results[seed] = (x, out)

    first = threading.Thread(target=run, args=(a, 2, 1))
    first.start()
    first.join(timeout=0.3)
    assert first.is_alive() and not model.seen  # waiting for b
    run(b, 1, 2)
    first.join(timeout=10)
    assert model.seen == [(3, 3, 4, 3)]  # one call: 3 rows, the ids once, the per-row list joined
    for x, out in results.values():
        assert torch.equal(out, x * 2)
    merger.leave(a)
    merger.leave(b)
    assert not merger.joined


def test_a_call_without_a_batched_tensor_is_refused_by_name():
    merger = CallMerger(Recorder())
    with pytest.raises(TypeError, match="first tensor argument"):
        merger.call(object(), (torch.tensor(1.0),), {})


class _Generation:
    def __init__(self, handle):
        self.handle = handle


def _merged_run(spec, groups: list[int], steps: int = 4):
    """``steps`` rounds of the calls of ``groups`` (a CFG pair each; request 0 never caches, request 1
    caches whenever allowed) through one CallMerger; returns each call's latent per step and the cached
    steps of each request."""
    torch._dynamo.reset()
    model = spec.build(warm=True)
    model.compile(backend="cachedit", options={"inner": "eager", "Fn": 1, "Bn": 0, "warmup_steps": 1})
    merger = CallMerger(model)
    handles = [cachedit.open_request(model, num_inference_steps=steps, threshold=(0.0, 10.0)[g]) for g in groups]
    timesteps = spec.timesteps(steps)
    latents = []
    with torch.no_grad():
        for step in range(steps):
            calls = [
                _Call(_Generation(h), merger.signature.bind(**spec.inputs(timesteps[step], seed=10 * g + step, batch=2)), 2)
                for g, h in zip(groups, handles)
            ]
            for group in [[c] for c in calls] if merger.alone else [calls]:
                merger._run(group)
            for c in calls:
                if c.error is not None:
                    raise c.error
            latents.append([spec.out_to_latent(c.result) for c in calls])
    return latents, [h.stats.branch_list[0].cached_steps for h in handles]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_merged_calls_of_every_core_model_equal_each_request_alone(name):
    """A computing and a caching request merged into one call per step (the middle on the computing rows,
    or every call alone on the per-block path) give each request what it gets alone: the same cached steps
    and latents within 2e-5 relative: float32 reordering in the bigger batch (seen <= 6.5e-6, Kandinsky 5, one
    thread); a row given to the wrong request moves a latent by ~1e-1."""
    spec = MODELS[name]
    together, cached = _merged_run(spec, [0, 1])
    assert cached[0] == [] and cached[1], cached
    for i in (0, 1):
        alone, alone_cached = _merged_run(spec, [i])
        assert alone_cached == [cached[i]]
        for step, (a, t) in enumerate(zip(alone, together)):
            scale = a[0].abs().max().item() or 1.0
            assert (a[0] - t[i]).abs().max().item() <= 2e-5 * scale, (name, i, step)
