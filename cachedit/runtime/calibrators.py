"""Forecasting calibrators: what a cached step adds in place of the stale middle residual.

Note [Calibrators]
~~~~~~~~~~~~~~~~~~
Background. On a cached step DBCache adds the middle residual ``R`` of the last computed step to the
fresh output of the first blocks (``reference/cache-semantics.md``, "One transformer call"). ``R`` drifts
from step to step, so cache-dit 1.5.3 can forecast it instead: TaylorSeer (polynomial), FoCa (a linear
multistep predictor-corrector) and DMD (exponential modes). The decision never reads the forecast. One
calibrator object holds ONE carried stream (image or text) of ONE branch of ONE request:
``update(step, R)`` on every computed step, ``forecast(step)`` on a cached step. ``s`` is the step,
``s_u`` the last updated (computed) step, ``h = s - s_u``.

  none        forecast = R(s_u).
  taylorseer  On update: ``d_0 = R(s)``, ``d_{i+1} = (d_i(s) - d_i(s_prev)) / (s - s_prev)`` for
              ``i < order`` while the older term exists.  Forecast: ``sum_i d_i * h^i / i!``.
  foca        Anchors ``F = R(s_u)``, ``dF = F - F_prev`` (the two last computed steps) and a rolling
              pair ``(F_k, F_km1)``: an update sets ``F_km1 = F_k`` (which may be a forecast) and
              ``F_k = R``; a forecast pushes itself: ``F_km1, F_k = F_k, forecast``. With
              ``D = dF + (F_k - F_km1)``: ``h <= 3``: ``F + h/2 * D``; ``h > 3``: the Heun step at
              horizon 3 damped toward F by ``w = 3/h``, i.e. ``F + (9 / 2h) * D``. With one computed step
              it returns F and pushes nothing. Because of the push, a forecast changes the state: call it
              once per cached step (a repeated call at the same step returns the same tensor, no push).
  dmd         Snapshots ``Y_0..Y_{n-1}`` = the longest uniformly spaced (spacing g) suffix of the last
              ``history`` computed residuals. Below 4 it is TaylorSeer of ``order`` (default 1). Else,
              per batch item (dim 0), with ``X = [Y_0..Y_{n-2}]``, ``X' = [Y_1..Y_{n-1}]``:
              ``X = U S V^H`` (economy), rank r = #{S > 1e-4 S_0} (or ``rank``),
              ``A = U_r^H X' V_r diag(1/(S_r + ridge))``, ``A W = W diag(lambda)``,
              ``Phi = X' V_r diag(1/(S_r + ridge)) W``, ``b = lstsq(Phi, Y_{n-1})``, and
              ``forecast = Re(Phi (lambda^(h/g) * b))``. A failed or non-finite fit, or a non-finite
              forecast (after the cast to the value's dtype), returns ``Y_{n-1}``.

How DMD is evaluated here. ``Phi = X' M`` with ``M = V_r diag(1/(S_r+ridge)) W`` (n-1 x r), and X' is
real, so ``forecast = X' c`` with ``c = Re(M (lambda^(h/g) * b))``: a real combination of the n-1
newest snapshots. The fit itself needs the trajectory ``T = [Y_0..Y_{n-1}]`` only through its Gram
matrix ``G = T^T T``: for any ``R`` with ``R^T R = G`` there is a Q with orthonormal columns and
``T = Q R``, so ``X = Q R[:, :-1]``, ``X' = Q R[:, 1:]``, ``Y_{n-1} = Q R[:, -1]`` and
``lstsq(Q A, Q y) = lstsq(A, y)``. So once per window (the first forecast after an update) we
accumulate G in float64 over blocks of rows (one read of the snapshots), take ``R = sqrt(Lambda) V^T``
from ``eigh(G)`` and do the SVD, eig and lstsq on n x n matrices on the host; a forecast computes c
(n-1 numbers) and then n-1 fused multiply-adds over the snapshots. cache-dit materialises Phi (d x r
complex128: ~1 GB for one [1, 4096, 3072] stream at r = 5) and multiplies it on each cached step. The
Gram route squares the conditioning: singular values near the 1e-4 cut carry ~eps64 * 1e8 relative
error instead of ~eps64 * 1e4 (2e-8: below fp32 rounding; modes above the cut fare better). lstsq
uses cache-dit's CPU semantics (gelsy, rcond = eps64 * max(d, r)).

Differences from cache-dit 1.5.3:
  - TaylorSeer lag. cache-dit creates a stream's state at its first update, after that step's
    ``mark_step_begin``, so in the first request of a calibrator its step counter runs one behind, and
    it builds derivatives only when that counter exceeds 1: the ladder restarts at ``d_0`` on every
    update at step <= 2 (first request) or <= 1 (later requests, after ``reset_cache``); derivatives
    start at step 3 (resp. 2). We build them from the first two computed steps (step 1 with warmup).
    With the restart applied, forecasts agree (tests/runtime/test_calibrators.py). DMD's Taylor
    fallback inherits the same difference; FoCa and DMD proper use step differences only, no lag.
  - Precision. States and forecasts are fp32 (or the value's dtype if wider) and forecasts return the
    value's dtype; cache-dit computes in the value's dtype (bf16 on GPUs). DMD fits in float64 like
    cache-dit; its forecast combination runs in fp32.
  - FoCa is evaluated as ``F + a dF + a (F_k - F_km1)``, ``a = h/2`` or ``9/(2h)`` (cache-dit: the damped
    step as the blend above): equal algebraically, rounding differs in the last bits.
  - DMD: ``svd_precision`` (randomised / gesvd) is not offered; the fit is the Gram route above.
  - DMD's Taylor fallback: cache-dit 1.5.3's ladder differences the new value against the ladder of two
    updates back but divides by the last gap only (its ``_update_taylor`` reads ``dY_prev`` before
    shifting it), so on an affine stream its fallback overshoots. Ours is TaylorSeer as above.
  - A stream's shape and dtype are fixed by its first update; a change is an error (cache-dit resets).

Returned tensors may alias the calibrator's state: treat them as read-only.

Cost per cached step, per stream (``python benchmarks/calibrators.py --threads 1``: one [1, 4096, 3072]
fp32 stream, 48 MiB; shared 2-core x86 CPU at load ~4, torch 2.13, 1 thread; fastest of 15 calls,
+-30% run to run). A full-size op is one elementwise pass; on this CPU ~10-30 ms, most of it allocating
and faulting in a fresh 48 MiB output; on a GPU each is one bandwidth-bound kernel.

  calibrator        ms / forecast  full-size ops per forecast         first after an update  held MiB
  none                  0          0 (returns the stored residual)         -                    48
  taylorseer order 1   27          1: add                                 28                    96
  taylorseer order 2   35          2: add add_                            32                   144
  taylorseer order 3   34          3: add add_ add_                       59                   192
  foca                 36          3: add add_ sub                        75                   192
  dmd history 6       122          7: mul add_ x4 sum where              283 (fits the window) 336

With 2 threads under the same load the DMD fit took 1.3 s (OpenMP workers waiting on each other).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math
import operator
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import Tensor

TAYLORSEER_ORDERS = (1, 2, 3)
FOCA_MAX_HORIZON = 3  # steps; beyond it FoCa damps its Heun step toward the anchor
DMD_MIN_SNAPSHOTS = 4  # a complex pole costs two real degrees of freedom: three snapshot pairs
DMD_RANK_CUTOFF = 1e-4  # singular values below this fraction of the largest are dropped as noise
DMD_DEFAULT_HISTORY = 6
DMD_DEFAULT_RIDGE = 1e-8
_GRAM_ROWS = 1 << 18  # rows per float64 block of the Gram accumulation (~12 MB at 6 snapshots)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _held_bytes(tensors: Iterable[Tensor | None]) -> int:
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


class Calibrator(abc.ABC):
    """The state of one carried stream of one branch of one request (Note [Calibrators])."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.last_update_step: int | None = None
        self._last_forecast_step: int | None = None
        self._shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None

    def update(self, step: int, value: Tensor) -> None:
        """Record the true middle residual of the computed step ``step``."""
        step = self._check_step(step)
        latest = max(s for s in (self.last_update_step, self._last_forecast_step, -1) if s is not None)
        if step <= latest:
            raise ValueError(
                f"{self.name} calibrator: update(step={step}) after step {latest}; steps must increase "
                "(one calibrator per stream, branch and request: start a new one for a new request)"
            )
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{self.name} calibrator: update() needs a floating-point tensor, got {value!r:.80}")
        if self._shape is None:
            self._shape, self._dtype = value.shape, value.dtype
        elif (value.shape, value.dtype) != (self._shape, self._dtype):
            raise ValueError(
                f"{self.name} calibrator: update(step={step}) got {tuple(value.shape)} {value.dtype}, but this "
                f"stream holds {tuple(self._shape)} {self._dtype}; a new shape is a new stream: make a new calibrator"
            )
        self._update(step, value.detach())
        self.last_update_step = step

    def forecast(self, step: int) -> Tensor:
        """The forecast of the middle residual at the cached step ``step``, in the value's dtype."""
        step = self._check_step(step)
        if self.last_update_step is None:
            raise RuntimeError(
                f"{self.name} calibrator: forecast(step={step}) before any update(); the first step of a "
                "stream is computed: call update() on computed steps"
            )
        if step <= self.last_update_step or (self._last_forecast_step is not None and step < self._last_forecast_step):
            raise ValueError(
                f"{self.name} calibrator: forecast(step={step}) must come after the last computed step "
                f"{self.last_update_step} and the last forecast step {self._last_forecast_step}"
            )
        out = self._forecast(step)
        self._last_forecast_step = step
        return out

    def nbytes(self) -> int:
        """Bytes of the tensors this calibrator holds (shared storages counted once)."""
        return _held_bytes(self._tensors())

    def _own(self, value: Tensor) -> Tensor:
        return value.to(_compute_dtype(value.dtype), copy=True)

    def _check_step(self, step: int) -> int:
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"{self.name} calibrator: step must be an int, got {step!r}") from None
        if step < 0:
            raise ValueError(f"{self.name} calibrator: step must be >= 0, got {step}")
        return step

    @abc.abstractmethod
    def _update(self, step: int, value: Tensor) -> None: ...

    @abc.abstractmethod
    def _forecast(self, step: int) -> Tensor: ...

    @abc.abstractmethod
    def _tensors(self) -> Iterable[Tensor | None]: ...


class ReuseCalibrator(Calibrator):
    """``none``: the residual of the last computed step, as plain DBCache."""

    name = "none"

    def __init__(self) -> None:
        super().__init__()
        self._last: Tensor | None = None

    def _update(self, step: int, value: Tensor) -> None:
        self._last = value.clone()

    def _forecast(self, step: int) -> Tensor:
        return self._last

    def _tensors(self) -> Iterable[Tensor | None]:
        return (self._last,)


class TaylorSeerCalibrator(Calibrator):
    """``taylorseer``: Taylor expansion from divided differences of the computed steps (no lag)."""

    name = "taylorseer"

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        if isinstance(order, bool) or order not in TAYLORSEER_ORDERS:
            raise ValueError(f"taylorseer order must be one of {TAYLORSEER_ORDERS}, got {order!r}")
        self.order = order
        self._terms: list[Tensor] = []  # d_0 .. d_m, m <= order, fp32

    def _update(self, step: int, value: Tensor) -> None:
        terms = [self._own(value)]
        if self._terms:
            gap = step - self.last_update_step
            for old in self._terms[: self.order]:
                terms.append((terms[-1] - old) / gap)
        self._terms = terms

    def _forecast(self, step: int) -> Tensor:
        terms, h = self._terms, step - self.last_update_step
        if len(terms) == 1:
            return terms[0].to(self._dtype)
        out = torch.add(terms[0], terms[1], alpha=float(h))
        for i in range(2, len(terms)):
            out.add_(terms[i], alpha=h**i / math.factorial(i))
        return out.to(self._dtype)

    def _tensors(self) -> Iterable[Tensor | None]:
        return self._terms


class FoCaCalibrator(Calibrator):
    """``foca``: BDF2-predict / Heun-correct from two anchors and a rolling pair fed by forecasts."""

    name = "foca"

    def __init__(self) -> None:
        super().__init__()
        self._anchor: Tensor | None = None  # F: the last computed value
        self._anchor_slope: Tensor | None = None  # F - F_prev
        self._head: Tensor | None = None  # F_k: the newest value, computed or forecast
        self._head_slope: Tensor | None = None  # F_k - F_km1
        self._pushed_step: int | None = None

    def _update(self, step: int, value: Tensor) -> None:
        y = self._own(value)
        if self._anchor is not None:
            self._anchor_slope = y - self._anchor
            self._head_slope = y - self._head
        self._anchor = self._head = y
        self._pushed_step = None

    def _forecast(self, step: int) -> Tensor:
        if self._anchor_slope is None:  # one computed step: reuse it, push nothing (as cache-dit)
            return self._anchor.to(self._dtype)
        if step == self._pushed_step:  # already pushed for this step
            return self._head.to(self._dtype)
        h = step - self.last_update_step
        weight = h / 2 if h <= FOCA_MAX_HORIZON else FOCA_MAX_HORIZON**2 / (2 * h)
        pred = torch.add(self._anchor, self._anchor_slope, alpha=weight).add_(self._head_slope, alpha=weight)
        torch.sub(pred, self._head, out=self._head_slope)  # its buffer is never handed out: reuse it
        self._head, self._pushed_step = pred, step
        return pred.to(self._dtype)

    def _tensors(self) -> Iterable[Tensor | None]:
        return (self._anchor, self._anchor_slope, self._head, self._head_slope)


@dataclasses.dataclass(frozen=True)
class DMDFit:
    """One window's fit, per batch item: ``forecast = X' c``, ``c = Re(modes @ (evals^k * amplitudes))``."""

    modes: list[Tensor]  # [n-1, r] complex128 each (host)
    evals: list[Tensor]  # [r]
    amplitudes: list[Tensor]  # [r]

    def coefficients(self, k: float) -> Tensor | None:
        """[items, n-1] float64 weights of the n-1 newest snapshots at horizon ``k`` (in spacings)."""
        c = torch.stack([(m @ (e.pow(k) * a)).real for m, e, a in zip(self.modes, self.evals, self.amplitudes)])
        return c if bool(torch.isfinite(c).all()) else None


class DMDCalibrator(Calibrator):
    """``dmd``: Dynamic Mode Decomposition (Prony) over the last ``history`` computed steps."""

    name = "dmd"

    def __init__(
        self, history: int = DMD_DEFAULT_HISTORY, order: int = 1, rank: int = 0, ridge: float = DMD_DEFAULT_RIDGE
    ) -> None:
        super().__init__()
        if isinstance(history, bool) or not isinstance(history, int) or history < DMD_MIN_SNAPSHOTS:
            raise ValueError(
                f"dmd history must be an int >= {DMD_MIN_SNAPSHOTS} (the fit needs {DMD_MIN_SNAPSHOTS} uniformly "
                f"spaced snapshots), got {history!r}; for fewer, use taylorseer"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"dmd rank must be an int >= 0 (0 picks it from the spectrum), got {rank!r}")
        if not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"dmd ridge must be a finite float >= 0, got {ridge!r}")
        self.history, self.rank, self.ridge = history, rank, float(ridge)
        self._taylor = TaylorSeerCalibrator(order)  # the fallback below DMD_MIN_SNAPSHOTS
        self._snapshots: list[tuple[int, Tensor]] = []  # (step, value in its own dtype), oldest first
        self._fit: DMDFit | None = None
        self._fitted = False

    def _update(self, step: int, value: Tensor) -> None:
        self._taylor.update(step, value)
        d0 = self._taylor._terms[0]
        snapshot = d0 if d0.dtype == value.dtype else value.clone()
        self._snapshots = [*self._snapshots, (step, snapshot)][-self.history :]
        self._fit, self._fitted = None, False

    def uniform_tail(self) -> tuple[list[Tensor], int]:
        """The longest uniformly spaced suffix of the snapshots (oldest first) and its spacing."""
        steps = [s for s, _ in self._snapshots]
        if len(steps) < 2:
            return [v for _, v in self._snapshots], 0
        spacing, start = steps[-1] - steps[-2], len(steps) - 2
        while start > 0 and steps[start] - steps[start - 1] == spacing:
            start -= 1
        return [v for _, v in self._snapshots[start:]], spacing

    def _forecast(self, step: int) -> Tensor:
        tail, spacing = self.uniform_tail()
        if len(tail) < DMD_MIN_SNAPSHOTS:
            return self._taylor.forecast(step)
        if not self._fitted:  # the window's one decomposition (Note [Calibrators])
            self._fit, self._fitted = fit_dmd(tail, self.rank, self.ridge), True
        newest = tail[-1]
        c = self._fit.coefficients((step - self.last_update_step) / spacing) if self._fit is not None else None
        if c is None:
            return newest
        out = _combine(tail[1:], c).to(self._dtype)
        # all elements finite <=> their float64 sum is finite (it cannot overflow below fp64 values);
        # one read pass instead of isfinite's four, and no host read
        finite = torch.isfinite(out.sum(dtype=torch.float64))
        return torch.where(finite, out, newest, out=out)

    def _tensors(self) -> Iterable[Tensor | None]:
        fit = [] if self._fit is None else [*self._fit.modes, *self._fit.evals, *self._fit.amplitudes]
        return [*(v for _, v in self._snapshots), *self._taylor._terms, *fit]


def fit_dmd(tail: Sequence[Tensor], rank: int = 0, ridge: float = DMD_DEFAULT_RIDGE) -> DMDFit | None:
    """Fit DMD on >= 2 same-shape snapshots (oldest first), per batch item; None when degenerate."""
    items = tail[-1].shape[0] if tail[-1].dim() > 1 else 1
    flat = [s.reshape(items, -1) for s in tail]
    rows = flat[0].shape[1]
    # [items, n, n] float64: trajectory^T trajectory, accumulated over blocks of rows in one reused buffer
    gram = torch.zeros(items, len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    buffer = torch.empty(items, len(flat), min(rows, _GRAM_ROWS), dtype=torch.float64, device=flat[0].device)
    for lo in range(0, rows, _GRAM_ROWS):
        block = buffer[..., : min(_GRAM_ROWS, rows - lo)]
        for j, f in enumerate(flat):
            block[:, j].copy_(f[:, lo : lo + _GRAM_ROWS])
        gram.baddbmm_(block, block.mT)
    try:
        evals, evecs = torch.linalg.eigh(gram.cpu())  # one host transfer per window
    except RuntimeError:  # non-finite snapshots: a degenerate fit, the caller reuses the newest value
        return None
    # r with r^T r = gram: trajectory = Q r for some Q with orthonormal columns
    r = evals.clamp(min=0).sqrt().unsqueeze(-1) * evecs.mT
    fits = [_fit_item(item, rows, rank, ridge) for item in r]
    if any(f is None for f in fits):
        return None
    return DMDFit(*(list(parts) for parts in zip(*fits)))


def _fit_item(r: Tensor, rows: int, rank: int, ridge: float) -> tuple[Tensor, Tensor, Tensor] | None:
    # r: [n, n] with trajectory = Q r; X = Q r[:, :-1], X' = Q r[:, 1:], newest = Q r[:, -1]
    cplx = torch.complex128
    rx, rp, newest = r[:, :-1], r[:, 1:], r[:, -1:]
    try:
        u, s, vh = torch.linalg.svd(rx, full_matrices=False)
        keep = rank if rank > 0 else int((s > s[0] * DMD_RANK_CUTOFF).sum().clamp(min=1))
        keep = max(1, min(keep, s.numel()))
        inv = 1.0 / (s[:keep] + ridge)
        vr = vh[:keep].mH
        evals, w = torch.linalg.eig((u[:, :keep].mH @ rp @ vr * inv).to(cplx))
        modes = (vr * inv).to(cplx) @ w  # Phi = X' @ modes
        rcond = torch.finfo(torch.float64).eps * max(rows, keep)  # cache-dit's lstsq on Phi [rows, r]
        amps = torch.linalg.lstsq(rp.to(cplx) @ modes, newest.to(cplx), rcond=rcond, driver="gelsy").solution
    except RuntimeError:  # a failed decomposition is a degenerate fit: the caller reuses the newest value
        return None
    return modes, evals, amps.squeeze(1)


def _combine(snapshots: Sequence[Tensor], c: Tensor) -> Tensor:
    """``sum_j c[:, j] * snapshots[j]`` per batch item, in the compute dtype: len(snapshots) fused passes."""
    last = snapshots[-1].to(_compute_dtype(snapshots[-1].dtype))
    if c.shape[0] == 1:
        weights = c[0].tolist()
        out = last * weights[-1]
        for y, weight in zip(snapshots[:-1], weights[:-1]):
            out.add_(y, alpha=weight)
        return out
    per_item = c.T.to(device=last.device, dtype=last.dtype).reshape(len(snapshots), -1, *[1] * (last.dim() - 1))
    out = last * per_item[-1]
    for y, weight in zip(snapshots[:-1], per_item[:-1]):
        out.addcmul_(y, weight)
    return out


CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.name: cls for cls in (ReuseCalibrator, TaylorSeerCalibrator, FoCaCalibrator, DMDCalibrator)
}


def make_calibrator(name: str, **params) -> Calibrator:
    """A fresh calibrator for one stream: none, taylorseer(order), foca, dmd(history, order, rank, ridge)."""
    cls = CALIBRATORS.get(name)
    if cls is None:
        raise ValueError(f"unknown calibrator {name!r}: expected one of {sorted(CALIBRATORS)}")
    signature = inspect.signature(cls)
    try:
        signature.bind(**params)
    except TypeError:
        raise TypeError(
            f"calibrator {name!r} takes {list(signature.parameters) or 'no parameters'}, got {sorted(params)}"
        ) from None
    return cls(**params)
