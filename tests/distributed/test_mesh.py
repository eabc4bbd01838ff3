"""Mesh validation and communication volume, in one process (no ranks are started)."""

from __future__ import annotations

import pytest
import torch

from cachedit.config import CacheditConfig
from cachedit.kernels import fp8_wire_ratio
from cachedit.runtime import parallel


def test_mesh_product_must_match_the_world_size(monkeypatch):
    """u·r != world size fails with the fix in the message, before any collective is issued."""
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    issued = []
    monkeypatch.setattr(parallel.dist, "new_group", lambda *a, **k: issued.append(a))
    with pytest.raises(ValueError, match=r"CACHEDIT_ULYSSES=2 x CACHEDIT_RING=1 = 2, but the world size is 4"):
        parallel.context_parallel_mesh(CacheditConfig(ulysses=2))
    assert not issued


def test_missing_launcher_environment_says_how_to_launch(monkeypatch):
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)

    def no_env(backend):
        raise ValueError("Error initializing torch.distributed using env:// rendezvous: environment variable RANK expected")

    monkeypatch.setattr(parallel.dist, "init_process_group", no_env)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 4"):
        parallel.context_parallel_mesh(CacheditConfig(ulysses=2, ring=2))


def test_more_ranks_than_tokens_is_refused():
    mesh = parallel.Mesh(4, 0, 4, 1, False, "0", "0", "0")
    with pytest.raises(ValueError, match="needs at least 4 tokens per attention, but the smallest attention has 3"):
        mesh.check_sizes(3, "the smallest attention")


def test_single_process_needs_no_mesh():
    assert parallel.context_parallel_mesh(CacheditConfig()) is None


def _sent_bytes(monkeypatch, fp8: bool, world: int = 2, heads: int = 24, head_dim: int = 128, tokens: int = 64):
    """Bytes one rank hands to all-to-all for one attention's Q, K, V and O (Ulysses over ``world`` ranks)."""
    sent = []

    def fake_all_to_all(x, out_splits, in_splits, group):
        sent.append(x.numel() * x.element_size())
        return x.new_zeros(sum(out_splits))

    monkeypatch.setattr(parallel, "_all_to_all", fake_all_to_all)
    x = torch.randn(1, heads, tokens, head_dim, dtype=torch.bfloat16)
    seq = [tokens] * world
    q = parallel.seq_to_heads(x, seq, 0, "0", fp8)
    parallel.seq_to_heads(x, seq, 0, "0", False)  # K travels unquantized
    parallel.seq_to_heads(x, seq, 0, "0", fp8)
    parallel.heads_to_seq(q, seq, heads, 0, "0", fp8)
    return sent


def test_fp8_all_to_all_payload_is_at_most_053_of_bf16(monkeypatch):
    """Q, V and O as FP8 with packed per-(token, head) scales: (D + 1) / 2D of bf16 at D = 128."""
    plain = _sent_bytes(monkeypatch, fp8=False)
    fp8 = _sent_bytes(monkeypatch, fp8=True)
    ratios = [a / b for a, b in zip(fp8, plain)]
    assert ratios[1] == 1.0  # K
    for r in (ratios[0], ratios[2], ratios[3]):
        assert r == pytest.approx(fp8_wire_ratio(128)) and r <= 0.53
