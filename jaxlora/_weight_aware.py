"""Weight- and gradient-aware initializations: the base weight becomes a residual.

Every function here works on one 2-D kernel ``k`` in the Flax orientation ``(in,
out)`` (``k = Wᵀ`` for PEFT's ``W`` of shape ``(out, in)``) and returns ``(a, b,
k_res)`` with ``a`` of shape ``(in, r)``, ``b`` of shape ``(r, out)`` and

    k_res = k − scale · a @ b,

computed in float32 (float64 for a float64 kernel) from the factors *as stored*, i.e.
after casting them to ``dtype``, and only then cast to ``k.dtype``. So ``k_res + scale
· a @ b`` reproduces ``k`` to the rounding of ``k``'s dtype, also for a bf16 model.

Callers reshape multi-axis kernels to ``(fan_in, fan_out)`` and `jax.vmap` over stacked
layers; ``rank``, ``niter`` and ``dtype`` are static, everything else may be traced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlora._linalg import compute_dtype
from jaxlora._linalg import svd_lowrank

_HIGHEST = jax.lax.Precision.HIGHEST
Factors = tuple[jax.Array, jax.Array, jax.Array]


def _check_kernel(k, rank: int, path: str, scheme: str) -> None:
    """Raises a ValueError naming ``path`` unless ``k`` is a floating 2-D kernel."""
    if k.ndim != 2 or not jnp.issubdtype(k.dtype, jnp.floating):
        raise ValueError(
            f"Cannot initialize {scheme} for {path!r}: expected a floating 2-D kernel "
            f"(fan_in, fan_out), got dtype {k.dtype} and shape {k.shape}. Reshape "
            "multi-axis kernels to 2-D, vmap over stacked layers, and exclude "
            "non-floating weights from the targets."
        )
    limit = min(k.shape)
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"Cannot initialize {scheme} for {path!r}: rank must be an int in "
            f"[1, {limit}] for a kernel of shape {k.shape}, got {rank!r}. Lower the "
            "rank (or exclude this weight)."
        )


def _with_residual(k, a, b, scale, dtype) -> Factors:
    """Casts ``a``, ``b`` to ``dtype``; the residual comes from the cast values."""
    a, b = a.astype(dtype), b.astype(dtype)
    work = compute_dtype(k.dtype)
    update = jnp.matmul(a.astype(work), b.astype(work), precision=_HIGHEST)
    k_res = k.astype(work) - jnp.asarray(scale, work) * update
    return a, b, k_res.astype(k.dtype)


def _split_singular(u, s, vt, scale, dtype):
    """``a = U·√(S/s)``, ``b = √(S/s)·Vᵀ`` so that ``s·a@b = U S Vᵀ``."""
    root = jnp.sqrt(s / jnp.asarray(scale, s.dtype))
    return u * root[None, :], root[:, None] * vt


def pissa(
    key: jax.Array,
    k: jax.typing.ArrayLike,
    rank: int,
    scale: float,
    *,
    niter: int | None = None,
    dtype: jax.typing.DTypeLike = jnp.float32,
    path: str = "<weight>",
) -> Factors:
    """PiSSA (Meng et al. 2024, arXiv 2404.02948): the principal singular components.

    With the SVD ``k = U S Vᵀ`` (so ``W = kᵀ = V S Uᵀ``) and ``S_r = S[:r] / scale``:

        a = U[:, :r] · diag(√S_r)        (in, r)   = PEFT's Aᵀ
        b = diag(√S_r) · Vᵀ[:r]          (r, out)  = PEFT's Bᵀ

    so ``scale · a @ b = U_r S[:r] V_rᵀ`` is the best rank-``r`` approximation of
    ``k`` and ``k_res`` holds the remaining singular components.

    Args:
        key: the key of the randomized SVD (unused when ``niter`` is None).
        k: a floating kernel of shape ``(in, out)``.
        rank: the LoRA rank ``r``, at most ``min(in, out)``.
        scale: the LoRA scale ``s`` (``alpha / r``, or ``alpha / sqrt(r)``).
        niter: None for the exact ``jnp.linalg.svd``; an int for "fast PiSSA", the
            randomized `svd_lowrank` with ``q = r`` and ``niter`` power iterations
            (PEFT's ``pissa_niter_K``). ``k_res`` is exact either way.
        dtype: the dtype of the stored factors.
        path: the parameter path, for error messages.

    Returns:
        ``(a, b, k_res)`` with ``k_res = k − scale · a @ b`` (see the module doc).

    Raises:
        ValueError: for a non-floating or non-2-D ``k`` or a rank out of range.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> k = jax.random.normal(jax.random.key(0), (32, 24))
        >>> a, b, k_res = pissa(jax.random.key(1), k, 4, 2.0)
        >>> bool(jnp.allclose(k_res + 2.0 * a @ b, k, atol=1e-5))
        True
    """
    k = jnp.asarray(k)
    _check_kernel(k, rank, path, "PiSSA")
    return _pissa(key, k, rank, scale, niter, dtype)


@functools.partial(jax.jit, static_argnums=(2, 4, 5))
def _pissa(key, k, rank, scale, niter, dtype) -> Factors:
    work = k.astype(compute_dtype(k.dtype))
    if niter is None:
        u, s, vt = jnp.linalg.svd(work, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    else:
        u, s, vt = svd_lowrank(key, work, rank, niter=niter)
    a, b = _split_singular(u, s, vt, scale, work.dtype)
    return _with_residual(k, a, b, scale, dtype)


def milora(
    key: jax.Array,
    k: jax.typing.ArrayLike,
    rank: int,
    scale: float,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    path: str = "<weight>",
) -> Factors:
    """MiLoRA (Wang et al. 2024, arXiv 2406.09044): the minor singular components.

    As `pissa` with the *last* ``r`` of the ``min(in, out)`` singular triplets of the
    exact SVD ``k = U S Vᵀ``: ``a = U[:, -r:]·√(S[-r:]/s)`` and
    ``b = √(S[-r:]/s)·Vᵀ[-r:]``. ``k_res`` keeps the principal components. A
    randomized SVD cannot find the minor components, so this always uses the exact
    ``jnp.linalg.svd``.

    Args:
        key: unused (kept so every weight-aware scheme has the same signature).
        k: a floating kernel of shape ``(in, out)``.
        rank: the LoRA rank ``r``, at most ``min(in, out)``.
        scale: the LoRA scale ``s``.
        dtype: the dtype of the stored factors.
        path: the parameter path, for error messages.

    Returns:
        ``(a, b, k_res)`` with ``k_res = k − scale · a @ b``.

    Raises:
        ValueError: for a non-floating or non-2-D ``k`` or a rank out of range.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> k = jax.random.normal(jax.random.key(0), (32, 24))
        >>> a, b, k_res = milora(jax.random.key(1), k, 4, 0.5)
        >>> a.shape, b.shape, k_res.shape
        ((32, 4), (4, 24), (32, 24))
    """
    del key
    k = jnp.asarray(k)
    _check_kernel(k, rank, path, "MiLoRA")
    return _milora(k, rank, scale, dtype)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _milora(k, rank, scale, dtype) -> Factors:
    work = k.astype(compute_dtype(k.dtype))
    u, s, vt = jnp.linalg.svd(work, full_matrices=False)
    a, b = _split_singular(u[:, -rank:], s[-rank:], vt[-rank:], scale, work.dtype)
    return _with_residual(k, a, b, scale, dtype)


def olora(
    key: jax.Array,
    k: jax.typing.ArrayLike,
    rank: int,
    scale: float,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    path: str = "<weight>",
) -> Factors:
    """OLoRA (Büyükakyüz 2024, arXiv 2406.01775): a QR decomposition of the weight.

    In the PEFT orientation ``W = kᵀ`` of shape ``(out, in)``, ``Q, R = qr(W)``
    (reduced), ``B = Q[:, :r]`` (orthonormal columns) and ``A = R[:r, :]`` (upper
    trapezoidal), and ``W_res = W − s·B·A`` with no division by ``s``. In the Flax
    orientation ``a = Aᵀ`` (in, r) and ``b = Bᵀ`` (r, out). Since ``R`` is upper
    triangular, ``a @ b`` reproduces exactly the first ``r`` rows of ``k`` (the first
    ``r`` input columns of ``W``).

    Args:
        key: unused (kept so every weight-aware scheme has the same signature).
        k: a floating kernel of shape ``(in, out)``.
        rank: the LoRA rank ``r``, at most ``min(in, out)``.
        scale: the LoRA scale ``s``.
        dtype: the dtype of the stored factors.
        path: the parameter path, for error messages.

    Returns:
        ``(a, b, k_res)`` with ``k_res = k − scale · a @ b``.

    Raises:
        ValueError: for a non-floating or non-2-D ``k`` or a rank out of range.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> k = jax.random.normal(jax.random.key(0), (32, 24))
        >>> a, b, k_res = olora(jax.random.key(1), k, 4, 1.0)
        >>> bool(jnp.allclose(b @ b.T, jnp.eye(4), atol=1e-5))
        True
    """
    del key
    k = jnp.asarray(k)
    _check_kernel(k, rank, path, "OLoRA")
    return _olora(k, rank, scale, dtype)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _olora(k, rank, scale, dtype) -> Factors:
    work = k.astype(compute_dtype(k.dtype))
    q, r = jnp.linalg.qr(work.T, mode="reduced")
    return _with_residual(k, r[:rank].T, q[:, :rank].T, scale, dtype)


def lora_ga(
    key: jax.Array,
    k: jax.typing.ArrayLike,
    grad: jax.typing.ArrayLike,
    rank: int,
    scale: float,
    *,
    gamma: float = 16.0,
    niter: int = 4,
    dtype: jax.typing.DTypeLike = jnp.float32,
    path: str = "<weight>",
) -> Factors:
    """LoRA-GA (Wang et al. 2024, arXiv 2407.05000), as in the authors' repository.

    ``grad`` is the average gradient of the loss with respect to the full kernel over
    a few batches (Flax orientation ``(in, out)``); in the PEFT orientation ``G =
    gradᵀ`` of shape ``(out, in)``. With ``U, S, Vᵀ`` the randomized truncated SVD of
    ``G`` using ``q = min(4r, in, out)`` sketch columns and ``niter`` power
    iterations, direction "ArB2r" and the "stable" scale ``c = out^{1/4} / √γ``:

        A = c · Vᵀ[:r]          (r, in)    a = Aᵀ
        B = c · U[:, r:2r]      (out, r)   b = Bᵀ
        W_res = W − s·B·A

    Then one plain SGD step of size ``η`` on ``(a, b)`` changes ``s·a@b`` by
    ``−η s² c² G_2r + O(η²)`` where ``G_2r`` is the best rank-``2r`` approximation of
    the gradient, and the whole change (second order included) lies in the top-``2r``
    left and right singular subspaces of the gradient.

    Args:
        key: the key of the randomized SVD.
        k: a floating kernel of shape ``(in, out)``.
        grad: the averaged gradient of the loss with respect to ``k``, same shape.
        rank: the LoRA rank ``r``; ``2r`` must not exceed ``min(in, out)``.
        scale: the LoRA scale ``s``.
        gamma: the "stable" scale's ``γ`` (the repository's ``stable_gamma``).
        niter: the power iterations of the randomized SVD.
        dtype: the dtype of the stored factors.
        path: the parameter path, for error messages.

    Returns:
        ``(a, b, k_res)`` with ``k_res = k − scale · a @ b``.

    Raises:
        ValueError: for a non-floating or non-2-D ``k``, a ``grad`` of another shape,
            or ``2 * rank > min(in, out)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> k = jax.random.normal(jax.random.key(0), (32, 24))
        >>> g = jax.random.normal(jax.random.key(1), (32, 24))
        >>> a, b, k_res = lora_ga(jax.random.key(2), k, g, 4, 2.0)
        >>> bool(jnp.allclose(k_res + 2.0 * a @ b, k, atol=1e-5))
        True
    """
    k, grad = jnp.asarray(k), jnp.asarray(grad)
    if grad.shape != k.shape or not jnp.issubdtype(grad.dtype, jnp.floating):
        raise ValueError(
            f"Cannot initialize LoRA-GA for {path!r}: the gradient must be a floating "
            f"array of the kernel's shape {k.shape}, got dtype {grad.dtype} and shape "
            f"{grad.shape}. Pass the gradient of the loss with respect to this kernel."
        )
    _check_kernel(k, rank, path, "LoRA-GA")
    if 2 * rank > min(k.shape):
        raise ValueError(
            f"Cannot initialize LoRA-GA for {path!r}: direction 'ArB2r' uses the top "
            f"2·rank = {2 * rank} singular vectors of the gradient, more than "
            f"min(in, out) = {min(k.shape)} for a kernel of shape {k.shape}. Use a "
            f"rank of at most {min(k.shape) // 2}."
        )
    return _lora_ga(key, k, grad, rank, scale, float(gamma), niter, dtype)


@functools.partial(jax.jit, static_argnums=(3, 5, 6, 7))
def _lora_ga(key, k, grad, rank, scale, gamma, niter, dtype) -> Factors:
    work = compute_dtype(k.dtype)
    g = grad.astype(work).T
    q = min(4 * rank, min(g.shape))
    u, _, vt = svd_lowrank(key, g, 2 * rank, niter=niter, oversample=q - 2 * rank)
    c = k.shape[1] ** 0.25 / math.sqrt(gamma)
    a = c * vt[:rank].T
    b = c * u[:, rank : 2 * rank].T
    return _with_residual(k, a, b, scale, dtype)


def corda(
    key: jax.Array,
    k: jax.typing.ArrayLike,
    cov: jax.typing.ArrayLike,
    rank: int,
    scale: float,
    *,
    kpm: bool = False,
    dtype: jax.typing.DTypeLike = jnp.float32,
    path: str = "<weight>",
) -> Factors:
    """CorDA (Yang et al. 2024, arXiv 2406.05223), as in PEFT's ``corda`` init.

    ``cov`` is the covariance of the layer's inputs, ``(in, in)`` (PEFT: the mean
    over samples of ``XᵀX``, each sample ``X`` divided by ``|max X|``; see
    `jaxlora.init`). It is damped until it inverts well: ``C' = C + d·mean(diag
    C)·I`` with ``d = 0.01`` doubled while ``‖C'·C'⁻¹ − I‖_F ≥ 0.05``. In the PEFT
    orientation ``W = kᵀ`` (out, in), with the SVD ``W·C' = U S Vhᵀ`` and ``V =
    (Vh·C'⁻¹)ᵀ``:

        A = √(S_r/s) · V_rᵀ       (r, in)    a = Aᵀ
        B = U_r · √(S_r/s)        (out, r)   b = Bᵀ
        W_res = W − s·B·A

    where ``_r`` takes the first ``r`` singular triplets (IPM, "instruction-previewed
    mode") or, with ``kpm``, the last ``r`` (KPM, "knowledge-preserved mode": the
    base keeps the components that matter for the covariance's data). Since ``W =
    U S Vhᵀ C'⁻¹``, ``s·B·A`` is ``r`` of its ``min(in, out)`` rank-one terms.

    Args:
        key: unused (kept so every weight-aware scheme has the same signature).
        k: a floating kernel of shape ``(in, out)``.
        cov: the input covariance, shape ``(in, in)``, symmetric positive
            semi-definite.
        rank: the LoRA rank ``r``, at most ``min(in, out)``.
        scale: the LoRA scale ``s``.
        kpm: take the last ``r`` singular triplets (KPM) instead of the first (IPM).
        dtype: the dtype of the stored factors.
        path: the parameter path, for error messages.

    Returns:
        ``(a, b, k_res)`` with ``k_res = k − scale · a @ b``.

    Raises:
        ValueError: for a non-floating or non-2-D ``k``, a rank out of range, or a
            ``cov`` that is not ``(in, in)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> k = jax.random.normal(jax.random.key(0), (32, 24))
        >>> x = jax.random.normal(jax.random.key(1), (100, 32))
        >>> a, b, k_res = corda(jax.random.key(2), k, x.T @ x / 100, 4, 2.0)
        >>> bool(jnp.allclose(k_res + 2.0 * a @ b, k, atol=1e-5))
        True
    """
    k, cov = jnp.asarray(k), jnp.asarray(cov)
    _check_kernel(k, rank, path, "CorDA")
    if cov.shape != (k.shape[0],) * 2 or not jnp.issubdtype(cov.dtype, jnp.floating):
        raise ValueError(
            f"Cannot initialize CorDA for {path!r}: the input covariance must be a "
            f"floating ({k.shape[0]}, {k.shape[0]}) array for a kernel of shape "
            f"{k.shape}, got dtype {cov.dtype} and shape {cov.shape}. Pass the "
            "covariance of this kernel's inputs."
        )
    return _corda(k, cov, rank, scale, bool(kpm), dtype)


def damped_inverse(cov: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PEFT's CorDA damping: ``(C', C'⁻¹)`` with ``C' = C + d·mean(diag C)·I``, ``d``
    from 0.01 doubled until ``‖C'·C'⁻¹ − I‖_F < 0.05`` (at most 64 doublings)."""
    eye = jnp.eye(cov.shape[0], dtype=cov.dtype)
    shift = jnp.mean(jnp.diagonal(cov)) * eye

    def attempt(d):
        fixed = cov + shift * d
        inv = jnp.linalg.inv(fixed)
        err = jnp.linalg.norm(jnp.matmul(fixed, inv, precision=_HIGHEST) - eye)
        return fixed, inv, err

    def again(state):
        d, (_, _, err), n = state
        return (~(err < 0.05)) & (n < 64)

    def double(state):
        d, _, n = state
        return d * 2, attempt(d * 2), n + 1

    d0 = jnp.asarray(0.01, cov.dtype)
    _, (fixed, inv, _), _ = jax.lax.while_loop(again, double, (d0, attempt(d0), 0))
    return fixed, inv


@functools.partial(jax.jit, static_argnums=(2, 4, 5))
def _corda(k, cov, rank, scale, kpm, dtype) -> Factors:
    work = compute_dtype(k.dtype)
    fixed, inv = damped_inverse(cov.astype(work))
    # (W·C')ᵀ = C'·k: its left singular vectors are PEFT's Vh, its right ones U
    u, s, vt = jnp.linalg.svd(
        jnp.matmul(fixed, k.astype(work), precision=_HIGHEST), full_matrices=False
    )
    v = jnp.matmul(u.T, inv, precision=_HIGHEST).T  # PEFT's V = (Vh·C'⁻¹)ᵀ
    pick = slice(-rank, None) if kpm else slice(rank)
    a, b = _split_singular(v[:, pick], s[pick], vt[pick], scale, work)
    return _with_residual(k, a, b, scale, dtype)


def to_plain_lora(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    a0: jax.typing.ArrayLike,
    b0: jax.typing.ArrayLike,
    alpha: float,
    rslora: bool,
) -> tuple[jax.Array, jax.Array, float]:
    """A residual-init adapter as a plain rank-``2r`` LoRA on the *original* weight.

    An adapter ``(a, b)`` trained from ``(a0, b0)`` on the residual ``k_res = k −
    s·a0@b0`` computes ``k_res + s·a@b = k + s·(a@b − a0@b0) = k + s·a'@b'`` with

        a' = [a, a0]   (in, 2r),   b' = [b; −b0]   (2r, out),

    and ``alpha' = 2·alpha`` (``√2·alpha`` with rsLoRA) so that the scale ``s`` is the
    same at rank ``2r``. The result can be merged into, or shipped for, the original
    weight (e.g. saved in PEFT format) with no residual base.

    Args:
        a, b: the trained factors, shapes ``(in, r)`` and ``(r, out)``.
        a0, b0: the factors at initialization, same shapes.
        alpha: the adapter's alpha.
        rslora: whether the scale is ``alpha / sqrt(r)`` (else ``alpha / r``).

    Returns:
        ``(a', b', alpha')``.

    Raises:
        ValueError: if the four factors are not 2-D with matching shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> a2, b2, alpha2 = to_plain_lora(
        ...     jnp.ones((5, 2)), jnp.ones((2, 3)), jnp.zeros((5, 2)), jnp.ones((2, 3)),
        ...     8.0, False)
        >>> a2.shape, b2.shape, alpha2
        ((5, 4), (4, 3), 16.0)
    """
    a, b, a0, b0 = (jnp.asarray(x) for x in (a, b, a0, b0))
    if (
        a.ndim != 2
        or b.ndim != 2
        or a.shape != a0.shape
        or b.shape != b0.shape
        or a.shape[1] != b.shape[0]
    ):
        raise ValueError(
            "to_plain_lora expects a, a0 of shape (in, r) and b, b0 of shape (r, out), "
            f"got a {a.shape}, b {b.shape}, a0 {a0.shape}, b0 {b0.shape}. Reshape "
            "multi-axis factors to 2-D first."
        )
    factor = math.sqrt(2.0) if rslora else 2.0
    plain_a = jnp.concatenate([a, a0.astype(a.dtype)], axis=1)
    plain_b = jnp.concatenate([b, -b0.astype(b.dtype)], axis=0)
    return plain_a, plain_b, factor * float(alpha)
