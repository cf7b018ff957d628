"""Optax wiring: train the factors, never the base weights; LoRA+ learning rates."""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import optax

from jaxlora._node import is_lora
from jaxlora._paths import path_str
from jaxlora._targets import _name_matches

PyTree = Any
#: Plain (non-LoRA) leaves to train in full: a regex fully matched against the path,
#: a sequence of module names (suffix match) or a predicate ``(path, leaf) -> bool``.
Trainable = None | str | Sequence[str] | Callable[[str, Any], bool]


def _full_trainer(trainable: Trainable) -> Callable[[str, Any], bool]:
    if trainable is None:
        return lambda p, x: False
    if isinstance(trainable, str):
        return lambda p, x: re.fullmatch(trainable, p) is not None
    if callable(trainable):
        return trainable
    names = list(trainable)

    def by_name(p, x):
        module = p.rsplit("/", 1)[0]
        return any(_name_matches(n, p) or module.endswith(n) for n in names)

    return by_name


def param_labels(params: PyTree, *, trainable: Trainable = None) -> PyTree:
    """Labels every leaf ``"lora_a"``, ``"lora_b"``, ``"full"`` or ``"frozen"``.

    The tree has the structure of ``params`` (a `LoraWeight` gets ``w="frozen"``,
    ``a="lora_a"``, ``b="lora_b"``), ready for ``optax.multi_transform``.

    Args:
        params: an adapted tree.
        trainable: plain leaves to train in full (e.g. a new classification head):
            a regex fully matched against the path, module names, or a predicate.
    """
    full = _full_trainer(trainable)

    def label(keypath, x):
        if is_lora(x):
            return x.replace(w="frozen", a="lora_a", b="lora_b")
        return "full" if full(path_str(keypath), x) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=is_lora)


def trainable_mask(params: PyTree, *, trainable: Trainable = None) -> PyTree:
    """True for every leaf that is trained (factors, and ``trainable`` leaves)."""
    return jax.tree.map(
        lambda s: s != "frozen", param_labels(params, trainable=trainable)
    )


def freeze_base(
    tx: optax.GradientTransformation, *, trainable: Trainable = None
) -> optax.GradientTransformation:
    """Applies ``tx`` to the factors only; base weights get zero updates, no state.

    Args:
        tx: any optax transformation (``optax.adamw(1e-3)``).
        trainable: plain leaves to train in full with ``tx`` as well.

    Example:
        >>> import optax, jaxlora
        >>> tx = jaxlora.freeze_base(optax.adam(1e-3))
    """
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda s: "frozen" if s == "frozen" else "train",
        param_labels(params, trainable=trainable),
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def lora_plus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    *,
    ratio: float = 16.0,
    trainable: Trainable = None,
    **optimizer_kwargs,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): ``b`` learns ``ratio`` times faster than ``a``.

    Args:
        optimizer: an optax optimizer factory, e.g. ``optax.adamw``.
        learning_rate: the learning rate of ``a`` (and of ``trainable`` leaves); a
            float or an optax schedule.
        ratio: ``η_b / η_a`` (the paper's λ; 16 is typical).
        trainable: plain leaves trained in full at ``learning_rate``.
        **optimizer_kwargs: passed to ``optimizer`` (e.g. ``weight_decay``).

    Example:
        >>> import optax, jaxlora
        >>> tx = jaxlora.lora_plus(optax.adamw, 2e-4, ratio=16, weight_decay=0.0)
    """
    if callable(learning_rate):
        lr_b = lambda step: ratio * learning_rate(step)  # noqa: E731
    else:
        lr_b = ratio * learning_rate
    make = lambda lr: optimizer(learning_rate=lr, **optimizer_kwargs)  # noqa: E731
    return optax.multi_transform(
        {
            "lora_a": make(learning_rate),
            "lora_b": make(lr_b),
            "full": make(learning_rate),
            "frozen": optax.set_to_zero(),
        },
        lambda params: param_labels(params, trainable=trainable),
    )
