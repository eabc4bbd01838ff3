"""How a token dim is split over ranks: the arithmetic the sharding plan and the runtime must share.

The passes (``fxpasses/``) rewrite token-axis sizes to local sizes, and the runtime (``runtime/``)
shards, gathers and exchanges tokens; both must agree on who holds which tokens, so both import this
module, which imports nothing of cachedit (DESIGN, layers).

A segment of ``n`` tokens is split over ``world`` ranks with ``torch.tensor_split`` sizes: the first
``n % world`` ranks hold one token more. A token dim made of several segments (Flux's joint
``[text | image]``) is split segment by segment, so rank ``i`` holds ``[seg0_i | seg1_i | ...]``.
"""

from __future__ import annotations


def local_length(n: int, world: int, rank: int) -> int:
    """Tokens of an ``n``-token segment held by ``rank`` (``torch.tensor_split`` sizes)."""
    return n // world + (1 if rank < n % world else 0)


def offset(n: int, world: int, rank: int) -> int:
    """Global index of the first token of an ``n``-token segment held by ``rank``."""
    return sum(local_length(n, world, r) for r in range(rank))


def rank_spans(layout: tuple[int, ...], world: int, rank: int) -> list[tuple[int, int]]:
    """(global start, length) of each piece of the token dim held by ``rank``, in local order."""
    spans, base = [], 0
    for n in layout:
        spans.append((base + offset(n, world, rank), local_length(n, world, rank)))
        base += n
    return spans


def local_tokens(layout: tuple[int, ...], world: int, rank: int) -> int:
    """Tokens of a dim made of segments of ``layout`` lengths held by ``rank``."""
    return sum(local_length(n, world, rank) for n in layout)
