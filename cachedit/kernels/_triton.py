"""Launch plumbing shared by the kernel files: Triton imported on first launch, strides collapsed.

Note [Lazy Triton]
~~~~~~~~~~~~~~~~~~
cachedit must import, and run every op on the CPU, without triton; so no kernel file imports triton at
module level. A kernel body is a module-level function decorated with ``@lazy_jit``, which is
``triton.jit`` applied on the kernel's first launch. At that moment ``lazy_jit`` imports triton and
binds ``tl`` (``triton.language``) in the kernel module's globals: the compiler resolves names there,
and the interpreter patches only a ``triton.language`` it finds there. Kernel files declare
``tl = None`` as the placeholder, and use ``from __future__ import annotations`` so that the
``tl.constexpr`` annotations stay strings until triton reads them (it accepts strings).

``TRITON_INTERPRET=1`` has to be in the environment before triton is first imported, because
``triton.language``'s own jitted helpers (``tl.sum``, ``tl.max``) are built at that import. Tests that run
kernels on CPU tensors therefore run in a child process (``tests/kernels/test_interpreted.py``).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported; checked without importing it."""
    return importlib.util.find_spec("triton") is not None


class LazyKernel:
    """A Triton kernel jitted on its first launch: ``kernel[grid](*args)`` as with ``triton.jit``."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._jitted: Any = None
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if self._jitted is None:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language  # Note [Lazy Triton]
            self._jitted = triton.jit(self.fn)
        return self._jitted[grid]


def lazy_jit(fn: Callable[..., None]) -> LazyKernel:
    """``triton.jit``, applied when the kernel is first launched (Note [Lazy Triton])."""
    return LazyKernel(fn)


def collapse_dims(
    shape: Sequence[int], strides: Sequence[Sequence[int]], ndim: int
) -> tuple[list[int], list[list[int]]] | None:
    """The same elements of tensors sharing ``shape``, addressed with exactly ``ndim`` dims.

    Size-1 dims are dropped, the rest are ordered by the first tensor's strides (outermost first), and
    neighbours that are contiguous in every tensor are merged; the result is padded in front with
    size-1 dims. Reordering is safe because callers address every tensor with the same multi-index, so
    a dense tensor of any layout comes out as one dim of stride 1. Returns None when more than ``ndim``
    dims remain; the caller then copies to contiguous.
    """
    dims = [d for d, size in enumerate(shape) if size != 1]
    dims.sort(key=lambda d: -abs(strides[0][d]))  # stable: ties keep their order
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    for d in dims:
        if sizes and all(m[-1] == s[d] * shape[d] for m, s in zip(merged, strides)):
            sizes[-1] *= shape[d]
            for m, s in zip(merged, strides):
                m[-1] = s[d]
            continue
        sizes.append(shape[d])
        for m, s in zip(merged, strides):
            m.append(s[d])
    if len(sizes) > ndim:
        return None
    pad = ndim - len(sizes)
    return [1] * pad + sizes, [[0] * pad + m for m in merged]
