"""Moving between adapted trees, plain trees and adapter-only trees."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._boxes import factored_boxes
from jaxlora._nnx import through_state
from jaxlora._node import LoraWeight
from jaxlora._node import is_lora
from jaxlora._paths import path_str
from jaxlora._targets import check_flag
from jaxlora._targets import check_unique
from jaxlora._targets import examples
from jaxlora._targets import is_floating
from jaxlora._targets import shown

PyTree = Any
#: Adapters of a tree: ``{path: LoraWeight(w=None, a, b, spec)}``.
Adapters = dict[str, LoraWeight]


def refuse_baseless(params: PyTree, caller: str) -> None:
    """Raises if ``params`` holds adapters without a base (`adapters`' ``w=None``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    baseless = [path_str(p) for p, x in flat if is_lora(x) and x.w is None]
    if baseless:
        raise ValueError(
            f"{caller}: {examples(baseless)} hold adapters without a base weight "
            "(w=None, as jaxlora.adapters returns them). Put them on the base weights "
            "first: jaxlora.combine(base_params, adapters)."
        )


def _map_lora(fn, params: PyTree, caller: str) -> PyTree:
    refuse_baseless(params, caller)
    out = jax.tree.map(lambda x: fn(x) if is_lora(x) else x, params, is_leaf=is_lora)
    return factored_boxes(out)


@through_state()
def merge(params: PyTree) -> PyTree:
    """The plain tree with every adapted weight replaced by ``w + scale · a @ b``.

    The result is what an unmodified ``model.apply`` takes. The sum is formed in
    float32 (or wider) and cast back to the base weight's dtype.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> p = jaxlora.init({"kernel": jnp.ones((4, 3))}, jax.random.key(0), rank=2)
        >>> node = p["kernel"].replace(b=jnp.ones((2, 3)))  # as if trained
        >>> want = node.w + node.scale * node.a @ node.b
        >>> bool(jnp.allclose(jaxlora.merge({"kernel": node})["kernel"], want))
        True
    """
    out = _map_lora(LoraWeight.merged, params, "merge")
    _warn_overflow(params, out)
    return out


def _warn_overflow(params: PyTree, merged: PyTree) -> None:
    """Warns of merged weights of a narrow dtype (float16) that overflowed to inf
    where the base was finite (the float32 sum did not fit the base's dtype)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    out = dict(
        (path_str(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(merged)[0]
    )
    wide = jnp.finfo(jnp.float32).maxexp  # bfloat16 has float32's range
    bad = []
    for kp, node in flat:
        new = out.get(path_str(kp))
        if not is_lora(node) or new is None or isinstance(new, jax.core.Tracer):
            continue
        if (
            not jnp.issubdtype(new.dtype, jnp.floating)
            or jnp.finfo(new.dtype).maxexp >= wide
        ):
            continue
        if bool(jnp.any(jnp.isinf(new) & jnp.isfinite(node.w))):
            bad.append(f"{path_str(kp)!r} ({jnp.dtype(new.dtype).name})")
    if bad:
        warnings.warn(
            f"jaxlora.merge: w + scale·a@b overflows the base weight's dtype at "
            f"{shown(bad)}: the merged weight holds inf where the base did not. "
            "Merge a float32 copy of the base (jax.tree.map(lambda x: x.astype("
            "jnp.float32), base) with jaxlora.combine) or keep the adapter unmerged "
            "(jaxlora.lora_apply).",
            stacklevel=3,
        )


@through_state()
def base(params: PyTree, *, allow_residual: bool = False) -> PyTree:
    """The plain tree with the base weights, adapters dropped.

    Args:
        params: an adapted tree.
        allow_residual: weight-aware schemes (PiSSA, OLoRA, ...) and
            ``compensate=True`` replace a base weight by a residual. Taking such a
            base is refused unless this is True, so that a residual is never used as
            if it were the original model by mistake.

    Raises:
        ValueError: if a target holds a residual base and ``allow_residual`` is False.
    """
    if not check_flag("allow_residual", allow_residual):
        residual = [
            path_str(p)
            for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
            if is_lora(x) and x.spec.residual
        ]
        if residual:
            raise ValueError(
                f"{examples(residual)} hold a residual base (scheme "
                f"{_first_scheme(params)!r}), not the original weights. Use "
                "jaxlora.merge(params) for the fine-tuned model, "
                "jaxlora.to_plain_lora(params, original_params) for a portable "
                "adapter, or base(params, allow_residual=True) if you mean the "
                "residual."
            )
    return _map_lora(lambda x: x.w, params, "base")


def _first_scheme(params: PyTree) -> str:
    leaves = jax.tree.leaves(params, is_leaf=is_lora)
    return next((x.spec.scheme for x in leaves if is_lora(x) and x.spec.residual), "")


@through_state(returns_tree=False)
def adapters(params: PyTree) -> Adapters:
    """The factors only: ``{path: LoraWeight(w=None, a, b, spec)}``.

    A pytree (``jax.tree.map`` reaches ``a`` and ``b``) that `combine` puts back on a
    base tree. Paths are ``/``-joined (``'params/Dense_0/kernel'``).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    return {path_str(p): x.replace(w=None) for p, x in flat if is_lora(x)}


def _check_adapter_tree(adapter_tree) -> None:
    """Refuses anything but a mapping of path -> adapter (``adapters``' output)."""
    if isinstance(adapter_tree, Mapping):
        bad = {
            p: x
            for p, x in adapter_tree.items()
            if not (isinstance(p, str) and is_lora(x) and x.w is None)
        }
        if not bad:
            return
        p, x = next(iter(bad.items()))
        held = "an adapter with its base" if is_lora(x) else type(x).__name__
        got = f"a mapping whose entry {p!r} is {held}"
    else:
        got = type(adapter_tree).__name__
    raise TypeError(
        "combine's adapter_tree must map paths to adapters without their base, as "
        f"jaxlora.adapters(params) returns them; got {got}. Pass "
        "jaxlora.adapters(params). (jaxlora.load already returns the base with its "
        "adapters on it: nothing to combine.)"
    )


@through_state()
def combine(
    base_params: PyTree, adapter_tree: Adapters, *, allow_residual: bool = False
) -> PyTree:
    """Puts adapters (from `adapters`) back on a plain base tree.

    Args:
        base_params: a plain tree of base weights.
        adapter_tree: adapters from `adapters`.
        allow_residual: adapters of a weight-aware scheme (PiSSA, OLoRA, ...) or of
            ``compensate=True`` were trained on a residual base; they only belong on
            that residual (``base(params, allow_residual=True)``). Set True to say
            ``base_params`` is it; on the original weights use `to_plain_lora`.

    Raises:
        ValueError: listing every adapter path missing from ``base_params``, every
            shape that does not fit, every path already adapted in ``base_params``
            and, unless ``allow_residual``, every residual adapter.
    """
    allow_residual = check_flag("allow_residual", allow_residual)
    _check_adapter_tree(adapter_tree)
    if not adapter_tree:
        raise ValueError(
            "combine: adapter_tree holds no adapters (an empty mapping), so nothing "
            "would be put on the base. Pass jaxlora.adapters(params) of adapted params."
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(base_params, is_leaf=is_lora)
    check_unique([path_str(k) for k, _ in flat], among=set(adapter_tree))
    found, problems = set(), []
    residual = sorted(p for p, x in adapter_tree.items() if x.spec.residual)
    if residual and not allow_residual:
        scheme = adapter_tree[residual[0]].spec.scheme
        problems.append(
            f"{examples(residual)} were trained on a residual base (scheme "
            f"{scheme!r}), not on the original weights: combine them with "
            "jaxlora.base(params, allow_residual=True) and pass allow_residual=True, "
            "or convert them with jaxlora.to_plain_lora(params, original_params)"
        )

    def attach(keypath, leaf):
        p = path_str(keypath)
        node = adapter_tree.get(p)
        if node is None:
            return leaf
        found.add(p)
        if is_lora(leaf):
            problems.append(
                f"{p!r}: base_params already holds an adapter here ({leaf!r}); pass "
                "the plain tree jaxlora.base(params) (allow_residual=True for a "
                "residual base) instead of the adapted tree"
            )
            return leaf
        if not is_floating(leaf) or leaf.ndim != node.layout.ndim:
            got = getattr(leaf, "dtype", type(leaf).__name__)
            problems.append(
                f"{p!r}: the base holds {got}{list(getattr(leaf, 'shape', ()))} here; "
                f"the adapter needs a floating {node.layout.ndim}-D weight (init "
                "adapts floating kernels only)"
            )
            return leaf
        want = node.layout.factor_shapes(tuple(leaf.shape), node.rank)
        got = (tuple(node.a.shape), tuple(node.b.shape))
        if want != got:
            problems.append(
                f"{p!r}: factors {got} do not fit a base weight of shape "
                f"{tuple(leaf.shape)} (expected {want})"
            )
        return node.replace(w=leaf)

    out = jax.tree_util.tree_map_with_path(attach, base_params, is_leaf=is_lora)
    missing = sorted(set(adapter_tree) - found)
    if missing:
        problems.append(f"adapter paths not in the base tree: {examples(missing)}")
    if problems:
        raise ValueError(
            "Cannot combine these adapters with this base tree:\n  - "
            + "\n  - ".join(problems)
            + "\nCheck the adapters were trained for this model (same paths, shapes)."
        )
    return factored_boxes(out)
