"""EVA (Paischer et al. 2024, arXiv 2410.07170): ``a`` from a PCA of layer inputs.

For each target layer, EVA streams the layer's *inputs* ``x`` (shape ``(..., fan_in)``)
over a few batches, keeps the top ``k = ⌈ρ·r⌉`` principal components (``ρ = 2``), stops
a layer once successive component estimates agree (cosine similarity ``≥ τ = 0.99``),
then pools the explained-variance ratios of all layers and hands out the total rank
budget ``Σ r`` to the largest ones. ``a`` is the top components, ``b = 0``.

The incremental PCA here is exact: the state is the running count, mean and centred
scatter matrix ``M₂ = Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ``, merged batch by batch with Chan et al.'s
parallel update (numerically stable, unlike accumulating ``Σ x xᵀ``). `eva_components`
takes ``eigh`` of the covariance, so after any number of batches the components equal
those of a PCA of all rows seen so far, concatenated. Memory is ``fan_in²`` floats per
layer (4 MiB at ``fan_in = 1024``, 64 MiB at 4096); ``eigh`` costs ``O(fan_in³)`` per
call, which is why convergence is checked once per batch, not per step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvaPCAState:
    """Running statistics of one layer's inputs (a pytree; ``k`` is static).

    Attributes:
        count: the number of rows seen (float32 scalar).
        mean: the running mean ``μ``, shape ``(dim,)``.
        m2: the centred scatter matrix ``Σ (x − μ)(x − μ)ᵀ``, shape ``(dim, dim)``.
        k: how many components `eva_components` returns.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))


def eva_num_components(rank: int, rho: float = 2.0) -> int:
    """``k = ⌈ρ·r⌉``: the components EVA keeps per layer for a target rank ``r``."""
    return math.ceil(rho * rank)


def eva_pca_init(dim: int, k: int) -> EvaPCAState:
    """An empty incremental-PCA state for inputs of width ``dim``, keeping ``k``.

    Args:
        dim: the layer's input width (its fan-in).
        k: the number of components to keep, ``1 <= k <= dim`` (``⌈ρ·r⌉``, see
            `eva_num_components`).

    Returns:
        An `EvaPCAState` with zero count.

    Raises:
        ValueError: if ``k`` is not in ``[1, dim]``.

    Example:
        >>> state = eva_pca_init(16, 4)
        >>> state.m2.shape, state.k
        ((16, 16), 4)
    """
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(
            f"eva_pca_init: k must be an int in [1, dim={dim}], got {k!r}. Keep at "
            "most as many components as the input has features (lower rank or rho)."
        )
    return EvaPCAState(
        count=jnp.zeros((), jnp.float32),
        mean=jnp.zeros((dim,), jnp.float32),
        m2=jnp.zeros((dim, dim), jnp.float32),
        k=k,
    )


def eva_pca_update(
    state: EvaPCAState, x_batch: jax.typing.ArrayLike, mask=None
) -> EvaPCAState:
    """Merges a batch of layer inputs into the running statistics (jittable).

    With ``n``, ``μ``, ``M₂`` the state and ``n_b``, ``μ_b``, ``M₂_b`` the batch's
    count, mean and centred scatter, ``δ = μ_b − μ`` (Chan, Golub, LeVeque 1979):

        n' = n + n_b,   μ' = μ + δ·n_b/n',   M₂' = M₂ + M₂_b + δδᵀ·n·n_b/n'.

    Args:
        state: the running state.
        x_batch: inputs of shape ``(..., dim)``; every leading position is a row
            (e.g. ``(batch, seq, dim)`` activations).
        mask: optional boolean or 0/1 array of shape ``x_batch.shape[:-1]``; rows
            where it is 0 (padding tokens) are ignored.

    Returns:
        The updated state (a new object; ``state`` is not modified).

    Raises:
        ValueError: if the last axis of ``x_batch`` is not ``dim``.

    Example:
        >>> import jax
        >>> state = eva_pca_init(8, 2)
        >>> x = jax.random.normal(jax.random.key(0), (4, 5, 8))  # (batch, seq, dim)
        >>> state = eva_pca_update(state, x)
        >>> float(state.count)
        20.0
    """
    x = jnp.asarray(x_batch)
    dim = state.mean.shape[0]
    if x.ndim < 1 or x.shape[-1] != dim:
        raise ValueError(
            f"eva_pca_update: expected inputs of shape (..., {dim}), got {x.shape}. "
            "Feed the inputs of the layer this state was created for."
        )
    x = x.reshape(-1, dim)
    if mask is None:
        mask = jnp.ones(x.shape[:1], jnp.float32)
    return _merge(state, x, jnp.asarray(mask).reshape(-1))


@jax.jit
def _merge(state: EvaPCAState, x: jax.Array, mask: jax.Array) -> EvaPCAState:
    w = mask.astype(jnp.float32)
    # rows the mask leaves out are zeroed first: a NaN or inf there (a padded
    # position of a -inf-masked attention) must not reach the statistics (0·NaN)
    x = jnp.where(w[:, None] != 0, x.astype(jnp.float32), 0.0)
    n_b = w.sum()
    mean_b = jnp.matmul(w, x, precision=_HIGHEST) / jnp.maximum(n_b, 1.0)
    centred = (x - mean_b[None, :]) * w[:, None]
    m2_b = jnp.matmul(centred.T, centred, precision=_HIGHEST)
    n = state.count + n_b
    delta = mean_b - state.mean
    frac = n_b / jnp.maximum(n, 1.0)
    mean = state.mean + delta * frac
    m2 = state.m2 + m2_b + jnp.outer(delta, delta) * (state.count * frac)
    return EvaPCAState(count=n, mean=mean, m2=m2, k=state.k)


@jax.jit
def eva_components(state: EvaPCAState) -> tuple[jax.Array, jax.Array]:
    """The top-``k`` principal components of all inputs seen so far (jittable).

    ``eigh`` of the covariance ``M₂ / (n − 1)``; eigenvalues are sorted descending and
    each component's sign is fixed so that its largest-magnitude entry is positive
    (so equal data give equal components).

    Args:
        state: the running state.

    Returns:
        ``(components, ratios)``: ``components`` of shape ``(k, dim)`` (orthonormal
        rows) and ``ratios`` of shape ``(k,)``, each component's share of the total
        variance ``λ_i / Σ_j λ_j`` (descending).

    Example:
        >>> import jax
        >>> state = eva_pca_update(
        ...     eva_pca_init(8, 2), jax.random.normal(jax.random.key(0), (64, 8)))
        >>> components, ratios = eva_components(state)
        >>> components.shape, ratios.shape
        ((2, 8), (2,))
    """
    cov = state.m2 / jnp.maximum(state.count - 1.0, 1.0)
    eigval, eigvec = jnp.linalg.eigh(cov)
    eigval = jnp.maximum(eigval, 0.0)
    top = eigvec[:, ::-1][:, : state.k].T
    pivot = jnp.take_along_axis(top, jnp.argmax(jnp.abs(top), axis=1)[:, None], 1)
    top = top * jnp.where(pivot < 0, -1.0, 1.0)
    total = jnp.maximum(eigval.sum(), jnp.finfo(eigval.dtype).tiny)
    return top, eigval[::-1][: state.k] / total


@jax.jit
def eva_singular_values(state: EvaPCAState) -> jax.Array:
    """The top-``k`` singular values of the centred inputs seen, ``√λᵢ(M₂)``
    (descending; what PEFT's ``whiten=True`` divides by the square root of).

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (64, 8))
        >>> s = eva_singular_values(eva_pca_update(eva_pca_init(8, 3), x))
        >>> s.shape, bool((s[:-1] >= s[1:]).all())
        ((3,), True)
    """
    eigval = jnp.maximum(jnp.linalg.eigvalsh(state.m2), 0.0)
    return jnp.sqrt(eigval[::-1][: state.k])


def eva_converged(
    previous: jax.typing.ArrayLike, current: jax.typing.ArrayLike, tau: float = 0.99
) -> jax.Array:
    """EVA's stopping rule, per component: ``|cos(previous_i, current_i)| ≥ τ``.

    The absolute value makes the test blind to the sign of a component. A layer is
    done (its inputs need no more batches) when every entry is True.

    Args:
        previous: the components of the previous estimate, shape ``(k, dim)``.
        current: the current components, shape ``(k, dim)``.
        tau: the threshold (the paper's ``τ = 0.99``).

    Returns:
        A boolean array of shape ``(k,)``.

    Example:
        >>> import jax.numpy as jnp
        >>> eva_converged(jnp.eye(2), -jnp.eye(2)).tolist()
        [True, True]
    """
    previous, current = jnp.asarray(previous), jnp.asarray(current)
    dot = jnp.abs(jnp.sum(previous * current, axis=-1))
    norms = jnp.linalg.norm(previous, axis=-1) * jnp.linalg.norm(current, axis=-1)
    return dot >= tau * norms


def eva_rank_allocation(
    ratios: dict[str, jax.typing.ArrayLike], budget: int, max_rank: int
) -> dict[str, int]:
    """Splits a total rank ``budget`` among layers by pooled explained variance.

    The first ``max_rank`` explained-variance ratios of every layer are pooled; the
    ``budget`` largest (ties broken by layer order, then component order) are kept,
    and a layer's rank is the number of its ratios kept. A layer may get 0 (EVA then
    drops its adapter). The ranks sum to ``min(budget, Σ_l min(max_rank, k_l))``, so
    exactly to ``budget`` when enough components exist. With plain LoRA scaling EVA
    sets ``alpha_l = alpha · r_l / r`` so that each layer keeps the scale ``alpha / r``.

    Args:
        ratios: per-layer explained-variance ratios (from `eva_components`).
        budget: the total rank, usually ``r × number of layers``.
        max_rank: the most rank one layer may get (usually ``⌈ρ·r⌉``).

    Returns:
        A dict of per-layer ranks, in the order of ``ratios``.

    Raises:
        ValueError: for a negative budget or max_rank, or ratios that are not 1-D.

    Example:
        >>> import numpy as np
        >>> eva_rank_allocation(
        ...     {"q": np.array([0.8, 0.1]), "v": np.array([0.3, 0.2])}, 2, 2)
        {'q': 1, 'v': 1}
    """
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(
            f"eva_rank_allocation: budget must be a non-negative int, got {budget!r}."
        )
    if not isinstance(max_rank, int) or max_rank < 0:
        raise ValueError(
            f"eva_rank_allocation: max_rank must be a non-negative int, got "
            f"{max_rank!r}."
        )
    names = list(ratios)
    values, owners, order = [], [], []
    for i, name in enumerate(names):
        r = np.asarray(ratios[name], dtype=np.float64)
        if r.ndim != 1:
            raise ValueError(
                f"eva_rank_allocation: ratios[{name!r}] must be 1-D, got shape "
                f"{r.shape}. Pass the explained-variance ratios of eva_components."
            )
        r = np.sort(r)[::-1][:max_rank]
        values.append(r)
        owners.append(np.full(r.shape, i))
        order.append(np.arange(r.size))
    if not names:
        return {}
    values, owners, order = map(np.concatenate, (values, owners, order))
    chosen = np.lexsort((order, owners, -values))[:budget]
    counts = np.bincount(owners[chosen], minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts, strict=True)}


def eva_factors(
    components: jax.typing.ArrayLike,
    rank: int,
    fan_out: int,
    dtype: jax.typing.DTypeLike = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """EVA's factors: ``a`` = the top ``rank`` components as columns, ``b = 0``.

    Args:
        components: shape ``(k, fan_in)``, sorted by explained variance.
        rank: the layer's allocated rank, ``0 <= rank <= k``.
        fan_out: the layer's output width.
        dtype: the dtype of the factors.

    Returns:
        ``(a, b)`` of shapes ``(fan_in, rank)`` and ``(rank, fan_out)``; ``a`` has
        orthonormal columns and the update ``a @ b`` is 0, so the base is unchanged.

    Raises:
        ValueError: if ``components`` is not 2-D or ``rank`` is not in ``[0, k]``.

    Example:
        >>> import jax.numpy as jnp
        >>> a, b = eva_factors(jnp.eye(4)[:2], 2, 3)
        >>> a.shape, b.shape, float(abs(b).sum())
        ((4, 2), (2, 3), 0.0)
    """
    components = jnp.asarray(components)
    if components.ndim != 2:
        raise ValueError(
            f"eva_factors: components must have shape (k, fan_in), got "
            f"{components.shape}."
        )
    if not isinstance(rank, int) or not 0 <= rank <= components.shape[0]:
        raise ValueError(
            f"eva_factors: rank must be an int in [0, k={components.shape[0]}], got "
            f"{rank!r}. Keep more components (k = ceil(rho * r)) or lower the rank."
        )
    a = components[:rank].T.astype(dtype)
    return a, jnp.zeros((rank, fan_out), dtype)
