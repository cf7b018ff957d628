"""Randomized truncated SVD (Halko, Martinsson, Tropp 2011), which JAX does not ship.

The weight-aware schemes need only the top few singular triplets of a large kernel; an
exact ``jnp.linalg.svd`` of a 4096 × 4096 matrix costs O(n³) while the randomized
range finder costs O(n² q) for ``q`` sketch columns.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._targets import check_key

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def _orthonormal(y: jax.Array) -> jax.Array:
    """An orthonormal basis of the columns of ``y`` (reduced QR)."""
    return jnp.linalg.qr(y, mode="reduced")[0]


def svd_lowrank(
    key: jax.Array,
    x: jax.typing.ArrayLike,
    rank: int,
    *,
    niter: int = 4,
    oversample: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top-``rank`` singular triplets of a matrix by a randomized range finder.

    Halko et al. (2011), Algorithms 4.4 and 5.1, with ``q = rank + oversample``
    sketch columns:

    1. ``Q = orth(x @ Ω)`` with ``Ω ~ N(0, 1)`` of shape ``(n, q)`` drawn from ``key``;
    2. ``niter`` subspace (power) iterations ``Q = orth(x @ orth(xᵀ @ Q))``, each
       product re-orthonormalised by a QR so that small singular directions are not
       lost to rounding;
    3. the exact SVD of the small ``(q, n)`` matrix ``Qᵀ x = Û S Vᵀ``, then
       ``U = Q Û``; the first ``rank`` triplets are returned.

    Each power iteration sharpens the spectrum by ``(σ_j / σ_i)²``, so ``niter = 4``
    is accurate for the slowly decaying spectra of trained weights. This is the
    algorithm behind ``torch.svd_lowrank`` (and PEFT's ``pissa_niter_K``), but the
    sketch is drawn from an explicit key: the same key gives bitwise the same result
    on the same device and backend.

    The work is done in float32 (float64 when ``x`` is float64) at the highest matmul
    precision. ``rank``, ``niter`` and ``oversample`` are static Python ints; the
    function can be jitted and vmapped over stacked matrices (vmap over ``key`` too).

    Args:
        key: a `jax.random` key for the Gaussian sketch.
        x: a floating matrix of shape ``(m, n)``.
        rank: how many singular triplets to return, ``1 <= rank <= min(m, n)``.
        niter: the number of power iterations (``>= 0``).
        oversample: extra sketch columns beyond ``rank`` (``q = rank + oversample``
            must not exceed ``min(m, n)``); more columns give a more accurate basis.

    Returns:
        ``(u, s, vt)`` with ``u`` of shape ``(m, rank)`` (orthonormal columns), ``s``
        of shape ``(rank,)`` sorted in descending order, and ``vt`` of shape
        ``(rank, n)`` (orthonormal rows), so that ``u * s @ vt`` approximates the best
        rank-``rank`` approximation of ``x``.

    Raises:
        ValueError: if ``x`` is not a floating 2-D array, or ``rank``, ``niter`` or
            ``oversample`` are out of range.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora import svd_lowrank
        >>> x = jax.random.normal(jax.random.key(0), (64, 8)) @ jax.random.normal(
        ...     jax.random.key(1), (8, 32))                  # a rank-8 matrix
        >>> u, s, vt = svd_lowrank(jax.random.key(2), x, 8, niter=2)
        >>> u.shape, s.shape, vt.shape
        ((64, 8), (8,), (8, 32))
        >>> bool(jnp.allclose((u * s[None, :]) @ vt, x, atol=1e-3))
        True
    """
    check_key(key, "svd_lowrank's key")
    x = jnp.asarray(x)
    _check_svd_args(x, rank, niter, oversample)
    return _svd_lowrank(key, x, int(rank), int(niter), int(oversample))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _svd_lowrank(key, x, rank, niter, oversample):
    dtype = compute_dtype(x.dtype)
    x = x.astype(dtype)
    q = rank + oversample
    matmul = lambda p, r: jnp.matmul(p, r, precision=_HIGHEST)  # noqa: E731

    omega = jax.random.normal(key, (x.shape[1], q), dtype)
    basis = _orthonormal(matmul(x, omega))

    def power_step(_, basis):
        return _orthonormal(matmul(x, _orthonormal(matmul(x.T, basis))))

    basis = jax.lax.fori_loop(0, niter, power_step, basis)
    u_small, s, vt = jnp.linalg.svd(matmul(basis.T, x), full_matrices=False)
    u = matmul(basis, u_small[:, :rank])
    return u, s[:rank], vt[:rank]


def _is_int(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_))


def _check_svd_args(x: jax.Array, rank: int, niter: int, oversample: int) -> None:
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            "svd_lowrank expects a floating matrix of shape (m, n), got "
            f"dtype {x.dtype} and shape {x.shape}. Reshape stacked weights to 2-D "
            "(or jax.vmap over the stack) and cast integer arrays to float."
        )
    if not _is_int(rank) or rank < 1:
        raise ValueError(f"svd_lowrank: rank must be a positive int, got {rank!r}.")
    if not _is_int(niter) or niter < 0:
        raise ValueError(
            f"svd_lowrank: niter must be a non-negative int, got {niter!r}."
        )
    if not _is_int(oversample) or oversample < 0:
        raise ValueError(
            f"svd_lowrank: oversample must be a non-negative int, got {oversample!r}."
        )
    if rank + oversample > min(x.shape):
        raise ValueError(
            f"svd_lowrank: rank + oversample = {rank} + {oversample} exceeds "
            f"min(m, n) = {min(x.shape)} for a matrix of shape {x.shape}. Lower the "
            "rank or the oversampling."
        )
