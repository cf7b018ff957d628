"""Initialization schemes: how the factors ``a`` (input side) and ``b`` start.

A scheme's random part is an ordinary ``jax.nn.initializers`` initializer
``(key, shape, dtype) -> array``. Every scheme here is called on the *flattened*
factor shapes ``(fan_in, r)`` for ``a`` and ``(r, fan_out)`` for ``b``, so
``fan_in`` is always ``shape[0]`` of ``a`` and ``r`` is ``shape[-1]`` of ``a`` /
``shape[0]`` of ``b``. Formulas and sources: the README's scheme table.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers as jinit

from jaxlora._residual import WeightAware

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A LoRA initialization scheme from two ``jax.nn.initializers`` initializers.

    Accepted wherever a scheme name is (``jaxlora.init(params, rng, scheme=...)``).

    Attributes:
        a_init: initializer of the input-side factor, called with shape ``(fan_in, r)``.
        b_init: initializer of the output-side factor, called with shape
            ``(r, fan_out)``.
        name: a label stored in each adapted weight's metadata and in checkpoints.

    Example:
        >>> import jax
        >>> s = Scheme(jax.nn.initializers.lecun_normal(), jax.nn.initializers.zeros,
        ...            name="lecun")
        >>> a, b = s.factors(jax.random.key(0), 64, 32, 4, jax.numpy.float32)
        >>> a.shape, b.shape, float(abs(b).max())
        ((64, 4), (4, 32), 0.0)
    """

    a_init: Initializer
    b_init: Initializer
    name: str = "custom"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(
                f"Scheme name is the label stored with each adapter and in checkpoints "
                f"and must be a non-empty string, got {self.name!r}."
            )
        if type(self).factors is not Scheme.factors:  # draws its own factors
            return
        for field in ("a_init", "b_init"):
            init = getattr(self, field)
            if not callable(init):
                raise TypeError(
                    f"Scheme {self.name!r}: {field} must be an initializer "
                    f"(key, shape, dtype) -> array such as "
                    f"jax.nn.initializers.normal(0.02), got {init!r}."
                )
        if self.a_init is jinit.zeros and self.b_init is jinit.zeros:
            # a warning, not an error: the saddle is a claim users test
            warnings.warn(
                f"Scheme {self.name!r}: a_init and b_init are both zeros, so a @ b "
                "starts at a saddle: every gradient of a and b is 0 and the adapter "
                "never trains. Draw one factor at random (a_init="
                "jax.nn.initializers.normal(0.02), as scheme='normal') to train.",
                stacklevel=3,
            )

    def zero_start(self) -> str | None:
        """Why ``a @ b`` is 0 at the start (one factor is drawn as zeros), or None."""
        for field, side in (("a_init", "a"), ("b_init", "b")):
            if getattr(self, field) is jinit.zeros:
                return f"{side} starts at 0"
        return None

    def factors(self, key, fan_in: int, fan_out: int, rank: int, dtype):
        """Draws ``(a, b)`` with shapes ``(fan_in, rank)`` and ``(rank, fan_out)``."""
        ka, kb = jax.random.split(key)
        a = self.a_init(ka, (fan_in, rank), dtype)
        b = self.b_init(kb, (rank, fan_out), dtype)
        asked = (("a_init", a, (fan_in, rank)), ("b_init", b, (rank, fan_out)))
        for name, x, shape in asked:
            got, want = (
                (tuple(jnp.shape(x)), jnp.dtype(x.dtype)),
                (shape, jnp.dtype(dtype)),
            )
            if got != want:
                raise ValueError(
                    f"Scheme {self.name!r}: {name} was asked for shape {shape} and "
                    f"dtype {want[1].name} and returned shape {got[0]} and dtype "
                    f"{got[1].name}. An initializer must return exactly what it is "
                    "asked for, as jax.nn.initializers do."
                )
        return a, b

    def check_rank(self, rank: int) -> str | None:
        """A problem with ``rank`` for this scheme, or None."""
        del rank
        return None


@dataclasses.dataclass(frozen=True)
class OrthogonalScheme(Scheme):
    """PEFT's ``"orthogonal"``: both factors non-zero, yet ``a @ b == 0`` (to rounding).

    ``Q = qr(N(0, 1)^{r×r}).Q``; ``q0, q1 = Q[0::2], Q[1::2]``;
    ``a = N^{fan_in×r/2} @ q0 / 10`` and ``b = q1ᵀ @ N^{r/2×fan_out} / 10`` (the
    transposes of PEFT's A and B). Rows of ``Q`` are orthonormal, so
    ``a @ b ∝ q0 @ q1ᵀ = 0``. ``r`` must be even.
    """

    a_init: Initializer = None
    b_init: Initializer = None
    name: str = "orthogonal"

    def factors(self, key, fan_in: int, fan_out: int, rank: int, dtype):
        kq, ka, kb = jax.random.split(key, 3)
        q, _ = jnp.linalg.qr(jax.random.normal(kq, (rank, rank), jnp.float32))
        q0, q1 = q[0::2], q[1::2]
        a = jax.random.normal(ka, (fan_in, rank // 2), jnp.float32) @ q0 / 10.0
        b = q1.T @ jax.random.normal(kb, (rank // 2, fan_out), jnp.float32) / 10.0
        return a.astype(dtype), b.astype(dtype)

    def zero_start(self) -> str | None:
        return "a @ b = 0 by construction"

    def check_rank(self, rank: int) -> str | None:
        if rank % 2:
            return f"scheme 'orthogonal' needs an even rank, got rank={rank}"
        return None


def _normal_std(std_of_shape: Callable[[tuple[int, ...]], float]) -> Initializer:
    """An untruncated normal initializer whose std depends on the (2-D) shape."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) * jnp.asarray(
            std_of_shape(shape), dtype
        )

    return init


# a has shape (fan_in, r); b has shape (r, fan_out).
_fan_in_normal = jinit.variance_scaling(1.0, "fan_in", "normal")  # N(0, 1/fan_in)
_torch_kaiming_uniform = jinit.variance_scaling(
    1 / 3, "fan_in", "uniform"
)  # ±1/√fan_in
_xavier_normal = jinit.variance_scaling(1.0, "fan_avg", "normal")  # N(0, 2/(in+r))
_inv_sqrt_r_a = _normal_std(lambda s: s[-1] ** -0.5)  # N(0, 1/r) on a (r = s[-1])
_inv_r_a = _normal_std(lambda s: 1.0 / s[-1])  # N(0, 1/r²) on a (PEFT gaussian)
_inv_sqrt_r_b = _normal_std(lambda s: s[0] ** -0.5)  # N(0, 1/r) on b (r = s[0])

_NAMED: dict[str, Scheme] = {
    "normal": Scheme(jinit.normal(0.02), jinit.zeros, "normal"),
    "he": Scheme(_fan_in_normal, jinit.zeros, "he"),
    "xavier": Scheme(_xavier_normal, jinit.zeros, "xavier"),
    "normalized": Scheme(_inv_sqrt_r_a, jinit.zeros, "normalized"),
    "kaiming_uniform": Scheme(_torch_kaiming_uniform, jinit.zeros, "kaiming_uniform"),
    "gaussian": Scheme(_inv_r_a, jinit.zeros, "gaussian"),
    "he_uniform": Scheme(jinit.he_uniform(), jinit.zeros, "he_uniform"),
    "init_b": Scheme(jinit.zeros, _inv_sqrt_r_b, "init_b"),
    "both_random": Scheme(_torch_kaiming_uniform, _inv_sqrt_r_b, "both_random"),
    "orthogonal": OrthogonalScheme(),
}
_ALIASES = {"kaiming_normal": "he", "reversed": "init_b", "corda_ipm": "corda"}

#: The names accepted by ``jaxlora.init(..., scheme=NAME)``, aliases included; also
#: accepted: ``pissa_niter_K`` and ``lora_ga_niter_K`` (K power iterations).
SCHEMES: tuple[str, ...] = (
    tuple(sorted(_NAMED))
    + ("pissa", "olora", "milora", "lora_ga", "eva", "corda", "corda_kpm")
    + tuple(sorted(_ALIASES))
)

#: The PEFT rule for embedding tables: ``lora_embedding_A`` (r, vocab) = 0 and
#: ``lora_embedding_B`` (dim, r) ~ N(0, 1), i.e. ``a`` (vocab, r) = 0, ``b`` ~ N(0, 1).
PEFT_EMBEDDING = Scheme(jinit.zeros, jinit.normal(1.0), "peft_embedding")


_WEIGHT_AWARE = ("pissa", "milora", "olora", "lora_ga", "eva", "corda", "corda_kpm")


def resolve(scheme: Any, *, niter: int | None = None) -> Scheme | WeightAware:
    """Returns the `Scheme` (or weight-aware scheme) for a name, alias or instance.

    ``"pissa_niter_K"`` (PEFT's spelling) is ``"pissa"`` with ``niter=K``, and
    ``"lora_ga_niter_K"`` is ``"lora_ga"`` with ``niter=K`` (the label stored for
    LoRA-GA run with other than its default 4 power iterations).

    Raises:
        ValueError: for an unknown name (the message lists the available ones).
        TypeError: for anything that is neither a string nor a `Scheme`.
    """
    if isinstance(scheme, (Scheme, WeightAware)):
        if niter is not None:
            raise ValueError(
                f"niter is only used by the named schemes 'pissa' and 'lora_ga', not "
                f"by the scheme object {scheme!r}; remove it."
            )
        return scheme
    if isinstance(scheme, str):
        name = _ALIASES.get(scheme, scheme)
        if (m := re.fullmatch(r"(pissa|lora_ga)_niter_(\d+)", name)) is not None:
            if niter is not None and niter != int(m.group(2)):
                raise ValueError(
                    f"scheme {scheme!r} already sets niter={int(m.group(2))}, but "
                    f"niter={niter!r} was passed. Pass one of them."
                )
            name, niter = m.group(1), int(m.group(2))
        if name in _WEIGHT_AWARE:
            if niter is not None and name not in ("pissa", "lora_ga"):
                raise ValueError(
                    f"niter is only used by 'pissa' and 'lora_ga', not {scheme!r}; "
                    "remove it."
                )
            if niter is not None and (
                isinstance(niter, (bool, np.bool_))
                or not isinstance(niter, numbers.Integral)
                or niter < 0
            ):
                raise ValueError(f"niter must be an integer >= 0, got {niter!r}.")
            niter = None if niter is None else int(niter)
            # the label stored with the adapter says how its residual was made:
            # fast PiSSA (niter=0: a sketch, no iteration), LoRA-GA other than its 4
            fast = niter is not None and (name == "pissa" or niter != 4)
            label = f"{name}_niter_{niter}" if fast else name
            return WeightAware(label, name, niter)
        if niter is not None:
            raise ValueError(
                f"niter is only used by 'pissa' and 'lora_ga', not {scheme!r}."
            )
        if name in _NAMED:
            return _NAMED[name]
        raise ValueError(
            f"Unknown LoRA scheme {scheme!r}. Available schemes: {', '.join(SCHEMES)}"
            ", pissa_niter_K and lora_ga_niter_K (K power iterations, e.g. "
            "'pissa_niter_4'); or pass jaxlora.Scheme(a_init=..., b_init=...) for a "
            "custom one."
        )
    raise TypeError(
        f"scheme must be a name or a jaxlora.Scheme, got {type(scheme).__name__}: "
        f"{scheme!r}. Available schemes: {', '.join(SCHEMES)}."
    )
