"""`nnx.Optimizer` for models whose parameters hold `LoraWeight`s."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlora._node import is_lora

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
        >>> grads = nnx.grad(lambda m: apply(m, jnp.ones((3, 4))).sum())(model)
        >>> _ = opt.update(model, grads)
    """

    def __init__(
        self, model: Any, tx: optax.GradientTransformation, *, wrt, graph=None
    ):
        self.graph = graph
        self.step = nnx.OptState(jnp.array(0, dtype=jnp.uint32))
        self.tx = tx
        state = tx.init(nnx.state(model, wrt, graph=graph))
        self.opt_state = nnx.data(
            jax.tree.map(_opt_variable, state, is_leaf=_is_variable)
        )
        self.wrt = wrt

    def update(self, model: Any, grads: PyTree, /, **kwargs) -> optax.Updates:
        """One step of ``tx`` on ``model``'s ``wrt`` parameters, in place."""
        param_arrays = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
        grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
        updates, new_opt_state = self.tx.update(
            grad_arrays,
            nnx.as_pure(self.opt_state),
            param_arrays,
            **nnx.as_pure(kwargs),
        )
        nnx.update(model, optax.apply_updates(param_arrays, updates))
        jax.tree.map(
            lambda var, value: var.set_value(value),
            self.opt_state,
            new_opt_state,
            is_leaf=_is_variable,
        )
        self.step[...] += 1
        return updates
