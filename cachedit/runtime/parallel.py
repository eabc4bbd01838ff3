"""Context-parallel runtime: the process mesh, token shard/gather, and Ulysses / Ring / USP attention.

Note [Context-parallel attention]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Mesh: ``u·r = P`` ranks; rank ``= ring_index · u + ulysses_index``. A Ulysses group is ``u``
consecutive ranks, a ring group the ``r`` ranks with one Ulysses index. Every segment of the token
dim (Note [Sequence sharding plan]) is split over all P ranks in rank order with ``tensor_split``
sizes, so rank ``i`` holds ``[seg0_i | seg1_i | ...]``.

Ulysses (per attention, one all-to-all each way, unequal split sizes allowed)::

    q [B, H, s_i, D]  --a2a-->  [B, h_j, s_0 + ... + s_{u-1}, D]  --SDPA-->  --a2a-->  [B, H, s_i, D]

Head split sizes follow ``tensor_split`` too, so H need not divide by u (a rank may hold no head).
After the all-to-all the sequence is rank-major, not global order: attention does not care (keys
permute freely, queries come back where they were), but a mask does, so its rows and columns are
taken in rank-major order. K/V that are not sharded (cross-attention) just keep the local heads.

Ring (``cachedit::ring_attention``): K and V travel together around the ring group with
point-to-point sends, overlapped with the attention on the block at hand; the partial results merge by
log-sum-exp in fp32 (``cachedit::merge_attention``). Each block runs a fused SDPA kernel that returns the
LSE (CPU flash; CUDA flash, efficient or cuDNN), never the block's score matrix, except on the documented
math fallback (Note [LSE attention kernels] in ``kernels/attention_lse.py``). It is an opaque custom op because compiled code
cannot issue point-to-point sends. USP runs Ulysses within the group and the ring across groups.

FP8 (``fp8_comm``): Q, V and O payloads travel as float8_e4m3fn with one power-of-two scale byte per
(token, head) packed after each row (``cachedit::fp8_quantize``); K travels unquantized, as in cache-dit. Around the
ring, V travels as FP8 and K as raw bytes in the same buffer.

Every function the rewrite calls takes only tensors and plain literals, so FX prints it, Inductor traces
through it (the all-to-alls and the all-gather are functional collectives) and fake tensors propagate.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cachedit import kernels  # noqa: F401  (registers torch.ops.cachedit.*)
from cachedit.config import CacheditConfig
from cachedit.kernels.attention_lse import attention_with_lse
from cachedit.sharding import local_length, local_tokens, rank_spans
from cachedit.sharding import offset as _offset


def _take(x: torch.Tensor, dim: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Concatenate ``x.narrow(dim, start, length)`` over ``spans`` (no index tensors: Inductor-friendly)."""
    pieces = [x.narrow(dim, s, n) for s, n in spans if n > 0]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=dim) if pieces else x.narrow(dim, 0, 0)


# --- shard and gather at the chain's cuts -----------------------------------------------------------------


def shard_tokens(x: torch.Tensor, dim: int, layout: tuple[int, ...], world: int, rank: int) -> torch.Tensor:
    """This rank's share of every segment of ``x``'s token dim ``dim``."""
    return _take(x, dim, rank_spans(layout, world, rank)).contiguous()


def gather_tokens(x: torch.Tensor, dim: int, layout: tuple[int, ...], world: int, group: str) -> torch.Tensor:
    """All-gather the shards of ``x`` along ``dim`` and put the tokens back in global order."""
    sizes = [local_tokens(layout, world, r) for r in range(world)]
    width = max(sizes)
    y = x.movedim(dim, 0)  # [s_i, ...]
    if y.shape[0] < width:  # all_gather_into_tensor needs equal sizes: pad, then drop the padding
        y = torch.cat([y, y.new_zeros((width - y.shape[0], *y.shape[1:]))])
    y = torch.ops._c10d_functional.all_gather_into_tensor(y.contiguous(), world, group)
    y = torch.ops._c10d_functional.wait_tensor(y)  # [world * width, ...]
    spans = []
    for k, n in enumerate(layout):  # segment-major: every rank's piece of segment 0, then segment 1, ...
        for r in range(world):
            local = rank_spans(layout, world, r)
            spans.append((r * width + sum(m for _, m in local[:k]), local[k][1]))
    return _take(y, 0, spans).movedim(0, dim)


# --- Ulysses all-to-all -----------------------------------------------------------------------------------


def _fp8_pack(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.cachedit.fp8_quantize(x)


def _fp8_unpack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.cachedit.fp8_dequantize(x, dtype)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: str) -> torch.Tensor:
    y = torch.ops._c10d_functional.all_to_all_single(x, out_splits, in_splits, group)
    return torch.ops._c10d_functional.wait_tensor(y)


def seq_to_heads(x: torch.Tensor, seq: list[int], me: int, group: str, fp8: bool) -> torch.Tensor:
    """``[B, H, seq[me], D]`` -> ``[B, heads[me], sum(seq), D]`` over the Ulysses group (rank-major tokens)."""
    b, h, s, d = x.shape
    heads = [local_length(h, len(seq), j) for j in range(len(seq))]
    send = x.transpose(0, 1)  # [H, B, s, D]
    dtype = x.dtype
    if fp8:
        send = _fp8_pack(send)  # [H, B, s, D + 1] uint8
    w = send.shape[-1]
    out_splits = [heads[me] * b * n * w for n in seq]
    recv = _all_to_all(send.contiguous().reshape(-1), out_splits, [k * b * s * w for k in heads], group)
    pieces = [p.view(heads[me], b, n, w) for p, n in zip(torch.split(recv, out_splits), seq)]
    y = torch.cat(pieces, dim=2)  # [h_me, B, S, w]
    if fp8:
        y = _fp8_unpack(y, dtype)
    return y.transpose(0, 1)


def heads_to_seq(y: torch.Tensor, seq: list[int], heads_total: int, me: int, group: str, fp8: bool) -> torch.Tensor:
    """The inverse of ``seq_to_heads``: ``[B, heads[me], sum(seq), D]`` -> ``[B, H, seq[me], D]``."""
    b, _, _, d = y.shape
    heads = [local_length(heads_total, len(seq), j) for j in range(len(seq))]
    send = y.transpose(0, 1)  # [h_me, B, S, D]
    dtype = y.dtype
    if fp8:
        send = _fp8_pack(send)
    w = send.shape[-1]
    flat = torch.cat([p.reshape(-1) for p in torch.split(send, seq, dim=2)])
    out_splits = [k * b * seq[me] * w for k in heads]
    recv = _all_to_all(flat, out_splits, [heads[me] * b * n * w for n in seq], group)
    pieces = [p.view(k, b, seq[me], w) for p, k in zip(torch.split(recv, out_splits), heads)]
    x = torch.cat(pieces, dim=0)  # [H, B, s, w]
    if fp8:
        x = _fp8_unpack(x, dtype)
    return x.transpose(0, 1)


# --- Ring attention ---------------------------------------------------------------------------------------


def _merge(out_a, lse_a, out_b, lse_b):
    return torch.ops.cachedit.merge_attention(out_a, lse_a, out_b, lse_b)


@torch.library.custom_op("cachedit::ring_attention", mutates_args=())
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: Optional[float],
    group: str,
    kv_lengths: list[int],
    fp8: bool,
) -> torch.Tensor:
    """Attention of the local queries over the K/V of every ring member; ``kv_lengths[j]``: member j's keys.

    ``mask`` (optional) has its key columns in ring order: member 0's keys, then member 1's, ...
    With ``fp8``, V travels as FP8 with packed scales and K as raw bytes (the local block stays exact).
    """
    return ring_attention_impl(q, k, v, mask, scale, group, kv_lengths, fp8)


def _pack_kv(k: torch.Tensor, v: torch.Tensor, fp8: bool) -> torch.Tensor:
    """One send buffer per step: ``[K | V]``, or with ``fp8`` the bytes of K then V's FP8 payload (uint8)."""
    if not fp8:
        return torch.cat([k, v], dim=-1).contiguous()  # [B, H, s, Dk + Dv]
    return torch.cat([k.contiguous().view(torch.uint8), _fp8_pack(v)], dim=-1).contiguous()


def _unpack_kv(block: torch.Tensor, dk: int, dtype: torch.dtype, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # narrow, not indexing: Python indexing needs a device guard, which fake CUDA tensors on a CPU-only
    # build (the allocation test in tests/kernels/test_attention_lse.py) cannot have
    width = block.shape[-1]
    if not fp8:
        return block.narrow(-1, 0, dk), block.narrow(-1, dk, width - dk)
    nk = dk * torch.empty((), dtype=dtype).element_size()
    return block.narrow(-1, 0, nk).contiguous().view(dtype), _fp8_unpack(block.narrow(-1, nk, width - nk).contiguous(), dtype)


def ring_attention_impl(q, k, v, mask, scale, group: str, kv_lengths: list[int], fp8: bool = False) -> torch.Tensor:
    """The body of ``cachedit::ring_attention`` (also run on fake tensors by ``benchmarks/comm.py``)."""
    pg = dist.distributed_c10d._resolve_process_group(group)
    size, me = len(kv_lengths), dist.get_rank(pg)
    dk = k.shape[-1]
    starts = [sum(kv_lengths[:j]) for j in range(size)]
    block = _pack_kv(k, v, fp8) if size > 1 else None  # one send per step
    src, out, lse = me, None, None
    for step in range(size):
        pending = []
        if step + 1 < size:
            nxt = (src - 1) % size
            recv = block.new_empty((*block.shape[:2], kv_lengths[nxt], block.shape[-1]))
            pending = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, block, group=pg, group_peer=(me + 1) % size),
                    dist.P2POp(dist.irecv, recv, group=pg, group_peer=(me - 1) % size),
                ]
            )
        if kv_lengths[src] > 0:  # overlaps the transfer above
            kb, vb = (k, v) if step == 0 else _unpack_kv(block, dk, k.dtype, fp8)
            mb = mask
            if mask is not None and mask.shape[-1] > 1:
                mb = mask.narrow(-1, starts[src], kv_lengths[src])
            o, l = attention_with_lse(q, kb, vb, mb, scale)
            out, lse = (o, l) if out is None else _merge(out, lse, o, l)
        for req in pending:
            req.wait()
        if pending:
            block, src = recv, nxt
    if out is None:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return out


def _ring(q, k, v, mask, scale, group: str, kv_lengths: list[int], fp8: bool) -> torch.Tensor:
    return torch.ops.cachedit.ring_attention(q, k, v, mask, scale, group, kv_lengths, fp8)


@ring_attention.register_fake
def _(q, k, v, mask, scale, group, kv_lengths, fp8):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# --- the attention the rewrite calls ----------------------------------------------------------------------


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: Optional[float],
    q_layout: tuple[int, ...],
    kv_layout: Optional[tuple[int, ...]],
    mesh: tuple,
) -> torch.Tensor:
    """SDPA over sharded tokens: Ulysses, Ring or USP by ``mesh`` (``Mesh.args``). Shapes ``[B, H, S, D]``."""
    world, rank, u, r, ulysses_group, ring_group, fp8 = mesh
    ui, ri = rank % u, rank // u
    members = [ri * u + j for j in range(u)]  # my Ulysses group
    q_seq = [local_tokens(q_layout, world, m) for m in members]
    heads = q.shape[1]
    h_start, h_len = _offset(heads, u, ui), local_length(heads, u, ui)
    if u > 1:
        q = seq_to_heads(q, q_seq, ui, ulysses_group, fp8)
        if kv_layout is not None:
            kv_seq = [local_tokens(kv_layout, world, m) for m in members]
            k = seq_to_heads(k, kv_seq, ui, ulysses_group, False)  # K stays unquantized (cache-dit)
            v = seq_to_heads(v, kv_seq, ui, ulysses_group, fp8)
        else:
            k, v = k.narrow(1, h_start, h_len), v.narrow(1, h_start, h_len)
    if mask is not None:
        if mask.shape[1] > 1 and u > 1:
            mask = mask.narrow(1, h_start, h_len)
        if mask.shape[-2] > 1:  # query rows: my group's tokens, rank-major
            mask = _take(mask, mask.dim() - 2, [s for m in members for s in rank_spans(q_layout, world, m)])
        if mask.shape[-1] > 1 and kv_layout is not None:  # key columns: every rank's tokens, rank-major
            mask = _take(mask, mask.dim() - 1, [s for m in range(world) for s in rank_spans(kv_layout, world, m)])
    if kv_layout is not None and r > 1:
        lengths = [sum(local_tokens(kv_layout, world, g * u + j) for j in range(u)) for g in range(r)]
        out = _ring(q, k, v, mask, scale, ring_group, lengths, fp8)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if u > 1:
        out = heads_to_seq(out, q_seq, heads, ui, ulysses_group, fp8)
    return out


def all_reduce_sum(x: torch.Tensor, group: str) -> torch.Tensor:
    y = torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group)
    return torch.ops._c10d_functional.wait_tensor(y)


# --- the mesh ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mesh:
    """This rank's place in the ``ulysses × ring`` mesh, and the functions the rewrite inserts."""

    world: int
    rank: int
    ulysses: int
    ring: int
    fp8: bool
    world_group: str
    ulysses_group: str
    ring_group: str

    shard_tokens = staticmethod(shard_tokens)
    gather_tokens = staticmethod(gather_tokens)
    attention = staticmethod(context_parallel_attention)

    @property
    def args(self) -> tuple:
        """The mesh as plain literals, the last argument of ``context_parallel_attention``."""
        return (self.world, self.rank, self.ulysses, self.ring, self.ulysses_group, self.ring_group, self.fp8)

    @property
    def mode(self) -> str:
        if self.ring == 1:
            return f"Ulysses-{self.ulysses}"
        return f"Ring-{self.ring}" if self.ulysses == 1 else f"USP {self.ulysses}x{self.ring}"

    def describe(self) -> str:
        return f"{self.mode} on rank {self.rank} of {self.world}" + (" with FP8 communication" if self.fp8 else "")

    def reduce_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over every rank (the step-cache diff sums), so that all ranks decide alike."""
        return all_reduce_sum(x, self.world_group)

    def agree(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is true on every rank (one tiny all-reduce, at compile time)."""
        flag = torch.tensor([1.0 if ok else 0.0], device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def check_sizes(self, min_tokens: int, where: str) -> None:
        """Refuse a mesh that would leave some rank without any query token."""
        if min_tokens < self.world:
            raise ValueError(
                f"context parallelism over {self.world} ranks (ulysses={self.ulysses} x ring={self.ring}) needs "
                f"at least {self.world} tokens per attention, but {where} has {min_tokens}; lower CACHEDIT_ULYSSES / "
                f"CACHEDIT_RING or use a larger input"
            )


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Per (u, r, fp8): the default group the mesh was built on, and the mesh. Subgroups are created once, on
# every rank alike; a re-initialised default group (destroy + init) gets new subgroups, since the old
# ones' names no longer resolve (and group names restart from "0", so a name cannot tell the two apart).
_meshes: dict[tuple, tuple[object, Mesh]] = {}


def context_parallel_mesh(config: CacheditConfig) -> Mesh | None:
    """The mesh for ``config.ulysses × config.ring`` ranks, or None when both are 1.

    Uses the default process group when one exists, else initialises it from torchrun's environment
    (NCCL with CUDA, gloo otherwise). Raises ``ValueError`` before any collective when ``u·r`` is not
    the world size.
    """
    u, r = config.ulysses, config.ring
    if u * r == 1:
        return None
    if not dist.is_available():
        raise ValueError(f"ulysses={u}, ring={r} need torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend)
        except ValueError as err:
            raise ValueError(
                f"ulysses={u}, ring={r} need {u * r} processes, but no process group is initialised and the "
                f"torchrun environment is missing ({err}); launch with `torchrun --nproc-per-node {u * r} app.py` "
                "or call torch.distributed.init_process_group first"
            ) from None
    world, rank = dist.get_world_size(), dist.get_rank()
    if u * r != world:
        raise ValueError(
            f"CACHEDIT_ULYSSES={u} x CACHEDIT_RING={r} = {u * r}, but the world size is {world}; set them so that "
            f"ulysses * ring == {world} (e.g. CACHEDIT_ULYSSES={world} CACHEDIT_RING=1)"
        )
    key = (u, r, config.fp8_comm)
    world_group = dist.group.WORLD
    if key in _meshes and _meshes[key][0] is world_group:
        return _meshes[key][1]
    world_name = world_group.group_name
    ulysses_name = ring_name = world_name
    if u > 1 and r > 1:  # every rank creates every subgroup, in the same order
        for g in range(r):
            pg = dist.new_group([g * u + j for j in range(u)])
            if rank // u == g:
                ulysses_name = pg.group_name
        for j in range(u):
            pg = dist.new_group([g * u + j for g in range(r)])
            if rank % u == j:
                ring_name = pg.group_name
    mesh = Mesh(world, rank, u, r, config.fp8_comm, world_name, ulysses_name, ring_name)
    _meshes[key] = (world_group, mesh)
    return mesh
