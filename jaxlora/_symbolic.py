"""The symbolic value of an adapted weight inside the factored interpreter.

A `Sym` stands for the array ``w + scale · einsum(a, b)`` without forming it.
Its factors carry *axis labels*: each axis of ``a`` and ``b`` is either the index
of an axis of ``w`` or `R` (the rank axis, contracted between them). An axis of
``w`` found only in ``a`` is an input axis, only in ``b`` an output axis, in both a
stacked (layer) axis.

Cheap view operations (dtype casts, transposes, reshapes within a group, squeezes,
broadcasts, slices, reversals, scalar multiples) are applied to ``w`` and to the factors
so the result is again a `Sym`; everything else asks for `Sym.materialize`.
"""

from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp
from jax import lax
from jax.lax import GatherScatterMode

from jaxlora._node import accumulator

R = -1  # the label of the rank axis


def factor_fill(params: dict) -> dict:
    """A gather's params for a factor: an out-of-range row of a factor is 0, so the
    update adds nothing and the base's fill (NaN, or the value asked for) is the
    result, as for the merged weight, and no NaN reaches the factor gradients."""
    if params["mode"] != GatherScatterMode.FILL_OR_DROP:
        return params
    return {**params, "fill_value": 0}


class Unsupported(Exception):
    """A view that cannot be expressed on the factors (the caller materializes)."""


@jax.tree_util.register_pytree_node_class
class Sym:
    """``w + scale · einsum(a, b)`` with labelled factor axes (see module docstring)."""

    __slots__ = ("w", "a", "b", "a_lab", "b_lab", "scale", "path")

    def __init__(self, w, a, b, a_lab, b_lab, scale, path):
        self.w, self.a, self.b = w, a, b
        self.a_lab, self.b_lab = tuple(a_lab), tuple(b_lab)
        self.scale, self.path = scale, path

    def tree_flatten(self):
        return (self.w, self.a, self.b), (self.a_lab, self.b_lab, self.scale, self.path)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @classmethod
    def from_lora(cls, lw, path: str) -> Sym:
        """The symbolic value of a `LoraWeight` (``w`` gets no gradient)."""
        lw.check_rank()
        lay = lw.layout
        s = lay.stack_axes
        return cls(
            lax.stop_gradient(lw.w),
            lw.a,
            lw.b,
            (*s, *lay.in_axes, R),
            (*s, R, *lay.out_axes),
            lw.scale,
            path,
        )

    # -- structure -----------------------------------------------------------------
    @property
    def paths(self) -> tuple[str, ...]:
        """The parameter paths this value is made of (several after `concatenate`)."""
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def ndim(self):
        return len(self.w.shape)

    @property
    def in_axes(self):
        return tuple(i for i in self.a_lab if i != R and i not in self.b_lab)

    @property
    def out_axes(self):
        return tuple(i for i in self.b_lab if i != R and i not in self.a_lab)

    @property
    def stack_axes(self):
        return tuple(i for i in self.a_lab if i != R and i in self.b_lab)

    def _with(self, w, a, b, a_lab, b_lab, scale=None):
        scale = self.scale if scale is None else scale
        return Sym(w, a, b, a_lab, b_lab, scale, self.path)

    def letters(self, w_letters, r_letter):
        """Einsum subscripts of ``a`` and ``b`` given letters for w's axes and R."""
        pick = lambda lab: "".join(r_letter if i == R else w_letters[i] for i in lab)
        return pick(self.a_lab), pick(self.b_lab)

    def materialize(self):
        """The dense array ``w + scale · a @ b`` (as `LoraWeight.merged` forms it)."""
        w_let = string.ascii_letters[: self.ndim]
        sa, sb = self.letters(w_let, string.ascii_letters[self.ndim])
        acc = accumulator(self.w.dtype, self.a.dtype)
        # the factors cast first, as `LoraWeight.delta` does (bf16 factors of a
        # float32 model: a product rounded to bf16 would be ~1e-3 off the merge)
        delta = jnp.einsum(
            f"{sa},{sb}->{w_let}",
            self.a.astype(acc),
            self.b.astype(acc),
            precision=lax.Precision.HIGHEST,
        )
        return (self.w.astype(acc) + delta * self.scale).astype(self.w.dtype)

    # -- views: each returns a new Sym or raises Unsupported -------------------------
    def convert(self, w, new_dtype):
        if not jnp.issubdtype(new_dtype, jnp.floating):
            raise Unsupported(f"cast to non-floating {new_dtype}")
        a, b = self.a.astype(new_dtype), self.b.astype(new_dtype)
        return self._with(w, a, b, self.a_lab, self.b_lab)

    def transpose(self, w, perm):
        inv = {old: new for new, old in enumerate(perm)}
        rel = lambda lab: tuple(R if i == R else inv[i] for i in lab)
        return self._with(w, self.a, self.b, rel(self.a_lab), rel(self.b_lab))

    def map_factors(self, w, fn, a_lab=None, b_lab=None, scale=None):
        """Applies ``fn(factor, labels)`` to both factors."""
        a = fn(self.a, self.a_lab)
        b = fn(self.b, self.b_lab)
        a_lab = self.a_lab if a_lab is None else a_lab
        b_lab = self.b_lab if b_lab is None else b_lab
        return self._with(w, a, b, a_lab, b_lab, scale)

    def slice(self, w, starts, limits, strides):
        strides = strides or (1,) * self.ndim

        def fn(f, lab):
            st = [0 if i == R else starts[i] for i in lab]
            lim = [f.shape[k] if i == R else limits[i] for k, i in enumerate(lab)]
            sd = [1 if i == R else strides[i] for i in lab]
            return lax.slice(f, st, lim, sd)

        return self.map_factors(w, fn)

    def dynamic_slice(self, w, starts, sizes):
        def fn(f, lab):
            zero = jnp.zeros((), jnp.asarray(starts[0]).dtype) if starts else 0
            st = [zero if i == R else starts[i] for i in lab]
            sz = [f.shape[k] if i == R else sizes[i] for k, i in enumerate(lab)]
            return lax.dynamic_slice(f, st, sz)

        return self.map_factors(w, fn)

    def gather_stacked(self, w, indices, params):
        """A gather that indexes stacked axes only (``jnp.take(w, i, 0)``: a layer
        picked by a traced index; ``w[ids]``: several layers): the same gather on
        each factor. Index batch axes are new stacked axes (in both factors)."""
        dn, sizes = params["dimension_numbers"], params["slice_sizes"]
        n_batch = w.ndim - len(dn.offset_dims)
        batch_pos = tuple(k for k in range(w.ndim) if k not in dn.offset_dims)
        kept = [i for i in range(self.ndim) if i not in dn.collapsed_slice_dims]
        out_pos = dict(zip(kept, dn.offset_dims, strict=True))
        fill = factor_fill(params)  # an out-of-range layer: no update, the base's fill

        def fn(f, lab):
            pos = {i: k for k, i in enumerate(lab)}
            collapsed = tuple(pos[i] for i in dn.collapsed_slice_dims)
            # start indices of axes this factor lacks (taken whole, clamped to 0
            # under vmap) are dropped
            keep = [k for k, i in enumerate(dn.start_index_map) if i in pos]
            fdn = type(dn)(
                offset_dims=tuple(range(n_batch, n_batch + f.ndim - len(collapsed))),
                collapsed_slice_dims=collapsed,
                start_index_map=tuple(pos[dn.start_index_map[k]] for k in keep),
                operand_batching_dims=(),
                start_indices_batching_dims=(),
            )
            f_sizes = tuple(
                f.shape[k] if i == R else sizes[i] for k, i in enumerate(lab)
            )
            idx = indices
            if len(keep) < len(dn.start_index_map):
                idx = jnp.take(indices, jnp.asarray(keep), axis=indices.ndim - 1)
            return lax.gather_p.bind(
                f,
                idx,
                **{**fill, "dimension_numbers": fdn, "slice_sizes": f_sizes},
            )

        rel = lambda lab: (
            batch_pos
            + tuple(  # noqa: E731
                R if i == R else out_pos[i]
                for i in lab
                if i not in dn.collapsed_slice_dims
            )
        )
        return self.map_factors(w, fn, rel(self.a_lab), rel(self.b_lab))

    def pad(self, w, config):
        """``lax.pad``: each factor padded (or cropped) along the weight axes it
        holds, with zeros, so the padding is the base's alone."""

        def fn(f, lab):
            cfg = [(0, 0, 0) if i == R else tuple(config[i]) for i in lab]
            return lax.pad(f, jnp.zeros((), f.dtype), cfg)

        return self.map_factors(w, fn)

    def rev(self, w, dims):
        def fn(f, lab):
            return lax.rev(f, [k for k, i in enumerate(lab) if i in dims])

        return self.map_factors(w, fn)

    def squeeze(self, w, dims):
        dims = set(d % self.ndim for d in dims)
        keep = [i for i in range(self.ndim) if i not in dims]
        new = {old: k for k, old in enumerate(keep)}

        def fn(f, lab):
            return jnp.squeeze(f, tuple(k for k, i in enumerate(lab) if i in dims))

        rel = lambda lab: tuple(R if i == R else new[i] for i in lab if i not in dims)
        return self.map_factors(w, fn, rel(self.a_lab), rel(self.b_lab))

    def broadcast(self, w, shape, bdims):
        """``broadcast_in_dim``: a new axis joins ``b`` when the nearest old axis
        before it is an output axis (a GQA-style ``jnp.repeat`` of a kernel's heads,
        merged into them by the next reshape), else ``a`` (an input-side broadcast).
        The factor is constant along it, so either side is the same update."""
        new_axes = [k for k in range(len(shape)) if k not in bdims]
        old_of = {new: old for old, new in enumerate(bdims)}

        def side(k, out):
            before = [old_of[j] for j in range(k) if j in old_of]
            return "b" if shape[k] != 1 and before and before[-1] in out else "a"

        # a size-1 axis grown to more (``w[:, :, None]`` broadcast to g copies)
        # sits where a new axis at its place would
        grown_units = {
            i for i, n in enumerate(self.shape) if n == 1 and shape[bdims[i]] != 1
        }
        # (only from a to b: a unit axis already on the output side stays there)
        want_in = set(self.in_axes) - {
            i for i in grown_units if side(bdims[i], set(self.out_axes)) == "b"
        }
        sym = self.regroup_units(want_in) if self.can_regroup(want_in) else self
        out = set(sym.out_axes)
        grown = {"a": [k for k in new_axes if side(k, out) == "a"]}
        grown["b"] = [k for k in new_axes if side(k, out) == "b"]

        def grow(f, lab, extra):
            kept = tuple(
                f.shape[k] if i == R else shape[bdims[i]] for k, i in enumerate(lab)
            )
            f = jnp.broadcast_to(f, kept).reshape(kept + (1,) * len(extra))
            return jnp.broadcast_to(f, kept + tuple(shape[k] for k in extra))

        rel = lambda lab, extra: (
            tuple(R if i == R else bdims[i] for i in lab) + tuple(extra)
        )
        a = grow(sym.a, sym.a_lab, grown["a"])
        b = grow(sym.b, sym.b_lab, grown["b"])
        a_lab, b_lab = rel(sym.a_lab, grown["a"]), rel(sym.b_lab, grown["b"])
        return sym._with(w, a, b, a_lab, b_lab)

    def tile(self, w, reps):
        """``jnp.tile``: each factor tiled along its own axes of w (a stacked axis in
        both); ΔW's blocks repeat as the factors' do."""

        def fn(f, lab):
            return jnp.tile(f, tuple(1 if i == R else reps[i] for i in lab))

        return self.map_factors(w, fn)

    def scalar_mul(self, w, c):
        return self._with(
            w, self.a * c.astype(self.a.dtype), self.b, self.a_lab, self.b_lab
        )

    def can_regroup(self, want_in) -> bool:
        """Whether `regroup_units` can make ``want_in`` the input axes: only size-1,
        non-stacked axes move (none need to, e.g. for a weight whose other side was
        squeezed away)."""
        want_in = set(want_in)
        units = {i for i, n in enumerate(self.shape) if n == 1}
        free = set(range(self.ndim)) - set(self.stack_axes)
        moves = set(self.in_axes) ^ want_in
        return moves <= units & free and want_in <= free

    def regroup_units(self, want_in) -> Sym:
        """The same Sym with its size-1 axes moved so its input axes are ``want_in``.

        A unit axis (from ``w[:, None]`` or a reshape to ``(d, 1, h)``) carries no
        data, so it may sit in either factor; views put new ones on the input side,
        and a contraction that wants them on the other side moves them here.
        Raises `Unsupported` if more than unit axes would have to move.
        """
        want_in, cur_in = set(want_in), set(self.in_axes)
        if not self.can_regroup(want_in):
            raise Unsupported("regrouping would move axes that are not of size 1")
        if want_in == cur_in:
            return self
        a, a_lab, b, b_lab = self.a, list(self.a_lab), self.b, list(self.b_lab)
        for i in sorted(cur_in - want_in):  # input side -> output side
            a = jnp.squeeze(a, a_lab.index(i))
            a_lab.remove(i)
            b, b_lab = b[..., None], [*b_lab, i]
        for i in sorted(want_in - cur_in):  # output side -> input side
            b = jnp.squeeze(b, b_lab.index(i))
            b_lab.remove(i)
            a, a_lab = a[..., None], [*a_lab, i]
        return self._with(self.w, a, b, tuple(a_lab), tuple(b_lab))

    def reshape(self, w, new_sizes):
        """A reshape that only splits or merges axes within one group."""
        old = self.shape
        if math.prod(old) != math.prod(new_sizes):
            raise Unsupported("reshape changes the size")
        sym = self.squeeze(self.w, [i for i, n in enumerate(old) if n == 1])
        cur = tuple(n for n in old if n != 1)  # non-unit old axes
        new_nu = [k for k, n in enumerate(new_sizes) if n != 1]
        blocks, i, j = [], 0, 0
        while i < len(cur):
            bi, bj, po, pn = [i], [j], cur[i], new_sizes[new_nu[j]]
            while po != pn:
                if po < pn:
                    i += 1
                    bi.append(i)
                    po *= cur[i]
                else:
                    j += 1
                    bj.append(j)
                    pn *= new_sizes[new_nu[j]]
            blocks.append((bi, bj))
            i, j = i + 1, j + 1
        first = {bi[0]: (bi, bj) for bi, bj in blocks}
        cls = lambda x: (x in sym.a_lab, x in sym.b_lab)  # noqa: E731

        def fn(f, lab):
            out_lab, out_shape, k = [], [], 0
            while k < len(lab):
                x = lab[k]
                if x == R:
                    out_lab.append(R)
                    out_shape.append(f.shape[k])
                    k += 1
                    continue
                if x not in first:
                    raise Unsupported("reshape mixes axes across factor groups")
                bi, bj = first[x]
                if (
                    tuple(lab[k : k + len(bi)]) != tuple(bi)
                    or len({cls(y) for y in bi}) > 1
                ):
                    raise Unsupported("reshape merges axes of different groups")
                out_lab += [new_nu[y] for y in bj]
                out_shape += [new_sizes[new_nu[y]] for y in bj]
                k += len(bi)
            return f.reshape(out_shape), tuple(out_lab)

        def canon(f, lab):  # w-axes ascending, then R: merged runs become contiguous
            order = sorted(range(len(lab)), key=lambda k: (lab[k] == R, lab[k]))
            return jnp.transpose(f, order), tuple(lab[k] for k in order)

        (a, a_lab), (b, b_lab) = (
            fn(*canon(sym.a, sym.a_lab)),
            fn(*canon(sym.b, sym.b_lab)),
        )
        units = [k for k, n in enumerate(new_sizes) if n == 1]
        a = a.reshape(a.shape + (1,) * len(units))
        return self._with(w, a, b, a_lab + tuple(units), b_lab)


def concatenate(operands, dimension: int, w) -> Sym:
    """``concatenate(operands, dimension)`` with some operands `Sym`: again a `Sym`.

    The parts' rank axes are laid side by side (rank Σr_i, scales folded into the
    factor that is not concatenated): along an output axis (fused q/k/v kernels)
    ``a = [s_1·a_1 … s_n·a_n]`` and ``b`` block-diagonal, each ``b_i`` on its own rank
    rows and its own columns; along an input axis the other way round. A plain array
    among the operands is a part with no update (zero blocks).
    """
    syms = [x for x in operands if isinstance(x, Sym)]
    ref = syms[0]
    if any(x.a_lab != ref.a_lab or x.b_lab != ref.b_lab for x in syms):
        raise Unsupported("concatenated weights have different layouts")
    if dimension in ref.stack_axes:
        raise Unsupported("concatenated along a stacked (layer) axis")
    # `cat`: the factor holding the concatenated axis; `other`: the one stacked on R
    on_b = dimension in ref.b_lab
    cat_lab, other_lab = (ref.b_lab, ref.a_lab) if on_b else (ref.a_lab, ref.b_lab)
    dtype = jnp.result_type(*(f for x in syms for f in (x.a, x.b)))
    ranks = [x.a.shape[x.a_lab.index(R)] for x in syms]
    total, r_cat, r_other = sum(ranks), cat_lab.index(R), other_lab.index(R)
    k_cat = cat_lab.index(dimension)
    blocks, others, start = [], [], 0
    for x in operands:
        if not isinstance(x, Sym):
            shape = [
                total if i == R else x.shape[i] if i == dimension else ref.shape[i]
                for i in cat_lab
            ]
            blocks.append(jnp.zeros(shape, dtype))
            continue
        r = x.a.shape[x.a_lab.index(R)]
        f_cat, f_other = (x.b, x.a) if on_b else (x.a, x.b)
        pad = [(0, 0)] * f_cat.ndim
        pad[r_cat] = (start, total - start - r)
        blocks.append(jnp.pad(f_cat.astype(dtype), pad))
        others.append(f_other.astype(dtype) * jnp.asarray(x.scale, dtype))
        start += r
    f_cat = jnp.concatenate(blocks, axis=k_cat)
    f_other = jnp.concatenate(others, axis=r_other)
    a, b = (f_other, f_cat) if on_b else (f_cat, f_other)
    paths = tuple(dict.fromkeys(p for x in syms for p in x.paths))
    return Sym(w, a, b, ref.a_lab, ref.b_lab, 1.0, paths)


def stack(operands, axis: int, w) -> Sym:
    """``stack(operands, axis)`` (per-layer weights stacked to scan over them) with
    some operands `Sym`: a `Sym` whose new axis is a stacked axis of both factors,
    each layer keeping its own factors (scales folded into ``a``). Parts of smaller
    rank (EVA, ``rank_pattern``) are padded with zero rank columns of ``a`` and zero
    rows of ``b`` to the largest rank: their product, and so the layer, is unchanged.
    A plain array among the operands is a layer with no update (zero factors). The
    parts must share their layout.
    """
    syms = [x for x in operands if isinstance(x, Sym)]
    ref = syms[0]
    if any(x.a_lab != ref.a_lab or x.b_lab != ref.b_lab for x in syms):
        raise Unsupported("stacked weights have different layouts")
    ra, rb = ref.a_lab.index(R), ref.b_lab.index(R)
    rank = max(x.a.shape[ra] for x in syms)
    shift = lambda lab: (axis,) + tuple(i if i == R or i < axis else i + 1 for i in lab)  # noqa: E731
    dtype = jnp.result_type(*(f for x in syms for f in (x.a, x.b)))

    def padded(f, k):
        pad = [(0, 0)] * f.ndim
        pad[k] = (0, rank - f.shape[k])
        return jnp.pad(f, pad)[None]

    a_parts, b_parts = [], []
    for x in operands:
        if isinstance(x, Sym):
            a_parts.append(padded(x.a.astype(dtype) * jnp.asarray(x.scale, dtype), ra))
            b_parts.append(padded(x.b.astype(dtype), rb))
        else:
            a_parts.append(padded(jnp.zeros(ref.a.shape, dtype), ra))
            b_parts.append(padded(jnp.zeros(ref.b.shape, dtype), rb))
    paths = tuple(dict.fromkeys(p for x in syms for p in x.paths))
    return Sym(
        w,
        jnp.concatenate(a_parts),
        jnp.concatenate(b_parts),
        shift(ref.a_lab),
        shift(ref.b_lab),
        1.0,
        paths,
    )


def is_sym(x) -> bool:
    return isinstance(x, Sym)


def fresh_letters(n: int, used: str = "") -> str:
    out = [c for c in string.ascii_letters if c not in used][:n]
    if len(out) < n:
        raise Unsupported("too many axes for an einsum")
    return "".join(out)
