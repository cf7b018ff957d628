"""Flax Linen partitioning boxes around adapted weights.

``nn.with_partitioning`` / ``nn.with_logical_partitioning`` wrap a kernel in a box
(``nn.Partitioned``, ``nn.LogicallyPartitioned``) whose ``names`` give one mesh (or
logical) axis per kernel axis. `jaxlora.init` puts the `LoraWeight` inside that box,
where Flax's recipes (``nn.get_partition_spec``, ``nn.get_sharding``,
``nn.logical_to_mesh_sharding``, ``unbox``) would apply the kernel's names to ``a``
and ``b`` too: the rank axis split, or an error where the mesh does not divide it.
The box is replaced by a subclass that answers those recipes per array: ``w`` with
the kernel's names, ``a`` with those of its stacked and input axes, ``b`` with those
of its stacked and output axes, the rank axis unnamed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax.core import meta
from flax.linen import spmd

from jaxlora._node import Layout
from jaxlora._node import LoraWeight
from jaxlora._node import is_lora

PyTree = Any


def factor_names(layout: Layout, names: tuple) -> tuple[tuple, tuple]:
    """The names of ``a``'s and ``b``'s axes given the weight's ``names``."""
    names = tuple(names) + (None,) * (layout.ndim - len(names))
    pick = lambda axes: tuple(names[i] for i in axes)  # noqa: E731
    stack = pick(layout.stack_axes)
    return (*stack, *pick(layout.in_axes), None), (*stack, None, *pick(layout.out_axes))


class _FactoredBox:
    """Mixin for a box holding a `LoraWeight`: each Flax recipe runs on one box per
    array (``w``, ``a``, ``b``) of the box's own class, with that array's names."""

    def _per_array(self) -> LoraWeight | None:
        node = self.value
        if not is_lora(node) or node.w is None:
            return None
        base = _base_class(type(self))
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        make = lambda v, n: base(**{**fields, "value": v, "names": n})  # noqa: E731
        a_names, b_names = factor_names(node.layout, self.names)
        return node.replace(
            w=make(node.w, tuple(self.names)),
            a=make(node.a, a_names),
            b=make(node.b, b_names),
        )

    def _each(self, method: str, *args) -> Any:
        boxes = self._per_array()
        if boxes is None:
            return getattr(super(), method)(*args)
        return boxes.replace(
            **{f: getattr(getattr(boxes, f), method)(*args) for f in ("w", "a", "b")}
        )

    def get_partition_spec(self):
        """The box again, holding a `LoraWeight` of per-array ``PartitionSpec``s (a
        prefix of the boxed tree; ``nn.unbox`` it for an unboxed tree)."""
        out = self._each("get_partition_spec")
        return self.replace(value=out) if is_lora(out) else out

    def get_sharding(self, mesh):
        out = self._each("get_sharding", mesh)
        return self.replace(value=out) if is_lora(out) else out

    def unbox(self, apply_constraint=True):
        arrays = all(hasattr(x, "shape") for x in jax.tree.leaves(self.value))
        return self._each("unbox", apply_constraint and arrays)


class FactoredPartitioned(_FactoredBox, meta.Partitioned):
    """``nn.Partitioned`` around a `LoraWeight` (see the module docstring)."""


class FactoredLogicallyPartitioned(_FactoredBox, spmd.LogicallyPartitioned):
    """``nn.LogicallyPartitioned`` around a `LoraWeight` (see the module docstring)."""


_FACTORED = {
    meta.Partitioned: FactoredPartitioned,
    spmd.LogicallyPartitioned: FactoredLogicallyPartitioned,
}


def _base_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if not issubclass(c, _FactoredBox))


def factored_boxes(tree: PyTree) -> PyTree:
    """``tree`` with every partitioning box around a `LoraWeight` answering Flax's
    sharding recipes per array (see the module docstring), and every box of ours
    that no longer holds one (`jaxlora.merge`, `jaxlora.base`) back to the model's
    own class, so a plain tree has the model's structure; other leaves unchanged."""

    def fix(x):
        fields = lambda: {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}  # noqa: E731
        factored = _FACTORED.get(type(x))  # (a box subclass of the user's: as is)
        if factored is not None and is_lora(x.value):
            return factored(**fields())
        if isinstance(x, _FactoredBox) and not is_lora(x.value):
            return _base_class(type(x))(**fields())
        return x

    return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
