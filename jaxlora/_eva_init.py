"""EVA inside `jaxlora.init`: capture each target's inputs, PCA them, share the ranks.

EVA (Paischer et al. 2024, arXiv 2410.07170): run the model on a few batches, keep an
exact streaming PCA of the inputs of every target (`jaxlora._eva`), stop feeding a
target once successive estimates of its top ``⌈ρ·r⌉`` components agree (``|cos| ≥
τ``), pool the explained-variance ratios of all targets and hand out the total rank
``Σ r`` to the largest: a target may end with rank 0 (no adapter). ``a`` = the top
components (orthonormal columns), ``b = 0``, and ``alpha_l = alpha · r_l / r``
(``alpha · √(r_l / r)`` with rsLoRA) so every target keeps the scale it would have
had at rank ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _eva
from jaxlora import _factored
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight

PyTree = Any


_TAG_BASE = 8  # layer l's base-8 digits d, each written as 2**d in a rank column


def _tag_digits(t) -> int:
    """Base-8 digits that number the layers of target ``t`` (0 if unstacked)."""
    n = math.prod(t.layout.split_shape(t.shape)[0])
    return 0 if not t.layout.stack_axes else max(1, math.ceil(math.log(n, _TAG_BASE)))


def _probe(params, plan, leaves):
    """``params`` with zero adapters (``b = 0``: the model is unchanged) on the
    targets, to find their inputs. For a stacked weight, ``a``'s rank columns after
    the first, divided by the first, are ``2**d`` for layer ``l``'s base-8 digits
    ``d``, so every captured row says which layer it met (the scan step need not be
    the layer: a flipped or sliced stack, ``w[0]`` inside the body). Powers of two
    keep their ratios exactly when the model scales or casts the weight (bf16, fp8)."""
    from jaxlora._paths import path_str

    probes = {}
    for t in plan:
        digits = _tag_digits(t)
        a_shape, b_shape = t.layout.factor_shapes(t.shape, 1 + digits)
        n_stack = len(t.layout.stack_axes)
        stack, fan_in = a_shape[:n_stack], math.prod(a_shape[n_stack:-1])
        layer = jnp.arange(math.prod(stack))[:, None]
        cols = jnp.concatenate(
            [jnp.ones_like(layer)]
            + [2 ** (layer // _TAG_BASE**d % _TAG_BASE) for d in range(digits)],
            1,
        ).astype(jnp.float32)
        a = jnp.broadcast_to(cols[:, None], (len(cols), fan_in, 1 + digits))
        spec = LoraSpec(t.layout, 1 + digits, 1.0)
        probes[t.path] = LoraWeight(
            leaves[t.path], a.reshape(a_shape), jnp.zeros(b_shape), spec
        )
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: probes.get(path_str(kp), x), params
    )


def _layers(t, tags) -> list:
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
            f"layers {unused[:8]} of its {n} meet no input (a loop over part of them?)"
        )
    return found


def eva_nodes(
    params: PyTree,
    plan: list,
    leaves: dict[str, Any],
    *,
    apply_fn: Callable,
    batches: Iterable,
    rslora: bool,
    dtype,
    rho: float = 2.0,
    tau: float = 0.99,
) -> dict[str, LoraWeight]:
    """EVA's adapters for the targets in ``plan`` (targets given rank 0 are left out).

    Args:
        params: the plain tree.
        plan: the validated targets (`jaxlora._targets.Target`).
        leaves: ``{path: weight}`` of ``params``.
        apply_fn: ``apply_fn(params, batch)``, run once per batch.
        batches: an iterable of batches; read until every target has converged.
        rslora: the scale rule (decides how alpha follows the rank).
        dtype: the factor dtype.
        rho: components kept per target: ``k = ⌈ρ·r⌉``.
        tau: the convergence threshold on ``|cos|`` of successive components.

    Raises:
        ValueError: for no batches, or targets whose inputs cannot be captured (used
            by a convolution or embedding lookup, inside a while loop, a cond
            branch or a ``shard_map``, or never used), or stacked targets with
            layers that no input meets. A stacked target (``nn.scan``, a loop that
            picks ``w[i]``) is captured per layer, each row tagged by the layer it
            met: each layer is a unit of the PCA and of the rank budget.
    """
    capture = _factored.input_capturer(lambda p, b: apply_fn(p, b))
    probe = _probe(params, plan, leaves)
    ks = {
        t.path: min(_eva.eva_num_components(t.rank, rho), min(t.layout.fans(t.shape)))
        for t in plan
    }
    # one PCA per unit: a weight, or one layer of a stacked weight (``(path, l)``)
    units = {
        t.path: [
            (t.path, i) for i in range(math.prod(t.layout.split_shape(t.shape)[0]))
        ]
        if t.layout.stack_axes
        else [t.path]
        for t in plan
    }
    states = {
        u: _eva.eva_pca_init(t.layout.fans(t.shape)[0], ks[t.path])
        for t in plan
        for u in units[t.path]
    }
    update = jax.jit(_eva.eva_pca_update)
    components = jax.jit(_eva.eva_components)
    previous, done, seen = {}, set(), 0
    for batch in batches:
        rows, tags, reasons = capture((probe, batch), {})
        _check_captured(plan, rows, reasons)
        layers = {t.path: _layers(t, tags[t.path]) for t in plan}
        _check_layers(layers)
        seen += 1
        # in the plan's order, the same in every process (each update runs the
        # collectives of a multi-process program; a set's order is per process)
        for unit in [u for u in states if u not in done]:
            path, i = (unit, 0) if isinstance(unit, str) else unit
            got, idx = rows[path], layers[path][i]
            got = got if idx is None else jnp.take(got, idx, axis=0)
            states[unit] = update(states[unit], got)
            comps, _ = components(states[unit])
            if unit in previous and bool(
                _eva.eva_converged(previous[unit], comps, tau).all()
            ):
                done.add(unit)
            previous[unit] = comps
        if len(done) == len(states):
            break
    if seen == 0:
        raise ValueError("scheme 'eva' got no batches: pass batches=[batch, ...].")
    found = {u: components(s) for u, s in states.items()}
    budget = sum(t.rank * len(units[t.path]) for t in plan)
    ranks = _eva.eva_rank_allocation(
        {u: r for u, (_, r) in found.items()}, budget, max(ks.values())
    )
    nodes = {}
    for t in plan:
        r = max(ranks[u] for u in units[t.path])
        if r == 0:
            continue
        _, fan_out = t.layout.fans(t.shape)
        parts = [
            _eva.eva_factors(found[u][0], ranks[u], fan_out, dtype)
            for u in units[t.path]
        ]
        # a layer given less than the stack's rank r gets zero columns of a (and
        # zero rows of b): they stay zero in training, so it keeps its own rank
        a = jnp.stack([jnp.pad(a, ((0, 0), (0, r - a.shape[1]))) for a, _ in parts])
        a_shape, b_shape = t.layout.factor_shapes(t.shape, r)
        ratio = math.sqrt(r / t.rank) if rslora else r / t.rank
        spec = LoraSpec(
            t.layout, r, t.alpha * ratio, rslora, "eva", False, t.embedding, t.conv
        )
        nodes[t.path] = LoraWeight(
            leaves[t.path], a.reshape(a_shape), jnp.zeros(b_shape, dtype), spec
        )
    return nodes


def _check_layers(layers):
    problems = [f"{p!r}: {why}" for p, why in layers.items() if isinstance(why, str)]
    if problems:
        raise ValueError(
            "scheme 'eva' needs the inputs of every layer of a stacked target; "
            "these cannot be had:\n  - "
            + "\n  - ".join(problems)
            + "\nExclude them with targets=..., or use another scheme for them."
        )


def _check_captured(plan, rows, reasons):
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
            "scheme 'eva' needs the inputs of every target, contracted over its input "
            "axes (Dense, DenseGeneral, Einsum), outside loops or in a scan (not a "
            "while loop); these cannot be captured:\n  - "
            + "\n  - ".join(problems)
            + "\nExclude them with targets=..., or use another scheme for them."
        )
