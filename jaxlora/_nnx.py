"""`nnx.Optimizer` for models whose parameters hold `LoraWeight`s."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlora._boxes import factor_names
from jaxlora._node import is_lora
from jaxlora._optax import apply_updates
from jaxlora._optax import check_transformation
from jaxlora._paths import path_str
from jaxlora._targets import examples

PyTree = Any


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _opt_variable(x: Any) -> Any:
    """Flax's ``to_opt_state`` for one leaf, except that a `LoraWeight` value keeps
    the layout of its arrays: the kernel's sharding metadata would reshard ``a`` and
    ``b`` to the kernel's axes (splitting the rank axis, or failing to)."""
    if not isinstance(x, nnx.Variable):
        return nnx.OptArray(x)
    meta = x.get_metadata()
    if any(is_lora(v) for v in jax.tree.leaves(x.get_value(), is_leaf=is_lora)):
        for key in ("out_sharding", "sharding_names", "sharding", "optimizer_sharding"):
            meta.pop(key, None)
        meta["eager_sharding"] = False
    elif "optimizer_sharding" in meta:
        meta["out_sharding"] = meta.pop("optimizer_sharding")
    return nnx.OptVariable(x.get_value(), **meta)


def _freezes(opt_state: PyTree) -> bool:
    """Whether ``opt_state`` comes from `jaxlora.freeze_base` or `jaxlora.lora_plus`
    (alone or inside a chain, ``MultiSteps``, ...): a partition with a frozen part."""
    partition = optax.transforms.PartitionState
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, partition))
    return any(isinstance(x, partition) and "frozen" in x.inner_states for x in found)


def _adapted(state: PyTree) -> dict[str, str]:
    """``{path: Variable type}`` of the adapted weights in an NNX state."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)
    return {
        path_str(kp): type(v).__name__
        for kp, v in flat
        if _is_variable(v) and is_lora(v.get_value())
    }


def through_state(index: int = 0, *, returns_tree: bool = True):
    """Decorates a function of a parameter tree (positional argument ``index``)
    that returns one: given an NNX graph node (a Module) there, it runs on the
    module's state and merges the result back into a new module. A pytree view of
    a module holds a Variable it shares (a tied kernel) once per place, and the
    function would adapt or merge each copy apart, untying them; its state holds
    it once, and ``nnx.merge`` ties the places again. ``returns_tree=False``: the
    function only reads the tree (its result is returned as is)."""

    def decorate(fn):
        name = list(inspect.signature(fn).parameters)[index]

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            given = args[index] if len(args) > index else kwargs.get(name)
            if not nnx.graph.is_graph_node(given):
                return fn(*args, **kwargs)
            graphdef, state = nnx.split(given)
            if len(args) > index:
                args = (*args[:index], state, *args[index + 1 :])
            else:
                kwargs = {**kwargs, name: state}
            out = fn(*args, **kwargs)
            return nnx.merge(graphdef, out) if returns_tree else out

        return wrapped

    return decorate


def _check_wrt(every: PyTree, chosen: PyTree, wrt: Any) -> None:
    """Refuses a ``wrt`` that keeps no adapted weight, or leaves out every one
    held by some Variable type (a kernel kept out of ``nnx.Param``): their factors
    would never train. Picking some adapters of a type (by path) is allowed."""
    everyone, kept = _adapted(every), _adapted(chosen)
    types = set(kept.values())
    left_out = {p: t for p, t in everyone.items() if p not in kept and t not in types}
    if left_out:
        kinds = sorted(set(left_out.values()))
        name = repr(wrt) if isinstance(wrt, str) else getattr(wrt, "__name__", wrt)
        fix = next((f"e.g. wrt=(nnx.Param, {k})" for k in kinds if k != "Param"), "")
        if isinstance(wrt, str):  # NNX reads a string as a tag
            fix = (
                "a string filter matches a Variable's tag, not its type, "
                f"e.g. wrt=nnx.{kinds[0]}"
            )
        raise ValueError(
            f"jaxlora.NnxOptimizer: wrt={name} leaves out the adapted weights "
            f"{examples(sorted(left_out))} (held by {', '.join(kinds)} variables), "
            "so their factors would never train. Pass a filter that includes "
            f"them{': ' + fix if fix else ''}."
        )


def _check_grads(params: PyTree, grads: PyTree, wrt: Any) -> None:
    """``grads`` must hold every ``wrt`` variable: ``nnx.grad`` differentiates
    ``nnx.Param`` only unless told otherwise (a ``wrt`` with BatchStat or every
    Variable selects state it has no gradient for)."""
    have = {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(grads)[0]}
    missing = [
        p
        for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        if (p := path_str(k)) not in have
    ]
    if missing:
        name = repr(wrt) if isinstance(wrt, str) else getattr(wrt, "__name__", wrt)
        raise ValueError(
            f"jaxlora.NnxOptimizer.update: wrt={name} selects {examples(missing)}, "
            "which the gradients do not hold (nnx.grad differentiates nnx.Param "
            "only unless told: nnx.grad(f, argnums=nnx.DiffState(0, wrt))). "
            "Differentiate what wrt selects, or narrow wrt (e.g. wrt=nnx.Param)."
        )


def _warn_unfrozen(params: PyTree, opt_state: PyTree) -> None:
    adapted = [x for x in jax.tree.leaves(params, is_leaf=is_lora) if is_lora(x)]
    if adapted and not _freezes(opt_state):
        warnings.warn(
            "jaxlora.NnxOptimizer: tx does not freeze the base weights (it is not "
            "made by jaxlora.freeze_base or jaxlora.lora_plus), so it treats each "
            "adapted kernel's frozen w as a parameter: weight decay moves it and "
            "the optimizer keeps full-size moments for it. Wrap the optimizer: "
            "jaxlora.freeze_base(optax.adamw(...)).",
            stacklevel=_user_level(),
        )


def _user_level() -> int:
    """The ``stacklevel`` of the first caller outside jaxlora and Flax (whose
    module metaclass adds frames around ``NnxOptimizer(...)``)."""
    internal = tuple(
        os.path.dirname(m.__file__) + os.sep for m in (sys.modules["jaxlora"], flax)
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def nnx_partition_spec(tree: PyTree) -> PyTree:
    """``nnx.get_partition_spec`` for an NNX state holding `LoraWeight`s.

    Flax's recipe gives a variable's whole value the kernel's ``PartitionSpec``
    (``nnx.with_partitioning`` metadata): ``a`` and ``b`` would get the kernel's
    axes, the rank axis split (or, where the mesh does not divide the rank, an
    error from ``nnx.get_named_sharding``). Here an adapted kernel's variable holds
    a `LoraWeight` of specs: ``w`` the kernel's, ``a`` those of its stacked and
    input axes, ``b`` those of its stacked and output axes, the rank axis none (as
    `jaxlora.init` lays the factors out). Everything else is Flax's.

    Args:
        tree: an NNX state (``nnx.state(model)``) or a tree holding variables.

    Returns:
        The tree of ``PartitionSpec``s (inside the variables), for
        ``jax.lax.with_sharding_constraint`` or `nnx_named_sharding`.

    Example:
        >>> import jax, jaxlora
        >>> from flax import nnx
        >>> init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("d", "m"))
        >>> with jax.set_mesh(jax.make_mesh((1, 1), ("d", "m"))):
        ...     linear = nnx.Linear(8, 4, kernel_init=init, rngs=nnx.Rngs(0))
        ...     state = jaxlora.init(nnx.state(linear), jax.random.key(1), rank=2)
        >>> node = jaxlora.nnx_partition_spec(state)["kernel"].get_value()
        >>> node.w, node.a, node.b
        (P('d', 'm'), P('d', None), P(None, 'm'))
    """

    def spec(x):
        node = x.get_value() if _is_variable(x) else None
        if not is_lora(node) or node.w is None:
            return nnx.get_partition_spec(x)
        names = tuple(nnx.spmd.get_var_pspec(x) or ())
        a_names, b_names = factor_names(node.layout, names)
        pspec = jax.sharding.PartitionSpec
        return x.replace(
            node.replace(w=pspec(*names), a=pspec(*a_names), b=pspec(*b_names))
        )

    return jax.tree.map(spec, tree, is_leaf=_is_variable)


def nnx_named_sharding(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """``nnx.get_named_sharding`` for an NNX state holding `LoraWeight`s: the specs
    of `nnx_partition_spec` on ``mesh`` (for ``jax.device_put``, ``nnx.jit``'s
    shardings or an orbax restore target)."""
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(
            f"nnx_named_sharding needs a jax.sharding.Mesh, got {mesh!r}: pass "
            "jax.make_mesh((n,), ('data',)) or the mesh the model is sharded on."
        )
    return jax.tree.map(
        lambda p: jax.sharding.NamedSharding(mesh, p), nnx_partition_spec(tree)
    )


class NnxOptimizer(nnx.Optimizer):
    """``nnx.Optimizer`` whose state may hold `LoraWeight`s.

    Flax's ``Optimizer.update`` writes the new optimizer state back through
    ``nnx.state``, which splits every pytree inside a variable's value: the moments
    of an adapted kernel (a `LoraWeight` of ``a`` and ``b``, as ``tx.init`` makes
    them) come back as an ``nnx.State``, and the next step fails with a pytree
    structure error. This class writes each variable's new value back whole; all
    else (``model``, ``tx``, ``wrt``, ``step``) is ``nnx.Optimizer``'s.

    The optimizer state of an adapted kernel is laid out like its factors (as
    ``tx.init`` makes it), not by the kernel's sharding metadata
    (``nnx.with_partitioning``), which names the kernel's axes, not the factors'.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from flax import nnx
        >>> graphdef, state = nnx.split(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
        >>> model = nnx.merge(graphdef, jaxlora.init(state, jax.random.key(1), rank=2))
        >>> tx = jaxlora.freeze_base(optax.adam(1e-2))
        >>> opt = jaxlora.NnxOptimizer(model, tx, wrt=nnx.Param)
        >>> apply = jaxlora.lora_apply(lambda m, x: m(x))
        >>> loss = lambda m: apply(m, jnp.ones((3, 4))).sum()
        >>> for _ in range(2):  # nnx.Optimizer's second step fails here
        ...     _ = opt.update(model, nnx.grad(loss)(model))
        >>> int(opt.step[...]), bool(jnp.abs(model.kernel.get_value().b).sum() > 0)
        (2, True)
    """

    def __init__(
        self, model: Any, tx: optax.GradientTransformation, *, wrt, graph=None
    ):
        check_transformation(
            tx, "NnxOptimizer needs", "jaxlora.freeze_base(optax.adamw(1e-3))"
        )
        self.graph = graph
        self.step = nnx.OptState(jnp.array(0, dtype=jnp.uint32))
        self.tx = tx
        try:
            params = nnx.state(model, wrt, graph=graph)
        except (TypeError, ValueError) as e:  # NNX's own message may not name it
            raise TypeError(
                f"jaxlora.NnxOptimizer: wrt={wrt!r} is not an NNX filter: pass a "
                "Variable type (wrt=nnx.Param), a tuple of filters, or nnx.All(...)"
                f" ({type(e).__name__}: {e})."
            ) from e
        _check_wrt(nnx.state(model, graph=graph), params, wrt)
        state = tx.init(params)
        _warn_unfrozen(params, state)
        self.opt_state = nnx.data(
            jax.tree.map(_opt_variable, state, is_leaf=_is_variable)
        )
        self.wrt = wrt

    def update(self, model: Any, grads: PyTree, /, **kwargs) -> optax.Updates:
        """One step of ``tx`` on ``model``'s ``wrt`` parameters, in place."""
        param_arrays = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
        grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
        _check_grads(param_arrays, grad_arrays, self.wrt)
        updates, new_opt_state = self.tx.update(
            grad_arrays,
            nnx.as_pure(self.opt_state),
            param_arrays,
            **nnx.as_pure(kwargs),
        )
        # each frozen w as it is: a base kept in host memory stays there
        nnx.update(model, apply_updates(param_arrays, updates))
        jax.tree.map(
            lambda var, value: var.set_value(value),
            self.opt_state,
            new_opt_state,
            is_leaf=_is_variable,
        )
        self.step[...] += 1
        return updates
