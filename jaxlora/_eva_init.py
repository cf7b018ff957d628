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

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _capture
from jaxlora import _eva
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._targets import shown as shown_items


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    """EVA's options, as PEFT's ``EvaConfig`` names them (``init(..., eva_config=)``).

    Attributes:
        rho: each target keeps ``k = ⌈ρ·r⌉`` components, the most rank it can be
            given (``ρ >= 1``; 1: every target keeps rank ``r``, only the
            components are data-driven).
        tau: a target is done when successive estimates of its top components
            agree, ``|cos| >= τ`` (``0 < τ <= 1``).
        whiten: divide each component by the square root of its singular value
            (of the centred inputs seen), as PEFT's ``whiten=True`` does.
        adjust_scaling_factors: ``alpha_l = alpha·r_l/r`` (``alpha·√(r_l/r)`` with
            rsLoRA) so every target keeps the scale it had at rank ``r`` (PEFT's
            default); False keeps ``alpha``, so the scale follows ``r_l``.

    Raises:
        ValueError: for ``rho < 1``, ``tau`` outside ``(0, 1]`` (or not a finite
            number) or non-bool flags.

    Example:
        >>> import jaxlora
        >>> jaxlora.EvaConfig(rho=1.5, whiten=True)
        EvaConfig(rho=1.5, tau=0.99, whiten=True, adjust_scaling_factors=True)
    """

    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        def real(x):
            return (
                isinstance(x, numbers.Real)
                and not isinstance(x, bool)
                and math.isfinite(x)
            )

        if not real(self.rho) or self.rho < 1:
            raise ValueError(
                f"EvaConfig: rho must be a finite number >= 1 (k = ceil(rho * r) "
                f"components per target; PEFT's default is 2), got {self.rho!r}."
            )
        if not real(self.tau) or not 0 < self.tau <= 1:
            raise ValueError(
                f"EvaConfig: tau is a threshold on |cos| of successive components, "
                f"in (0, 1] (the paper's 0.99), got {self.tau!r}."
            )
        for name in ("whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"EvaConfig: {name} must be True or False, got "
                    f"{getattr(self, name)!r}."
                )


def eva_nodes(
    plan: list,
    leaves: dict[str, Any],
    captured: Iterable[_capture.Rows],
    *,
    rslora: bool,
    dtype,
    config: EvaConfig = EvaConfig(),
) -> dict[str, LoraWeight]:
    """EVA's adapters for the targets in ``plan`` (targets given rank 0 are left out).

    Args:
        plan: the validated targets (`jaxlora._targets.Target`).
        leaves: ``{path: weight}`` of the plain tree.
        captured: each batch's inputs of the targets (`jaxlora._capture.captured`),
            read until every target has converged.
        rslora: the scale rule (decides how alpha follows the rank).
        dtype: the factor dtype.
        config: ``ρ``, ``τ``, whitening and the alpha rule (`EvaConfig`).

    Raises:
        ValueError: for no batches, or targets whose inputs cannot be captured (used
            by a convolution or embedding lookup, inside a while loop, a cond
            branch or a ``shard_map``, or never used), or stacked targets with
            layers that no input meets. A stacked target (``nn.scan``, a loop that
            picks ``w[i]``) is captured per layer, each row tagged by the layer it
            met: each layer is a unit of the PCA and of the rank budget.
    """
    ks = {
        t.path: min(
            _eva.eva_num_components(t.rank, config.rho), min(t.layout.fans(t.shape))
        )
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
    previous, agreed, done, seen = {}, {}, set(), 0
    for rows in captured:
        seen += 1
        # in the plan's order, the same in every process (each update runs the
        # collectives of a multi-process program; a set's order is per process)
        for unit in [u for u in states if u not in done]:
            keep = rows.weights(unit)
            if rows[unit].shape[0] == 0 or keep is not None and not bool(keep.any()):
                continue  # no rows, or masked out: no news on convergence
            states[unit] = update(states[unit], rows[unit], keep)
            comps, _ = components(states[unit])
            if unit in previous:
                agreed[unit] = _eva.eva_converged(previous[unit], comps, config.tau)
                if bool(agreed[unit].all()):
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
            + shown_items(shown)
            + " in every batch. Check the mask (nonzero: the position counts)."
        )
    found = {u: components(s) for u, s in states.items()}
    broken = [
        u
        for u, (c, r) in found.items()
        if not (bool(jnp.isfinite(c).all()) and bool(jnp.isfinite(r).all()))
    ]
    if broken:
        raise ValueError(
            "scheme 'eva': the inputs of "
            + shown_items([_unit_name(u) for u in broken])
            + " hold NaN or inf in some batch, so their principal components are "
            "NaN. Check the batches (and the model's activations on them)."
        )
    budget = sum(t.rank * len(units[t.path]) for t in plan)
    ranks = _eva.eva_rank_allocation(
        {u: r for u, (_, r) in found.items()}, budget, max(ks.values())
    )
    _warn_unconverged(ranks, agreed, seen, config.tau)
    comps = {u: c for u, (c, _) in found.items()}
    if config.whiten:
        comps = {u: _whitened(u, comps[u], states[u], ranks[u]) for u in comps}
    nodes = {}
    for t in plan:
        r = max(ranks[u] for u in units[t.path])
        if r == 0:
            continue
        _, fan_out = t.layout.fans(t.shape)
        parts = [
            _eva.eva_factors(comps[u], ranks[u], fan_out, dtype) for u in units[t.path]
        ]
        # a layer given less than the stack's rank r gets zero columns of a (and
        # zero rows of b): they stay zero in training, so it keeps its own rank
        a = jnp.stack([jnp.pad(a, ((0, 0), (0, r - a.shape[1]))) for a, _ in parts])
        a_shape, b_shape = t.layout.factor_shapes(t.shape, r)
        ratio = math.sqrt(r / t.rank) if rslora else r / t.rank
        ratio = ratio if config.adjust_scaling_factors else 1.0
        spec = LoraSpec(
            t.layout, r, t.alpha * ratio, rslora, "eva", False, t.embedding, t.conv
        )
        nodes[t.path] = LoraWeight(
            leaves[t.path], a.reshape(a_shape), jnp.zeros(b_shape, dtype), spec
        )
    return nodes


def _unit_name(u) -> str:
    return repr(u) if isinstance(u, str) else f"{u[0]!r} (layer {u[1]})"


def _warn_unconverged(ranks: dict, agreed: dict, seen: int, tau: float) -> None:
    """Warns of the units given rank whose top components (as many as their rank)
    had not settled when the batches ran out (PEFT raises there): their factors
    are the exact PCA of the rows seen, but EVA's stopping rule did not hold."""
    late = [
        u
        for u, r in ranks.items()
        if r and (u not in agreed or not bool(agreed[u][:r].all()))
    ]
    if not late:
        return
    names = [_unit_name(u) for u in late]
    shown = shown_items(names)
    why = (
        "one batch cannot show that (EVA compares successive batches' estimates)"
        if seen == 1
        else f"successive estimates still differed (|cos| < tau={tau}) after "
        f"{seen} batches"
    )
    warnings.warn(
        f"jaxlora: EVA's components of {shown} had not converged: {why}. Their "
        "factors are the exact PCA of the rows seen; pass more batches (or lower "
        "eva_config=jaxlora.EvaConfig(tau=...)) for EVA's stopping rule to hold.",
        stacklevel=4,
    )


def _whitened(unit, components, state, rank: int):
    """PEFT's ``whiten=True``: component i divided by √σᵢ, σᵢ the i-th singular
    value of the centred inputs seen (``√λᵢ(M₂)``)."""
    sigma = _eva.eva_singular_values(state)
    if rank and not bool((sigma[:rank] > 0).all()):
        raise ValueError(
            f"EvaConfig(whiten=True) divides each component by the square root of "
            f"its singular value, and the inputs of {_unit_name(unit)} span fewer "
            f"than the {rank} directions it was given (a singular value is 0). "
            "Lower the rank, pass more varied batches, or set whiten=False."
        )
    scale = jnp.where(sigma > 0, jax.lax.rsqrt(jnp.maximum(sigma, 1e-30)), 0.0)
    return components * scale[:, None]
