"""The adapted-weight node: a frozen base weight together with its low-rank factors.

`LoraWeight` is a registered pytree node. Its children are the arrays ``w`` (the frozen
base weight, or the residual base of a weight-aware scheme), ``a`` (input side, shape
``(*stack, *in, r)``) and ``b`` (output side, shape ``(*stack, r, *out)``). Everything
else (axis layout, rank, alpha, rsLoRA, scheme) is static metadata in a `LoraSpec`, so
``jax.jit`` sees only the three arrays and a new value of a factor compiles nothing.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def accumulator(*dtypes) -> jnp.dtype:
    """The dtype sums of ``dtypes`` are done in: their promotion, float32 or wider.
    8-bit floats (which JAX does not promote implicitly) sum in float32."""
    wide = [d for d in map(jnp.dtype, dtypes) if d.itemsize > 1]
    return jnp.promote_types(
        jnp.result_type(*wide) if wide else jnp.float32, jnp.float32
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a weight are its input side, output side and stacked layer axes.

    Axes are indices into the base weight's shape; together they must name every axis
    exactly once. ``a`` gets shape ``(*stack, *in, r)`` and ``b`` gets ``(*stack, r,
    *out)``; the update ``ΔW = scale · a @ b`` is laid out back in the weight's order.

    Example:
        >>> Layout.dense(2)                    # Dense kernel (in, out)
        Layout(in_axes=(0,), out_axes=(1,), stack_axes=())
        >>> Layout.conv(4)                     # Conv kernel (h, w, in, out)
        Layout(in_axes=(0, 1, 2), out_axes=(3,), stack_axes=())
        >>> Layout.dense(3, n_in=2)            # out projection (heads, dim, embed)
        Layout(in_axes=(0, 1), out_axes=(2,), stack_axes=())
    """

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("in_axes", "out_axes", "stack_axes"):
            axes = getattr(self, name)
            ok = isinstance(axes, (tuple, list)) and all(
                isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))
                for i in axes
            )
            if not ok:  # "01" would read as (0, 1), 0.5 as 0
                raise TypeError(
                    f"Layout {name} must be a tuple of axis indices (ints), got "
                    f"{axes!r}: e.g. Layout(in_axes=(0,), out_axes=(1,))."
                )
            object.__setattr__(self, name, tuple(int(i) for i in axes))
        if not self.in_axes or not self.out_axes:
            raise ValueError(
                f"A Layout needs at least one input and one output axis, got {self}."
            )
        axes = self.stack_axes + self.in_axes + self.out_axes
        if sorted(axes) != list(range(len(axes))):
            raise ValueError(
                f"Layout axes must name each axis 0..{len(axes) - 1} exactly once, "
                f"got {self}."
            )

    @property
    def ndim(self) -> int:
        return len(self.stack_axes) + len(self.in_axes) + len(self.out_axes)

    @classmethod
    def dense(cls, ndim: int, *, n_in: int = 1, n_stack: int = 0) -> Layout:
        """``n_stack`` leading layer axes, then ``n_in`` input axes, the rest output."""
        s = tuple(range(n_stack))
        i = tuple(range(n_stack, n_stack + n_in))
        return cls(in_axes=i, out_axes=tuple(range(n_stack + n_in, ndim)), stack_axes=s)

    @classmethod
    def conv(cls, ndim: int, *, n_stack: int = 0) -> Layout:
        """Every axis but the last is input (``(*window, in, out)``)."""
        return cls.dense(ndim, n_in=ndim - 1 - n_stack, n_stack=n_stack)

    def split_shape(self, shape: tuple[int, ...]):
        """Returns ``(stack_shape, in_shape, out_shape)`` of a weight of ``shape``."""
        pick = lambda axes: tuple(shape[i] for i in axes)  # noqa: E731
        return pick(self.stack_axes), pick(self.in_axes), pick(self.out_axes)

    def fans(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(fan_in, fan_out)``: the products of the input and output axis sizes."""
        _, i, o = self.split_shape(shape)
        return math.prod(i), math.prod(o)

    def factor_shapes(self, shape: tuple[int, ...], rank: int):
        """Shapes of ``a`` and ``b`` for a weight of ``shape`` at ``rank``."""
        s, i, o = self.split_shape(shape)
        return (*s, *i, rank), (*s, rank, *o)

    def einsum_spec(self) -> str:
        """The einsum ``'a,b->w'`` that forms ``a @ b`` in the weight's axis order."""
        letters = string.ascii_letters
        w = letters[: self.ndim]
        r = letters[self.ndim]
        pick = lambda axes: "".join(w[i] for i in axes)  # noqa: E731
        s = pick(self.stack_axes)
        return f"{s}{pick(self.in_axes)}{r},{s}{r}{pick(self.out_axes)}->{w}"


@dataclasses.dataclass(frozen=True)
class Conv:
    """How a convolution reads its kernel, for the formats that store conv adapters
    as convolutions (PEFT's ``lora_A`` is a conv over the base window to ``r``
    channels, its ``lora_B`` a 1×1 conv).

    Attributes:
        axes: the kernel's input-feature axis, then its window axes in the order of
            the input's spatial axes (torch's ``(in, *window)``); None where a
            convolution reads the kernel in a way one such adapter cannot hold (a
            flipped, scaled or reshaped kernel, a transposed convolution, a kernel
            that other operations or differently dilated convolutions use too).
        groups: the convolution's feature groups; None where the layout was not
            inferred from the model (``apply_fn=``), so it is not known.
        dilation: the kernel (rhs) dilation per window axis; None if not known.

    Example:
        >>> Conv.hwio(4)                       # Flax Conv kernel (h, w, in, out)
        Conv(axes=(2, 0, 1), groups=None, dilation=None)
    """

    axes: tuple[int, ...] | None
    groups: int | None = None
    dilation: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.axes is not None:
            object.__setattr__(self, "axes", tuple(int(i) for i in self.axes))
        if self.dilation is not None:
            dilation = tuple(int(d) for d in self.dilation)
            object.__setattr__(self, "dilation", dilation)

    @classmethod
    def hwio(cls, ndim: int) -> Conv:
        """A Flax ``Conv`` kernel ``(*window, in, out)``: what the default ``"conv"``
        layout assumes (groups and dilation unknown)."""
        return cls(axes=(ndim - 2, *range(ndim - 2)))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static metadata of one adapted weight (hashable; part of the pytree structure).

    Attributes:
        layout: the axis layout of the base weight.
        rank: the rank ``r`` of the factors.
        alpha: the LoRA alpha.
        rslora: if True the scale is ``alpha / sqrt(r)``, else ``alpha / r``.
        scheme: the name of the scheme that initialized the factors.
        residual: True when ``w`` is not the original weight but a residual
            (weight-aware schemes, or ``compensate=True``): such a base must never be
            merged with an adapter trained on the original weight.
        embedding: True for an embedding table (rows are looked up by index).
        conv: for a convolution kernel, how the convolution reads it (`Conv`);
            None for any other weight.
    """

    layout: Layout
    rank: int
    alpha: float
    rslora: bool = False
    scheme: str = ""
    residual: bool = False
    embedding: bool = False
    conv: Conv | None = None

    def __post_init__(self):
        # plain Python values: NumPy or JAX scalars (np.bool_(True), jnp.float32(4))
        # would make a checkpoint's metadata unwritable as JSON, or the spec
        # unhashable
        def scalar(x, kind) -> bool:
            if isinstance(x, jax.core.Tracer) or np.shape(x) != ():
                return False
            return isinstance(x, (np.generic, jax.Array)) and jnp.issubdtype(
                x.dtype, kind
            )

        for name in ("rslora", "residual", "embedding"):
            if scalar(getattr(self, name), jnp.bool_):
                object.__setattr__(self, name, bool(getattr(self, name)))
        if scalar(self.rank, jnp.integer):
            object.__setattr__(self, "rank", int(self.rank))
        if scalar(self.alpha, jnp.number) or type(self.alpha) is int:
            object.__setattr__(self, "alpha", float(self.alpha))
        # a spec built by hand is checked as init checks its arguments: a rank the
        # factors do not have, or a NaN alpha, would give a silently wrong scale
        if not isinstance(self.layout, Layout):
            raise TypeError(
                f"LoraSpec: layout must be a jaxlora.Layout, got {self.layout!r}."
            )
        if type(self.rank) is not int or self.rank < 1:
            raise ValueError(
                f"LoraSpec: rank must be a positive int, got {self.rank!r}."
            )
        if type(self.alpha) is not float or not math.isfinite(self.alpha):
            raise ValueError(
                f"LoraSpec: alpha must be a finite number, got {self.alpha!r}."
            )
        for name in ("rslora", "residual", "embedding"):
            if type(getattr(self, name)) is not bool:
                raise TypeError(
                    f"LoraSpec: {name} must be a bool, got {getattr(self, name)!r}."
                )

    @property
    def scale(self) -> float:
        root = math.sqrt(self.rank) if self.rslora else self.rank
        return self.alpha / root


@jax.tree_util.register_pytree_with_keys_class
class LoraWeight:
    """A frozen weight ``w`` with LoRA factors ``a`` and ``b``: ``w + scale · a @ b``.

    Build it with `jaxlora.init`; read it with `jaxlora.merge`, `jaxlora.base` and
    `jaxlora.adapters`. It refuses to be used as an array, so an unmodified
    ``model.apply`` fails loudly instead of silently ignoring the adapter.
    """

    __slots__ = ("w", "a", "b", "spec")

    def __init__(self, w, a, b, spec: LoraSpec):
        self.w = w
        self.a = a
        self.b = b
        self.spec = spec

    # -- pytree protocol -------------------------------------------------------------
    def tree_flatten_with_keys(self):
        key = jax.tree_util.GetAttrKey
        return ((key("w"), self.w), (key("a"), self.a), (key("b"), self.b)), self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        return cls(*children, spec)

    # -- conveniences ----------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.spec.scale

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def layout(self) -> Layout:
        """The layout of ``w`` as it is here: inside ``jax.vmap`` over the leading
        stacked axes (one ensemble member or layer at a time) those axes are gone
        from ``w``, ``a`` and ``b`` alike, and from the layout too."""
        lay = self.spec.layout
        k = lay.ndim - getattr(self.w, "ndim", lay.ndim)
        if k == 0:
            return lay
        n_a, n_b = len(lay.stack_axes) + len(lay.in_axes), len(lay.stack_axes)
        n_b += len(lay.out_axes)
        if (
            0 < k <= len(lay.stack_axes)
            and lay.stack_axes[:k] == tuple(range(k))
            and (self.a.ndim, self.b.ndim) == (n_a + 1 - k, n_b + 1 - k)
        ):
            drop = lambda axes: tuple(i - k for i in axes)  # noqa: E731
            return Layout(
                drop(lay.in_axes), drop(lay.out_axes), drop(lay.stack_axes[k:])
            )
        raise ValueError(
            f"A LoraWeight's arrays (w {self.w.shape}, a {self.a.shape}, b "
            f"{self.b.shape}) do not have the {lay.ndim} axes of its layout {lay}. "
            "Under jax.vmap, map w, a and b over their leading stacked axes together "
            "(in_axes=0 for the whole LoraWeight, with stack_axes starting at 0), or "
            "vmap inside: jaxlora.lora_apply(jax.vmap(apply_fn))."
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self) -> int:
        return len(self.w.shape)

    def check_rank(self) -> None:
        """Raises ValueError if ``a`` and ``b`` are not of the spec's rank (a
        LoraWeight built by hand): the scale ``alpha / rank`` would be wrong."""
        n_stack = len(self.layout.stack_axes)
        got = (self.a.shape[-1], self.b.shape[n_stack])
        if got != (self.rank, self.rank):
            raise ValueError(
                f"A LoraWeight's factors a {tuple(self.a.shape)} and b "
                f"{tuple(self.b.shape)} have rank {got[0]} and {got[1]}, but its "
                f"spec says rank {self.rank}: its scale alpha / rank would be wrong. "
                "Build the LoraSpec with the factors' rank."
            )

    def delta(self, dtype=None) -> jax.Array:
        """The update ``scale · a @ b`` laid out like ``w``, formed in ``dtype``.

        The factors are cast to ``dtype`` (default: ``a``'s dtype) before the
        product, so bf16 factors give the float32 update that residual schemes
        subtracted from the base, not a bf16-rounded one.
        """
        self.check_rank()
        a, b = self.a, self.b
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        # full precision: GPUs default to TF32 matmuls, which would put a merged
        # residual-init model ~1e-3 away from the original weights
        delta = jnp.einsum(
            self.layout.einsum_spec(), a, b, precision=jax.lax.Precision.HIGHEST
        )
        return delta * self.scale

    def merged(self) -> jax.Array:
        """``w + scale · a @ b`` in ``w``'s dtype (summed in float32 or wider)."""
        acc = accumulator(self.w.dtype, self.a.dtype)
        w = self.w
        if isinstance(w, jax.core.Tracer):  # under jit the memory space is typed
            on_host = (
                getattr(jax.typeof(w), "memory_space", None) == jax.memory.Space.Host
            )
            if on_host:  # a base kept in host memory: summed on the device
                w = jax.device_put(w, jax.memory.Space.Device)
            merged = (w.astype(acc) + self.delta(acc)).astype(self.w.dtype)
            return jax.device_put(merged, jax.memory.Space.Host) if on_host else merged
        home = getattr(w, "sharding", None)
        offloaded = getattr(home, "memory_kind", None) not in (None, "device")
        if offloaded:  # a base kept in host memory: summed on the device, put back
            w = jax.device_put(w, home.with_memory_kind("device"))
        merged = (w.astype(acc) + self.delta(acc)).astype(self.w.dtype)
        return jax.device_put(merged, home) if offloaded else merged

    def replace(self, **changes) -> LoraWeight:
        """A copy with some of ``w``, ``a``, ``b``, ``spec`` replaced."""
        fields = {k: getattr(self, k) for k in self.__slots__}
        fields.update(changes)
        return LoraWeight(**fields)

    def __repr__(self) -> str:
        shape = lambda x: getattr(x, "shape", x)  # noqa: E731
        return (
            f"LoraWeight(w={shape(self.w)}, a={shape(self.a)}, b={shape(self.b)}, "
            f"rank={self.spec.rank}, scale={self.spec.scale:g}, "
            f"scheme={self.spec.scheme!r}{', residual' if self.spec.residual else ''})"
        )

    # -- loud failure when used as a plain array -------------------------------------
    def _refuse(self, *_, **__):
        raise TypeError(
            f"A jaxlora LoraWeight (base shape {self.shape}) was used as an array. "
            "The model was called with an adapted parameter tree: wrap its apply "
            "function with jaxlora.lora_apply(model.apply) (an NNX module: "
            "jaxlora.lora_apply(lambda m, x: m(x))(model, x)), or pass "
            "jaxlora.merge(params) (adapters folded in) or jaxlora.base(params) "
            "(adapters dropped) to the unmodified function. Inside lora_apply, "
            "pass the adapted tree or model as an argument of the wrapped function "
            "rather than capturing it in a closure."
        )

    __jax_array__ = _refuse
    __array__ = _refuse
    __getitem__ = _refuse  # an NNX layer reads its kernel as ``self.kernel[...]``


def is_lora(x: Any) -> bool:
    """True if ``x`` is a `LoraWeight` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, LoraWeight)


def factor_shardings(layout: Layout, weight: Any) -> tuple | None:
    """The shardings of the factors ``(a, b)`` of ``weight`` when it is an array laid
    out on a device mesh: a factor axis that is one of the weight's axes gets the
    weight's mesh axes, the rank axis none. None for anything else. The factors are
    trained, so they live in device memory even when the weight is offloaded to the
    host (and streamed in by the model)."""
    sharding = sharding_of(weight)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (weight.ndim - len(sharding.spec))
    stack = [spec[i] for i in layout.stack_axes]
    a_spec = (*stack, *(spec[i] for i in layout.in_axes), None)
    b_spec = (*stack, None, *(spec[i] for i in layout.out_axes))

    # written as a jitted step returns it, so that its second call (with updated
    # factors) reuses the first compilation: one entry per axis when the layout is
    # in the types (explicit axes), trailing Nones dropped when XLA chooses it
    explicit = jax.sharding.AxisType.Explicit in tuple(sharding.mesh.axis_types)

    def named(fspec):
        while fspec and fspec[-1] is None and not explicit:
            fspec = fspec[:-1]
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*fspec)
        )

    return named(a_spec), named(b_spec)


def sharding_of(weight: Any):
    """The sharding of an array, or of a traced one whose type says it (explicit
    mesh axes, e.g. `jaxlora.init` under ``jax.jit``); else None."""
    if not isinstance(weight, jax.core.Tracer):
        return getattr(weight, "sharding", None)
    sharding = getattr(jax.typeof(weight), "sharding", None)
    explicit = jax.sharding.AxisType.Explicit
    mesh = getattr(sharding, "mesh", None)
    return sharding if explicit in tuple(getattr(mesh, "axis_types", ())) else None


def layout_hidden(weight: Any) -> bool:
    """True for a traced array on a device mesh with an automatic axis of more than
    one device: its layout may split it, and its type does not say how."""
    if not isinstance(weight, jax.core.Tracer):
        return False
    mesh = getattr(getattr(jax.typeof(weight), "sharding", None), "mesh", None)
    sizes = tuple(getattr(mesh, "axis_sizes", ()))
    types = tuple(getattr(mesh, "axis_types", ()))
    auto = jax.sharding.AxisType.Auto
    return any(n > 1 and t == auto for n, t in zip(sizes, types, strict=True))


def place(x: jax.Array, sharding) -> jax.Array:
    """``x`` laid out as ``sharding``: ``device_put`` for an array, ``reshard`` for
    a traced one (its layout is part of its type)."""
    if isinstance(x, jax.core.Tracer):
        return jax.sharding.reshard(x, sharding)
    return jax.device_put(x, sharding)


def placed_like_weight(node: LoraWeight, weight: Any) -> LoraWeight:
    """``node`` with its factors sharded like ``weight`` (`factor_shardings`) when
    that is an array laid out on a device mesh, and a base that replaces ``weight``
    (a residual) put back in ``weight``'s own layout; anything else is left where
    it is."""
    shardings = factor_shardings(node.spec.layout, weight)
    if shardings is None:
        return node
    sa, sb = shardings
    w = node.w if node.w is weight else place(node.w, sharding_of(weight))
    return node.replace(w=w, a=place(node.a, sa), b=place(node.b, sb))
