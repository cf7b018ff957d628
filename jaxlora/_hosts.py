"""What the file functions need when a program runs as several JAX processes (a
multi-host TPU slice, or `jax.distributed` on CPUs/GPUs): arrays that span devices of
other processes read in full on every process, one process writing the files that
are not sharded, and every process agreeing on a directory and waiting for the others.

With one process every function here is the plain single-process operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def several() -> bool:
    """True when this program runs as more than one JAX process."""
    return jax.process_count() > 1


def primary() -> bool:
    """True on the process that writes the files every process agrees on."""
    return jax.process_index() == 0


def agreed(text: str) -> str:
    """The primary process's ``text`` on every process (``text`` is ignored on the
    others)."""
    if not several():
        return text
    data = text.encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buf = np.zeros(size, np.uint8)
    if primary():
        buf[:] = np.frombuffer(data, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode()


def on_primary(fn: Callable[[], Any]) -> tuple[Any, str]:
    """Runs ``fn`` (file work) on the primary process and tells every process how it
    went: ``(its result, None on the others; "" or the error text)``. An error is
    raised as is on the primary process (and with one process); the others get its
    text, to raise their own, rather than waiting for a process that stopped."""
    if not several():
        return fn(), ""
    result, failed, error = None, "", None
    if primary():
        try:
            result = fn()
        except Exception as e:  # any error: the others must not wait for it
            error, failed = e, f"{type(e).__name__}: {e}"
    failed = agreed(failed)
    if error is not None:
        raise error
    return result, failed


def everywhere(ok: bool) -> bool:
    """True on every process if ``ok`` is True on all of them, else False on every
    process (so that all raise, rather than some waiting for the others)."""
    if not several():
        return ok
    flags = multihost_utils.process_allgather(np.int32(ok))
    return bool(np.asarray(flags).min())


def on_host(x: Any) -> np.ndarray:
    """The whole of ``x`` as a numpy array on this process. An array whose shards
    live on other processes' devices is gathered from all of them, so every process
    must call this for the same arrays in the same order."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def checksums(x: Any, period: int) -> np.ndarray:
    """Float64 ``[sum, sum of squares, sum weighted by 1 + (i mod period)/period]``
    over the flat (row-major) elements ``i`` of ``x``. An array spread over several
    processes is summed shard by shard where it lives (each element once) and the
    partial sums are added up, so no process reads the whole array."""
    if getattr(x, "is_fully_addressable", True):
        flat = np.asarray(jax.device_get(x), np.float64).ravel()
        return _sums(flat, np.arange(flat.size), period)
    part = np.zeros(3)
    for shard in x.addressable_shards:
        if shard.replica_id != 0:  # a replicated block is counted by one device
            continue
        block = np.asarray(shard.data, np.float64)
        index = np.zeros(block.shape, np.int64)  # each element's flat position
        stride = 1
        for axis in reversed(range(x.ndim)):
            rows = np.arange(x.shape[axis])[shard.index[axis]] * stride
            index += rows.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
            stride *= x.shape[axis]
        part += _sums(block.ravel(), index.ravel(), period)
    # JAX carries 32-bit values (without jax_enable_x64): the float64 sums travel
    # as their raw bits
    bits = np.asarray(multihost_utils.process_allgather(part.view(np.uint32)))
    return np.ascontiguousarray(bits).view(np.float64).sum(axis=0)


def _sums(flat: np.ndarray, index: np.ndarray, period: int) -> np.ndarray:
    weights = 1.0 + (index % period) / period
    return np.array([flat.sum(), np.dot(flat, flat), np.dot(flat, weights)])
