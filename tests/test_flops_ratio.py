"""A LoRA step's FLOPs and temp memory against full fine-tuning, counted by XLA.

The model and steps are `benchmarks/flops_ratio.py`'s: a transformer from Flax's own
layers (d_model 512, 8 heads, 4 layers, vocabulary 1000, 32×128 tokens), every kernel
adapted at r = 8 through the public API (``jaxlora.init`` with inferred layouts,
``lora_apply``, ``freeze_base(optax.adam)``). XLA's cost analysis is deterministic.

The yardstick is the issue's "hand-factored reference": the same Flax layers given a
``dot_general`` that computes ``x@stop_gradient(W0) + s·(x@a)@b`` and is
differentiated by plain JAX (`benchmarks.flops_ratio.HandLoraDot`).
"""

import functools

import jax
import pytest

from benchmarks import flops_ratio as fr


@functools.cache
def measured(variant):
    return fr.measure(variant, fr.FULL)


def floor_flops(apply_fn, params, ids):
    """FLOPs of the frozen model's step: forward plus the gradient w.r.t. the
    embedding output only (every weight gradient skipped). The parameters are
    arguments, as in the steps measured: closed over, they would be constants and
    XLA would drop the adds of zero biases and the products by unit LayerNorm scales
    (63.52 instead of 63.60 GFLOPs under ``nn.scan``)."""

    def loss(table, params):
        frozen = jax.tree.map(jax.lax.stop_gradient, params)
        frozen["params"]["Embed_0"]["embedding"] = table
        return fr._xent(apply_fn(frozen, ids), ids)

    table = params["params"]["Embed_0"]["embedding"]
    return fr.compiled_cost(jax.grad(loss), table, params)[0]


def rank_path_flops(lp, n_tokens):
    """The exact cost of the rank-r paths: ``6·N·r·(fan_in + fan_out)`` per target
    (x@a and (xa)@b forward; ∂b, ∂(xa), ∂a and the input gradient through a)."""
    total = 0
    for node in jax.tree.leaves(lp, is_leaf=fr.jaxlora.is_lora):
        if fr.jaxlora.is_lora(node):
            fan_in, fan_out = node.layout.fans(node.shape)
            total += 6 * n_tokens * node.rank * (fan_in + fan_out)
    return total


@pytest.mark.parametrize("variant", ["linen", "nnx"])
def test_lora_step_costs_at_most_70_percent_of_full(variant):
    r = measured(variant)
    assert r["adapted"] == 4 * 6 + 1  # q/k/v/out + two MLP kernels per layer, head
    assert r["ratio"] <= 0.70, r  # measured 0.684
    assert r["lora_temp"] <= r["full_temp"], r


def test_hand_factored_reference_reproduces_the_issues_figure():
    """The reference is the one the issue measured at 0.685 (unrolled layers)."""
    r = measured("linen")
    assert 0.680 <= r["ref_flops"] / r["full_flops"] <= 0.690, r  # measured 0.6858


@pytest.mark.parametrize("variant", ["linen", "scan", "scan_unrolled"])
def test_engine_costs_no_more_than_the_hand_factored_reference(variant):
    """FLOPs and temp memory at most the reference's (measured: linen 0.6844 vs
    0.6858, 1098 vs 1241 MiB; scan 0.7021 vs 0.7029, 1525 vs 1605 MiB; scan with
    ``unroll=True`` 0.6844 vs 0.6858, 1143 vs 1269 MiB)."""
    r = measured(variant)
    assert r["lora_flops"] <= r["ref_flops"], r
    assert r["lora_temp"] <= r["ref_temp"], r


def test_scanned_layers_add_only_the_rank_r_paths():
    """Under ``nn.scan`` XLA counts the loop body once, so the ratio is essentially
    one layer's (measured 0.7021; the hand-factored reference 0.7029): a frozen
    layer's forward and input gradient plus the rank-8 paths. Unrolled, the first
    layer skips its input gradient, which a scan cannot.

    That sum is a lower bound for any step that trains the factors and keeps the
    scan: the frozen model's own step (63.60 GFLOPs) plus the exact rank-r products
    (2.11) is 0.7002 of the full step, above the 0.70 target before any LoRA-specific
    add. The engine adds at most 0.5% to that bound (measured 0.26%)."""
    s = fr.FULL
    apply_fn, params, lp, ids, *_ = fr.setup("scan", s)
    r = measured("scan")
    assert r["adapted"] == 7  # six stacked (layers, in, out) kernels and the head
    bound = floor_flops(apply_fn, params, ids) + rank_path_flops(lp, s.batch * s.seq)
    assert bound > 0.70 * r["full_flops"], (bound, r["full_flops"])  # 0.7002
    assert bound <= r["lora_flops"] <= 1.005 * bound, (r["lora_flops"], bound)
    assert r["ratio"] < 0.71, r


def test_a_loop_of_layers_is_above_70_percent_even_counting_every_layer():
    """What a loop cannot skip, with every layer counted (the Python loop of blocks):
    a loop body is the same for every layer, so it also computes the first layer's
    input gradient, which the unrolled step drops. The frozen model's step with that
    gradient (forward and input gradients down to the embedding output, 229.02
    GFLOPs) plus the rank-8 products (7.55) is 0.7028 of the full step (336.59): no
    step that keeps the layers in a loop meets 0.70, however XLA counted its body."""
    s = fr.FULL
    apply_fn, params, lp, ids, *_ = fr.setup("linen", s)
    r = measured("linen")
    bound = floor_flops(apply_fn, params, ids) + rank_path_flops(lp, s.batch * s.seq)
    assert bound > 0.70 * r["full_flops"], (bound, r["full_flops"])  # 0.7028
    assert r["lora_flops"] < bound  # unrolled, the first input gradient is dropped


def test_scanned_layers_counted_every_iteration_cost_at_most_70_percent():
    """XLA's cost analysis counts a while loop's body once (``HandleWhile`` in
    ``hlo_cost_analysis.cc``: "compute the cost of a single iteration"). With
    ``nn.scan(..., unroll=True)`` the jaxpr is the same ``scan`` over the same stacked
    kernels, run by the same engine path, but XLA emits the layers without a loop and
    counts each: the ratio is the unrolled Linen model's (measured 0.6844, FLOPs equal
    to the Python loop's within 0.01%)."""
    r, loop = measured("scan_unrolled"), measured("linen")
    assert r["adapted"] == 7
    assert r["ratio"] <= 0.70, r
    assert abs(r["lora_flops"] - loop["lora_flops"]) <= 1e-3 * loop["lora_flops"]


def test_scanned_lora_step_live_peak_is_the_full_steps_within_2_percent():
    """The scan variant's larger temp allocation (1525 vs 1425 MiB) is XLA's heap
    packing: the bytes live at the peak are the full step's plus the rank-r
    residuals and one layer's scratch (measured 1367.5 vs 1352.5 MiB)."""
    from benchmarks import live_memory

    apply_fn, params, lp, ids, tx, ltx, _ = fr.setup("scan", fr.FULL)
    full_live, full_temp = live_memory.live_peak(
        fr.full_step_fn(apply_fn, tx), params, tx.init(params), ids
    )
    lora_live, lora_temp = live_memory.live_peak(
        fr.lora_step_fn(apply_fn, ltx), lp, ltx.init(lp), ids
    )
    assert full_live <= full_temp and lora_live <= lora_temp
    assert lora_live <= 1.02 * full_live, (lora_live, full_live)
