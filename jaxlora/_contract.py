"""Factored rules for the primitives that contract an adapted weight.

Each rule gets the equation's inputs, one of them a `Sym` standing for
``W = w + s · a @ b``, and returns ``op(x, w) + s · op'(op''(x, a), b)`` so the product
``a @ b`` is never formed and ``w`` (stop-gradient'ed) gets no weight gradient.
A rule raises `Unsupported` with a reason when the use does not fit; the interpreter
then materializes the weight for that one use.
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.interpreters import ad as _ad
from jax.lax import GatherScatterMode

from jaxlora._node import accumulator
from jaxlora._symbolic import R
from jaxlora._symbolic import Sym
from jaxlora._symbolic import Unsupported
from jaxlora._symbolic import factor_fill
from jaxlora._symbolic import fresh_letters

# True while the interpreter runs a call that forward-mode differentiation (jax.jvp,
# jacfwd) perturbs: a custom_vjp cannot be differentiated forwards, so the
# contraction is then emitted in plain ops, which JAX differentiates itself
FORWARD_MODE = contextvars.ContextVar("jaxlora_forward_mode", default=False)


def forward_mode(values) -> bool:
    """Whether forward-mode differentiation perturbs any of ``values``: a JVP tracer
    somewhere down a value's chain of tracers (``vmap`` of ``jvp``, ``jit`` inside,
    ...). Reverse mode (``jax.grad``) runs on linearize tracers, unless
    ``jax_use_direct_linearize`` is off: then its JVP tracers cannot be told apart
    from forward mode, and the custom reverse rule is kept (forward mode then fails
    with JAX's own error).
    """
    if not jax.config.jax_use_direct_linearize:
        return False
    for x in values:
        for _ in range(64):  # tracer chains are as deep as the nested transforms
            if not isinstance(x, jax.core.Tracer):
                break
            if isinstance(x, _ad.JVPTracer):
                return True
            x = getattr(x, "primal", getattr(x, "val", None))
    return False


def _sum(base, lora):
    return base + lora.astype(base.dtype)


def vma(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (none outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; `vma` before
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _vary(x, axes: frozenset):
    """``x`` cast to vary over ``axes`` too (type-level: no data moves)."""
    more = axes - vma(x)
    if not more:
        return x
    return jax.lax.pcast(x, tuple(sorted(more, key=str)), to="varying")


def unify_vma(operands: list) -> list:
    """The operands of a contraction (arrays and `Sym` s, whose ``w`` and factors
    count) cast to vary over the union of their manual mesh axes.

    Inside a ``shard_map`` (with ``check_vma``) the operands of a primitive or a
    custom rule must agree; a replicated factor is cast to varying, and the cast's
    transpose is the ``psum`` that adds up its gradient over the shards. Outside a
    ``shard_map``, a no-op.
    """
    arrays = lambda x: (x.w, x.a, x.b) if isinstance(x, Sym) else (x,)  # noqa: E731
    parts = [p for x in operands for p in arrays(x) if hasattr(p, "dtype")]
    union = frozenset().union(*(vma(p) for p in parts))
    if not union:
        return operands
    cast = lambda x: _vary(x, union) if hasattr(x, "dtype") else x  # noqa: E731
    return [
        x.map_factors(cast(x.w), lambda f, _: cast(f))
        if isinstance(x, Sym)
        else cast(x)
        for x in operands
    ]


def _explicitly_split(x) -> bool:
    """Whether ``x``'s type says it is split over explicit mesh axes."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return spec is not None and any(e is not None for e in spec)


def _one_buffer_sum(base, lora):
    """``base + lora``, bitwise, as a reduction over a stacked pair with weights that
    XLA cannot prove are 1: a plain add would be fused into every consumer, keeping
    both summands alive as backward residuals; a reduction output is one buffer.
    """
    lora = _like(lora, base)  # explicit mesh axes: laid out as the model's product
    if _explicitly_split(lora) or not lora.size:  # no flat slice: a plain add
        return _sum(base, lora)
    one = (lora.reshape(-1)[:1] != lora.reshape(-1)[:1]).astype(base.dtype) * 0 + 1
    pair = jnp.stack([base, lora.astype(base.dtype)], axis=-1)
    # exact on every backend (a default-precision dot is bf16 passes on TPUs, TF32
    # on GPUs: it would round the base term)
    return jnp.einsum(
        "...k,k->...",
        pair,
        jnp.concatenate([one, one]),
        precision=jax.lax.Precision.HIGHEST,
    )


class _Plan(NamedTuple):
    """Static recipe mapping the operands of a contraction onto 2-D matrices."""

    x_perm: tuple  # x -> (free..., contracted...)
    w_perm: tuple  # w -> (contracted..., free...)
    f1_perm: tuple  # first factor -> (contracted..., r)
    f2_perm: tuple  # second factor -> (r, free...)
    out_perm: tuple  # (x free..., w free...) -> the primitive's output order
    scale: float
    dtype: Any
    precision: Any
    base_params: Any  # the dot_general's own params, to form x·w bitwise as the model
    sym_lhs: bool


def _canon(x, w, f1, f2, plan):
    xt, wt = jnp.transpose(x, plan.x_perm), jnp.transpose(w, plan.w_perm)
    f1t, f2t = jnp.transpose(f1, plan.f1_perm), jnp.transpose(f2, plan.f2_perm)
    k = math.prod(f1t.shape[:-1])
    return (
        xt.reshape(-1, k),
        wt.reshape(k, -1),
        f1t.reshape(k, -1),
        f2t.reshape(f1t.shape[-1], -1),
        xt.shape[: xt.ndim - (f1t.ndim - 1)] + wt.shape[f1t.ndim - 1 :],
    )


def _undo(y, perm, shape):
    """Inverse of ``transpose(., perm).reshape(...)`` back to ``shape``."""
    t_shape = tuple(shape[i] for i in perm)
    return jnp.transpose(y.reshape(t_shape), tuple(int(i) for i in np.argsort(perm)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora_contract(x, w, f1, f2, plan):
    """``dot_general(x, w) + scale · (x @ f1) @ f2`` with a hand-written VJP.

    The base product is the model's own ``dot_general`` (so with ``b = 0`` the output
    is bitwise the base model's) and the sum is formed as one buffer
    (`_one_buffer_sum`). The residuals are the operands as given (a scanned weight
    slice is then forwarded by ``scan``, not stacked) and ``t = scale · x @ f1``.
    The backward computes the input gradient and the factor gradients only: ``w``
    is frozen and gets a zero cotangent, unless it carries a tangent of its own
    (``w`` is the stop-gradient'ed base times a differentiable scalar, e.g.
    ``x @ (kernel * gate)``): then ``x^T g`` is its cotangent, so the scalar's
    gradient includes the base path.
    """
    return _lora_contract_fwd(x, w, f1, f2, plan)[0]


def _explicit_mesh(x):
    """The mesh of ``x``'s type when it has explicit axes, else None."""
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    explicit = jax.sharding.AxisType.Explicit
    return mesh if explicit in tuple(getattr(mesh, "axis_types", ())) else None


def _like(x, other):
    """``x`` laid out as ``other``'s type says (explicit mesh axes only)."""
    want = jax.typeof(other).sharding
    if _explicit_mesh(other) is None or jax.typeof(x).sharding == want:
        return x
    return jax.reshard(x, want)


def _acc(dtype):
    """The dtype of the rank-r intermediates: float32 or wider (they are small)."""
    return accumulator(dtype)


def _lora_contract_fwd(x, w, f1, f2, plan):
    dt = _acc(plan.dtype)
    x2, _, a2, b2, y_shape = _canon(x, w, f1, f2, plan)
    base = jax.lax.dot_general(
        *((w, x) if plan.sym_lhs else (x, w)), **dict(plan.base_params)
    )
    t = jnp.dot(
        x2, a2, preferred_element_type=dt, precision=plan.precision
    ) * jnp.asarray(plan.scale, dt)
    lora = jnp.dot(
        t, b2.astype(dt), preferred_element_type=dt, precision=plan.precision
    )
    lora = jnp.transpose(lora.reshape(y_shape), plan.out_perm)
    return _one_buffer_sum(base, lora), (x, w, f1, f2, t)


def _lora_contract_fwd_rule(x, w, f1, f2, plan):
    """The forward rule (``symbolic_zeros``): records whether ``w`` is perturbed."""
    out, res = _lora_contract_fwd(x.value, w.value, f1.value, f2.value, plan)
    # a static flag in the residuals' structure: w's cotangent is wanted
    return out, (*res, (None,) if w.perturbed else ())


def _lora_contract_bwd(plan, res, g):
    *res, w_grad = res
    x, w, f1, f2, t = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return (None, None, None, None)
    dt = _acc(plan.dtype)
    x2, w2, a2, b2, y_shape = _canon(x, w, f1, f2, plan)
    g2 = jnp.transpose(g, tuple(int(i) for i in np.argsort(plan.out_perm)))
    g2 = g2.reshape(-1, w2.shape[1])
    dt_ = jnp.dot(
        g2, b2.T.astype(g2.dtype), preferred_element_type=dt, precision=plan.precision
    )
    db2 = jnp.dot(
        t.T, g2.astype(t.dtype), preferred_element_type=dt, precision=plan.precision
    )
    dts = dt_ * jnp.asarray(plan.scale, dt)
    da2 = jnp.dot(
        x2.T.astype(dt), dts, preferred_element_type=dt, precision=plan.precision
    )
    dx2 = jnp.dot(
        g2,
        w2.T.astype(g2.dtype),
        preferred_element_type=plan.dtype,
        precision=plan.precision,
    )
    dx2 = dx2 + jnp.dot(
        dts, a2.T.astype(dt), preferred_element_type=dt, precision=plan.precision
    ).astype(plan.dtype)
    dw = None  # w is the frozen base: no weight gradient is formed
    if w_grad:
        dw2 = jnp.dot(
            x2.T,
            g2.astype(x2.dtype),
            preferred_element_type=dt,
            precision=plan.precision,
        )
        dw = _undo(dw2, plan.w_perm, w.shape).astype(w.dtype)
    return (
        _undo(dx2, plan.x_perm, x.shape).astype(x.dtype),
        dw,
        _undo(da2, plan.f1_perm, f1.shape).astype(f1.dtype),
        _undo(db2, plan.f2_perm, f2.shape).astype(f2.dtype),
    )


_lora_contract.defvjp(_lora_contract_fwd_rule, _lora_contract_bwd, symbolic_zeros=True)


def _fused(x, sym, first, sc, xc, sym_lhs, dtype, precision, base_params):
    """The single-matmul path for a weight with no stacked axes and no batch dims."""
    x_free = [i for i in range(x.ndim) if i not in xc]
    s_free = [i for i in range(sym.ndim) if i not in sc]
    f1, l1 = (sym.a, sym.a_lab) if first == "a" else (sym.b, sym.b_lab)
    f2, l2 = (sym.b, sym.b_lab) if first == "a" else (sym.a, sym.a_lab)
    nx, ns = len(x_free), len(s_free)
    out_perm = (
        tuple(range(nx, nx + ns)) + tuple(range(nx))
        if sym_lhs
        else tuple(range(nx + ns))
    )
    plan = _Plan(
        x_perm=tuple(x_free) + tuple(xc),
        w_perm=tuple(sc) + tuple(s_free),
        f1_perm=tuple(l1.index(i) for i in sc) + (l1.index(R),),
        f2_perm=(l2.index(R),) + tuple(l2.index(i) for i in s_free),
        out_perm=out_perm,
        scale=sym.scale,
        dtype=np.dtype(dtype),
        precision=precision,
        base_params=base_params,
        sym_lhs=sym_lhs,
    )
    if FORWARD_MODE.get():
        return _lora_contract_fwd(x, sym.w, f1, f2, plan)[0]
    return _lora_contract(x, sym.w, f1, f2, plan)


def _labelled_sharding(out_lab, operands):
    """On a mesh with explicit axes, the sharding of an einsum output ``out_lab``
    whose letters keep the mesh axes they have in ``operands`` ((array, letters)
    pairs; a mesh axis is used once, contracted letters are summed over); else
    None (no sharding to say)."""
    mesh = next((m for a, _ in operands if (m := _explicit_mesh(a))), None)
    if mesh is None:
        return None
    seen = {}
    for a, lab in operands:
        spec = tuple(jax.typeof(a).sharding.spec)
        for c, e in zip(lab, spec + (None,) * (len(lab) - len(spec)), strict=True):
            seen.setdefault(c, e)
    used, spec = set(), []
    for c in out_lab:
        e = seen.get(c)
        names = set(e if isinstance(e, tuple) else (e,)) - {None}
        spec.append(e if names and not names & used else None)
        used |= names if spec[-1] is not None else set()
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _two_step(
    first,
    first_lab,
    second,
    second_lab,
    x,
    x_lab,
    out_lab,
    scale,
    dtype,
    prec=None,
    out_sharding=None,
):
    """``einsum(einsum(x, first), second)`` keeping only the letters still needed.

    On a mesh with explicit axes the intermediate keeps the mesh axes of ``x`` and
    the factor, and the result takes ``out_sharding`` (the base term's: a mesh axis
    that both the batch and ``second`` are split over would otherwise be used twice).
    """
    keep = set(second_lab) | set(out_lab)
    t_lab = "".join(dict.fromkeys(c for c in x_lab + first_lab if c in keep))
    acc = _acc(dtype)
    t_sharding = _labelled_sharding(t_lab, [(x, x_lab), (first, first_lab)])
    t = jnp.einsum(
        f"{x_lab},{first_lab}->{t_lab}",
        x,
        first,
        preferred_element_type=acc,
        precision=prec,
        **({"out_sharding": t_sharding} if t_sharding is not None else {}),
    )
    t = t * jnp.asarray(scale, t.dtype)
    return jnp.einsum(
        f"{t_lab},{second_lab}->{out_lab}",
        t,
        second,
        preferred_element_type=acc,
        precision=prec,
        **({"out_sharding": out_sharding} if out_sharding is not None else {}),
    ).astype(dtype)


def dot_general(eqn, lhs, rhs):
    """``dot_general`` with the weight on either side, contracting in- or out-axes."""
    if isinstance(lhs, Sym) and isinstance(rhs, Sym):
        raise Unsupported("both operands are adapted weights")
    sym_lhs = isinstance(lhs, Sym)
    sym, x = (lhs, rhs) if sym_lhs else (rhs, lhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    sc, xc, sb, xb = (lc, rc, lb, rb) if sym_lhs else (rc, lc, rb, lb)
    if not set(sb) <= set(sym.stack_axes):
        raise Unsupported("a batch dimension of the weight is not a stacked axis")
    free = set(range(sym.ndim)) - set(sym.stack_axes)
    # stacked axes contracted too (the top-k experts of a token, summed with their
    # gates) are kept through the first factor and summed with the second
    own = [i for i in sc if i in free]
    if own and sym.can_regroup(own):
        sym = sym.regroup_units(own)
        first, second, route = "a", "b", "in"
    elif own and sym.can_regroup(free - set(own)):
        sym = sym.regroup_units(free - set(own))
        first, second, route = "b", "a", "out"
    else:
        lost = "input" if not sym.in_axes else "output" if not sym.out_axes else None
        raise Unsupported(
            f"contracts axes {tuple(sc)} of the weight as used here (shape "
            f"{sym.shape}), neither its input axes {sym.in_axes} nor its output axes "
            f"{sym.out_axes} under the adapter's layout"
            + (
                f"; its {lost} side was indexed away, as when a default layout took "
                "a stacked layer axis as a side: infer layouts with jaxlora.init(..., "
                "apply_fn=..., example_args=...)"
                if lost
                else ""
            )
        )
    letters = fresh_letters(x.ndim + sym.ndim + 1)
    x_let = list(letters[: x.ndim])
    w_let = list(letters[x.ndim : x.ndim + sym.ndim])
    r_let = letters[-1]
    for si, xi in zip(tuple(sc) + tuple(sb), tuple(xc) + tuple(xb), strict=True):
        w_let[si] = x_let[xi]
    s_free = [w_let[i] for i in range(sym.ndim) if i not in sc and i not in sb]
    x_free = [x_let[i] for i in range(x.ndim) if i not in xc and i not in xb]
    batch = [x_let[i] for i in xb]
    out_lab = "".join(batch + (s_free + x_free if sym_lhs else x_free + s_free))
    a_lab, b_lab = sym.letters(w_let, r_let)
    dtype = eqn.outvars[0].aval.dtype
    prec = eqn.params.get("precision")
    # on a mesh with explicit axes the flattening of the fused path is refused (a
    # reshape of split axes): einsums that say their output shardings instead
    explicit = any(_explicit_mesh(v) for v in (x, sym.w, sym.a, sym.b))
    if not (sb or sym.stack_axes or explicit or 0 in x.shape + sym.shape):
        base_params = tuple(sorted(eqn.params.items()))
        fused = _fused(x, sym, first, sc, xc, sym_lhs, dtype, prec, base_params)
        return fused, route
    base = eqn.primitive.bind(*((sym.w, x) if sym_lhs else (x, sym.w)), **eqn.params)
    fa = (sym.a, a_lab) if first == "a" else (sym.b, b_lab)
    fb = (sym.b, b_lab) if second == "b" else (sym.a, a_lab)
    out_sharding = jax.typeof(base).sharding if explicit else None
    lora = _two_step(
        *fa, *fb, x, "".join(x_let), out_lab, sym.scale, dtype, prec, out_sharding
    )
    return _one_buffer_sum(base, lora), route


def conv_general_dilated(eqn, lhs, rhs):
    """Weight as a conv kernel: ``a`` as a conv to r channels, then b (a 1×1 conv).

    A grouped convolution (``feature_group_count = G``, depthwise included) runs ``a``
    as a grouped conv to ``G·r`` channels (group g's r channels see only group g's
    inputs, as ``w`` does), then each group's r channels go through the columns of
    ``b`` that belong to that group's outputs.
    """
    if isinstance(lhs, Sym):
        raise Unsupported(
            "the adapted weight is the convolution's input, not its kernel"
        )
    p = eqn.params
    dn = p["dimension_numbers"]
    o_dim, i_dim, *spatial = dn.rhs_spec
    groups = p["feature_group_count"]
    if p["batch_group_count"] != 1:
        raise Unsupported("batch-grouped convolution")
    if groups > 1 and any(_explicit_mesh(v) for v in (lhs, rhs.w)):
        # JAX (0.10) doubles the kernel gradient of a grouped conv whose batch is
        # split over explicit mesh axes, which the rank-r conv would inherit
        raise Unsupported("a grouped convolution on a mesh with explicit axes")
    if rhs.stack_axes or set(rhs.out_axes) != {o_dim}:
        raise Unsupported(f"kernel output axis {o_dim} is not the weight's output axis")
    if set(rhs.in_axes) != {i_dim, *spatial}:
        raise Unsupported(
            "kernel window and input axes are not the weight's input axes"
        )
    base = eqn.primitive.bind(lhs, rhs.w, **p)
    want = [R if k == o_dim else k for k in range(rhs.ndim)]
    a_k = jnp.transpose(rhs.a, [rhs.a_lab.index(k) for k in want])
    rank = a_k.shape[o_dim]
    # group g's r output channels are g*r ... g*r + r - 1, each with a's kernel
    a_k = jnp.tile(a_k, [groups if k == o_dim else 1 for k in range(a_k.ndim)])
    # conv needs one operand dtype: the factors may be wider than the weight (float32
    # factors of a bfloat16 model), and the rank-r path runs in the wider one
    dt = jnp.promote_types(lhs.dtype, a_k.dtype)
    pet = p.get("preferred_element_type")
    # the rank-r intermediate in float32 or wider, as the dot rule keeps it: a
    # float16 one overflows where the merged model's output does not
    t_params = {**p, "preferred_element_type": _acc(dt if pet is None else pet)}
    f = dn.out_spec[1]
    if p.get("out_sharding") is not None:  # the model's layout, but rank r channels
        t_params["out_sharding"] = _unsplit(p["out_sharding"], f, base.ndim)
    t = eqn.primitive.bind(lhs.astype(dt), a_k.astype(dt), **t_params)
    t = t * jnp.asarray(rhs.scale, t.dtype)
    t = t.reshape(t.shape[:f] + (groups, rank) + t.shape[f + 1 :])
    letters = fresh_letters(t.ndim + 1)
    t_lab, o_let = letters[: t.ndim], letters[-1]
    g_let, r_let = t_lab[f], t_lab[f + 1]
    out_lab = t_lab[:f] + g_let + o_let + t_lab[f + 2 :]
    # b's output axis split as (group, output within the group)
    b_lab = "".join(r_let if k == R else g_let + o_let for k in rhs.b_lab)
    b_dims = []
    for k, n in zip(rhs.b_lab, rhs.b.shape, strict=True):
        b_dims += [n] if k == R else [groups, n // groups]
    out_sharding = None
    if _explicit_mesh(base) is not None:  # the base's layout, channels split (g, o)
        spec = tuple(jax.typeof(base).sharding.spec)
        spec += (None,) * (base.ndim - len(spec))
        out_sharding = jax.sharding.NamedSharding(
            jax.typeof(base).sharding.mesh,
            jax.sharding.PartitionSpec(*spec[:f], None, spec[f], *spec[f + 1 :]),
        )
    lora = jnp.einsum(
        f"{t_lab},{b_lab}->{out_lab}",
        t,
        rhs.b.reshape(b_dims).astype(t.dtype),
        preferred_element_type=t.dtype,
        precision=_dot_precision(p.get("precision")),
        **({"out_sharding": out_sharding} if out_sharding is not None else {}),
    )
    lora = lora.reshape(base.shape).astype(base.dtype)
    return _one_buffer_sum(base, lora), "in"


def _dot_precision(precision):
    """A convolution's ``precision`` for the ``b`` einsum: a `lax.Precision` (or a
    pair) as it is; a dot algorithm preset (``TF32_TF32_F32``) none, as a dot on
    the CPU refuses presets a convolution takes."""
    plain = lambda q: q is None or isinstance(q, jax.lax.Precision)  # noqa: E731
    if plain(precision) or (
        isinstance(precision, tuple) and all(map(plain, precision))
    ):
        return precision
    return None


def _unsplit(sharding, axis: int, ndim: int):
    """``sharding`` (a NamedSharding or a PartitionSpec) with ``axis`` not split."""
    spec = getattr(sharding, "spec", sharding)
    entries = list(tuple(spec)) + [None] * (ndim - len(tuple(spec)))
    entries[axis] = None
    new = jax.sharding.PartitionSpec(*entries)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, new, sharding.memory_kind)
    return new


def gather_indexed_axes(params: dict, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The operand axes a gather (``params``) really indexes, in start-index order.

    An axis taken whole with clamped starts always starts at 0, so it is not
    indexed: ``vmap(lambda i: table[i])`` gathers ``(row, 0)`` windows of full rows.
    """
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    clamped = params["mode"] in (
        GatherScatterMode.CLIP,
        GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return tuple(
        i
        for i in dn.start_index_map
        if not (clamped and sizes[i] == shape[i] and i not in dn.collapsed_slice_dims)
    )


def _gather_parts(eqn, operand, indices):
    """A row gather of an adapted weight as ``base`` plus the factor holding the
    indexed axes gathered (``g``, unscaled) and the other factor, with einsum
    subscripts: ``base + scale · einsum(g, other)`` is the gathered weight."""
    if not isinstance(operand, Sym) or isinstance(indices, Sym):
        raise Unsupported("the adapted weight is used as gather indices")
    p = eqn.params
    dn, sizes = p["dimension_numbers"], p["slice_sizes"]
    if dn.operand_batching_dims:
        raise Unsupported("batched gather")
    index_map = gather_indexed_axes(p, operand.shape)
    whole = set(dn.start_index_map) - set(index_map)
    if not index_map:
        raise Unsupported("gather takes the whole weight")
    idx = set(index_map)
    if idx <= set(operand.in_axes):
        fac, fac_lab, oth, oth_lab = operand.a, operand.a_lab, operand.b, operand.b_lab
    elif idx <= set(operand.out_axes):
        fac, fac_lab, oth, oth_lab = operand.b, operand.b_lab, operand.a, operand.a_lab
    else:
        raise Unsupported("gather indexes axes from both factors")
    full = [i for i in range(operand.ndim) if i not in idx]
    if any(sizes[i] != operand.shape[i] for i in full) or any(
        i in oth_lab for i in idx
    ):
        raise Unsupported("gather takes a partial slice of a non-indexed axis")
    base = eqn.primitive.bind(operand.w, indices, **p)
    pos = {lab: k for k, lab in enumerate(fac_lab)}
    collapsed = tuple(pos[i] for i in dn.collapsed_slice_dims)
    n_batch = base.ndim - len(dn.offset_dims)
    n_off = len(fac_lab) - len(collapsed)
    fdn = type(dn)(
        offset_dims=tuple(range(n_batch, n_batch + n_off)),
        collapsed_slice_dims=collapsed,
        start_index_map=tuple(pos[i] for i in index_map),
        operand_batching_dims=(),
        start_indices_batching_dims=(),
    )
    if whole:  # drop the whole axes' (clamped-to-0) start indices
        keep = [k for k, i in enumerate(dn.start_index_map) if i not in whole]
        indices = jnp.take(indices, jnp.asarray(keep), axis=indices.ndim - 1)
    f_sizes = tuple(
        fac.shape[k] if lab == R else sizes[lab] for k, lab in enumerate(fac_lab)
    )
    g = eqn.primitive.bind(
        fac,
        indices,
        **{**factor_fill(p), "dimension_numbers": fdn, "slice_sizes": f_sizes},
    )
    letters = fresh_letters(base.ndim + operand.ndim + 1)
    w_let, r_let = letters[: operand.ndim], letters[-1]
    batch_let = iter(letters[operand.ndim : operand.ndim + n_batch])
    kept = iter(i for i in range(operand.ndim) if i not in dn.collapsed_slice_dims)
    out_lab = "".join(
        w_let[next(kept)] if k in dn.offset_dims else next(batch_let)
        for k in range(base.ndim)
    )
    g_lab = "".join(c for k, c in enumerate(out_lab) if k not in dn.offset_dims)
    g_lab += "".join(
        r_let if lab == R else w_let[lab]
        for lab in fac_lab
        if lab not in dn.collapsed_slice_dims
    )
    o_lab = "".join(r_let if lab == R else w_let[lab] for lab in oth_lab)
    route = "in" if fac is operand.a else "out"
    return base, g, g_lab, oth, o_lab, out_lab, r_let, route


def gather(eqn, operand, indices):
    """Row lookup (``nn.Embed``): gather the factor holding the indexed axes, then @."""
    base, g, g_lab, oth, o_lab, out_lab, _, route = _gather_parts(eqn, operand, indices)
    g = g * jnp.asarray(operand.scale, g.dtype)
    lora = jnp.einsum(  # a lookup has no precision: as exact as the merged table's
        f"{g_lab},{o_lab}->{out_lab}",
        g,
        oth,
        preferred_element_type=base.dtype,
        precision=jax.lax.Precision.HIGHEST,
    )
    return _one_buffer_sum(base, lora), route


def gather_view(eqn, operand, indices) -> Sym:
    """A gather whose result is used as a weight (``x @ w[:, perm]``: columns
    permuted or picked): the gathered weight kept symbolic, its indexed factor
    gathered, for the contraction that consumes it to run factored."""
    base, g, g_lab, oth, o_lab, out_lab, r_let, route = _gather_parts(
        eqn, operand, indices
    )
    if not set(o_lab) - {r_let} <= set(out_lab):
        raise Unsupported("the other factor's axis is collapsed by the gather")
    pos = {c: k for k, c in enumerate(out_lab)} | {r_let: R}
    g_pos = tuple(pos[c] for c in g_lab)
    o_pos = tuple(pos[c] for c in o_lab)
    a, b, a_lab, b_lab = (
        (g, oth, g_pos, o_pos) if route == "in" else (oth, g, o_pos, g_pos)
    )
    return operand._with(base, a, b, a_lab, b_lab)


def ragged_dot(eqn, lhs, rhs, group_sizes):
    """``ragged_dot_general`` (a mixture of experts: row groups of ``lhs`` each meet
    one expert of ``rhs``) with stacked expert weights: the same grouped product
    through ``a``, then ``b``. The weight is frozen by `Sym`'s stop-gradient; JAX's
    own ragged-dot transposes give the factors' per-expert gradients."""
    if isinstance(lhs, Sym) or isinstance(group_sizes, Sym):
        raise Unsupported("the adapted weight is the ragged (row-grouped) operand")
    p = eqn.params
    if p.get("out_sharding") is not None:
        raise Unsupported("a ragged dot with an output sharding")
    dn = p["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    (g,) = dn.rhs_group_dimensions or (None,)
    if lb or rb or g is None or g not in rhs.stack_axes:
        raise Unsupported("a ragged dot other than experts stacked on a weight axis")
    if set(rc) != set(rhs.in_axes) or set(rhs.stack_axes) != {g}:
        raise Unsupported(
            f"contracts axes {tuple(rc)} of the weight, not its input axes "
            f"{rhs.in_axes} (stacked: {rhs.stack_axes})"
        )
    kind = type(dn)
    base = eqn.primitive.bind(lhs, rhs.w, group_sizes, **p)
    a_pos = {i: k for k, i in enumerate(rhs.a_lab)}
    b_pos = {i: k for k, i in enumerate(rhs.b_lab)}
    acc = _acc(base.dtype)
    t = eqn.primitive.bind(
        lhs,
        rhs.a.astype(lhs.dtype),
        group_sizes,
        **{
            **p,
            "preferred_element_type": acc,
            "ragged_dot_dimension_numbers": kind(
                dot_dimension_numbers=((lc, tuple(a_pos[i] for i in rc)), ((), ())),
                lhs_ragged_dimensions=dn.lhs_ragged_dimensions,
                rhs_group_dimensions=(a_pos[g],),
            ),
        },
    )
    t = t * jnp.asarray(rhs.scale, acc)
    free = [i for i in range(lhs.ndim) if i not in lc]  # t: (*free, r)
    (m,) = dn.lhs_ragged_dimensions
    lora = eqn.primitive.bind(
        t,
        rhs.b.astype(acc),
        group_sizes,
        **{
            **p,
            "preferred_element_type": acc,
            "ragged_dot_dimension_numbers": kind(
                dot_dimension_numbers=(((t.ndim - 1,), (b_pos[R],)), ((), ())),
                lhs_ragged_dimensions=(free.index(m),),
                rhs_group_dimensions=(b_pos[g],),
            ),
        },
    )
    # lora's axes: lhs free, then b's output axes in b's order; base's: rhs order
    outs = [i for i in rhs.b_lab if i not in (R, g)]
    order = sorted(range(len(outs)), key=lambda k: outs[k])
    lora = jnp.transpose(lora, [*range(len(free)), *(len(free) + k for k in order)])
    return _one_buffer_sum(base, lora), "in"


RULES = {
    "dot_general": dot_general,
    "ragged_dot_general": ragged_dot,
    "conv_general_dilated": conv_general_dilated,
    "gather": gather,
}
