"""CorDA inside `jaxlora.init`: the covariance of each target's inputs over batches.

CorDA (Yang et al. 2024, arXiv 2406.05223) decomposes ``W·C`` with ``C`` the
covariance of the layer's inputs on data of the task (IPM) or of the knowledge to keep
(KPM); the 2-D maths is `jaxlora._weight_aware.corda`. As in PEFT's
``preprocess_corda``, each batch is one *sample*: the rows ``X`` a target meets in it
are divided by ``|max X|`` and ``C`` is the mean over batches of ``XᵀX`` (PEFT hooks
one sequence per forward call: give batches of one sequence to reproduce it). Every
layer of a stacked weight gets its own covariance (`jaxlora._capture`).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

from jaxlora import _capture
from jaxlora._targets import shown

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _add(total: jax.Array, x: jax.Array, keep=None) -> tuple[jax.Array, jax.Array]:
    """``total + X̂ᵀX̂`` with ``X̂ = X / |max X|`` in float32 over the rows ``keep``
    marks (all when None), and whether X̂ and the sum are finite (PEFT refuses a
    sample whose normalized inputs or covariance are not)."""
    x = x.astype(jnp.float32)
    if keep is not None:  # the rows left out count neither in max X nor in XᵀX
        kept = (keep > 0)[:, None]
        largest = jnp.max(jnp.where(kept, x, -jnp.inf))
        x = jnp.where(kept, x / jnp.abs(largest), 0.0)
        finite = jnp.isfinite(largest)
    else:
        x = x / jnp.abs(jnp.max(x))
        finite = True
    total = total + jnp.matmul(x.T, x, precision=_HIGHEST)
    return total, finite & jnp.isfinite(x).all() & jnp.isfinite(total).all()


def covariances(
    plan: list, captured: Iterable[_capture.Rows], *, scheme: str
) -> dict[str, jax.Array]:
    """Per target path, its inputs' covariances, ``(n_layers, fan_in, fan_in)``
    (``n_layers = 1`` for a weight that is not stacked), from each batch's inputs
    of the targets in ``plan`` (`jaxlora._capture.captured`).

    All the rows a target meets in one batch make one sample, with one ``|max|``:
    every use of a weight the model applies several times per call (a shared or
    tied layer, a weight broadcast to every step of a scan), where PEFT's hook
    counts each call of the layer as a sample of its own.

    Raises:
        ValueError: for no batches; targets whose inputs cannot be captured (see
            `jaxlora._capture.captured`); a batch whose inputs to a target are not
            finite once divided by their largest value, or whose covariance is not
            finite, naming the targets and the batch.
    """
    units = {t.path: _capture.units(t) for t in plan}
    totals = {
        u: jnp.zeros((t.layout.fans(t.shape)[0],) * 2, jnp.float32)
        for t in plan
        for u in units[t.path]
    }
    seen = 0
    for rows in captured:
        empty = [u for u in totals if rows[u].shape[0] == 0]
        if empty:
            raise _refused(
                scheme, seen, empty, "get no input rows from it (an empty batch?); "
                "CorDA counts each batch as one sample. Drop empty batches."
            )  # fmt: skip
        finite = []
        for unit in totals:  # in the plan's order, the same in every process
            totals[unit], ok = _add(totals[unit], rows[unit], rows.weights(unit))
            finite.append(ok)
        finite = jax.device_get(finite)
        bad = [u for u, ok in zip(totals, finite, strict=True) if not ok]
        if bad:
            raise _refused(
                scheme, seen, bad, "have inputs that are not finite once divided by "
                "their largest value, as CorDA scales each sample, or their "
                "covariance overflows float32 (the largest value is 0 or tiny next "
                "to the others, the inputs hold inf or nan, or input_mask keeps none "
                "of them). Check the batch, or exclude these targets with targets=...."
            )  # fmt: skip
        seen += 1
    if seen == 0:
        raise ValueError(
            f"scheme {scheme!r} got no batches: pass batches=[batch, ...]."
        )
    return {
        path: jnp.stack([totals[u] for u in us]) / seen for path, us in units.items()
    }


def _refused(scheme: str, batch: int, units: list, why: str) -> ValueError:
    return ValueError(
        f"scheme {scheme!r}: in batch {batch}, "
        + shown([_name(u) for u in units])
        + f" {why}"
    )


def _name(unit: _capture.Unit) -> str:
    return repr(unit) if isinstance(unit, str) else f"{unit[0]!r} (layer {unit[1]})"
