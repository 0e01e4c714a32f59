"""GPU test helpers for the no-sync checks: a block run under torch.cuda.set_sync_debug_mode("error"), and a
cold plan cache, so that the next call takes the plan-building path (which must not sync either)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

from fusedclip import backends, dispatch
from fusedclip.backends.plan import TableCache


@contextmanager
def sync_errors() -> Iterator[None]:
    """Any host-device synchronisation inside the block raises. Work queued before it is drained first, and the
    mode is switched off again however the block ends."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def cold_plans(backend: Optional[str] = None, device: str = "cuda") -> TableCache:
    """Empty the plan cache of `backend` (None: the one chosen automatically) and the API's index cache; returns
    the plan cache (its .builds tells whether a later call built a plan)."""
    cache = backends.select(backend, torch.device(device)).cache  # type: ignore[attr-defined]
    cache.clear()
    dispatch._indices.clear()
    return cache
