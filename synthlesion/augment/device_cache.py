"""Small read-only tensors the transforms make once per device, and their CUDA-graph safety.

Transforms run per batch; ``torch.tensor(values, device="cuda")`` copies from pageable
memory and waits for the device on every call, so their constants and tables (interpolation
weights, powers, smoothing kernels) are made once and cached. A captured CUDA graph reads
them from their device memory at every replay, while a cache may drop an entry later:
:func:`keep_cached_alive` collects every cached tensor used while a graph is captured, and
the graph holds them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

_CONSTANTS: dict[tuple, torch.Tensor] = {}
_KEEP_ALIVE: list[list[torch.Tensor]] = []


def _kept(value: torch.Tensor) -> torch.Tensor:
    """Return a cached tensor, kept alive by the CUDA graph being captured (if any).

    A captured graph reads cached constants from their device memory at every replay; a
    cache may later drop its entry, so :func:`keep_cached_alive` collects every cached
    tensor a capture touches and the graph holds them.
    """
    if _KEEP_ALIVE:
        _KEEP_ALIVE[-1].append(value)
    return value


def device_cache(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Memoise ``fn`` (hashable arguments -> a read-only tensor made once per device).

    Transforms run per batch; their tables (interpolation weights, powers, smoothing
    kernels) are made once. ``fn.__wrapped__`` is the uncached function (for tracing).
    """
    memo = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def call(*args: Any) -> torch.Tensor:
        return _kept(memo(*args))

    return call


@contextlib.contextmanager
def keep_cached_alive() -> Iterator[list[torch.Tensor]]:
    """Collect the cached tensors used inside the block (see :func:`cached`)."""
    kept: list[torch.Tensor] = []
    _KEEP_ALIVE.append(kept)
    try:
        yield kept
    finally:
        _KEEP_ALIVE.pop()


def constant(values: Sequence[Any], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small read-only constant on ``device`` (from nested lists of numbers), made once
    and cached.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for the
    device on every call; transforms run per batch, so their constants are cached instead.
    Never modify the returned tensor in place.
    """
    key = (str(values), dtype, str(device))
    value = _CONSTANTS.get(key)
    if value is None:
        if len(_CONSTANTS) > 4096:
            _CONSTANTS.clear()
        value = _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device)
    return _kept(value)
