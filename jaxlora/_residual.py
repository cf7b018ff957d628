"""Weight- and data-aware schemes: the factors come from the weight (or its gradient)
and the base weight becomes the residual ``W − s·a@b``.

The 2-D maths lives in `jaxlora._weight_aware` (one kernel in the ``(fan_in,
fan_out)`` orientation); this module moves any target between its layout and that
2-D form (stacked layers are vmapped), collects LoRA-GA's gradients, and turns a
trained residual adapter back into a plain one (`to_plain_lora`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _weight_aware
from jaxlora._linalg import svd_lowrank
from jaxlora._node import Layout
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._node import accumulator
from jaxlora._node import is_lora
from jaxlora._node import place
from jaxlora._node import placed_like_weight
from jaxlora._node import sharding_of
from jaxlora._paths import path_str

PyTree = Any


@dataclasses.dataclass(frozen=True)
class WeightAware:
    """A scheme computed from each target's weight (and data): PiSSA, MiLoRA, OLoRA,
    LoRA-GA, EVA, CorDA.

    Attributes:
        name: the scheme's name as stored in metadata (``"pissa_niter_4"``, ...).
        kind: ``"pissa"``, ``"milora"``, ``"olora"``, ``"lora_ga"``, ``"eva"``,
            ``"corda"`` (IPM) or ``"corda_kpm"``.
        niter: power iterations of the randomized SVD (fast PiSSA, LoRA-GA); None
            for PiSSA's exact SVD.
    """

    name: str
    kind: str
    niter: int | None = None

    def check_rank(self, rank: int) -> str | None:
        del rank
        return None


def to_3d(w: jax.Array, layout: Layout) -> jax.Array:
    """``w`` as ``(n_stack, fan_in, fan_out)`` (``n_stack = 1`` when not stacked)."""
    perm = layout.stack_axes + layout.in_axes + layout.out_axes
    fan_in, fan_out = layout.fans(tuple(w.shape))
    return jnp.transpose(w, perm).reshape(-1, fan_in, fan_out)


def from_3d(x: jax.Array, layout: Layout, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `to_3d` for a weight of ``shape``."""
    perm = layout.stack_axes + layout.in_axes + layout.out_axes
    x = x.reshape(tuple(shape[i] for i in perm))
    return jnp.transpose(x, np.argsort(perm))


def _factors_3d(scheme, keys, k3, g3, rank, scale, dtype, path):
    def one(key, k, g):
        if scheme.kind in ("corda", "corda_kpm"):
            kpm = scheme.kind == "corda_kpm"
            return _weight_aware.corda(
                key, k, g, rank, scale, kpm=kpm, dtype=dtype, path=path
            )
        if scheme.kind == "pissa":
            return _weight_aware.pissa(
                key, k, rank, scale, niter=scheme.niter, dtype=dtype, path=path
            )
        if scheme.kind == "milora":
            return _weight_aware.milora(key, k, rank, scale, dtype=dtype, path=path)
        if scheme.kind == "olora":
            return _weight_aware.olora(key, k, rank, scale, dtype=dtype, path=path)
        return _weight_aware.lora_ga(
            key,
            k,
            g,
            rank,
            scale,
            niter=4 if scheme.niter is None else scheme.niter,
            dtype=dtype,
            path=path,
        )

    if g3 is None:
        return jax.vmap(lambda key, k: one(key, k, None))(keys, k3)
    return jax.vmap(one)(keys, k3, g3)


def _warn_zero_gradient(g3, path: str) -> None:
    """Warns where LoRA-GA's gradient is exactly zero: every rank-2r subspace is
    then a top one, and its factors' directions are arbitrary (the SVD's)."""
    zero = np.flatnonzero(~np.asarray(jnp.any(g3 != 0, axis=(1, 2))))
    if not len(zero):
        return
    where = "" if g3.shape[0] == 1 else f" (layers {', '.join(map(str, zero))})"
    warnings.warn(
        f"jaxlora: the gradient of loss_fn with respect to {path!r}, averaged over "
        f"the batches, is exactly zero{where}, so LoRA-GA's directions there are "
        "arbitrary (no "
        "subspace of the gradient is larger than another): the weight does not "
        "reach the loss, or the batches do not exercise it. Check loss_fn and the "
        "batches, or leave the target out (targets=...) or give it another scheme.",
        stacklevel=4,
    )


def _whole(x):
    """``x`` replicated when it is split over explicit mesh axes (an SVD or QR takes
    whole matrices there); else ``x``."""
    sharding = sharding_of(x)
    explicit = jax.sharding.AxisType.Explicit
    if not isinstance(sharding, jax.sharding.NamedSharding) or explicit not in tuple(
        sharding.mesh.axis_types
    ):
        return x
    return place(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    )


def adapt(
    scheme: WeightAware,
    key,
    w,
    spec: LoraSpec,
    dtype,
    grad=None,
    *,
    cov=None,
    path: str,
) -> LoraWeight:
    """One target's `LoraWeight` with factors from ``w`` (and LoRA-GA's gradient
    ``grad`` of ``w``'s shape, or CorDA's input covariances ``cov``, ``(n_layers,
    fan_in, fan_in)``) and the residual as base; the caller lays the factors and the
    residual out like ``w`` (`placed_like_weight`). Errors name ``path``."""
    layout, shape = spec.layout, tuple(w.shape)
    checks = (
        ("weight", w, "Fix the weights"),
        ("gradient of loss_fn", grad, "Check loss_fn on the batches (a NaN loss?)"),
    )
    for what, x, fix in checks:
        if x is not None and not isinstance(x, jax.core.Tracer):
            if not bool(jnp.isfinite(x).all()):
                raise ValueError(
                    f"{path!r}: its {what} holds NaN or inf, so {scheme.name!r} would "
                    f"give NaN factors and residual. {fix}, or leave the target out "
                    "(targets=...)."
                )
    w = _whole(w)
    k3 = to_3d(w, layout)
    g3 = None if grad is None else to_3d(_whole(grad), layout)
    if g3 is not None and not isinstance(g3, jax.core.Tracer):
        _warn_zero_gradient(g3, path)
    g3 = g3 if cov is None else _whole(cov)
    keys = jax.random.split(key, k3.shape[0])
    a, b, res = _factors_3d(scheme, keys, k3, g3, spec.rank, spec.scale, dtype, path)
    a_shape, b_shape = layout.factor_shapes(shape, spec.rank)
    return LoraWeight(
        from_3d(res, layout, shape),
        a.reshape(a_shape),
        b.reshape(b_shape),
        dataclasses.replace(spec, residual=True),
    )


def average_gradients(
    loss_fn: Callable, params: PyTree, batches: Iterable, paths: list[str]
) -> dict[str, jax.Array]:
    """The average over ``batches`` of ∂loss/∂W for the weights at ``paths``.

    Only the weights at ``paths`` are differentiated; their gradients are held once
    (float32): the extra memory is one float32 copy of those weights (`jaxlora.init`
    passes groups of targets under its ``grad_memory`` budget).
    """
    wanted = set(paths)

    def split(tree):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        names = [path_str(p) for p, _ in flat]
        picked = {n: x for n, (_, x) in zip(names, flat, strict=True) if n in wanted}
        return picked, names, [x for _, x in flat], treedef

    picked, names, leaves, treedef = split(params)
    # the other weights are arguments, not constants folded into the program
    rest = {
        n: x
        for n, x in zip(names, leaves, strict=True)
        if n not in wanted and isinstance(x, (jax.Array, np.ndarray))
    }

    @jax.jit
    def grad_fn(picked, rest, batch):
        def loss(picked):
            full = [
                picked.get(n, rest.get(n, x))
                for n, x in zip(names, leaves, strict=True)
            ]
            out = loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)
            if isinstance(out, (tuple, list, dict)) or jnp.ndim(out) != 0:
                raise TypeError(
                    "scheme 'lora_ga' differentiates loss_fn(params, batch), which "
                    f"must return a scalar; it returned {_what(out)}. Reduce it "
                    "(e.g. jnp.mean), and return auxiliary outputs elsewhere."
                )
            return out

        return jax.tree.map(lambda g: g.astype(jnp.float32), jax.grad(loss)(picked))

    total, count = None, 0
    for batch in batches:
        g = grad_fn(picked, rest, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if count == 0:
        raise ValueError("scheme 'lora_ga' got no batches: pass batches=[batch, ...].")
    return {p: total[p] / count for p in paths}


def _what(out) -> str:
    shape = getattr(out, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(out).__name__


def gradient_groups(plan: list, max_bytes: int) -> list[list]:
    """Targets grouped so one group's float32 gradients fit in ``max_bytes`` (a target
    larger than that forms a group of its own)."""
    groups, current, size = [], [], 0
    for t in plan:
        nbytes = 4 * math.prod(t.shape)
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    return groups + ([current] if current else [])


def to_plain_lora(params: PyTree, original_params: PyTree) -> PyTree:
    """Turns residual-init adapters into plain adapters on the ORIGINAL weights.

    A residual adapter (PiSSA, OLoRA, MiLoRA, LoRA-GA, CorDA, ``compensate=True``)
    started at ``(a0, b0)`` on ``W_res = W − s·a0@b0`` and trained to ``(a, b)``
    computes ``W_res + s·a@b = W + s·(a@b − a0@b0)``: a plain LoRA of rank ``2r`` on
    ``W`` with ``a' = [a, a0]``, ``b' = [b; −b0]`` and ``alpha' = 2·alpha``
    (``√2·alpha`` with rsLoRA), so the scale is unchanged. ``a0@b0 = (W − W_res)/s`` is
    recovered from the two bases by a rank-``r`` factorization, so nothing extra
    has to be kept from the start of training. The result can be merged into, saved
    for, or shared with anyone holding the original model.

    Args:
        params: an adapted tree whose residual targets were trained.
        original_params: the plain tree the adapters were initialized from.

    Returns:
        The adapted tree on the original weights, with no residual targets.

    Raises:
        ValueError: if a residual target's path is missing from ``original_params``
            or has another shape or dtype, or (outside ``jit``) if the original
            weight minus the residual base is not of the adapter's rank: other
            weights, e.g. another checkpoint (a difference above about 1e-7 of the
            weight's norm in float32, 0.8% in bfloat16, is seen).
    """
    originals = {
        path_str(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(original_params)[0]
    }
    problems = []

    def convert(keypath, node):
        if not (is_lora(node) and node.spec.residual):
            return node
        p = path_str(keypath)
        orig = originals.get(p)
        if (
            orig is None
            or tuple(orig.shape) != node.shape
            or jnp.dtype(orig.dtype) != jnp.dtype(node.w.dtype)
        ):
            got = "missing" if orig is None else _describe(orig)
            problems.append(
                f"{p!r}: original weight {got}, residual base {_describe(node.w)}"
            )
            return node
        try:
            return _plain(node, jnp.asarray(orig), p)
        except _NotTheOriginal as e:
            problems.append(str(e))
            return node

    out = jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_lora)
    if problems:
        raise ValueError(
            "to_plain_lora needs the original (pre-init) weights of every residual "
            "target:\n  - "
            + "\n  - ".join(problems)
            + "\nPass the plain tree you gave jaxlora.init."
        )
    return out


def _describe(x: Any) -> str:
    return f"of shape {tuple(x.shape)} and dtype {jnp.dtype(x.dtype).name}"


class _NotTheOriginal(ValueError):
    pass


def _check_low_rank(path, d3, rebuilt, w_res, scale, rank) -> None:
    """``W − W_res`` must be the rank-r ``s·a0@b0``: other weights of the same shape
    (another checkpoint) leave a remainder far above ``W_res``'s rounding."""
    if isinstance(d3, jax.core.Tracer):  # under jit: nothing to compare
        return
    eps = float(jnp.finfo(w_res.dtype).eps)
    left = float(jnp.linalg.norm(d3 - rebuilt)) * scale
    allowed = eps * float(jnp.linalg.norm(w_res.astype(d3.dtype)))  # 2× rounding
    allowed += 1e-4 * float(jnp.linalg.norm(d3)) * scale
    if left > allowed:
        raise _NotTheOriginal(
            f"{path!r}: the original weight minus the residual base is not of the "
            f"adapter's rank {rank} (remainder {left:.3g}, rounding allows "
            f"{allowed:.3g}): not the weight this adapter was initialized from"
        )


def _plain(node: LoraWeight, orig: jax.Array, path: str) -> LoraWeight:
    spec, layout, r = node.spec, node.spec.layout, node.spec.rank
    acc = accumulator(orig.dtype)
    base = _whole(node.w)  # whole matrices for the QR of the range finder
    d3 = to_3d(_whole(orig).astype(acc) - base.astype(acc), layout) / spec.scale
    # d3 has rank <= r: a randomized range finder on r columns recovers it exactly
    # (up to rounding) for any sketch, so the fixed key does not change the result.
    keys = jax.random.split(jax.random.key(0), d3.shape[0])
    u, s, vt = jax.vmap(lambda k, d: svd_lowrank(k, d, r, niter=2))(keys, d3)
    rebuilt = jnp.matmul(u * s[:, None, :], vt, precision=jax.lax.Precision.HIGHEST)
    _check_low_rank(path, d3, rebuilt, base, spec.scale, r)
    root = jnp.sqrt(s)
    a0 = (u * root[:, None, :]).astype(node.a.dtype)
    b0 = (root[:, :, None] * vt).astype(node.b.dtype)
    n = d3.shape[0]
    plain = lambda a, b, a0, b0: _weight_aware.to_plain_lora(  # noqa: E731
        a, b, a0, b0, spec.alpha, spec.rslora
    )
    a, b, alpha = jax.vmap(plain, out_axes=(0, 0, None))(
        _whole(node.a).reshape(n, -1, r), _whole(node.b).reshape(n, r, -1), a0, b0
    )
    a_shape, b_shape = layout.factor_shapes(node.shape, 2 * r)
    a, b = a.reshape(a_shape), b.reshape(b_shape)
    new = dataclasses.replace(
        spec, rank=2 * r, alpha=alpha, residual=False, scheme=f"{spec.scheme}:plain"
    )
    return placed_like_weight(LoraWeight(orig, a, b, new), orig)
