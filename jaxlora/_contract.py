"""Factored rules for the primitives that contract an adapted weight.

Each rule gets the equation's inputs, one of them a `Sym` standing for
``W = w + s · a @ b``, and returns ``op(x, w) + s · op'(op''(x, a), b)`` so the product
``a @ b`` is never formed and ``w`` (stop-gradient'ed) gets no weight gradient.
A rule raises `Unsupported` with a reason when the use does not fit; the interpreter
then materializes the weight for that one use.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlora._symbolic import R, Sym, Unsupported, fresh_letters


def _sum(base, lora):
    return base + lora.astype(base.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lora_matmul(x, w, f1, f2, scale, dtype):
    """``x @ w + scale · (x @ f1) @ f2`` for 2-D operands, as ONE matmul.

    The forward appends ``t = scale · x @ f1`` to the contraction
    (``[x, t] @ [w; f2]``) so the output is a single buffer: a separate add would be
    fused by XLA into every consumer and keep both summands alive for the backward
    pass. The backward computes the input gradient and the factor gradients only
    (``w`` is frozen: its cotangent is zero).
    """
    return _lora_matmul_fwd(x, w, f1, f2, scale, dtype)[0]


def _lora_matmul_fwd(x, w, f1, f2, scale, dtype):
    t = jnp.dot(x, f1, preferred_element_type=dtype) * jnp.asarray(scale, dtype)
    xt = jnp.concatenate([x.astype(dtype), t], axis=1)
    # A dependency on t that is exactly 0 (even for non-finite t) keeps XLA from
    # hoisting every weight concatenation to the program start, all alive at once.
    tie = (t[:1, :1] != t[:1, :1]).astype(dtype) * 0
    wf = jnp.concatenate([w.astype(dtype), f2.astype(dtype) + tie], axis=0)
    return jnp.dot(xt, wf, preferred_element_type=dtype), (x, t, w, f1, f2)


def _lora_matmul_bwd(scale, dtype, res, g):
    x, t, w, f1, f2 = res
    dt = jnp.dot(g, f2.T.astype(g.dtype), preferred_element_type=dtype)
    df2 = jnp.dot(t.T, g.astype(t.dtype), preferred_element_type=dtype)
    dts = dt * jnp.asarray(scale, dtype)
    df1 = jnp.dot(x.T.astype(dtype), dts, preferred_element_type=dtype)
    dx = jnp.dot(g, w.T.astype(g.dtype), preferred_element_type=dtype)
    dx = dx + jnp.dot(dts, f1.T.astype(dtype), preferred_element_type=dtype)
    return (
        dx.astype(x.dtype),
        jnp.zeros_like(w),
        df1.astype(f1.dtype),
        df2.astype(f2.dtype),
    )


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def _fused(x, sym, first, sc, xc, sym_lhs, dtype):
    """The single-matmul path for a weight with no stacked axes and no batch dims."""
    x_free = [i for i in range(x.ndim) if i not in xc]
    s_free = [i for i in range(sym.ndim) if i not in sc]
    x2 = jnp.transpose(x, x_free + list(xc))
    w2 = jnp.transpose(sym.w, list(sc) + s_free)
    f1, l1 = (sym.a, sym.a_lab) if first == "a" else (sym.b, sym.b_lab)
    f2, l2 = (sym.b, sym.b_lab) if first == "a" else (sym.a, sym.a_lab)
    f1 = jnp.transpose(f1, [l1.index(i) for i in sc] + [l1.index(R)])
    f2 = jnp.transpose(f2, [l2.index(R)] + [l2.index(i) for i in s_free])
    m = math.prod(x2.shape[: len(x_free)])
    k = math.prod(w2.shape[: len(sc)])
    n = math.prod(w2.shape[len(sc) :])
    y = _lora_matmul(
        x2.reshape(m, k),
        w2.reshape(k, n),
        f1.reshape(k, -1),
        f2.reshape(-1, n),
        sym.scale,
        dtype,
    )
    y = y.reshape(x2.shape[: len(x_free)] + w2.shape[len(sc) :])
    if sym_lhs:
        nx = len(x_free)
        y = jnp.transpose(y, list(range(nx, y.ndim)) + list(range(nx)))
    return y


def _two_step(first, first_lab, second, second_lab, x, x_lab, out_lab, scale, dtype):
    """``einsum(einsum(x, first), second)`` keeping only the letters still needed."""
    keep = set(second_lab) | set(out_lab)
    t_lab = "".join(dict.fromkeys(c for c in x_lab + first_lab if c in keep))
    t = jnp.einsum(
        f"{x_lab},{first_lab}->{t_lab}", x, first, preferred_element_type=dtype
    )
    t = t * jnp.asarray(scale, t.dtype)
    return jnp.einsum(
        f"{t_lab},{second_lab}->{out_lab}", t, second, preferred_element_type=dtype
    )


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
    if set(sc) == set(sym.in_axes) and sc:
        first, second, route = "a", "b", "in"
    elif set(sc) == set(sym.out_axes) and sc:
        first, second, route = "b", "a", "out"
    else:
        raise Unsupported(
            f"contracts axes {tuple(sc)} of the weight, neither its input axes "
            f"{sym.in_axes} nor its output axes {sym.out_axes}"
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
    if not sb and not sym.stack_axes and 0 not in x.shape + sym.shape:
        return _fused(x, sym, first, sc, xc, sym_lhs, dtype), route
    base = eqn.primitive.bind(*((sym.w, x) if sym_lhs else (x, sym.w)), **eqn.params)
    fa = (sym.a, a_lab) if first == "a" else (sym.b, b_lab)
    fb = (sym.b, b_lab) if second == "b" else (sym.a, a_lab)
    lora = _two_step(*fa, *fb, x, "".join(x_let), out_lab, sym.scale, dtype)
    return _sum(base, lora), route


def conv_general_dilated(eqn, lhs, rhs):
    """Weight as a conv kernel: ``a`` as a conv to r channels, then b."""
    if isinstance(lhs, Sym):
        raise Unsupported(
            "the adapted weight is the convolution's input, not its kernel"
        )
    p = eqn.params
    dn = p["dimension_numbers"]
    o_dim, i_dim, *spatial = dn.rhs_spec
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise Unsupported("grouped convolution")
    if rhs.stack_axes or set(rhs.out_axes) != {o_dim}:
        raise Unsupported(f"kernel output axis {o_dim} is not the weight's output axis")
    if set(rhs.in_axes) != {i_dim, *spatial}:
        raise Unsupported(
            "kernel window and input axes are not the weight's input axes"
        )
    base = eqn.primitive.bind(lhs, rhs.w, **p)
    want = [R if k == o_dim else k for k in range(rhs.ndim)]
    a_k = jnp.transpose(rhs.a, [rhs.a_lab.index(k) for k in want])
    t = eqn.primitive.bind(lhs, a_k, **p)
    t = t * jnp.asarray(rhs.scale, t.dtype)
    letters = fresh_letters(t.ndim + 1)
    t_lab, o_let = letters[: t.ndim], letters[-1]
    f = dn.out_spec[1]
    out_lab = t_lab[:f] + o_let + t_lab[f + 1 :]
    b_lab = "".join(t_lab[f] if k == R else o_let for k in rhs.b_lab)
    lora = jnp.einsum(
        f"{t_lab},{b_lab}->{out_lab}", t, rhs.b, preferred_element_type=base.dtype
    )
    return _sum(base, lora), "in"


def gather(eqn, operand, indices):
    """Row lookup (``nn.Embed``): gather the factor holding the indexed axes, then @."""
    if not isinstance(operand, Sym) or isinstance(indices, Sym):
        raise Unsupported("the adapted weight is used as gather indices")
    p = eqn.params
    dn, sizes = p["dimension_numbers"], p["slice_sizes"]
    if dn.operand_batching_dims:
        raise Unsupported("batched gather")
    idx = set(dn.start_index_map)
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
        start_index_map=tuple(pos[i] for i in dn.start_index_map),
        operand_batching_dims=(),
        start_indices_batching_dims=(),
    )
    f_sizes = tuple(
        fac.shape[k] if lab == R else sizes[lab] for k, lab in enumerate(fac_lab)
    )
    g = eqn.primitive.bind(
        fac, indices, **{**p, "dimension_numbers": fdn, "slice_sizes": f_sizes}
    )
    g = g * jnp.asarray(operand.scale, g.dtype)
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
    lora = jnp.einsum(
        f"{g_lab},{o_lab}->{out_lab}", g, oth, preferred_element_type=base.dtype
    )
    return _sum(base, lora), "in" if fac is operand.a else "out"


RULES = {
    "dot_general": dot_general,
    "conv_general_dilated": conv_general_dilated,
    "gather": gather,
}
