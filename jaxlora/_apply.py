"""`jaxlora.lora_apply`: call any apply function with an adapted parameter tree."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jaxlora._node import is_lora


def _materialize(tree: Any) -> Any:
    """Every `LoraWeight` → ``stop_gradient(w) + scale · a @ b`` (weight dtype)."""

    def merged(x):
        return x.replace(w=jax.lax.stop_gradient(x.w)).merged()

    return jax.tree.map(lambda x: merged(x) if is_lora(x) else x, tree, is_leaf=is_lora)


def lora_apply(apply_fn: Callable) -> Callable:
    """Wraps ``apply_fn`` so it accepts trees holding `LoraWeight` nodes.

    The wrapped function has the same signature; any argument may hold adapted
    weights (a Linen variables dict, an NNX state, a plain pytree). Base weights are
    frozen: their gradient is exactly zero. Works under ``jax.jit``, ``jax.grad``
    and ``jax.vmap``.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
        >>> model = nn.Dense(8)
        >>> x = jnp.ones((2, 4))
        >>> params = jaxlora.init(model.init(jax.random.key(0), x), jax.random.key(1),
        ...                       rank=2)
        >>> jaxlora.lora_apply(model.apply)(params, x).shape
        (2, 8)
    """

    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        args, kwargs = _materialize((args, kwargs))
        return apply_fn(*args, **kwargs)

    return wrapped
