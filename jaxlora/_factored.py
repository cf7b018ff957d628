"""Run any function on a tree holding `LoraWeight` leaves without forming ``a @ b``.

`call` traces ``fn`` once with each adapted weight replaced by its base array, then
evaluates the jaxpr with an interpreter in which values derived from an adapted weight
are symbolic (`jaxlora._symbolic.Sym`). Contractions (``dot_general``, convolutions,
row gathers) run factored, ``W0·x + s·b(a(x))``, with ``W0`` frozen so a backward
pass computes the input gradient but no weight gradient (`jaxlora._contract`).
Views of the weight (casts, transposes, reshapes, slices, scalar multiples, a gather
of rows or columns used only as a contraction's weight: ``x @ w[:, perm]``) and tags
on it (``with_sharding_constraint``, ``checkpoint_name``) keep it symbolic, and so do
``concatenate`` and ``stack`` of adapted weights (`jaxlora._symbolic.concatenate`,
`jaxlora._symbolic.stack`).

Followed inside: nested ``jit``; ``checkpoint``/``remat`` (re-applied with the same
policy); ``scan`` (a stacked weight passed as ``xs`` is sliced factor by factor, or
closed over as a constant); ``while`` and ``cond`` (weights as constants or branch
operands); ``shard_map`` (a weight enters as its shard and its factors split like
it, so the body runs factored on every device). A ``custom_jvp``/``custom_vjp``
function keeps its own derivative rule: an adapted weight passed into one is
materialized for that call (the rule, not the primal body, decides its gradient).

Any other use (``jnp.sin(kernel)``, a weight carried through a loop, ...) is computed
correctly by materializing ``w + s·a@b`` for that use only, with one warning per
parameter path. `explain` reports, per path, which primitives consumed the weight and
whether each ran factored or materialized.

Forward-mode differentiation cannot enter the custom VJP of a factored
``dot_general``: a call that ``jax.jvp``/``jax.jacfwd`` perturbs (seen at trace time)
emits the same factored contraction in plain ops instead; ``jax.linearize`` and a
``jvp`` applied to a ``jit`` that holds the call are refused by JAX. The base weight
is a constant (no weight gradient); a differentiable scalar that multiplies the kernel
before use (``x @ (kernel * gate)``) gets its full gradient, base path included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Literal

from jaxlora import _contract
from jaxlora import _symbolic
from jaxlora._node import is_lora
from jaxlora._paths import path_str
from jaxlora._symbolic import R
from jaxlora._symbolic import Sym
from jaxlora._symbolic import Unsupported
from jaxlora._targets import shown

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Use:
    """One consumer of an adapted weight: the primitive, how it ran, and why."""

    primitive: str
    mode: str  # "factored" or "materialized"
    reason: str = ""


class _Context:
    """Per-call record of uses; warns once per path on materialization."""

    def __init__(self, warn: bool, capture: bool = False, row_ids=None):
        self.warn = warn
        # capture: per path, (k, fan_in) when the last k rank columns of its ``a``
        # number its input rows (see `input_capturer`)
        self.row_ids: dict[str, tuple[int, int]] = dict(row_ids or {})
        self.uses: dict[str, list[Use]] = {}
        self.warned: set[str] = set()
        # capture_inputs: path -> list of (rows, fan_in) input arrays, or a reason
        self.captured: dict[str, list] | None = {} if capture else None
        # the traced bodies (loops, branches, shard_map) being evaluated: values
        # seen inside one cannot be captured out of it
        self.inside: list[str] = []
        self.views: dict[int, tuple] = {}  # id -> (view, gather, its operands)

    @contextlib.contextmanager
    def within(self, what: str):
        self.inside.append(what)
        try:
            yield
        finally:
            self.inside.pop()

    def record(self, path, primitive, mode, reason=""):
        use = Use(primitive, mode, reason)
        uses = self.uses.setdefault(path, [])
        if use not in uses:
            uses.append(use)

    def gathered(self, eqn, invals, view):
        """Notes ``view``, a gathered weight kept symbolic for a contraction."""
        self.views[id(view)] = (view, eqn, invals)
        return view

    def looked_up(self, x):
        """A gathered weight the contraction could not factor: the lookup's rows
        (`_contract.gather`) instead, as if it had not been kept symbolic."""
        if not isinstance(x, Sym) or id(x) not in self.views:
            return x
        _, eqn, invals = self.views[id(x)]
        out, route = _contract.gather(eqn, *invals)
        for path in x.paths:
            self.record(path, "gather", "factored", f"via {route}-axes")
        return out

    def materialize(self, x, primitive, reason):
        if not isinstance(x, Sym):
            return x
        for path in x.paths:
            self.record(path, primitive, "materialized", reason)
            if self.warn and path not in self.warned:
                self.warned.add(path)
                warnings.warn(
                    f"jaxlora: the adapted weight '{path}' is used by '{primitive}' "
                    f"({reason}), which it cannot run factored; it is materialized as "
                    "w + scale * a @ b for that use (correct, but it costs a dense "
                    "weight and its gradient).",
                    stacklevel=2,
                )
        return x.materialize()


# -- the interpreter ---------------------------------------------------------------


def _eval(ctx, jaxpr, consts, args, weight_outs=frozenset()):
    """``weight_outs``: positions of outputs the caller uses only as contraction
    weights (a nested ``jit``'s ``jnp.take(w, ids, 1)`` before ``x @ .``)."""
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    consumers = None
    plain = lambda v: v in env and not isinstance(env[v], Sym)  # noqa: E731
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, Sym) for x in invals):
            as_weight = False
            if eqn.primitive.name in ("gather", "jit", "pjit"):
                consumers = consumers or _consumers(jaxpr)
                weights = {
                    k
                    for k, v in enumerate(eqn.outvars)
                    if _used_as_weight(v, consumers, plain, weight_outs)
                }
                as_weight = weights if eqn.primitive.name != "gather" else bool(weights)
            outs = _eval_sym_eqn(ctx, eqn, invals, as_weight)
        else:
            outs = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


_WEIGHT_USES = ("dot_general", "conv_general_dilated")


def _consumers(jaxpr) -> dict:
    """Each variable's consuming equations (the jaxpr's k-th output: ``k``)."""
    uses: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal):
                uses.setdefault(v, []).append(eqn)
    for k, v in enumerate(jaxpr.outvars):
        if not isinstance(v, Literal):
            uses.setdefault(v, []).append(k)
    return uses


def _used_as_weight(var, consumers, plain, weight_outs) -> bool:
    """Whether a gathered adapted weight is used only as the weight of contractions
    whose other operands are plain arrays (``x @ w[:, perm]``), directly or inside
    the body of a ``jit``, ``scan`` or ``remat`` it is passed to: then it stays
    symbolic and the contraction runs factored. Otherwise (an embedding lookup,
    whose rows are activations) the lookup rule forms the rows. ``plain(v)``: the
    variable is known to hold no adapted weight."""
    uses = consumers.get(var, [])
    for eqn in uses:
        if isinstance(eqn, int):  # an output: as the caller uses it
            if eqn not in weight_outs:
                return False
        elif eqn.primitive.name in _BODIES:
            if not _used_as_weight_in_body(eqn, var, plain):
                return False
        elif eqn.primitive.name not in _WEIGHT_USES or not all(
            v is var or isinstance(v, Literal) or plain(v) for v in eqn.invars
        ):
            return False
    return bool(uses)


_BODIES = ("jit", "pjit", "scan", "checkpoint", "remat2")


def _used_as_weight_in_body(eqn, var, plain) -> bool:
    """`_used_as_weight` for ``var`` passed to ``eqn``'s body (a scan's constant or
    scanned-over input; not its carry, which is materialized). In the body a
    variable may hold an adapted weight if it is computed from one by anything but
    a contraction (whose result is an activation)."""
    body = eqn.params["jaxpr"]
    body = getattr(body, "jaxpr", body)
    at = [k for k, v in enumerate(eqn.invars) if v is var]
    if eqn.primitive.name == "scan":
        nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
        if any(nc <= k < nc + nk for k in at):
            return False
    held = {
        bv
        for v, bv in zip(eqn.invars, body.invars, strict=True)
        if not isinstance(v, Literal) and (v is var or not plain(v))
    }
    for e in body.eqns:
        if e.primitive.name not in _WEIGHT_USES and any(
            not isinstance(v, Literal) and v in held for v in e.invars
        ):
            held.update(e.outvars)
    consumers = _consumers(body)
    return all(
        _used_as_weight(body.invars[k], consumers, lambda v: v not in held, frozenset())
        for k in at
    )


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def _fallback(ctx, eqn, invals, reason):
    name = eqn.primitive.name
    invals = [ctx.looked_up(x) for x in invals]
    return _bind(eqn, [ctx.materialize(x, name, reason) for x in invals])


def _eval_sym_eqn(ctx, eqn, invals, as_weight=False):
    # in the equation's own context (its mesh: e.g. automatic axes in auto_axes)
    with eqn.ctx.manager:
        return _eval_sym_eqn_here(ctx, eqn, invals, as_weight)


def _eval_sym_eqn_here(ctx, eqn, invals, as_weight):
    name = eqn.primitive.name
    if name == "gather" and _picks_layers(eqn, invals):  # a view, not a use
        return _gather_stacked(eqn, *invals)
    # columns picked or permuted: a view (EVA/CorDA capture refuses gathers)
    if name == "gather" and as_weight and ctx.captured is None:
        with contextlib.suppress(Unsupported):
            return ctx.gathered(eqn, invals, _contract.gather_view(eqn, *invals))
    if ctx.captured is not None and name in _contract.RULES:
        _capture(ctx, eqn, invals)
    try:
        if name in _contract.RULES:
            routes = []

            def rule(*xs):
                out, route = _contract.RULES[name](eqn, *_contract.unify_vma(xs))
                routes.append(route)
                return out

            if ctx.inside.count(_IN_SHARD_MAP) > 1:
                # in a shard_map nested in another, a residual computed from values
                # varying over the outer one's axes does not lower (XLA's Shardy
                # verifier); recomputed in the backward pass, only inputs remain
                nothing = jax.checkpoint_policies.nothing_saveable
                rule = jax.checkpoint(rule, policy=nothing)
            out, route = rule(*invals), routes[0]
            for x in invals:
                for path in x.paths if isinstance(x, Sym) else ():
                    ctx.record(path, name, "factored", f"via {route}-axes")
            return out
        if name in _VIEWS:
            return _VIEWS[name](eqn, *invals)
        if name in ("jit", "pjit") and as_weight:
            return _jit(ctx, eqn, invals, frozenset(as_weight))
        if name in _HIGHER:
            return _HIGHER[name](ctx, eqn, invals)
    except Unsupported as e:
        return _fallback(ctx, eqn, invals, str(e))
    return _fallback(ctx, eqn, invals, f"no factored rule for '{name}'")


# -- views: applied to w directly and mirrored on the factors -----------------------


def _view(method):
    def rule(eqn, x, *rest):
        if any(isinstance(r, Sym) for r in rest):
            raise Unsupported("an adapted weight used as an operand index or shape")
        w = eqn.primitive.bind(x.w, *rest, **eqn.params)
        return method(x, w, eqn.params, rest)

    return rule


def _picks_layers(eqn, invals) -> bool:
    """Whether a gather indexes only stacked axes of an adapted weight (a layer
    loop's ``jnp.take(w, i, 0)``), not an embedding table's rows."""
    x, dn = invals[0], eqn.params["dimension_numbers"]
    if not isinstance(x, Sym) or isinstance(invals[1], Sym):
        return False
    indexed = _contract.gather_indexed_axes(eqn.params, x.shape)
    return (
        not dn.operand_batching_dims
        and bool(indexed)
        and set(indexed) <= set(x.stack_axes)
    )


def _gather_stacked(eqn, x: Sym, indices) -> Sym:
    w = eqn.primitive.bind(x.w, indices, **eqn.params)
    return x.gather_stacked(w, indices, eqn.params)


def _split(eqn, x: Sym) -> list:
    """``jnp.split`` of a weight (a fused q/k/v kernel split before its matmuls):
    each part a slice of the weight and of the factor holding the axis."""
    axis, parts = eqn.params["axis"], eqn.primitive.bind(x.w, **eqn.params)
    outs, start = [], 0
    for part in parts:
        lo, hi = [0] * x.ndim, list(x.shape)
        lo[axis], hi[axis] = start, start + part.shape[axis]
        outs.append(x.slice(part, lo, hi, None))
        start = hi[axis]
    return outs


def _device_put(eqn, *xs) -> list:
    """``jax.device_put`` inside the model (a layout hint, or a base weight streamed
    from host memory): the weights go where the model puts them; the (small)
    factors stay where they are, as with a sharding constraint."""
    outs = eqn.primitive.bind(*_bases(xs), **eqn.params)
    result = []
    for x, out, dst in zip(xs, outs, eqn.params["devices"], strict=True):
        if isinstance(x, Sym):
            # to one device (a pipeline stage): the factors go along; a mesh
            # layout or memory kind is the weight's alone
            one = isinstance(dst, (jax.Device, jax.sharding.SingleDeviceSharding))
            move = (lambda f, _, d=dst: jax.device_put(f, d)) if one else None
            out = x.map_factors(out, move or (lambda f, _: f))
        result.append(out)
    return result


def _unstack(eqn, x: Sym) -> list:
    """``jnp.unstack`` of a weight (``q, k, v = w``, a list of layers): each part
    the slice at one index of the axis, that axis squeezed away."""
    axis, parts = eqn.params["axis"], eqn.primitive.bind(x.w, **eqn.params)
    outs = []
    for i, part in enumerate(parts):
        lo, hi = [0] * x.ndim, list(x.shape)
        lo[axis], hi[axis] = i, i + 1
        one = x.slice(lax.slice_in_dim(x.w, i, i + 1, axis=axis), lo, hi, None)
        outs.append(one.squeeze(part, (axis,)))
    return outs


def _as_scalar(x: Sym, y):
    """``y`` as a 0-d array when it is one number scaling all of ``x`` (a (1, 1)
    gate broadcasts like a scalar), else None."""
    if isinstance(y, Sym) or np.size(y) != 1 or np.ndim(y) > x.ndim:
        return None
    return jnp.reshape(y, ())


def _scalar_mul(eqn, x, y):
    if isinstance(y, Sym):
        x, y = y, x
    c = _as_scalar(x, y)
    if c is None:
        raise Unsupported("multiplied by a non-scalar")
    return x.scalar_mul(eqn.primitive.bind(x.w, y, **eqn.params), c)


def _scalar_div(eqn, x, y):
    c = _as_scalar(x, y) if isinstance(x, Sym) else None
    if c is None:
        raise Unsupported("divided by a non-scalar or used as a divisor")
    return x.scalar_mul(eqn.primitive.bind(x.w, y, **eqn.params), 1 / c)


def _reshape(s, w, p, _):
    perm = p.get("dimensions")
    if perm is not None:  # the operand transposed first (vmap of a conv kernel)
        s = s.transpose(jax.lax.transpose(s.w, perm), perm)
    try:
        return s.reshape(w, p["new_sizes"])
    except Unsupported:
        folded = _fold_stack_into_output(s)
        if folded is None:
            raise
        return folded.reshape(w, p["new_sizes"])


def _fold_stack_into_output(s: Sym) -> Sym | None:
    """``s`` with a stacked axis merged into the output axis right after it (an
    ensemble's members side by side in one output axis, as ``vmap`` of a conv with a
    shared input makes them): the members' updates concatenated along that output
    axis (`concatenate`: rank E·r, ``b`` block-diagonal). None if no such pair."""
    k = next((k for k in s.stack_axes if k + 1 < s.ndim and k + 1 in s.out_axes), None)
    if k is None:
        return None
    n = s.shape[k]
    parts = []
    for e in range(n):
        lo, hi = [0] * s.ndim, list(s.shape)
        lo[k], hi[k] = e, e + 1
        part = jax.lax.slice(s.w, lo, hi)
        one = s.slice(part, lo, hi, None)
        parts.append(one.squeeze(jnp.squeeze(part, k), [k]))
    merged = jnp.concatenate([x.w for x in parts], axis=k)
    return _symbolic.concatenate(parts, k, merged)


def _reshard(eqn, x: Sym) -> Sym:
    dst = eqn.params["dst_sharding"]
    w = eqn.primitive.bind(x.w, **eqn.params)
    if not isinstance(dst, jax.sharding.NamedSharding):
        return x.map_factors(w, lambda f, _: f)
    spec = _spec_of(dst.spec, x.ndim)

    def follow(f, lab):
        part = jax.sharding.PartitionSpec(*(None if i == R else spec[i] for i in lab))
        to = jax.sharding.NamedSharding(dst.mesh, part, memory_kind=dst.memory_kind)
        return eqn.primitive.bind(f, **{**eqn.params, "dst_sharding": to})

    return x.map_factors(w, follow)


def _all_gather(eqn, x: Sym) -> Sym:
    """A weight gathered whole from its shards (FSDP): each factor holding the
    gathered axis is gathered along it (the other is whole already)."""
    p = eqn.params
    if not p["tiled"] or p["axis_index_groups"] is not None:
        raise Unsupported("an untiled or grouped all_gather")
    d = p["all_gather_dimension"]
    w = eqn.primitive.bind(x.w, **p)

    def gather(f, lab):
        if d not in lab:
            return f
        return eqn.primitive.bind(f, **{**p, "all_gather_dimension": lab.index(d)})

    return x.map_factors(w, gather)


def _bases(xs):
    return [x.w if isinstance(x, Sym) else x for x in xs]


# w as the primitive makes it, the factors unchanged
_PASS = _view(lambda s, w, p, _: s.map_factors(w, lambda f, _: f))

_VIEWS = {
    "convert_element_type": _view(lambda s, w, p, _: s.convert(w, p["new_dtype"])),
    "transpose": _view(lambda s, w, p, _: s.transpose(w, p["permutation"])),
    "reshape": _view(_reshape),
    "squeeze": _view(lambda s, w, p, _: s.squeeze(w, p["dimensions"])),
    "broadcast_in_dim": _view(
        lambda s, w, p, _: s.broadcast(w, p["shape"], p["broadcast_dimensions"])
    ),
    "slice": _view(
        lambda s, w, p, _: s.slice(
            w, p["start_indices"], p["limit_indices"], p["strides"]
        )
    ),
    "dynamic_slice": _view(lambda s, w, p, r: s.dynamic_slice(w, r, p["slice_sizes"])),
    "rev": _view(lambda s, w, p, _: s.rev(w, p["dimensions"])),
    "tile": _view(lambda s, w, p, _: s.tile(w, p["reps"])),
    "pad": _view(lambda s, w, p, _: s.pad(w, p["padding_config"])),
    "split": _split,
    "device_put": _device_put,
    "unstack": _unstack,
    "copy": _PASS,
    "copy_p": _PASS,
    # layout hints and remat tags on the weight: applied to w as the model asks; the
    # (small) factors pass through and XLA's sharding propagation places them
    "sharding_constraint": _PASS,
    "name": _PASS,
    # inside shard_map: w cast to vary over more mesh axes; the factors keep their
    # own (a contraction casts all its operands alike, `_contract.unify_vma`)
    "pvary": _PASS,
    # w laid out anew (jax.reshard, auto_axes, a weight closed over by a shard_map
    # body): each factor axis follows the weight axis it holds
    "reshard": lambda eqn, x: _reshard(eqn, x),
    "all_gather": lambda eqn, x: _all_gather(eqn, x),
    "concatenate": lambda eqn, *xs: _symbolic.concatenate(
        xs, eqn.params["dimension"], eqn.primitive.bind(*_bases(xs), **eqn.params)
    ),
    "stack": lambda eqn, *xs: _symbolic.stack(
        xs, eqn.params["axis"], eqn.primitive.bind(*_bases(xs), **eqn.params)
    ),
    "stop_gradient": _view(
        lambda s, w, p, _: s.map_factors(w, lambda f, _: lax.stop_gradient(f))
    ),
    "neg": _view(lambda s, w, p, _: s.scalar_mul(w, jnp.asarray(-1, s.a.dtype))),
    "mul": _scalar_mul,
    "div": _scalar_div,
}


# -- higher-order primitives ---------------------------------------------------------


def _jit(ctx, eqn, invals, weight_outs=frozenset()):
    closed = eqn.params["jaxpr"]
    return _eval(ctx, closed.jaxpr, closed.consts, invals, weight_outs)


def _remat(ctx, eqn, invals):
    p = eqn.params
    if ctx.captured is not None:  # capturing inputs (no gradient): run it inline
        return _eval(ctx, p["jaxpr"], (), invals)
    body = jax.checkpoint(
        lambda *xs: _eval(ctx, p["jaxpr"], (), xs),
        prevent_cse=p["prevent_cse"],
        policy=p["policy"],
    )
    return _passed_through(p["jaxpr"], invals, body(*invals))


def _passed_through(jaxpr, invals, outs) -> list:
    """``outs`` with each output that is an input adapted weight returned as is
    (NNX returns a block's state from its ``remat`` body) being that input's
    `Sym` itself, which a transform's own outputs are not."""
    pos = {v: i for i, v in enumerate(jaxpr.invars)}
    src = [None if isinstance(v, Literal) else pos.get(v) for v in jaxpr.outvars]
    return [
        invals[i] if i is not None and isinstance(invals[i], Sym) else o
        for o, i in zip(outs, src, strict=True)
    ]


def _custom(ctx, eqn, invals):
    """A ``custom_jvp``/``custom_vjp`` function an adapted weight flows into: its
    own derivative rule decides the gradient (a gradient scale, a straight-through
    estimator), and a rule is not a jaxpr the engine could factor, so the weight
    is materialized for the call and the rule kept. Differentiating its primal body
    instead would give the body's own derivative: wrong wherever the rule differs."""
    info = getattr(eqn.params.get("call_jaxpr"), "jaxpr", None)
    info = getattr(info, "debug_info", None)
    name = eqn.params.get("name") or getattr(info, "func_name", "?")
    if ctx.captured is not None:  # EVA/CorDA read forward values: no rule is involved
        closed = eqn.params["call_jaxpr"]
        return _eval(ctx, closed.jaxpr, closed.consts, invals)
    kind = eqn.primitive.name.removesuffix("_call").removesuffix("_call_jaxpr")
    why = f"passed to the {kind} function '{name}', whose own derivative rule is kept"
    return _fallback(ctx, eqn, invals, why)


def _concrete(ctx, xs, primitive, reason):
    return [ctx.materialize(x, primitive, reason) for x in xs]


def _slice0(x: Sym):
    """Splits a Sym into per-step parts sliced along w's axis 0 and the rest."""
    if x.ndim == 0:
        raise Unsupported("scanned over a scalar")
    to_front = lambda f, lab: (
        f if 0 not in lab else jax.numpy.moveaxis(f, lab.index(0), 0)
    )
    a, b = to_front(x.a, x.a_lab), to_front(x.b, x.b_lab)
    a_lab = ((0,) + tuple(i for i in x.a_lab if i != 0)) if 0 in x.a_lab else x.a_lab
    b_lab = ((0,) + tuple(i for i in x.b_lab if i != 0)) if 0 in x.b_lab else x.b_lab
    sliced = (x.w, a if 0 in a_lab else None, b if 0 in b_lab else None)
    rest = (None if 0 in a_lab else a, None if 0 in b_lab else b)
    dec = lambda lab: tuple(i if i < 0 else i - 1 for i in lab if i != 0)

    def rebuild(parts):
        w, sa, sb = parts
        fa = sa if sa is not None else rest[0]
        fb = sb if sb is not None else rest[1]
        return Sym(w, fa, fb, dec(a_lab), dec(b_lab), x.scale, x.path)

    return sliced, rebuild


def _scan(ctx, eqn, invals):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    carry = _concrete(ctx, carry, "scan", "carried through the loop")
    xs_parts, builders = [], []
    for x in xs:
        if isinstance(x, Sym):
            part, build = _slice0(x)
        else:
            part, build = x, None
        xs_parts.append(part)
        builders.append(build)
    closed = p["jaxpr"]
    # capturing EVA's inputs at the top level: the body's captured rows (and their
    # tags: which layer of a scanned stack) leave the loop as outputs
    capturing = ctx.captured is not None and not ctx.inside
    reasons, through = {}, {}  # through: ys k is xs j, stacked back as it was

    def body(c, xs_step):
        xs_vals = [b(v) if b else v for b, v in zip(builders, xs_step, strict=True)]
        if capturing:
            outer, ctx.captured = ctx.captured, {}
            try:
                outs = _eval(ctx, closed.jaxpr, closed.consts, [*consts, *c, *xs_vals])
            finally:
                inner, ctx.captured = ctx.captured, outer
            got = {k: v for k, v in inner.items() if not isinstance(v, str)}
            reasons.update({k: v for k, v in inner.items() if isinstance(v, str)})
        else:
            with ctx.within("a loop (scan)"):
                outs = _eval(ctx, closed.jaxpr, closed.consts, [*consts, *c, *xs_vals])
            got = {}
        ys = outs[nk:]
        for k, y in enumerate(ys):  # a layer's weight returned as it came in
            j = next((j for j, x in enumerate(xs_vals) if x is y), None)
            if isinstance(y, Sym) and j is not None:
                through[k], ys[k] = j, None
        outs = _concrete(ctx, [*outs[:nk], *ys], "scan", "returned from the loop body")
        return outs[:nk], (outs[nk:], got)

    c, (ys, got) = lax.scan(
        body,
        carry,
        xs_parts,
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    for path, uses in got.items():  # each use's rows of every step
        entry = ctx.captured.setdefault(path, [])
        if isinstance(entry, list):  # its lead shape, once per step: (steps, ..., k)
            entry.extend(
                (
                    *(v.reshape(math.prod(v.shape[:-1]), v.shape[-1]) for v in use[:2]),
                    use[2],
                    jax.numpy.max(use[3]),  # how its rows read, the worst step
                )
                for use in uses
            )
    if ctx.captured is not None:
        ctx.captured.update(reasons)
    ys = [xs[through[k]] if k in through else y for k, y in enumerate(ys)]
    return [*c, *ys]


def _while(ctx, eqn, invals):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cc, bc, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    carry = _concrete(ctx, carry, "while", "carried through the loop")
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond(c):
        with ctx.within("a loop (while)"):
            return _eval(ctx, cj.jaxpr, cj.consts, [*cc, *c])[0]

    def body(c):
        with ctx.within("a loop (while)"):
            outs = _eval(ctx, bj.jaxpr, bj.consts, [*bc, *c])
        return _concrete(ctx, outs, "while", "returned from the loop body")

    return lax.while_loop(cond, body, carry)


def _cond(ctx, eqn, invals):
    index, ops = invals[0], invals[1:]
    if isinstance(index, Sym):
        raise Unsupported("an adapted weight used as a branch index")

    def branch(closed):
        def run(*xs):
            with ctx.within("a branch of cond/switch"):
                outs = _eval(ctx, closed.jaxpr, closed.consts, xs)
            return _concrete(ctx, outs, "cond", "returned from a branch")

        return run

    return lax.switch(index, [branch(b) for b in eqn.params["branches"]], *ops)


def _spec_of(spec, ndim: int) -> tuple:
    """A ``PartitionSpec``'s entry for each of ``ndim`` axes (``None`` past its end)."""
    entries = tuple(spec)
    return entries + (None,) * (ndim - len(entries))


_IN_SHARD_MAP = "shard_map (its inputs there are shards)"


def _placed(f, spec, mesh):
    """A factor resharded to ``spec`` where the mesh has explicit axes (``shard_map``
    then requires its inputs to be laid out as their ``in_specs`` say)."""
    explicit = jax.sharding.AxisType.Explicit
    if explicit not in tuple(getattr(mesh, "axis_types", ())):
        return f
    have = _spec_of(jax.typeof(f).sharding.spec, f.ndim)
    if have == _spec_of(spec, f.ndim):
        return f
    # a concrete mesh names its devices (no mesh context needed); an abstract one
    # comes from the context
    if isinstance(mesh, jax.sharding.Mesh):
        spec = jax.sharding.NamedSharding(mesh, spec)
    return jax.reshard(f, spec)


def _shard_map(ctx, eqn, invals):
    """A ``shard_map`` body run factored: an adapted weight enters as ``w`` and its
    factors, each factor axis split like the weight axis it holds (the rank axis is
    not split), so the shard of ``w + s·a@b`` is ``w``'s shard plus ``s·a_i@b_j``
    of the factors' shards. A factor that is whole on some mesh axis gets its
    gradient summed over it (``jax.shard_map``'s transpose, or the casts of
    `jaxlora._contract.unify_vma` under ``check_vma``)."""
    p = eqn.params
    flat, specs, builds = [], [], []
    for x, spec in zip(invals, p["in_specs"], strict=True):
        if isinstance(x, Sym):
            ws = _spec_of(spec, x.ndim)
            part = lambda lab, ws=ws: jax.sharding.PartitionSpec(
                *(None if i == R else ws[i] for i in lab)
            )
            pa, pb = part(x.a_lab), part(x.b_lab)
            flat += [x.w, _placed(x.a, pa, p["mesh"]), _placed(x.b, pb, p["mesh"])]
            specs += [spec, pa, pb]
            builds.append(
                lambda w, a, b, x=x: Sym(w, a, b, x.a_lab, x.b_lab, x.scale, x.path)
            )
        else:
            flat.append(x)
            specs.append(spec)
            builds.append(None)
    jaxpr = p["jaxpr"]
    jaxpr, consts = getattr(jaxpr, "jaxpr", jaxpr), getattr(jaxpr, "consts", ())

    def body(*local):
        it, vals = iter(local), []
        for build in builds:
            vals.append(build(*(next(it) for _ in range(3))) if build else next(it))
        with ctx.within(_IN_SHARD_MAP):
            outs = _eval(ctx, jaxpr, consts, vals)
        return tuple(_concrete(ctx, outs, "shard_map", "returned from the body"))

    mapped = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=tuple(specs),
        out_specs=tuple(p["out_specs"]),
        axis_names=p["newly_manual_axes"],
        check_vma=p["check_vma"],
    )
    # jitted: an eager shard_map cannot run the custom VJP of a factored contraction
    return list(jax.jit(mapped)(*flat))


_HIGHER = {
    "jit": _jit,
    "pjit": _jit,
    "closed_call": _jit,
    "core_call": _jit,
    "remat2": _remat,
    "checkpoint": _remat,
    "custom_jvp_call": _custom,
    "custom_vjp_call": _custom,
    "custom_vjp_call_jaxpr": _custom,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "shard_map": _shard_map,
}


# -- entry points ---------------------------------------------------------------------


def _arg_path(keypath) -> str:
    """Names a leaf of ``(args, kwargs)``: the first positional argument (the params,
    by convention) is unprefixed, other arguments are prefixed with their position or
    keyword (``'1/...'``, ``'state/...'``)."""
    which, arg, rest = keypath[0].idx, keypath[1], keypath[2:]
    if which == 0 and arg.idx == 0:
        return path_str(rest)
    return path_str((arg, *rest))


def _is_dynamic(x) -> bool:
    return is_lora(x) or isinstance(x, (jax.Array, np.ndarray, np.generic))


def _run(ctx, fn, args, kwargs):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        (args, kwargs), is_leaf=is_lora
    )
    values = [x for _, x in leaves]
    dyn = [i for i, x in enumerate(values) if _is_dynamic(x)]
    changed_structure = []

    def flat_fn(*dyn_vals):
        full = list(values)
        for i, v in zip(dyn, dyn_vals, strict=True):
            full[i] = v
        a, kw = jax.tree.unflatten(treedef, full)
        out = fn(*a, **kw)
        # the arguments after the call: NNX Variables the model wrote in place
        after, after_def = jax.tree.flatten((a, kw), is_leaf=is_lora)
        if after_def != treedef:
            changed_structure.append(after_def)
            return out, []
        return out, [after[i] for i in dyn]

    placeholders = [values[i].w if is_lora(values[i]) else values[i] for i in dyn]
    closed, (out_shape, _) = jax.make_jaxpr(flat_fn, return_shape=True)(*placeholders)
    if changed_structure:
        raise ValueError(_CHANGED_STRUCTURE)
    jaxpr = closed.jaxpr
    n_out = len(jax.tree.leaves(out_shape))
    written = [  # positions in dyn whose value the function replaced
        k for k, var in enumerate(jaxpr.outvars[n_out:]) if var is not jaxpr.invars[k]
    ]
    invals = [
        Sym.from_lora(values[i], _arg_path(leaves[i][0]))
        if is_lora(values[i])
        else values[i]
        for i in dyn
    ]
    token = _contract.FORWARD_MODE.set(
        _contract.FORWARD_MODE.get()
        or _contract.forward_mode([*jax.tree.leaves(invals), *closed.consts])
    )
    try:
        outs = _eval(ctx, jaxpr, closed.consts, invals)
    finally:
        _contract.FORWARD_MODE.reset(token)
    outs, new_values = outs[:n_out], [outs[n_out + k] for k in written]
    given = [
        (sym, values[i])
        for sym, i in zip(invals, dyn, strict=True)
        if isinstance(sym, Sym)
    ]
    paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(out_shape)[0]]
    outs = [_returned(ctx, x, p, given) for x, p in zip(outs, paths, strict=True)]
    if written:
        _write_back(
            ctx,
            (args, kwargs),
            {dyn[k]: v for k, v in zip(written, new_values, strict=True)},
            [leaves[dyn[k]][0] for k in written],
            {dyn[k]: invals[k] for k in written},
        )
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


_CHANGED_STRUCTURE = (
    "jaxlora.lora_apply: the function added or removed variables of its arguments "
    "while it ran (e.g. an NNX module that creates a cache or an attribute on first "
    "call). Changes of structure cannot be carried out of the run on the adapted "
    "weights: create them before the call (e.g. model.init_cache(...)), outside "
    "lora_apply."
)


def call_merged(fn: Callable, args: tuple, kwargs: dict) -> PyTree:
    """``fn(*args, **kwargs)`` with every `LoraWeight` merged, ``stop_gradient(w) +
    s·a@b`` (`jaxlora.lora_apply`'s ``factored=False``). The function runs on copies
    of the arguments that hold the merged arrays, so the values it writes to NNX
    Variables in place (BatchNorm statistics, a Dropout RNG count, a KV cache) are
    stored back in the caller's, as for `call`."""
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_lora)
    merged = [
        x.replace(w=lax.stop_gradient(x.w)).merged() if is_lora(x) else x
        for x in leaves
    ]
    a, kw = jax.tree.unflatten(treedef, merged)
    out = fn(*a, **kw)
    after, after_def = jax.tree.flatten((a, kw), is_leaf=is_lora)
    if after_def != treedef:
        raise ValueError(_CHANGED_STRUCTURE)
    new = {
        i: v for i, (v, m) in enumerate(zip(after, merged, strict=True)) if v is not m
    }
    if new:
        keys = [k for k, _ in jax.tree_util.tree_flatten_with_path(
            (args, kwargs), is_leaf=is_lora)[0]]  # fmt: skip
        _store(_Context(warn=False), (args, kwargs), new, [keys[i] for i in new])
    return out


def _write_back(ctx, tree, new: dict, keys: list, before: dict) -> None:
    """Stores in the caller's NNX Variables the values the function wrote to them
    (BatchNorm statistics, a Dropout RNG count, a KV cache), as calling it directly
    would have: the factored run worked on copies of the arguments. An adapted
    weight written back as it was (``nnx.scan`` stacks each block's state back) is
    left alone."""

    new = {i: v for i, v in new.items() if not _same_weight(v, before[i])}
    keys = [k for k, i in zip(keys, before, strict=True) if i in new]
    _store(ctx, tree, new, keys)


def _store(ctx, tree, new: dict, keys: list) -> None:
    """Sets ``new[i]`` (leaf ``i`` of ``tree``, at path ``keys[k]``) on the NNX
    Variable holding that leaf; refuses leaves no Variable holds alone, and
    adapted weights."""
    from flax import nnx

    owners = []  # per leaf of ``tree``: the Variable holding it alone, or None
    for node in jax.tree.leaves(
        tree, is_leaf=lambda x: is_lora(x) or isinstance(x, nnx.Variable)
    ):
        n = len(jax.tree.leaves(node, is_leaf=is_lora))
        owner = node if isinstance(node, nnx.Variable) and n == 1 else None
        owners += [owner] * n
    problems = []
    for i, key in zip(new, keys, strict=True):
        if owners[i] is None or is_lora(owners[i].get_value()):
            what = "an adapted weight" if owners[i] is not None else "not in a Variable"
            problems.append(f"{path_str(key)!r} ({what})")
    if problems:
        raise ValueError(
            "jaxlora.lora_apply: the function replaced argument values in place that "
            f"cannot be stored back: {shown(problems)}. Only NNX Variables "
            "other than the adapted weights can be updated in place; return other "
            "new values from the function instead."
        )
    for i, value in new.items():
        value = ctx.materialize(value, "output", "stored by the function")
        owners[i].set_value(value)


def _same_weight(x, sym) -> bool:
    """Whether ``x`` is the adapted weight ``sym`` itself, unchanged (maybe rebuilt
    from the same arrays, as a scan stacks its slices back)."""
    return (
        isinstance(x, Sym)
        and isinstance(sym, Sym)
        and all(getattr(x, f) is getattr(sym, f) for f in ("w", "a", "b"))
        and (x.a_lab, x.b_lab, x.scale) == (sym.a_lab, sym.b_lab, sym.scale)
    )


def _returned(ctx, x, out_path: str, given: list):
    """An output: an adapted weight returned unchanged where the output tree holds
    it at its own path (an NNX step returning ``nnx.state(model)``, Linen's
    updated variables) is its `LoraWeight`, so state threaded to the next step
    keeps its adapters; anything else derived from one (the weight returned as a
    value) is materialized."""
    at_own_path = isinstance(x, Sym) and (
        out_path == x.path or out_path.endswith(f"/{x.path}")
    )
    for sym, weight in given if at_own_path else ():
        if _same_weight(x, sym):
            ctx.record(
                x.path, "output", "factored", "returned unchanged: its LoraWeight"
            )
            return weight
    return ctx.materialize(x, "output", "returned by the function")


def call(fn: Callable, args: tuple, kwargs: dict) -> PyTree:
    """Evaluates ``fn(*args, **kwargs)`` with every `LoraWeight` leaf run factored.

    Args:
        fn: any JAX-traceable function (a Flax ``apply``, an NNX or Equinox-style
            forward, a plain function).
        args: positional arguments; any pytree may hold `LoraWeight` leaves.
        kwargs: keyword arguments, likewise.

    Returns:
        ``fn``'s output, equal to running ``fn`` on the merged weights, computed as
        ``W0·x + s·b(a(x))`` wherever a weight is contracted.

    Warns:
        UserWarning: once per parameter path whose weight had to be materialized.

    Example:
        ``y = call(model.apply, (lora_params, x), {})`` (runnable examples:
        `jaxlora.lora_apply`).
    """
    return _run(_Context(warn=True), fn, tuple(args), dict(kwargs))


def _capture(ctx, eqn, invals):
    """Records the activations contracted with an adapted weight's input axes."""
    (sym,) = [x for x in invals if isinstance(x, Sym)][:1] or [None]
    if not isinstance(sym.path, str):  # a concatenation: its rows are not one weight's
        for path in sym.paths:
            ctx.captured[path] = (
                "combined with other arrays (concatenate or stack) before its use"
            )
        return
    if eqn.primitive.name != "dot_general" or len(invals) != 2:
        ctx.captured[sym.path] = f"used by '{eqn.primitive.name}'"
        return
    lhs, rhs = invals
    sym_lhs = isinstance(lhs, Sym)
    x = rhs if sym_lhs else lhs
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    sc, xc = (lc, rc) if sym_lhs else (rc, lc)
    if ctx.inside:
        ctx.captured[sym.path] = f"used inside {ctx.inside[-1]}"
        return
    if sym.stack_axes or lb or isinstance(x, Sym):
        ctx.captured[sym.path] = "stacked, or contracted with a batch axis"
        return
    if not sym.can_regroup(sc):  # input axes up to size-1 axes (w[:, None] etc.)
        ctx.captured[sym.path] = "not contracted over its input axes"
        return
    # x's contracted axes in the order of a's input axes; size-1 ones go last
    order = [xc[list(sc).index(i)] for i in sym.in_axes if i in sc]
    order += [xc[k] for k, i in enumerate(sc) if i not in sym.in_axes]
    free = [i for i in range(x.ndim) if i not in xc]
    fan_in = math.prod(x.shape[i] for i in order)
    rows = jax.numpy.transpose(x, free + order).reshape(-1, fan_in)
    # a's rows at this use, in the order of x's contracted axes (a's input axes;
    # the size-1 ones on b's side add nothing)
    a_rows = jax.numpy.moveaxis(sym.a, sym.a_lab.index(R), -1)
    a_rows = a_rows.reshape(fan_in, a_rows.shape[-1]).astype(jax.numpy.float32)
    k, code = ctx.row_ids.get(sym.path, (0, None)), jnp.asarray(_READ)
    if k[0]:
        rows, code = _unpermuted(rows, a_rows, *k)
    entry = ctx.captured.setdefault(sym.path, [])
    if isinstance(entry, list):
        ratios = _rank_ratios(a_rows[:, : a_rows.shape[1] - k[0]])
        tags = jax.numpy.broadcast_to(ratios, (len(rows), len(ratios)))
        lead = jax.numpy.asarray([x.shape[i] for i in free], jax.numpy.int32)
        entry.append((rows, tags, lead, code))  # lead: the use's positions, row-major


def _rank_ratios(a_rows):
    """``a``'s rank columns after the first, divided by the first, at this use (at
    the input position where the first is largest: a padded view has rows of
    zeros): which slice of a stacked factor is in use, when the columns were
    written so (EVA's probe tags each layer this way). Views of the weight scale
    all columns alike and keep the ratios."""
    first = a_rows[jax.numpy.argmax(jax.numpy.abs(a_rows[:, 0]))]
    return first[1:] / first[0]


# how a use's rows read (`_unpermuted`), worst last
_READ, _ZEROED, _UNREADABLE, _ZEROED_CUT = 0, 1, 2, 3


def _unpermuted(rows, a_rows, k: int, fan_in: int):
    """``rows`` met by a view of the weight, as the weight's own input rows.

    The probe's last ``k`` rank columns number each of ``a``'s input rows (the
    binary digits ``d`` of its index, each as ``2**d`` over the first column), so
    at a use through a view that reorders, cuts, pads or repeats the input side
    (``w[::-1]``, a transpose then a reshape of input axes, ``w[:2]``, a tile),
    each position of the view says which row of the weight it is. The row a
    position holds gets the inputs that met it, summed over the positions that hold
    it: ``x · view(w) = u · w``, and ``u`` is what the weight sees. A row of zeros
    (padding) holds no row. Returns ``(u, code)``: `_READ`; `_UNREADABLE` where a
    position does not read as a row (the weight was changed by more than a view,
    or cast or scaled out of its dtype's range); `_ZEROED` where no position
    holds a row, as for a weight scaled by zero (a gate that starts at 0): its rows
    are taken as they come, in the weight's order unless the view also reorders
    them; `_ZEROED_CUT` for such a view of another width (nothing to take).

    The view is most often the weight itself, or a permutation of its rows: those
    are a copy or a gather; only a view that repeats or drops rows scatters (which
    XLA:CPU runs ~15x slower than a gather).
    """
    absent = jnp.all(a_rows == 0, axis=1)
    first = jnp.where(absent, 1.0, a_rows[:, 0])[:, None]
    mant, expo = jnp.frexp(a_rows[:, a_rows.shape[1] - k :] / first)
    digits = expo - 1  # 2**d = 0.5 * 2**(d + 1), exactly
    fine = (mant == 0.5) & (digits >= 0) & (digits < 2)
    ids = (digits << jnp.arange(k)[None]).sum(1)
    read = jnp.all(absent | (jnp.all(fine, axis=1) & (ids < fan_in)))
    zeroed = jnp.all(absent)
    cut = rows.shape[1] != fan_in
    code = jnp.where(zeroed, _ZEROED_CUT if cut else _ZEROED, _READ)
    code = jnp.where(read, code, _UNREADABLE)
    ids = jnp.where(absent, fan_in, ids)  # out of range: dropped
    rows, ids = _unsplit_rows(rows), _unsplit_rows(ids)  # whole, for a gather

    def scattered(rows):
        u = jnp.zeros((len(rows), fan_in), rows.dtype)
        return u.at[:, ids].add(rows, mode="drop")

    if cut:  # a slice, a tile: rows dropped or repeated
        return scattered(rows), code
    held = jnp.zeros(fan_in, jnp.int32).at[ids].add(1, mode="drop")
    inverse = jnp.zeros(fan_in, jnp.int32).at[ids].set(jnp.arange(fan_in), mode="drop")
    same = jnp.all(ids == jnp.arange(fan_in)) | zeroed
    branch = jnp.where(same, 0, jnp.where(jnp.all(held == 1), 1, 2))
    u = lax.switch(
        branch,
        [lambda r: r, lambda r: jnp.take(r, inverse, axis=1), scattered],
        rows,
    )
    return u, code


def _unsplit_rows(rows):
    """Captured rows whole on every device when split over explicit mesh axes (a
    batch split on 'data'): the PCA contracts over them."""
    mesh = _contract._explicit_mesh(rows)
    if mesh is None:
        return rows
    return jax.reshard(
        rows, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )


def input_capturer(fn: Callable, row_ids: dict | None = None) -> Callable:
    """A function ``(args, kwargs) -> (rows, tags, reasons, leads)`` capturing inputs.

    Each call runs ``fn(*args, **kwargs)`` once (jitted; compiled once per input
    shape) and returns ``rows``: per weight path, every row of activations that met
    the weight's input axes (all uses, and every step of a ``scan``, concatenated),
    shaped ``(n, fan_in)`` in the order of its ``a`` factor's input axes; ``tags``:
    per path and row, ``a``'s rank columns after the first divided by the first at
    that use, shaped ``(n, rank - 1 - k)`` (which layer of a stacked weight the row
    met, when the columns were written to say so); and ``reasons``: per path that
    cannot be captured (used by a convolution or a gather, inside a while loop, a
    cond branch or a ``shard_map``, still stacked where it is contracted, only
    used as a dense array), why; ``leads``: per path and use, in the order of its
    rows, the shape of the positions one row stands for at that use (the input's
    axes other than the contracted ones), an int array ``(*steps, k)``: one copy
    per step of the ``scan`` loops around the use, whose rows come step after step.

    ``row_ids``: per path, ``(k, fan_in)`` where the last ``k`` rank columns of
    its ``a`` number ``a``'s input rows (`_unpermuted`): its rows are then the
    weight's own, whatever view of it met them (a reversal, a transpose then a
    reshape of input axes, a slice); without, the rows are in the order of the
    view's input axes, and as many.
    """
    reasons: dict[str, str] = {}
    warned: set[str] = set()

    @jax.jit
    def run(args, kwargs):
        ctx = _Context(warn=False, capture=True, row_ids=row_ids)
        _run(ctx, fn, args, kwargs)
        rows, tags, leads, codes = {}, {}, {}, {}
        for path, got in ctx.captured.items():
            if isinstance(got, str):
                reasons[path] = got
                continue
            rows[path] = _unsplit_rows(jax.numpy.concatenate([u[0] for u in got]))
            tags[path] = jax.numpy.concatenate([u[1] for u in got])
            leads[path] = [u[2] for u in got]
            codes[path] = jax.numpy.max(jax.numpy.stack([u[3] for u in got]))
        for path, uses in ctx.uses.items():  # never contracted as a weight
            dense = [u for u in uses if u.mode == "materialized"]
            if path not in ctx.captured and dense:
                reasons[path] = (
                    f"only used as a dense array (by '{dense[0].primitive}': "
                    f"{dense[0].reason}), whose inputs are not the weight's"
                )
        return rows, tags, leads, codes

    def capture(args, kwargs):
        rows, tags, leads, codes = run(tuple(args), dict(kwargs))
        got = dict(reasons)
        for path, code in codes.items():
            if int(code) == _UNREADABLE:
                got[path] = (
                    "its input rows cannot be told apart at a use: it is changed by "
                    "more than a view (reversal, slice, transpose, reshape, cast, "
                    "scalar multiple) before it, or cast or scaled out of its "
                    "dtype's range there"
                )
            elif int(code) == _ZEROED_CUT:
                got[path] = (
                    "scaled by zero at a use where a view changes its input side: "
                    "which of its rows meet which inputs cannot be read"
                )
            elif int(code) == _ZEROED and path not in warned:
                warned.add(path)  # once, not per batch
                warnings.warn(
                    f"jaxlora: {path!r} is scaled by zero at a use (a gate that "
                    "starts at 0?), so the probe cannot check which of its rows "
                    "meet which inputs there: its inputs are taken in the order they "
                    "meet it, which is right unless the model also reorders its "
                    "input side at that use (w[::-1]).",
                    stacklevel=4,
                )
            if int(code) > _ZEROED:
                del rows[path]
        return rows, tags, got, leads

    return capture


@dataclasses.dataclass(frozen=True)
class Report:
    """What `explain` found: for each adapted weight path, its uses."""

    uses: dict[str, tuple[Use, ...]]

    def status(self, path: str) -> str:
        modes = {u.mode for u in self.uses[path]}
        if "materialized" in modes:
            return "materialized"
        return "factored" if "factored" in modes else "unused"

    @property
    def statuses(self) -> dict[str, str]:
        return {p: self.status(p) for p in self.uses}

    def __str__(self) -> str:
        rows = [("path", "status", "used by")]
        for path, uses in self.uses.items():
            how = "; ".join(
                u.primitive
                + (f" ({u.mode}: {u.reason})" if u.mode != "factored" else "")
                for u in uses
            )
            rows.append((path, self.status(path), how or "-"))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def explain(fn: Callable, args: tuple, kwargs: dict) -> Report:
    """Reports, without running any FLOPs, how each `LoraWeight` in the args is used.

    Example:
        ``print(explain(model.apply, (lora_params, x), {}))`` prints (runnable
        example: `jaxlora.explain`)::

        path                  status    used by
        params/Dense_0/kernel factored  dot_general
    """
    ctx = _Context(warn=False)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        (tuple(args), dict(kwargs)), is_leaf=is_lora
    )
    values = [x for _, x in leaves]
    for kp, x in leaves:
        if is_lora(x):
            ctx.uses.setdefault(_arg_path(kp), [])
    # abstract inputs (jax.ShapeDtypeStruct) are traced like arrays
    dyn = [
        i
        for i, x in enumerate(values)
        if _is_dynamic(x) or isinstance(x, jax.ShapeDtypeStruct)
    ]

    def run(dyn_vals):
        full = list(values)
        for i, v in zip(dyn, dyn_vals, strict=True):
            full[i] = v
        return _run(ctx, fn, *jax.tree.unflatten(treedef, full))

    jax.eval_shape(run, [values[i] for i in dyn])
    return Report({p: tuple(u) for p, u in ctx.uses.items()})
