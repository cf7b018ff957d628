"""Infer each weight's input / output / stacked axes from how the model uses it.

`infer_layouts` traces ``apply_fn(params, *example_args)`` to a jaxpr (abstractly: no
FLOPs are run) and follows every floating parameter with ``ndim >= 2`` through view
operations (casts, transposes, reshapes, slices) and into nested ``jit``,
``checkpoint``, ``shard_map``, custom-derivative functions, ``scan``, ``while`` and
``cond``. The first recognisable consumer decides its `Layout`:

* ``dot_general``: contracted axes are inputs, free axes outputs, batch axes stacked;
* ``conv_general_dilated`` (as kernel): window and input-feature axes are inputs;
* ``gather`` of an array of ids (an embedding lookup): the indexed axes are
  inputs; this wins over a ``dot_general`` use of the same table (``attend``);
* ``scan`` over the weight: the scanned leading axis is a stacked (layer) axis, and
  so is an axis indexed away (``w[i]`` or ``jnp.take(w, i, 0)`` at one index: a
  loop over layers that picks one).

Values computed from the model's inputs are marked as activations (loop carries
included, to a fixed point), so that a contraction applying a weight to one decides
over a contraction on weights or constants alone (a spectral norm's ``w @ u``). Rows
gathered by ids are a lookup, except where the ids do not depend on the inputs, are
not of the first axis, and a contraction applies the rows to an activation: then the
weight was reordered or subset (``x @ w[:, perm]``) and that contraction decides.
Matrices gathered by ids (experts, layers) are followed as the weight itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from jaxlora._contract import gather_indexed_axes
from jaxlora._node import Conv
from jaxlora._node import Layout
from jaxlora._paths import path_str

PyTree = Any


class _T:
    """A value derived from parameters: ``parts`` pairs a leaf with ``axes`` (axes[k]:
    the leaf's original axes behind axis k); several parts after a concatenation,
    each with its own axes (the parts may be oriented differently)."""

    __slots__ = ("parts", "plain", "cut", "lookup", "data", "vectors")

    def __init__(
        self,
        parts,
        plain: bool = True,
        cut=frozenset(),
        lookup=None,
        data=False,
        vectors=True,
    ):
        self.parts = tuple(
            (leaf, tuple(frozenset(a) for a in axes)) for leaf, axes in parts
        )
        self.plain = plain  # False once a view changed values (a flip, a negation)
        self.cut = frozenset(cut)  # (leaf, axis) whose extent a slice or pad changed
        # the lookup (its index in `_Walker.lookups`) whose rows this holds: an
        # embedding's activations, unless a contraction uses them as its weight
        # (``x @ w[:, perm]``: a reordered weight)
        self.lookup = lookup
        self.data = data  # looked up by ids that depend on the model's inputs
        # rows that are vectors (a table's), followed through views only; matrices
        # picked by ids (experts, layers) are followed everywhere, as weights are
        self.vectors = vectors

    @property
    def ndim(self):
        return len(self.parts[0][1])

    def map(self, fn):
        """The same leaves with each part's axes through ``fn``."""
        parts = ((leaf, fn(axes)) for leaf, axes in self.parts)
        return _T(parts, self.plain, self.cut, self.lookup, self.data, self.vectors)

    def valued(self, plain=False, cut=frozenset()):
        """The same axes; other values (``plain=False``) or ``cut`` extents."""
        return _T(
            self.parts,
            self.plain and plain,
            self.cut | cut,
            self.lookup,
            self.data,
            self.vectors,
        )


#: a value that depends on the model's inputs (an activation), not a weight view
_DATA = object()


def _union(sets):
    return frozenset().union(*sets)


def _depends_on_inputs(ins) -> bool:
    return any(x is _DATA or isinstance(x, _T) and x.data for x in ins)


class _Walker:
    def __init__(self, shapes: dict[int, tuple[int, ...]]):
        # per leaf: (kind, contracted axes, batch axes, axes present at the use)
        self.obs: dict[int, list[tuple[str, frozenset, frozenset, frozenset]]] = {}
        self.stack: dict[int, set[int]] = {}
        self.picked: dict[int, set[int]] = {}  # axes indexed away (w[i])
        # per leaf, per conv use: (kernel axes as (in, *window), or None where a
        # view merged axes or changed values, groups, rhs dilation)
        self.convs: dict[int, list[tuple]] = {}
        self.shapes = shapes
        # per gather by an array of ids: (leaf, index of its "gather" in obs[leaf]);
        # per (gather, leaf): the contractions that used its rows as their weight
        self.lookups: list[list[tuple[int, int]]] = []
        self.reused: dict[tuple[int, int], list[tuple]] = {}

    def note(self, t, kind, ins, stack=(), applied=False):
        """Records a use contracting axes ``ins`` (and batching ``stack``) of ``t``
        (``applied``: to an activation); of the rows of a lookup, as a use of the
        weight they were gathered from."""
        for leaf, axes in t.parts:
            use = (
                kind,
                _union(axes[i] for i in ins),
                _union(axes[i] for i in stack),
                _union(axes),
                applied,
            )
            if t.lookup is None:
                self.obs.setdefault(leaf, []).append(use)
            else:
                self.reused.setdefault((t.lookup, leaf), []).append(use)

    def event(self, t, ids, vectors=True) -> _T:
        """``t`` as the rows of a lookup (by ``ids``) just noted in ``obs``."""
        g = len(self.lookups)
        self.lookups.append([(leaf, len(self.obs[leaf]) - 1) for leaf, _ in t.parts])
        return _T(t.parts, t.plain, t.cut, g, ids is _DATA, vectors)

    def note_lookup(self, t, p, shape, n_out, ids):
        """Records a gather from ``t`` as a lookup; returns its rows as a view where
        the ids are an array that does not depend on the model's inputs (a
        permutation, a fixed subset) and every axis not indexed is taken whole (each
        output axis then holds one weight axis: the ids' axes the indexed ones)."""
        indexed = gather_indexed_axes(p, shape)
        self.note(t, "gather", indexed)
        dn, sizes = p["dimension_numbers"], p["slice_sizes"]
        kept = [i for i in range(len(shape)) if i not in dn.collapsed_slice_dims]
        window = any(sizes[i] != (1 if i in indexed else shape[i]) for i in kept)
        if t.lookup is not None or dn.operand_batching_dims or window:
            return None
        if n_out == len(dn.offset_dims):  # one id: a row (or a layer, see _is_pick)
            return None
        # ids from the inputs, or rows of the first axis (a table's, nn.Embed's
        # learned queries E[arange(n)] included): a lookup, as q @ items[ids].T is
        if ids is _DATA or 0 in indexed:
            return None

        def rows(ax):
            new = [_union(ax[i] for i in indexed)] * n_out
            for k, i in zip(dn.offset_dims, kept, strict=True):
                new[k] = frozenset() if i in indexed else ax[i]
            return new

        return self.event(t, ids).map(rows)

    def note_conv(self, t, p, shape, lhs=None):
        """Records how a convolution reads ``t`` (of ``shape``) as its kernel (see
        `Conv`): its input-feature axis, then its window axes in the order of the
        input's spatial axes (as a torch twin's ``(in, *window)`` weight lies)."""
        dn = p["dimension_numbers"]
        self.note(t, "conv", dn.rhs_spec[1:], applied=lhs is _DATA)
        groups = p["feature_group_count"] * p["batch_group_count"]
        spatial = zip(dn.lhs_spec[2:], dn.rhs_spec[2:], strict=True)
        window = [w for _, w in sorted(spatial)]  # paired by the input's axis order
        # a transposed convolution (input dilation) is no conv of PEFT's
        plain = t.plain and all(d == 1 for d in p["lhs_dilation"])
        dims = (dn.rhs_spec[1], *window)
        for leaf, axes in t.parts:
            order = [axes[i] for i in dims]
            # the weight's own axes, uncut, not split, tiled or joined to others
            whole = not any((leaf, a) in t.cut for ax in order for a in ax) and all(
                len(ax) == 1 and shape[i] == self.shapes[leaf][next(iter(ax))]
                for i, ax in zip(dims, order, strict=True)
            )
            kernel_axes = (
                tuple(next(iter(a)) for a in order) if plain and whole else None
            )
            use = (kernel_axes, groups, tuple(p["rhs_dilation"]))
            self.convs.setdefault(leaf, []).append(use)

    def walk(self, jaxpr, args):
        env = {}
        read = lambda v: None if isinstance(v, Literal) else env.get(v)  # noqa: E731
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            data = _depends_on_inputs(ins)
            if any(isinstance(x, _T) for x in ins):
                outs = self.eqn(eqn, ins)
            elif data:
                outs = [_DATA] * len(eqn.outvars)
            else:
                continue
            for v, x in zip(eqn.outvars, outs, strict=False):
                if isinstance(x, _T) or x is _DATA:
                    env[v] = x
                elif data:  # an activation (x @ w), or a value computed from one
                    env[v] = _DATA
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins):
        name, p = eqn.primitive.name, eqn.params
        weights = [x for x in ins if isinstance(x, _T) and x.lookup is None]
        looked_up = [x for x in ins if isinstance(x, _T) and x.lookup is not None]
        # rows of a lookup are a weight where a contraction applies them to an
        # activation (x @ w[:, perm]); met by a weight, or by a value computed from
        # weights alone (a weight-normed or dequantized kernel), they are activations
        vectors = any(x.vectors for x in looked_up)
        if looked_up and (
            vectors
            and name not in _ROWS_OPS
            or name == "dot_general"
            and (weights or len(looked_up) > 1 or _DATA not in ins[:2])
        ):
            ins = [
                (_DATA if x.data else None) if any(x is y for y in looked_up) else x
                for x in ins
            ]
            if not weights:
                return [None] * len(eqn.outvars)
        t = next(x for x in ins if isinstance(x, _T))
        if name in ("rev", "neg") and ins[0] is t:  # same axes, other values
            return [t.valued()]
        if name in ("slice", "dynamic_slice", "pad") and ins[0] is t:
            # the same axes; an axis whose extent changes holds part of the weight
            # (a cut window, or a layer picked by w[i], squeezed away next) or
            # more than it (padding)
            old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            changed = [
                i for i, (m, n) in enumerate(zip(old, new, strict=True)) if m != n
            ]
            cut = {
                (leaf, a) for leaf, axes in t.parts for i in changed for a in axes[i]
            }
            return [t.valued(plain=True, cut=cut)]
        if name in _IDENTITY:  # views of the first operand (not of an index or a pad)
            return [t if ins[0] is t else None]
        if name in ("mul", "div"):  # a weight scaled (w * gate), not x * norm scale
            k = 0 if ins[0] is t else 1
            scalar = math.prod(eqn.invars[1 - k].aval.shape) == 1
            if not (scalar and (k == 0 or name == "mul")):
                return [None]
            return [t.valued()]  # same axes, other values
        if name == "transpose":
            return [t.map(lambda ax: [ax[i] for i in p["permutation"]])]
        if name == "split":
            return [t] * len(eqn.outvars)
        if name in ("squeeze", "unstack") or _is_pick(eqn, ins, t):
            if name == "squeeze":
                dims = {d % t.ndim for d in p["dimensions"]}
            elif name == "unstack":
                dims = {p["axis"] % t.ndim}
            else:  # jnp.take(w, i, 0): the collapsed axes are picked
                dims = set(p["dimension_numbers"].collapsed_slice_dims)
            for leaf, axes in t.parts:  # one layer picked (w[i]): a layer axis
                picked = _union(axes[d] for d in dims)
                sized = {a for a in picked if self.shapes[leaf][a] > 1}
                self.picked.setdefault(leaf, set()).update(sized)
            if name == "gather":  # index batch axes (an array of ids) hold no w axis
                offset = p["dimension_numbers"].offset_dims
                n_out = eqn.outvars[0].aval.ndim
                if n_out > len(offset):  # an array of ids: a lookup unless contracted
                    shape = eqn.invars[0].aval.shape
                    self.note(t, "rows", gather_indexed_axes(p, shape))
                    t = self.event(t, ins[1], vectors=False)

                def kept(ax):
                    new = [frozenset()] * n_out
                    rest = [a for i, a in enumerate(ax) if i not in dims]
                    for k, a in zip(offset, rest, strict=True):
                        new[k] = a
                    return new

                return [t.map(kept)]
            out = t.map(lambda ax: [a for i, a in enumerate(ax) if i not in dims])
            return [out] * len(eqn.outvars)
        if name == "broadcast_in_dim":

            def grow(ax):
                new = [frozenset()] * len(p["shape"])
                for i, d in enumerate(p["broadcast_dimensions"]):
                    new[d] = ax[i]
                return new

            return [t.map(grow)]
        if name == "concatenate":  # e.g. q, k, v kernels fused into one matmul
            ts = [x for x in ins if isinstance(x, _T)]
            plain = all(x.plain for x in ts)
            cut = _union(x.cut for x in ts)
            return [_T((part for x in ts for part in x.parts), plain, cut)]
        if name == "stack":  # per-layer weights stacked: a new (layer) axis
            k = p["axis"]
            parts = [
                x.map(lambda ax: [*ax[:k], (), *ax[k:]])
                for x in ins
                if isinstance(x, _T)
            ]
            plain, cut = all(x.plain for x in parts), _union(x.cut for x in parts)
            return [_T((part for x in parts for part in x.parts), plain, cut)]
        if name == "reshape" and ins[0] is t:
            perm = p.get("dimensions") or tuple(range(t.ndim))  # transposed first
            old = tuple(eqn.invars[0].aval.shape[i] for i in perm)
            return [
                t.map(
                    lambda ax: _reshape_axes(old, p["new_sizes"], [ax[i] for i in perm])
                )
            ]
        if name == "dot_general" and len([x for x in ins if isinstance(x, _T)]) == 1:
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            c, b = (lc, lb) if ins[0] is t else (rc, rb)
            other = ins[1] if ins[0] is t else ins[0]
            self.note(t, "dot", c, b, applied=other is _DATA)
        elif name == "ragged_dot_general" and ins[1] is t:  # experts stacked
            dn = p["ragged_dot_dimension_numbers"]
            contracted, groups = dn.dot_dimension_numbers[0][1], dn.rhs_group_dimensions
            self.note(t, "dot", contracted, groups, applied=ins[0] is _DATA)
        elif name == "conv_general_dilated" and ins[1] is t:
            self.note_conv(t, p, eqn.invars[1].aval.shape, ins[0])
        elif name == "gather" and ins[0] is t:
            shape = eqn.invars[0].aval.shape
            n_out = eqn.outvars[0].aval.ndim
            return [self.note_lookup(t, p, shape, n_out, ins[1])]
        elif name in (
            "jit",
            "pjit",
            "closed_call",
            "custom_jvp_call",
            "custom_vjp_call",
        ):
            closed = p.get("jaxpr") or p["call_jaxpr"]
            return self.walk(closed.jaxpr, ins)
        elif name in ("remat2", "checkpoint", "shard_map"):
            return self.walk(p["jaxpr"], ins)
        elif name == "scan":
            return self.scan(p, ins)
        elif name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            body_in = _carried(p["body_jaxpr"].jaxpr, ins[cn:], bn, len(ins) - cn - bn)
            self.walk(p["cond_jaxpr"].jaxpr, ins[:cn] + body_in[bn:])
            self.walk(p["body_jaxpr"].jaxpr, body_in)
        elif name == "cond":
            for br in p["branches"]:
                self.walk(br.jaxpr, ins[1:])
        return [None] * len(eqn.outvars)

    def scan(self, p, ins):
        n = p["num_consts"] + p["num_carry"]
        body_in = list(ins[:n])
        for x in ins[n:]:
            if isinstance(x, _T) and x.lookup is not None and x.vectors:
                x = _DATA if x.data else None  # scanned embeddings: activations
            if isinstance(x, _T) and x.ndim:
                for leaf, axes in x.parts:
                    self.stack.setdefault(leaf, set()).update(axes[0])
                x = x.map(lambda ax: ax[1:])
            body_in.append(x)
        body_in = _carried(p["jaxpr"].jaxpr, body_in, p["num_consts"], p["num_carry"])
        outs = self.walk(p["jaxpr"].jaxpr, body_in)
        ys = [_DATA if y is _DATA else None for y in outs[p["num_carry"] :]]
        return outs[: p["num_carry"]] + ys


def _data_outs(jaxpr, flags) -> list[bool]:
    """Which outputs of ``jaxpr`` depend on the inputs flagged (any input of an
    equation taints all its outputs)."""
    env = {v: f for v, f in zip(jaxpr.invars, flags, strict=True) if f}
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and env.get(v) for v in eqn.invars):
            env.update((v, True) for v in eqn.outvars)
    return [not isinstance(v, Literal) and bool(env.get(v)) for v in jaxpr.outvars]


def _carried(jaxpr, args, first, n):
    """A loop body's ``args`` with each carry (``args[first:first + n]``, the
    body's first ``n`` outputs) marked an activation where some iteration makes it
    one (``h = tanh(h @ w + x_t)`` from ``h = 0``)."""
    flags = [x is _DATA or isinstance(x, _T) and x.data for x in args]
    while True:
        outs = _data_outs(jaxpr, flags)[:n]
        new = [f or o for f, o in zip(flags[first : first + n], outs, strict=True)]
        if new == flags[first : first + n]:
            break
        flags[first : first + n] = new
    return [_DATA if x is None and flags[i] else x for i, x in enumerate(args)]


_IDENTITY = {
    "convert_element_type",
    "copy",
    "copy_p",
    "stop_gradient",
    "slice",
    "dynamic_slice",
    "rev",
    "tile",
    "pad",
    "neg",
    "reduce_precision",
    "sharding_constraint",
    "optimization_barrier",
    "pvary",
    "reshard",
    "all_gather",
}

# what the rows of a lookup are followed through: views, contractions that may use
# them as a weight (``x @ w[:, perm]``) and the bodies that may hold one (a scan
# scanning over them takes them as activations: an LSTM over embeddings)
_ROWS_OPS = _IDENTITY | {
    "transpose",
    "reshape",
    "split",
    "broadcast_in_dim",
    "mul",
    "div",
    "dot_general",
    "jit",
    "pjit",
    "closed_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "remat2",
    "checkpoint",
    "shard_map",
    "scan",
    "while",
    "cond",
}


def _is_pick(eqn, ins, t) -> bool:
    """A gather from ``t`` whose slices are matrices: a layer or expert picked
    (``jnp.take(w, i, 0)`` of stacked layers, ``w[i]``, the top-k experts of each
    token ``w[topk_ids]``). A gather of rows (one id or an array of them) is an
    embedding lookup."""
    if eqn.primitive.name != "gather" or ins[0] is not t:
        return False
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    kept = [i for i in range(len(sizes)) if i not in dn.collapsed_slice_dims]
    return sum(sizes[i] > 1 for i in kept) >= 2 and not dn.operand_batching_dims


def _reshape_axes(old, new, axes):
    """Original-axis sets after a reshape: a new axis inherits every old axis whose
    span of the flattened index overlaps its own."""
    po, pn = np.cumprod((1, *old)), np.cumprod((1, *new))
    return [
        _union(
            axes[k]
            for k in range(len(old))
            if old[k] != 1 and po[k] < pn[j + 1] and pn[j] < po[k + 1]
        )
        if new[j] != 1
        else frozenset()
        for j in range(len(new))
    ]


def _decide(ndim, obs, stack, picked=frozenset()):
    """The layout from the deciding use (a lookup, else the first contraction):
    its batch axes and scanned axes are stacked, and so are axes indexed away
    (``w[i]``) that no use sees whole (an embedding row picked by a scalar id is
    still a vocabulary axis where the table is looked up or attended), unless that
    would leave no output axis (an ``(out, in)`` head used one row at a time)."""
    # matrices gathered by an array of ids are the top-k experts of each token when
    # a contraction maps them to outputs of their own; else rows of a table after
    # all (nothing contracts them, or only through the ids' axes and batch axes,
    # as per-head relative-position keys): a lookup
    rows = [("gather", *o[1:]) for o in obs if o[0] == "rows"]
    main = [o for o in obs if o[0] != "rows"]
    if rows:
        layout = _decide(ndim, main, stack, picked) if main else None
        if layout is None or set(layout.out_axes) <= set(picked):
            return _decide(ndim, rows, stack)
        return layout
    gathers = [o for o in obs if o[0] == "gather"]
    # a contraction applying the weight to an activation decides over one with
    # weights or constants alone (a power iteration's w @ u in a spectral norm)
    applied = [o for o in obs if o[4]]
    use = (gathers or applied or obs or [None])[0]
    if use is None:
        return None
    stack = set(stack) | set(use[2])
    ins = set(use[1]) - stack
    picked = set(picked) - _union(o[3] for o in obs) - ins
    if set(range(ndim)) - ins - stack - picked:  # an output axis is left
        stack |= picked
    outs = set(range(ndim)) - ins - stack
    if not ins or not outs:
        return None
    return Layout(in_axes=sorted(ins), out_axes=sorted(outs), stack_axes=sorted(stack))


def _is_candidate(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return (
        dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(x.shape) >= 2
    )


def infer_layouts(
    apply_fn: Callable,
    params: PyTree,
    example_args: tuple,
    example_kwargs: dict | None = None,
    *,
    paths=None,
) -> dict[str, Layout]:
    """The `Layout` of every floating weight (``ndim >= 2``) that the model contracts.

    Args:
        apply_fn: called as ``apply_fn(params, *example_args, **example_kwargs)``.
        params: the parameter tree (arrays or `jax.ShapeDtypeStruct`).
        example_args: example positional inputs (arrays or `jax.ShapeDtypeStruct`).
        example_kwargs: example keyword inputs.
        paths: if given, only these parameter paths are inferred.

    Returns:
        ``{path: Layout}``; leaves not consumed by a recognisable contraction are
        omitted.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> m = nn.Dense(3)
        >>> p = m.init(jax.random.key(0), jnp.ones((1, 2)))
        >>> infer_layouts(m.apply, p, (jnp.ones((1, 2)),))
        {'params/kernel': Layout(in_axes=(0,), out_axes=(1,), stack_axes=())}
    """
    return infer(apply_fn, params, example_args, example_kwargs, paths=paths)[0]


def infer(
    apply_fn: Callable,
    params: PyTree,
    example_args: tuple,
    example_kwargs: dict | None = None,
    *,
    paths=None,
) -> tuple[dict[str, Layout], dict[str, Conv], set[str]]:
    """`infer_layouts` and, from the same trace, the `Conv` of each weight that a
    convolution reads as its kernel: its axes where every use is a convolution
    reading it alike through views that keep its values, else ``Conv(None)``
    (flipped, scaled or merged axes, a transposed convolution, other uses too);
    and the paths of the tables: weights whose layout a lookup decided (their
    looked-up axes are the inputs), whatever the leaf's name.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> m = nn.Conv(4, (3, 3), kernel_dilation=2)
        >>> x = jnp.ones((1, 8, 8, 2))
        >>> infer(m.apply, m.init(jax.random.key(0), x), (x,))[1]
        {'params/kernel': Conv(axes=(2, 0, 1), groups=1, dilation=(2, 2))}
    """
    example_kwargs = dict(example_kwargs or {})
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    names = [path_str(kp) for kp, _ in p_leaves]
    a_leaves, a_def = jax.tree.flatten((tuple(example_args), example_kwargs))
    dyn = lambda x: isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))  # noqa: E731
    a_dyn = [i for i, x in enumerate(a_leaves) if dyn(x)]

    def flat(p_vals, a_vals):
        full = list(a_leaves)
        for i, v in zip(a_dyn, a_vals, strict=True):
            full[i] = v
        args, kwargs = jax.tree.unflatten(a_def, full)
        return apply_fn(jax.tree.unflatten(p_def, p_vals), *args, **kwargs)

    def abstract(x):  # keeps a mesh layout (explicit mesh axes are part of the type)
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    closed = jax.make_jaxpr(flat)(
        [abstract(x) for _, x in p_leaves], [abstract(a_leaves[i]) for i in a_dyn]
    )
    want = set(paths) if paths is not None else None
    tracked = [
        _T([(k, [{d} for d in range(len(x.shape))])])
        if _is_candidate(x) and (want is None or names[k] in want)
        else None
        for k, (_, x) in enumerate(p_leaves)
    ]
    walker = _Walker({k: tuple(x.shape) for k, (_, x) in enumerate(p_leaves)})
    walker.walk(closed.jaxpr, tracked + [_DATA] * len(a_dyn))
    out, convs, tables = {}, {}, set()
    for k, t in enumerate(tracked):
        if t is None:
            continue
        ndim = len(p_leaves[k][1].shape)
        stack, picked = walker.stack.get(k, set()), walker.picked.get(k, set())
        obs = list(walker.obs.get(k, []))
        for g, entries in enumerate(walker.lookups):
            for leaf, i in entries:
                reused = walker.reused.get((g, leaf), [])
                if leaf != k or not reused:
                    continue
                if obs[i][0] == "rows":  # matrices by ids: `_decide` weighs both
                    obs[i] = [obs[i], *reused]
                # rows contracted as a weight that has outputs of its own: a weight
                # reordered or subset (w[:, perm]), not a lookup
                elif _decide(ndim, reused, stack, picked):
                    obs[i] = reused
        obs = [u for o in obs for u in (o if isinstance(o, list) else [o])]
        lay = _decide(ndim, obs, stack, picked)
        if lay is None:
            continue
        out[names[k]] = lay
        lookups = [set(o[1]) - set(lay.stack_axes) for o in obs if o[0] == "gather"]
        lookups += [set(o[1]) - set(lay.stack_axes) for o in obs if o[0] == "rows"]
        if set(lay.in_axes) in lookups:
            tables.add(names[k])
        uses = set(walker.convs.get(k, []))
        if not uses:
            continue
        conv = Conv(None)  # convolved, but not as one PEFT conv adapter can hold
        if len(uses) == 1 and all(o[0] == "conv" for o in obs):
            ((axes, groups, dilation),) = uses
            if axes is not None and set(axes) == set(lay.in_axes):
                conv = Conv(axes, groups, dilation)
        convs[names[k]] = conv
    return out, convs, tables
