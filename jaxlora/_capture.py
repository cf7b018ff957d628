"""The inputs each target meets, captured batch by batch, for the data-aware schemes.

EVA (a PCA of each target's inputs) and CorDA (their covariance) read the rows of
activations contracted with every target's input axes while ``apply_fn(params,
batch)`` runs. The model runs on a *probe*: the plain tree with zero-update adapters
on the targets (``b = 0``, so every output is the model's own), which the factored
engine (`jaxlora._factored.input_capturer`) intercepts. A stacked weight (``nn.scan``,
a loop that picks ``w[i]``) is captured per layer: the probe's rank columns say which
layer each row met, so every layer of a stack is a unit of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _factored
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._paths import path_str
from jaxlora._targets import shown

PyTree = Any
Unit = str | tuple[str, int]  # a weight's path, or (path, layer) of a stacked weight

_TAG_BASE = 2  # layer l's binary digits d, each written as 2**d in a rank column


def units(t) -> list[Unit]:
    """The units of target ``t``: its path, or ``(path, l)`` per stacked layer."""
    if not t.layout.stack_axes:
        return [t.path]
    return [(t.path, i) for i in range(math.prod(t.layout.split_shape(t.shape)[0]))]


def _tag_digits(t) -> int:
    """Binary digits that number the layers of target ``t`` (0 if unstacked)."""
    n = math.prod(t.layout.split_shape(t.shape)[0])
    return 0 if not t.layout.stack_axes else max(1, (n - 1).bit_length())


def _row_digits(t) -> int:
    """Binary digits that number the input rows of target ``t``."""
    return max(1, (t.layout.fans(t.shape)[0] - 1).bit_length())


def _probe(params, plan, leaves):
    """``params`` with zero adapters (``b = 0``: the model is unchanged) on the
    targets, to find their inputs. ``a``'s rank columns after the first, divided by
    the first, are ``2**d`` (1 or 2): for the binary digits ``d`` of layer ``l`` of
    a stacked weight, so every captured row says which layer it met (the scan step
    need not be the layer: a flipped or sliced stack, ``w[0]`` inside the body);
    then for those of each input row's index, so a view that reorders the input
    side (``w[::-1]``) gives back the weight's own rows (`_factored._unpermuted`).
    Powers of two keep their ratios exactly when the model scales or casts the
    weight (bf16, fp8), and ``a`` is scaled by a power of two to at most the
    weight's own largest magnitude, so a model that scales its weight into a
    narrow dtype's range (an fp8 recipe, ``w * 448 / max|w|``) keeps ``a`` in it."""
    probes = {}
    for t in plan:
        digits, row_digits = _tag_digits(t), _row_digits(t)
        rank = 1 + digits + row_digits
        a_shape, b_shape = t.layout.factor_shapes(t.shape, rank)
        n_stack = len(t.layout.stack_axes)
        stack, fan_in = a_shape[:n_stack], math.prod(a_shape[n_stack:-1])
        layer = jnp.arange(math.prod(stack))[:, None]
        cols = jnp.concatenate(
            [jnp.ones_like(layer)]
            + [2 ** (layer // _TAG_BASE**d % _TAG_BASE) for d in range(digits)],
            1,
        ).astype(jnp.float32)
        row = jnp.arange(fan_in)[:, None]
        ids = jnp.concatenate(
            [jnp.zeros((fan_in, 0), jnp.int32)]
            + [2 ** (row >> d & 1) for d in range(row_digits)],
            1,
        ).astype(jnp.float32)
        a = jnp.concatenate(
            [
                jnp.broadcast_to(cols[:, None], (len(cols), fan_in, 1 + digits)),
                jnp.broadcast_to(ids, (len(cols), fan_in, row_digits)),
            ],
            2,
        )
        spec = LoraSpec(t.layout, rank, 1.0)
        a = a.reshape(a_shape) * _magnitude(leaves[t.path])
        probes[t.path] = LoraWeight(leaves[t.path], a, jnp.zeros(b_shape), spec)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: probes.get(path_str(kp), x), params
    )


def _magnitude(w) -> jax.Array:
    """The largest power of two ``c`` with ``2c <= max|w|`` (1 for a weight of
    zeros or non-finite values)."""
    top = jnp.max(jnp.abs(w)).astype(jnp.float32)
    c = jnp.exp2(jnp.floor(jnp.log2(top / 2)))
    return jnp.where(jnp.isfinite(c) & (top > 0), c, 1.0)


def _layers(t, tags) -> list | str:
    """Per layer of target ``t``, the indices of the captured rows that met it
    (``[None]``: all rows, for a weight with no stacked axes); or a reason."""
    if not t.layout.stack_axes:
        return [None]  # every row
    n = math.prod(t.layout.split_shape(t.shape)[0])
    with np.errstate(all="ignore"):
        exps = np.log2(np.asarray(tags, np.float64))
    digits = np.rint(exps)
    if not np.all(np.isfinite(exps)) or np.abs(exps - digits).max(initial=0) > 1e-6:
        return (
            "its layers cannot be told apart (it is scaled by zero, or changed by "
            "more than a view, before its use)"
        )
    layer = digits @ (float(_TAG_BASE) ** np.arange(tags.shape[1]))
    found = [np.flatnonzero(layer == i) for i in range(n)]
    unused = [i for i, rows in enumerate(found) if not len(rows)]
    if unused:
        return (
            f"layers {shown([str(i) for i in unused])} of its {n} meet no input "
            "(a loop over part of them?)"
        )
    return found


class Rows:
    """One batch's captured inputs: ``rows[unit]`` is ``(n, fan_in)`` (a unit's rows
    are only gathered out of its weight's rows when asked for), and
    ``rows.weights(unit)`` which of them count: None (all) without an input mask,
    else 0/1 of shape ``(n,)``: the batch's mask at each use whose positions have
    the mask's shape, once per step of the scans around it."""

    def __init__(self, rows, layers, mask=None, leads=None):
        self._rows, self._layers, self._mask = rows, layers, mask
        self._masks = {}  # per path: the mask over all its rows, or why it cannot be
        if mask is not None:
            for path, uses in leads.items():
                self._masks[path] = _mask_rows(mask, jax.device_get(uses))

    def __getitem__(self, unit: Unit) -> jax.Array:
        path, i = (unit, 0) if isinstance(unit, str) else unit
        got, idx = self._rows[path], self._layers[path][i]
        return got if idx is None else jnp.take(got, idx, axis=0)

    def weights(self, unit: Unit) -> jax.Array | None:
        if self._mask is None:
            return None
        path, i = (unit, 0) if isinstance(unit, str) else unit
        idx = self._layers[path][i]
        whole = self._masks[path]
        return whole if idx is None else jnp.take(whole, idx, axis=0)

    def misfits(self) -> dict[str, str]:
        """Per path whose uses the mask does not fit: the shapes of their positions."""
        return {p: m for p, m in self._masks.items() if isinstance(m, str)}


def _mask_rows(mask: jax.Array, leads: list) -> jax.Array | str:
    """The mask over a weight's rows, use after use (each use's positions, once per
    step of its scans); or the use shapes, when one of them is not the mask's."""
    parts, shapes = [], []
    for lead in leads:
        lead = np.asarray(lead)
        steps = lead.shape[:-1]  # one copy of the shape per scan step
        shape = tuple(map(int, lead[(0,) * len(steps)]))
        shapes.append(shape)
        parts.append(jnp.tile(mask.reshape(-1), math.prod(steps)))
    if any(s != tuple(mask.shape) for s in shapes):
        return ", ".join(map(str, shapes))
    return jnp.concatenate(parts)


def captured(
    params: PyTree,
    plan: list,
    leaves: dict[str, Any],
    *,
    apply_fn: Callable,
    batches: Iterable,
    scheme: str,
    input_mask: Callable | None = None,
) -> Iterator[Rows]:
    """Runs ``apply_fn(probe, batch)`` per batch and yields its `Rows`.

    ``input_mask(batch)``, when given, says which positions of the batch count
    (nonzero; e.g. ``(batch, seq)`` from an attention mask). It applies at each use
    of a target whose positions (the input's axes other than the contracted ones,
    row-major) have the mask's shape, once per step of the scans around the use
    (the layers of a stack); positions of the same sizes in another order cannot
    be told apart.

    Raises:
        ValueError: naming ``scheme`` and every target whose inputs cannot be had:
            used by a convolution or an embedding lookup, inside a while loop, a
            cond branch or a ``shard_map``, only used as a dense array, through a
            view whose positions do not read as the weight's rows (cast out of
            range), never used; or a stacked target with layers no input meets; a
            target with a use whose positions are not of the mask's shape. A
            consumer stops reading when it has enough (the batches are read lazily).
    """
    capture = _factored.input_capturer(
        lambda p, b: apply_fn(p, b),
        {t.path: (_row_digits(t), t.layout.fans(t.shape)[0]) for t in plan},
    )
    probe = _probe(params, plan, leaves)
    for batch in batches:
        check_concrete(batch, scheme)
        rows, tags, reasons, leads = capture((probe, batch), {})
        _check_captured(plan, rows, reasons, scheme)
        layers = {t.path: _layers(t, tags[t.path]) for t in plan}
        _check_layers(layers, scheme)
        mask = None
        if input_mask is not None:  # nonzero: the position counts
            mask = jnp.asarray(input_mask(batch)) != 0
            mask = _factored._unsplit_rows(mask.astype(jnp.float32))
        out = Rows(rows, layers, mask, leads)
        if mask is not None:
            _check_mask(out, mask.shape, scheme)
        yield out


def _check_mask(rows: Rows, shape: tuple[int, ...], scheme: str) -> None:
    problems = [f"{p!r}: positions {m}" for p, m in rows.misfits().items()]
    if problems:
        raise ValueError(
            f"scheme {scheme!r}: input_mask gave positions of shape {shape}, and "
            "these targets meet inputs whose positions (the axes other than the "
            "contracted ones, per use and per step of a scan) have other shapes "
            "(a head on pooled features, time-major inputs, a weight applied at "
            "each step of a scan over the sequence):\n  - "
            + "\n  - ".join(problems)
            + "\nExclude them with targets=..., or drop input_mask."
        )


def check_concrete(tree: PyTree, scheme: str) -> None:
    """Refuses traced values: the data-aware schemes read their batches one by one
    and decide on what they capture (ranks, convergence, finiteness)."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
        raise ValueError(
            f"scheme {scheme!r} reads its batches one by one and decides on the "
            "values it captures, which a trace (jax.jit, jax.vmap) of jaxlora.init "
            "or of its batches does not have: call jaxlora.init outside the "
            "transformation, on concrete batches (the model it runs on each batch "
            "is jitted inside)."
        )


def _check_layers(layers, scheme):
    problems = [f"{p!r}: {why}" for p, why in layers.items() if isinstance(why, str)]
    if problems:
        raise ValueError(
            f"scheme {scheme!r} needs the inputs of every layer of a stacked target; "
            "these cannot be had:\n  - "
            + "\n  - ".join(problems)
            + "\nExclude them with targets=..., or use another scheme for them."
        )


def _check_captured(plan, rows, reasons, scheme):
    problems = [f"{p!r}: {why}" for p, why in reasons.items()]
    problems += [
        f"{t.path!r}: not used by apply_fn"
        for t in plan
        if t.path not in rows and t.path not in reasons
    ]
    problems += [
        f"{t.path!r}: its inputs have {rows[t.path].shape[-1]} features, not the "
        f"weight's {t.layout.fans(t.shape)[0]} (it is used through a slice or another "
        "view that changes its input side)"
        for t in plan
        if t.path in rows and rows[t.path].shape[-1] != t.layout.fans(t.shape)[0]
    ]
    if problems:
        raise ValueError(
            f"scheme {scheme!r} needs the inputs of every target, contracted over its "
            "input axes (Dense, DenseGeneral, Einsum), outside loops or in a scan (not "
            "a while loop); these cannot be captured:\n  - "
            + "\n  - ".join(problems)
            + "\nExclude them with targets=..., or use another scheme for them."
        )
