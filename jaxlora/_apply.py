"""`jaxlora.lora_apply`: call any apply function with an adapted parameter tree."""

from __future__ import annotations

import functools
from collections.abc import Callable

from jaxlora import _factored
from jaxlora._targets import check_callable
from jaxlora._targets import check_flag


def lora_apply(apply_fn: Callable, *, factored: bool = True) -> Callable:
    """Wraps ``apply_fn`` so it accepts trees holding `LoraWeight` nodes.

    The wrapped function has the same signature; any argument may hold adapted
    weights (a Linen variables dict, an NNX state, a plain pytree). Each adapted
    weight is used factored, ``W0·x + s·b(a(x))``: the update ``a @ b`` is never
    formed, and the frozen ``W0`` gets an exactly-zero gradient that XLA never
    computes, so a training step costs about 2/3 of a full fine-tuning step. Uses
    the engine cannot factor are computed on ``w + s·a@b`` with one warning per
    parameter path (see `explain`). Works under ``jax.jit``, ``jax.grad``,
    ``jax.vmap`` and forward mode (``jax.jvp``, ``jax.jacfwd`` applied around the call:
    the contractions then run in plain ops); new factor values never recompile. JAX
    refuses ``jax.linearize``, and a ``jvp`` whose ``jit``/``checkpoint`` boundary sits
    between it and this call (``jvp(jit(f))``; write ``jit(jvp(f))``): the custom
    reverse rule has no forward mode. ``factored=False`` supports both.

    Args:
        apply_fn: any function, e.g. a Linen ``model.apply``, an NNX
            ``lambda state, x: nnx.merge(graphdef, state)(x)``, or plain JAX.
        factored: ``False`` forms ``w + s·a@b`` for every weight instead (the naive
            formulation; same values, full-fine-tuning cost).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
        >>> model = nn.Dense(8)
        >>> x = jnp.ones((2, 4))
        >>> params = jaxlora.init(model.init(jax.random.key(0), x), jax.random.key(1),
        ...                       rank=2)
        >>> jaxlora.lora_apply(model.apply)(params, x).shape
        (2, 8)
    """

    check_callable("lora_apply's apply_fn", apply_fn)
    factored = check_flag("factored", factored)

    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        if factored:
            return _factored.call(apply_fn, args, kwargs)
        return _factored.call_merged(apply_fn, args, kwargs)

    return wrapped


def explain(apply_fn: Callable, *args, **kwargs) -> _factored.Report:
    """Reports how each adapted weight is used by ``apply_fn(*args, **kwargs)``.

    For every `LoraWeight` in the arguments: whether it ran factored (and through
    which primitive: ``dot_general``, ``conv_general_dilated``, ``gather``) or was
    materialized, and why. Traces abstractly: no FLOPs are spent.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
        >>> model = nn.Dense(8)
        >>> x = jnp.ones((2, 4))
        >>> params = jaxlora.init(model.init(jax.random.key(0), x), jax.random.key(1),
        ...                       rank=2)
        >>> report = jaxlora.explain(model.apply, params, x)
        >>> report.status("params/kernel")
        'factored'
    """
    check_callable("explain's apply_fn", apply_fn)
    return _factored.explain(apply_fn, args, kwargs)
