"""One state per block list (``block_lists="separate"``, Note [Block lists] in cachedit/runtime/step_cache.py).

Tiny real FLUX.1 and FLUX.2 transformers (tests/models.py), inner "eager". Decision parity with cache-dit's
per-list states is in tests/test_parity_cachedit.py; here: per-list settings, a list the joined chain
leaves out (FLUX.2's single blocks), the forced-compute identity, and no recompiles.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import cachedit
from tests.models import denoise, get

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

BASE = dict(inner="eager", Fn=1, Bn=0, warmup_steps=2)


def run(name: str, steps: int = 8, **options):
    spec = get(name)
    model = spec.build()
    compiled = torch.compile(model, backend="cachedit", options={**BASE, **options})
    with cachedit.request(compiled, num_inference_steps=steps):
        out, _ = denoise(compiled, spec, num_steps=steps)
    (record,) = cachedit.stats(model)
    return model, out, record


@pytest.mark.parametrize("name", ["flux", "flux2"])
def test_each_list_computing_equals_eager_bitwise(name):
    """Both lists forced to compute (threshold 0): the nested split runs exactly what eager runs."""
    spec = get(name)
    reference, _ = denoise(spec.build(), spec, num_steps=3)
    model, out, record = run(name, steps=3, threshold=0.0, block_lists="separate")
    assert torch.equal(out, reference)
    explained = cachedit.explain(model)
    assert "its own state" in explained, explained


def test_each_list_has_its_own_settings_and_history():
    model, _, record = run(
        "flux", threshold=1.5, block_lists="separate", list_settings={"single_transformer_blocks": {"Fn": 2, "threshold": 0.0}}
    )
    main = record.branches["main"]
    single = main.lists["single_transformer_blocks"]
    assert main.cached_steps == list(range(2, 8)), "threshold >= 1 caches every step after warmup"
    assert single.cached_steps == [] and len(single.computed_steps) == 8, "its threshold 0 never caches"
    assert "block list single_transformer_blocks, its own state: split F2B0" in cachedit.explain(model)
    assert record.bytes_held == 0, "the request ended: every list freed its buffers"
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0


def test_flux2_single_blocks_get_a_state_of_their_own():
    """FLUX.2's single blocks take the joined text+image stream, so the joined chain stops before them; as a
    separate list they are cached too (cache-dit caches FLUX.2 per list)."""
    model, _, record = run("flux2", threshold=1.5, block_lists="separate")
    lists = record.branches["main"].lists
    assert list(lists) == ["single_transformer_blocks"] and lists["single_transformer_blocks"].cached_steps


def test_a_bad_list_setting_names_the_list_and_key():
    with pytest.raises(ValueError, match=r"list_settings\['single_transformer_blocks'\] has 'cfg'"):
        cachedit.CacheditConfig.resolve({"list_settings": {"single_transformer_blocks": {"cfg": "separate"}}})
