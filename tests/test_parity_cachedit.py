"""Decision parity with cache-dit 1.5.3's DBCache, the reference (``reference/cache-semantics.md``).

Note [Parity with cache-dit]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each case runs the same tiny ``FluxPipeline`` (``tests/flux_pipeline.py``, identical weights) twice: once
under ``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))`` and once under
``cachedit.enable(pipe, inner="eager", ...)`` with the same settings, and compares, per CFG branch,

- the cached-step lists (cache-dit: ``summary(pipe)[0].cached_steps`` and ``.cfg_cached_steps``;
  cachedit: ``stats(pipe.transformer)[-1].branches``) -- must be equal;
- the residual diffs recorded at each step -- same steps, same values to fp32 rounding;
- the final latents -- within 1e-5. Not bitwise: cache-dit runs its own copy of the Flux forward
  (``FluxPatchFunctor``) around its block wrapper, cachedit runs the Dynamo graph of diffusers' forward
  cut into parts, so fp32 results may differ by operation order; 24 steps of O(1) latents keep such
  differences near 1e-6, while one step decided differently moves the latents by more than 1e-2.

Random weights make head residuals change a lot from step to step (diffs 0.2-0.6, where trained models
see 0.01-0.2), so each threshold below was picked from the diffs cache-dit records for this model such
that cached and computed steps both occur after warmup, and the test asserts that mix (and that the
rule a case is about actually fired). Every recorded diff is also checked to sit at least ``MARGIN``
away from the threshold, so no decision hinges on fp32 rounding.

cache-dit is a test-time reference only (``pip install cache-dit==1.5.3``); cachedit never imports it.
It patches ``pipe.__class__.__call__``, so each cache-dit pipeline gets a throwaway subclass (named
``FluxPipeline``, the name cache-dit's adapter registry matches on) to keep the patch off diffusers' class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from packaging.version import Version

import cachedit
from cachedit.runtime.policy import Reason
from tests.flux_pipeline import CHANNELS, IMAGE_TOKENS, generate, prompt, tiny_flux_pipeline, tiny_flux_transformer

REFERENCE_VERSION = Version("1.5.3")
LATENT_ATOL = 1e-5  # fp32 reordering between two implementations of the same forward (Note [Parity with cache-dit])
DIFF_RTOL = 1e-5  # the same relative L1 reduced in a different order, in fp32
MARGIN = 1e-3  # every recorded diff is at least this far from the threshold: decisions cannot flip on rounding

# cachedit option -> DBCacheConfig field
_REFERENCE_NAMES = {
    "Fn": "Fn_compute_blocks",
    "Bn": "Bn_compute_blocks",
    "threshold": "residual_diff_threshold",
    "warmup_steps": "max_warmup_steps",
    "warmup_interval": "warmup_interval",
    "max_cached_steps": "max_cached_steps",
    "max_continuous_cached_steps": "max_continuous_cached_steps",
    "max_accumulated_residual_diff_threshold": "max_accumulated_residual_diff_threshold",
    "cfg_diff_compute_separate": "cfg_diff_compute_separate",
}


@pytest.fixture(scope="module")
def cache_dit():
    module = pytest.importorskip("cache_dit", reason="parity tests need the reference: pip install cache-dit==1.5.3")
    if Version(module.__version__) != REFERENCE_VERSION:
        pytest.skip(f"parity is pinned to cache-dit {REFERENCE_VERSION}; found {module.__version__}")
    return module


@dataclasses.dataclass(frozen=True)
class Run:
    latents: torch.Tensor
    cached: dict[str, list[int]]  # branch -> cached steps
    diffs: dict[str, dict[int, float]]  # branch -> step -> recorded residual diff
    reasons: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)  # cachedit only


def reference_generation(cache_dit, config: Any, steps: int, true_cfg: bool = False) -> tuple[torch.Tensor, list]:
    """The tiny pipeline under ``cache_dit.enable_cache(cache_config=config)`` (a class of its own: cache-dit
    patches the class): the final latents and cache-dit's summary entries."""
    pipe = tiny_flux_pipeline(type("FluxPipeline", (FluxPipeline,), {}))
    cache_dit.enable_cache(pipe, cache_config=config)
    latents = generate(pipe, steps, true_cfg=true_cfg)
    return latents, cache_dit.summary(pipe, logging=False)


def run_reference(cache_dit, options: dict[str, Any], steps: int, true_cfg: bool, **reference_only: Any) -> Run:
    config = cache_dit.DBCacheConfig(
        enable_separate_cfg=true_cfg, **{_REFERENCE_NAMES[k]: v for k, v in options.items()}, **reference_only
    )
    latents, summary = reference_generation(cache_dit, config, steps, true_cfg)
    stats = summary[0]
    diffs = {int(k): float(v) for k, v in stats.residual_diffs.items()}
    if not true_cfg:
        return Run(latents, {"main": list(stats.cached_steps)}, {"main": diffs})
    cfg_diffs = {int(k): float(v) for k, v in stats.cfg_residual_diffs.items()}
    return Run(
        latents,
        {"cond": list(stats.cached_steps), "uncond": list(stats.cfg_cached_steps)},
        {"cond": diffs, "uncond": cfg_diffs},
    )


def fresh_dynamo() -> None:
    """Forget earlier compiles: Dynamo reuses a graph (and so its StepCache) for another instance of the same
    class compiled with equal options, which would tie this test's state and stats to an earlier test's model."""
    torch._dynamo.reset()


def cachedit_generation(steps: int, true_cfg: bool = False, **options: Any) -> tuple[torch.Tensor, Any, Any]:
    """The tiny pipeline under ``cachedit.enable(inner="eager", **options)`` after ``fresh_dynamo``: the final
    latents, the record of its one request, and the pipeline."""
    fresh_dynamo()
    pipe = tiny_flux_pipeline()
    cachedit.enable(pipe, inner="eager", **options)
    latents = generate(pipe, steps, true_cfg=true_cfg)
    records = cachedit.stats(pipe.transformer)
    assert len(records) == 1, f"one pipe() call must be one request, got {len(records)}"
    return latents, records[0], pipe


def run_cachedit(options: dict[str, Any], steps: int, true_cfg: bool, cfg: str) -> Run:
    latents, record, pipe = cachedit_generation(steps, true_cfg, cfg=cfg, **options)
    explained = cachedit.explain(pipe.transformer)
    assert explained.count("graph #") == 1, f"expected one Dynamo graph for the whole generation:\n{explained}"
    assert "not step-cached" not in explained, explained
    assert (record.source, record.num_inference_steps, record.steps) == ("explicit", steps, steps)
    branches = record.branches
    return Run(
        latents,
        {name: list(b.cached_steps) for name, b in branches.items()},
        {name: dict(b.diffs) for name, b in branches.items()},
        {name: dict(b.reasons) for name, b in branches.items()},
    )


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    options: dict[str, Any]
    fired: tuple[Reason, ...] = ()  # rules that must decide at least one step (besides diffs and warmup)
    true_cfg: bool = False
    cfg: str = "batched"
    steps: int = 24


CASES = [
    # F1B0: the popular setting; τ 0.35 sits inside this model's diffs (0.23-0.47).
    Case("F1B0", dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=4)),
    # F2B1 with at most 2 cached steps in a row; τ 0.3 also lets diffs force computes between streaks.
    Case(
        "F2B1-MC2",
        dict(Fn=2, Bn=1, threshold=0.3, warmup_steps=3, max_continuous_cached_steps=2),
        fired=(Reason.MAX_CONTINUOUS,),
    ),
    # Warmup steps range(0, 8, 3) = {0, 3, 6}: steps 1, 2, 4, 5, 7 are ordinary; at most 5 cached steps.
    Case(
        "W8I3-M5",
        dict(Fn=1, Bn=0, threshold=0.32, warmup_steps=8, warmup_interval=3, max_cached_steps=5),
        fired=(Reason.MAX_CACHED,),
    ),
    # Separate CFG: FluxPipeline's true CFG calls the transformer twice per step, positive prompt first.
    Case("CFG-separate", dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=4), true_cfg=True, cfg="separate"),
    Case("CFG-auto", dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=4), true_cfg=True, cfg="auto"),
    # The uncond call decides on the cond call's diff of the same step.
    Case(
        "CFG-shared-diff",
        dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=4, cfg_diff_compute_separate=False),
        true_cfg=True,
        cfg="separate",
    ),
    # Caching stops once the recorded diffs of a branch sum to 1.5.
    Case(
        "MA1.5",
        dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=3, max_accumulated_residual_diff_threshold=1.5),
        fired=(Reason.MAX_ACCUMULATED,),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cached_steps_and_latents_match_cache_dit(cache_dit, case):
    reference = run_reference(cache_dit, case.options, case.steps, case.true_cfg)
    ours = run_cachedit(case.options, case.steps, case.true_cfg, case.cfg)

    threshold = case.options["threshold"]
    warmup = set(range(0, case.options["warmup_steps"], case.options.get("warmup_interval", 1)))
    assert ours.cached.keys() == reference.cached.keys() == ({"cond", "uncond"} if case.true_cfg else {"main"})
    for branch, cached in reference.cached.items():
        # The setup is meaningful: both outcomes occur outside warmup, and no diff is within rounding of τ.
        computed = set(range(case.steps)) - warmup - set(cached)
        assert cached and computed, f"{case.id}/{branch}: trivial schedule, cached {cached}; pick another τ"
        near = {s: d for s, d in reference.diffs[branch].items() if abs(d - threshold) < MARGIN}
        assert not near, f"{case.id}/{branch}: diffs {near} within {MARGIN} of τ={threshold}; pick another τ"

        assert ours.cached[branch] == cached, (
            f"{case.id}/{branch}: cachedit cached {ours.cached[branch]}, cache-dit cached {cached}\n"
            f"cachedit reasons: {ours.reasons[branch]}"
        )
        assert ours.diffs[branch].keys() == reference.diffs[branch].keys(), (
            f"{case.id}/{branch}: diffs recorded at steps {sorted(ours.diffs[branch])}, "
            f"cache-dit at {sorted(reference.diffs[branch])}"
        )
        for step, diff in reference.diffs[branch].items():
            assert ours.diffs[branch][step] == pytest.approx(diff, rel=DIFF_RTOL), f"{case.id}/{branch} step {step}"
        assert any(Reason.CHANGED.value in r for r in ours.reasons[branch].values()), (
            f"{case.id}/{branch}: no step was computed because its diff reached τ"
        )
        if case.options.get("warmup_interval", 1) > 1:
            window = set(range(case.options["warmup_steps"])) - warmup
            assert window & set(cached), f"{case.id}/{branch}: no step inside the warmup window was cached"
        for rule in case.fired:
            assert any(rule.value in r for r in ours.reasons[branch].values()), f"{case.id}/{branch}: {rule} never fired"
    torch.testing.assert_close(ours.latents, reference.latents, rtol=0, atol=LATENT_ATOL)


# --- steps-computation masks -------------------------------------------------------------------------------------

SCM_OPTIONS = dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=4)
# Picked, like the cases above, from the diffs cache-dit records: at 0.35 a diff of these two lands
# within MARGIN of τ (0.3502); at 0.33 none does and both outcomes still occur on 0 bits.
SCM_THRESHOLDS = {("fast", 50): 0.33, ("ultra", 50): 0.33}


@pytest.mark.parametrize("steps", [28, 50])
@pytest.mark.parametrize("policy", ["dynamic", "static"])
@pytest.mark.parametrize("preset", ["slow", "medium", "fast", "ultra"])
def test_steps_masks_match_cache_dit(cache_dit, preset, policy, steps):
    """The same preset mask, policy and DBCache settings: the same cached steps, diffs and latents."""
    mask = cache_dit.steps_mask(total_steps=steps, mask_policy=preset)
    assert cachedit.steps_mask(steps, preset) == mask
    options = {**SCM_OPTIONS, "threshold": SCM_THRESHOLDS.get((preset, steps), SCM_OPTIONS["threshold"])}
    reference = run_reference(
        cache_dit, options, steps, False, steps_computation_mask=mask, steps_computation_policy=policy
    )
    ours = run_cachedit({**options, "scm": preset, "scm_policy": policy}, steps, False, "batched")
    cached = reference.cached["main"]
    zeros = {s for s, bit in enumerate(mask) if bit == 0}
    if policy == "static":
        assert cached == sorted(zeros)
    else:  # 0 bits fall through to the threshold: both outcomes occur there
        assert zeros - set(cached) and set(cached), f"trivial schedule {cached}; pick another τ"
        near = {s: d for s, d in reference.diffs["main"].items() if abs(d - options["threshold"]) < MARGIN}
        assert not near, f"diffs {near} within {MARGIN} of τ; pick another τ"
    assert ours.cached["main"] == cached, f"cachedit cached {ours.cached['main']}, cache-dit {cached}"
    assert ours.diffs["main"].keys() == reference.diffs["main"].keys()
    for step, diff in reference.diffs["main"].items():
        assert ours.diffs["main"][step] == pytest.approx(diff, rel=DIFF_RTOL), f"step {step}"
    torch.testing.assert_close(ours.latents, reference.latents, rtol=0, atol=LATENT_ATOL)


# --- requests on a bare compiled transformer -------------------------------------------------------------------

BARE_STEPS = 20
BARE_OPTIONS = dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=4)


def denoise(model: Any, steps: int) -> torch.Tensor:
    """One generation driven by hand, as a serving stack would: Euler over FlowMatch sigmas, t = sigma."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, IMAGE_TOKENS, CHANNELS, generator=g)  # [B, 16 tokens, 16 channels]
    embeds, pooled = prompt(1)
    side = int(IMAGE_TOKENS**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    sigmas = [float(s) for s in np.linspace(1.0, 1.0 / steps, steps)] + [0.0]
    with torch.no_grad():
        for i in range(steps):
            v = model(
                hidden_states=x,
                timestep=torch.tensor([sigmas[i]]),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                img_ids=img_ids.reshape(-1, 3),
                txt_ids=torch.zeros(embeds.shape[1], 3),
                return_dict=False,
            )[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@pytest.fixture(scope="module")
def bare_requests():
    """Two identical back-to-back generations on one compiled transformer, no pipeline, no explicit request."""
    fresh_dynamo()
    model = torch.compile(tiny_flux_transformer(), backend="cachedit", options=dict(inner="eager", **BARE_OPTIONS))
    outputs = [denoise(model, BARE_STEPS), denoise(model, BARE_STEPS)]
    return outputs, cachedit.stats(model)


def test_back_to_back_requests_on_a_bare_transformer_are_independent(bare_requests):
    (first, second), records = bare_requests
    assert [(r.source, r.steps) for r in records] == [("timestep", BARE_STEPS)] * 2, records
    cached = [r.branches["main"].cached_steps for r in records]
    assert cached[0] and len(cached[0]) < BARE_STEPS - BARE_OPTIONS["warmup_steps"], f"trivial schedule {cached[0]}"
    warmup = {s for s, r in records[1].branches["main"].reasons.items() if Reason.WARMUP.value in r}
    assert warmup == set(range(BARE_OPTIONS["warmup_steps"]))
    # The second request starts from nothing: step 0 is its first call, warmup again, no stale buffers.
    assert cached[1] == cached[0]
    assert records[1].branches["main"].diffs == records[0].branches["main"].diffs
    assert torch.equal(second, first)


def test_bare_transformer_matches_cache_dit_and_avoids_its_off_by_one(cache_dit, bare_requests):
    (first, _), records = bare_requests
    transformer = tiny_flux_transformer()
    config = {_REFERENCE_NAMES[k]: v for k, v in BARE_OPTIONS.items()}
    cache_dit.enable_cache(transformer, cache_config=cache_dit.DBCacheConfig(num_inference_steps=BARE_STEPS, **config))
    reference_first = denoise(transformer, BARE_STEPS)
    assert cache_dit.summary(transformer, logging=False)[0].cached_steps == records[0].branches["main"].cached_steps
    torch.testing.assert_close(first, reference_first, rtol=0, atol=LATENT_ATOL)
    # cache-dit (transformer-only mode) refreshes only when a call *starts* past num_inference_steps, so the
    # first call of the next request runs as step 20 of the old one, against its buffers: the same request
    # gives another result. This is what the test above keeps cachedit from reproducing.
    reference_second = denoise(transformer, BARE_STEPS)
    assert (reference_second - reference_first).abs().max() > 1e-3, "cache-dit no longer shows the off-by-one"



# --- forced refresh ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hint,policy", [(10, "once"), (8, "repeat")])
def test_force_refresh_matches_cache_dit(cache_dit, hint, policy):
    """``force_refresh_step_hint``: the cache state restarts at the hint (and its multiples with "repeat").

    cache-dit's summary after a refresh mixes step numbers from before and after it, so the comparison is
    on what the generation computed: the latents, against the run without a refresh to show it mattered.
    """
    options = dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=3)
    refresh = dict(force_refresh_step_hint=hint, force_refresh_step_policy=policy)
    reference = run_reference(cache_dit, options, 24, False, **refresh)
    ours = run_cachedit({**options, **refresh}, 24, False, "batched")
    plain = run_cachedit(options, 24, False, "batched")
    torch.testing.assert_close(ours.latents, reference.latents, rtol=0, atol=LATENT_ATOL)
    assert (ours.latents - plain.latents).abs().max() > 1e-3, "the refresh changed nothing: pick another hint"
    starts = [0, hint] if policy == "once" else list(range(0, 24, hint))
    warmup = {s + i for s in starts for i in range(options["warmup_steps"])}
    reasons = ours.reasons["main"]
    assert {s for s, r in reasons.items() if Reason.WARMUP.value in r} == warmup, reasons
    assert ours.cached["main"] and all(s not in warmup for s in ours.cached["main"])


# --- DBPrune -------------------------------------------------------------------------------------------------------

PRUNE_STEPS = 16


def run_prune_reference(cache_dit, options: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    names = {**_REFERENCE_NAMES, "prune_threshold": "residual_diff_threshold", "non_prune_blocks": "non_prune_block_ids"}
    config = cache_dit.DBPruneConfig(**{names[k]: v for k, v in options.items()})
    latents, summary = reference_generation(cache_dit, config, PRUNE_STEPS)
    return latents, summary[0]


@pytest.mark.parametrize(
    "options",
    [
        # Two thresholds inside this model's block diffs (0.03-0.38): prunes stop at different steps.
        dict(Fn=1, Bn=0, prune_threshold=0.2, warmup_steps=4),
        dict(Fn=1, Bn=0, prune_threshold=0.35, warmup_steps=4),
        # Fn/Bn, an excluded block and a run-length limit: decisions differ between blocks of one step.
        dict(Fn=2, Bn=1, prune_threshold=0.3, warmup_steps=3, max_continuous_cached_steps=3, non_prune_blocks=[3]),
        # The step of the 4th prune counts as cached at its first pruned block: the blocks after it run.
        dict(Fn=1, Bn=0, prune_threshold=0.35, warmup_steps=4, max_cached_steps=4),
    ],
    ids=["F1-0.2", "F1-0.35", "F2B1-MC3-skip3", "M4"],
)
def test_dbprune_matches_cache_dit(cache_dit, options):
    """Per step, the same pruned-block counts and block diffs as cache-dit 1.5.3's DBPrune, and the same latents."""
    reference_latents, reference = run_prune_reference(cache_dit, options)
    latents, record, _ = cachedit_generation(PRUNE_STEPS, cfg="batched", policy="dbprune", **options)
    branch = record.branches["main"]
    counts = [len(branch.pruned_blocks[s]) for s in range(PRUNE_STEPS)]
    assert counts == list(reference.pruned_blocks), (counts, reference.pruned_blocks)
    excluded = set(options.get("non_prune_blocks", ()))
    assert not excluded & {b for blocks in branch.pruned_blocks.values() for b in blocks}
    if "max_cached_steps" in options:
        assert counts[branch.cached_steps[-1]] == 1, f"the last cached step pruned {counts} blocks, not only its first"
    assert branch.cached_steps == list(reference.cached_steps)
    assert 0 < len(branch.cached_steps) < PRUNE_STEPS - options["warmup_steps"], "trivial schedule: pick another τ"
    threshold = options["prune_threshold"]
    for step, diffs in reference.residual_diffs.items():
        mine = list(branch.block_diffs[int(step)].values())
        assert mine == pytest.approx(list(diffs), rel=DIFF_RTOL), f"step {step}"
        assert all(abs(d - threshold) >= MARGIN for d in diffs), f"step {step}: a diff within {MARGIN} of τ"
    torch.testing.assert_close(latents, reference_latents, rtol=0, atol=LATENT_ATOL)


# --- one state per block list --------------------------------------------------------------------------------------


def test_separate_block_lists_match_cache_dit(cache_dit, monkeypatch):
    """``block_lists="separate"``: each of FLUX.1's lists decides on its own, as cache-dit 1.5.3 does with
    ``CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS=0``: the same cached steps and diffs per list, and the same latents."""
    from cache_dit.envs import ENV

    monkeypatch.setattr(ENV, "CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", False)
    options = dict(Fn=1, Bn=0, threshold=0.35, warmup_steps=4)
    steps = 16
    config = cache_dit.DBCacheConfig(**{_REFERENCE_NAMES[k]: v for k, v in options.items()})
    reference_latents, summary = reference_generation(cache_dit, config, steps)
    reference = {}
    for entry in summary:  # one per list (its summary may repeat an entry)
        path = entry.cache_options["name"].rsplit("_", 1)[0]
        reference.setdefault(path, entry)
    assert set(reference) == {"transformer_blocks", "single_transformer_blocks"}

    latents, record, _ = cachedit_generation(steps, cfg="batched", block_lists="separate", **options)
    main = record.branches["main"]
    ours = {"transformer_blocks": main, "single_transformer_blocks": main.lists["single_transformer_blocks"]}
    assert ours["transformer_blocks"].cached_steps != ours["single_transformer_blocks"].cached_steps, "lists agree: no test"
    for path, branch in ours.items():
        assert branch.cached_steps == list(reference[path].cached_steps), path
        diffs = {int(k): float(v) for k, v in reference[path].residual_diffs.items()}
        assert branch.diffs.keys() == diffs.keys(), path
        for step, diff in diffs.items():
            assert branch.diffs[step] == pytest.approx(diff, rel=DIFF_RTOL), f"{path} step {step}"
            assert abs(diff - options["threshold"]) >= MARGIN, f"{path} step {step}: diff within {MARGIN} of τ"
    torch.testing.assert_close(latents, reference_latents, rtol=0, atol=LATENT_ATOL)
