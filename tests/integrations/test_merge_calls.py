"""How ``CallMerger`` groups, merges and splits transformer calls (Note [Merged pipeline calls]); its use
in a server is tested in test_serve_pipeline.py. Pure bookkeeping on small tensors: exact comparisons."""

import dataclasses
import inspect
import threading

import pytest
import torch

from cachedit.integrations.merge_calls import CallMerger, _Call, _groups, _split


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
        import cachedit

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
