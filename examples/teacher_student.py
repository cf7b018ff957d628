"""A synthetic teacher–student task for comparing LoRA initializations.

After Hayou, Ghosh & Yu 2024 (arXiv 2406.08447): a frozen random "pretrained"
MLP of width ``n`` plays the base model; the teacher is the same network with a
low-rank change on its ``n × n`` hidden kernels. A student made of the base plus
LoRA factors on those kernels must fit the teacher's outputs (mean squared error).

The network is ``x (d_in) → input → gelu → hidden_0 → gelu → hidden_1 → gelu →
readout (d_out)``. Every kernel is drawn N(0, 1/fan_in) (standard
parametrization), so activations stay O(1) as the width grows; only the two
``n × n`` hidden kernels get LoRA and the teacher's change. Inputs are fresh
N(0, I) draws at every step (infinite data), so the training loss estimates the
population loss and there is nothing to overfit.

The loss is the *relative* MSE: MSE(student, teacher) / MSE(base, teacher), the
denominator measured once per task on its evaluation set. Training from a
zero update (``b = 0`` or ``a = 0``) therefore starts at 1.0, and 0.0 is a
perfect fit, which is reachable whenever the LoRA rank is at least the teacher's.

Example:
    >>> import jax
    >>> cfg = TaskConfig(width=32)
    >>> task = make_task(jax.random.key(0), cfg)
    >>> round(float(relative_mse(task.base, task)), 4)  # the base, untrained
    1.0
    >>> float(relative_mse(task.teacher, task))
    0.0
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxlora

PyTree = Any

#: LoRA targets of the student: the two ``n × n`` hidden kernels.
TARGETS = r"params/hidden_\d/kernel"
HIDDEN = ("hidden_0", "hidden_1")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Shape of a teacher–student task.

    Attributes:
        width: hidden width ``n`` (the LoRA'd kernels are ``n × n``).
        d_in: input dimension.
        d_out: output dimension.
        teacher_rank: rank of the teacher's change on each hidden kernel.
        teacher_scale: singular value of each direction of that change (the base
            kernels' singular values are O(1), so 1.0 is a change of comparable size).
        batch: training batch size.
        eval_size: number of fixed evaluation inputs.
    """

    width: int = 256
    d_in: int = 32
    d_out: int = 8
    teacher_rank: int = 4
    teacher_scale: float = 1.0
    batch: int = 64
    eval_size: int = 1024


class MLP(nn.Module):
    """The base / teacher / student network (its parameters decide which it is)."""

    width: int
    d_out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        h = nn.gelu(nn.Dense(self.width, kernel_init=init, name="input")(x))
        for name in HIDDEN:
            h = nn.gelu(nn.Dense(self.width, kernel_init=init, name=name)(h))
        return nn.Dense(self.d_out, kernel_init=init, name="readout")(h)


class Task(NamedTuple):
    """One teacher–student task (a pytree: ``jax.vmap`` stacks tasks over seeds).

    Attributes:
        base: the frozen "pretrained" variables ``{"params": ...}``.
        teacher: the base with ``teacher_delta`` added to its hidden kernels.
        delta: ``{hidden name: (u, v)}``, the teacher's change ``u @ v`` per kernel,
            ``u`` of shape ``(n, teacher_rank)`` and ``v`` ``(teacher_rank, n)``.
        x_eval: fixed evaluation inputs ``(eval_size, d_in)``.
        y_eval: the teacher's outputs on ``x_eval``.
        mse0: MSE(base, teacher) on ``x_eval`` (the loss normalizer).
    """

    base: PyTree
    teacher: PyTree
    delta: PyTree
    x_eval: jax.Array
    y_eval: jax.Array
    mse0: jax.Array


def low_rank_delta(key: jax.Array, n: int, rank: int, scale: float):
    """``(u, v)`` with ``u @ v = scale · Q₁ Q₂ᵀ`` for random orthonormal ``Q₁, Q₂``."""
    k1, k2 = jax.random.split(key)
    q1, _ = jnp.linalg.qr(jax.random.normal(k1, (n, rank)))
    q2, _ = jnp.linalg.qr(jax.random.normal(k2, (n, rank)))
    return q1 * scale, q2.T


def make_task(key: jax.Array, cfg: TaskConfig) -> Task:
    """Draws the base network, the teacher's low-rank change and the eval set.

    Pure and traceable: ``jax.vmap(lambda k: make_task(k, cfg))(keys)`` gives one
    task per seed.
    """
    k_base, k_delta, k_x = jax.random.split(key, 3)
    model = MLP(cfg.width, cfg.d_out)
    base = model.init(k_base, jnp.zeros((1, cfg.d_in)))
    keys = jax.random.split(k_delta, len(HIDDEN))
    delta = {
        name: low_rank_delta(k, cfg.width, cfg.teacher_rank, cfg.teacher_scale)
        for name, k in zip(HIDDEN, keys, strict=True)
    }
    changed = {
        name: {**base["params"][name], "kernel": base["params"][name]["kernel"] + u @ v}
        for name, (u, v) in delta.items()
    }
    teacher = {"params": {**base["params"], **changed}}
    x_eval = jax.random.normal(k_x, (cfg.eval_size, cfg.d_in))
    y_eval = model.apply(teacher, x_eval)
    mse0 = jnp.mean((model.apply(base, x_eval) - y_eval) ** 2)
    return Task(base, teacher, delta, x_eval, y_eval, mse0)


def forward(params: PyTree, x: jax.Array) -> jax.Array:
    """The network on plain or LoRA-adapted params (width read from the params)."""
    width = params["params"]["input"]["kernel"].shape[-1]  # never adapted
    d_out = params["params"]["readout"]["kernel"].shape[-1]
    return jaxlora.lora_apply(MLP(width, d_out).apply)(params, x)


def relative_mse(params: PyTree, task: Task, x: jax.Array | None = None) -> jax.Array:
    """MSE(params, teacher) on ``x`` (default: the eval set) divided by ``mse0``."""
    if x is None:
        x, y_teacher = task.x_eval, task.y_eval
    else:
        y_teacher = forward(task.teacher, x)
    return jnp.mean((forward(params, x) - y_teacher) ** 2) / task.mse0


def student(task: Task, key: jax.Array, **init_kwargs) -> PyTree:
    """The base with LoRA on the hidden kernels: ``jaxlora.init(base, key, ...)``."""
    return jaxlora.init(task.base, key, targets=TARGETS, **init_kwargs)
