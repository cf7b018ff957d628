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
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _capture
from jaxlora import _eva
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight


def eva_nodes(
    plan: list,
    leaves: dict[str, Any],
    captured: Iterable[_capture.Rows],
    *,
    rslora: bool,
    dtype,
    rho: float = 2.0,
    tau: float = 0.99,
) -> dict[str, LoraWeight]:
    """EVA's adapters for the targets in ``plan`` (targets given rank 0 are left out).

    Args:
        plan: the validated targets (`jaxlora._targets.Target`).
        leaves: ``{path: weight}`` of the plain tree.
        captured: each batch's inputs of the targets (`jaxlora._capture.captured`),
            read until every target has converged.
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
    ks = {
        t.path: min(_eva.eva_num_components(t.rank, rho), min(t.layout.fans(t.shape)))
        for t in plan
    }
    # one PCA per unit: a weight, or one layer of a stacked weight (``(path, l)``)
    units = {t.path: _capture.units(t) for t in plan}
    states = {
        u: _eva.eva_pca_init(t.layout.fans(t.shape)[0], ks[t.path])
        for t in plan
        for u in units[t.path]
    }
    update = jax.jit(_eva.eva_pca_update)
    components = jax.jit(_eva.eva_components)
    previous, done, seen = {}, set(), 0
    for rows in captured:
        seen += 1
        # in the plan's order, the same in every process (each update runs the
        # collectives of a multi-process program; a set's order is per process)
        for unit in [u for u in states if u not in done]:
            keep = rows.weights(unit)
            if keep is not None and not bool(keep.any()):
                continue  # masked out: no new rows, no news on convergence
            states[unit] = update(states[unit], rows[unit], keep)
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
    empty = [u for u, s in states.items() if not float(s.count)]
    if empty:
        shown = [
            repr(u) if isinstance(u, str) else f"{u[0]!r} (layer {u[1]})" for u in empty
        ]
        raise ValueError(
            "scheme 'eva': input_mask left out every input row of "
            + ", ".join(shown[:8])
            + " in every batch. Check the mask (nonzero: the position counts)."
        )
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
