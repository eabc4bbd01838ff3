"""``cachedit.enable(pipe)`` on a real (tiny) FluxPipeline: exactness, one request per call, errors."""

import pytest
import torch
from diffusers import FluxPipeline

import cachedit
from cachedit.runtime.policy import Reason
from tests.flux_pipeline import generate, tiny_flux_pipeline, tiny_flux_transformer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Dynamo reuses a compiled graph (and its StepCache) for another instance of the same class compiled
    # with equal options; start each test from an empty cache so no test sees another test's state.
    torch._dynamo.reset()


def _graph_count(pipe) -> int:
    explained = cachedit.explain(pipe)
    assert "not step-cached" not in explained, explained
    return explained.count("graph #")


def test_threshold_zero_is_bitwise_the_uncompiled_pipeline():
    plain = tiny_flux_pipeline()
    ours = cachedit.enable(tiny_flux_pipeline(), inner="eager", Fn=1, threshold=0.0, warmup_steps=2)
    assert isinstance(ours, FluxPipeline)
    for true_cfg in (False, True):
        expected = generate(plain, 8, true_cfg=true_cfg)
        # The gate forced to compute runs every part; with the eager inner compiler that is bitwise eager.
        assert torch.equal(generate(ours, 8, true_cfg=true_cfg), expected), f"true_cfg={true_cfg}"
    records = cachedit.stats(ours)
    assert len(records) == 2
    for record in records:
        for branch in record.branches.values():
            assert branch.cached_steps == [] and branch.computed_steps == list(range(8))
            assert all(Reason.DISABLED.value in branch.reasons[s] for s in range(2, 8)), branch.reasons
    assert _graph_count(ours) == 1


def test_each_call_is_one_request_with_its_num_inference_steps():
    pipe = cachedit.enable(tiny_flux_pipeline(), inner="eager", Fn=1, threshold=0.35, warmup_steps=2)
    first = generate(pipe, 10)
    generate(pipe, 6, true_cfg=True)
    generate(pipe, None)  # FluxPipeline's default num_inference_steps
    again = generate(pipe, 10)

    records = cachedit.stats(pipe)
    assert [(r.source, r.num_inference_steps, r.steps) for r in records] == [
        ("explicit", 10, 10),
        ("explicit", 6, 6),
        ("explicit", 28, 28),
        ("explicit", 10, 10),
    ]
    assert [sorted(r.branches) for r in records] == [["main"], ["cond", "uncond"], ["main"], ["main"]]
    for record in records:
        for name, branch in record.branches.items():
            assert sorted(branch.cached_steps + branch.computed_steps) == list(range(record.steps)), name
    assert records[0].num_cached_steps > 0, "caching never engaged; the threshold no longer suits this model"
    # A request starts from nothing: the same call gives the same decisions and the same latents.
    assert records[3].branches["main"].cached_steps == records[0].branches["main"].cached_steps
    assert torch.equal(again, first)
    # New step counts, CFG pairs, cached and computed steps: all one Dynamo graph.
    assert _graph_count(pipe) == 1


@pytest.mark.parametrize("make", [tiny_flux_transformer, object], ids=["bare-transformer", "object"])
def test_enable_rejects_what_is_not_a_pipeline(make):
    thing = make()
    with pytest.raises(TypeError, match=rf"expects a diffusers pipeline.*{type(thing).__name__}.*torch\.compile"):
        cachedit.enable(thing)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(thresold=0.1), r"unknown cachedit option 'thresold'.*Did you mean 'threshold'"),
        (dict(Fn=0), r"Fn=0 is out of range"),
        (dict(cfg="sometimes"), r"cfg='sometimes' is not accepted.*'separate'"),
    ],
    ids=["unknown-name", "bad-Fn", "bad-cfg"],
)
def test_enable_rejects_a_bad_option_before_touching_the_pipeline(options, message):
    pipe = tiny_flux_pipeline()
    with pytest.raises(ValueError, match=message):
        cachedit.enable(pipe, **options)
    assert type(pipe) is FluxPipeline
    assert getattr(pipe.transformer, "_compiled_call_impl", None) is None, "the transformer was compiled anyway"


def test_two_pipelines_with_equal_options_keep_their_own_requests():
    options = dict(inner="eager", Fn=1, threshold=0.35, warmup_steps=2)
    first = cachedit.enable(tiny_flux_pipeline(), **options)
    second = cachedit.enable(tiny_flux_pipeline(), **options)
    generate(first, 6)
    generate(second, 6)
    assert [r.source for r in cachedit.stats(first)] == ["explicit"]
    assert [r.source for r in cachedit.stats(second)] == ["explicit"]


def test_per_call_settings_reach_that_request_only():
    pipe = cachedit.enable(tiny_flux_pipeline(), inner="eager", Fn=1, threshold=0.35, warmup_steps=2)
    generate(pipe, 10)
    generate(pipe, 10, cachedit={"threshold": 0.0})
    generate(pipe, 10, cachedit={"threshold": 0.9, "warmup_steps": 1})
    generate(pipe, 10)
    records = cachedit.stats(pipe)
    assert [r.settings for r in records] == [{}, {"threshold": 0.0}, {"threshold": 0.9, "warmup_steps": 1}, {}]
    cached = [r.num_cached_steps for r in records]
    assert cached[1] == 0 and cached[2] > cached[0] > 0 and cached[3] == cached[0]
    assert _graph_count(pipe) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"Fn": 2}, r"Fn=2 cannot be set per request: it is fixed when the model is compiled"),
        ({"threshhold": 0.2}, r"unknown per-request setting 'threshhold'.*Did you mean 'threshold'"),
        ({"warmup_steps": -1}, r"warmup_steps=-1 is out of range"),
        (0.2, r"cachedit=0.2: expected a dict"),
    ],
    ids=["structural", "typo", "out-of-range", "not-a-dict"],
)
def test_bad_per_call_settings_fail_before_the_first_step(settings, message):
    pipe = cachedit.enable(tiny_flux_pipeline(), inner="eager", Fn=1)
    with pytest.raises((ValueError, TypeError), match=message):
        generate(pipe, 4, cachedit=settings)
    assert cachedit.stats(pipe) == []
