"""The factored engine agrees with the materialized formulation on real models."""

import dataclasses
import warnings

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given
from hypothesis import settings

import jaxlora
from jaxlora import _factored
from jaxlora._node import Layout
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._node import is_lora
from jaxlora._paths import path_str

RANK = 3


def adapt(params, layouts, *, rank=RANK, seed=0, alpha=2.0, factor_dtype=None):
    """Wraps the leaves named in ``layouts`` as LoraWeights with non-zero a AND b
    (factors in the weight's dtype unless ``factor_dtype`` is given)."""

    def wrap(kp, x):
        path = path_str(kp)
        if path not in layouts:
            return x
        lay = layouts[path]
        sa, sb = lay.factor_shapes(x.shape, rank)
        key = jax.random.fold_in(jax.random.key(seed), len(path) * 131 + x.size)
        ka, kb = jax.random.split(key)
        a = (jax.random.normal(ka, sa) * 0.5).astype(factor_dtype or x.dtype)
        b = (jax.random.normal(kb, sb) * 0.5).astype(factor_dtype or x.dtype)
        return LoraWeight(x, a, b, LoraSpec(lay, rank, alpha))

    out = jax.tree_util.tree_map_with_path(wrap, params)
    found = {
        path_str(kp)
        for kp, x in jax.tree_util.tree_flatten_with_path(out, is_leaf=is_lora)[0]
        if is_lora(x)
    }
    assert found == set(layouts), (found, set(layouts))
    return out


def merged(tree):
    return jax.tree.map(
        lambda x: x.merged() if is_lora(x) else x, tree, is_leaf=is_lora
    )


def factors(tree):
    """The (a, b) of every LoraWeight, keyed by path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lora)[0]
    return {path_str(kp): (x.a, x.b) for kp, x in leaves if is_lora(x)}


def rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


def _loss(out):
    """A well-conditioned loss: ∂/∂o = o + 1 (a loss like Σcos(o) has gradients that
    blow up relative rounding errors near its stationary points, e.g. o ≈ π in bf16)."""
    leaves = [
        o.astype(jnp.promote_types(o.dtype, jnp.float32)) for o in jax.tree.leaves(out)
    ]
    return sum(jnp.sum(0.5 * o * o + o) for o in leaves)


def _upcast(tree):
    up = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x  # noqa: E731
    return jax.tree.map(up, tree)


def _widen(tree):
    """Float leaves as float64 (call under ``jax.enable_x64(True)``)."""
    up = lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return jax.tree.map(up, tree)


def check(fn, lp, *args, tol=1e-5, kwargs=None, magnitude=False, dense=()):
    """Outputs and gradients wrt every a and b agree with fn on merged weights, and
    every target runs factored (those in ``dense``: materialized).

    In float32 the two agree to ``tol`` relative; where they do not (a result that
    cancels, e.g. w0·x + s·a·b·x ≈ 0), both are compared with a float64 reference
    and the factored error must be at most twice the materialized formulation's
    own. In low precision both are compared with a float32 reference and the
    factored error must be within ``tol`` or at most twice the materialized one's.

    ``magnitude=True`` (only for an ``fn`` that is one contraction) also accepts a
    low-precision error within ``tol`` of the floating-point error bound's scale:
    the same computation on absolute values, |x|·(|w0| + s·|a|·|b|). The factored
    form rounds ``w0·x`` and ``s·(x·a)·b`` separately, as a hand-written LoRA layer
    does, so where they cancel its error is a fraction of that scale, not of the
    (much smaller) result.
    """
    kwargs = kwargs or {}

    @jax.jit
    def factored(t, args):
        out = _factored.call(fn, (t, *args), kwargs)
        return out, factors(
            jax.grad(lambda t: _loss(_factored.call(fn, (t, *args), kwargs)))(t)
        )

    @jax.jit
    def materialized(t, args):
        out = fn(merged(t), *args, **kwargs)
        return out, factors(
            jax.grad(lambda t: _loss(fn(merged(t), *args, **kwargs)))(t)
        )

    got, want = factored(lp, args), materialized(lp, args)
    low = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((lp, args)))
    ref = materialized(_upcast(lp), _upcast(args)) if low else want
    if not low and any(
        rel_err(u, v) > tol
        for u, v in zip(*map(jax.tree.leaves, (got, want)), strict=True)
    ):
        with jax.enable_x64(True):
            ref = materialized(_widen(lp), _widen(args))
    mag = ref
    if low and magnitude:
        # every term positive: the outputs and the factor gradients (through
        # ∂loss/∂o = o + 1 > 0) are sums of absolute values
        mag = materialized(*jax.tree.map(jnp.abs, (_upcast(lp), _upcast(args))))
    for u, v, r, m in zip(*map(jax.tree.leaves, (got, want, ref, mag)), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        assert np.linalg.norm(np.asarray(r, np.float64)) > 0
        err = rel_err(u, r)
        scaled = np.linalg.norm(np.asarray(u, np.float64) - np.asarray(r, np.float64))
        scaled /= max(np.linalg.norm(np.asarray(m, np.float64)), 1e-30)
        assert err <= tol or err <= 2 * rel_err(v, r) or scaled <= tol, (
            err,
            rel_err(v, r),
            scaled,
        )
    report = _factored.explain(fn, (lp, *args), kwargs)
    assert set(report.statuses) == set(factors(lp)), str(report)
    mode = lambda p: "materialized" if p in dense else "factored"  # noqa: E731
    assert report.statuses == {p: mode(p) for p in report.statuses}, str(report)
    return report


def rand(shape, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


# -- Flax Linen -------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_dense(dtype, tol):
    m = nn.Dense(5, dtype=dtype)
    x = rand((2, 4), dtype=dtype)
    lp = adapt(m.init(jax.random.key(0), x), {"params/kernel": Layout.dense(2)})
    check(m.apply, lp, x, tol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_bf16_params(dtype, tol):
    m = nn.Dense(5, dtype=dtype, param_dtype=dtype)
    x = rand((2, 4), dtype=dtype)
    lp = adapt(m.init(jax.random.key(0), x), {"params/kernel": Layout.dense(2)})
    check(m.apply, lp, x, tol=tol)


CONV = (nn.Conv(6, (3, 3)), (2, 9, 9, 3), "params/kernel", Layout.conv(4))
DENSE = (nn.Dense(5), (2, 4), "params/kernel", Layout.dense(2))
EMBED = (nn.Embed(11, 6), (2, 3), "params/embedding", Layout.dense(2))


@pytest.mark.parametrize("layer,shape,path,layout", [CONV, DENSE, EMBED])
def test_bf16_model_with_float32_factors(layer, shape, path, layout):
    """`jaxlora.init` keeps the factors float32 for a bfloat16 model (README,
    Dtypes); every factored rule must take them (a conv refuses operands of mixed
    dtypes)."""
    bf16 = jnp.bfloat16
    m = layer.clone(dtype=bf16, param_dtype=bf16)
    if isinstance(layer, nn.Embed):
        x = jnp.array([[0, 3, 10], [5, 5, 1]])
    else:
        x = rand(shape, dtype=bf16)
    lp = adapt(m.init(jax.random.key(0), x), {path: layout}, factor_dtype=jnp.float32)
    assert jaxlora_factor_dtypes(lp) == {jnp.dtype(jnp.float32)}
    check(m.apply, lp, x, tol=2e-2)


def test_a_weight_cast_to_float8_runs_factored():
    """A model that casts its kernel to float8 (``x8 @ w.astype(float8)``) failed
    in the engine: JAX promotes no 8-bit float implicitly, and the rank-r path asked
    float8 and float32 for a common type. It now runs factored, summing in float32,
    within float8's rounding of the merged weight's output (3 mantissa bits: the
    factors are rounded apart, the merge rounds their sum into ``w``)."""
    f8 = jnp.float8_e4m3fn

    def model(p, x):
        return (x.astype(f8) @ p["q"].astype(f8)).astype(jnp.float32)

    p = {"q": rand((16, 8))}
    lp = jaxlora.init(p, jax.random.key(1), rank=2, scheme="both_random", targets=["q"])
    x = rand((4, 16), seed=2)
    got = jax.jit(jaxlora.lora_apply(model))(lp, x)
    want = model(jaxlora.merge(lp), x)
    assert jaxlora.explain(model, lp, x).statuses == {"q": "factored"}
    assert float(jnp.abs(got - model(p, x)).max()) > 0  # the update counts
    np.testing.assert_allclose(got, want, atol=0.15 * float(jnp.abs(want).max()))


def test_float16_convolution_keeps_its_rank_r_path_in_float32():
    """The conv rule kept ``s·conv(x, a)`` and its product with ``b`` in float16,
    which overflowed to inf where the merged model's output is finite (the dot
    rule already summed in float32); a dot algorithm preset the CPU's conv takes
    (TF32_TF32_F32) was passed to the ``b`` einsum, which the CPU's dot refuses."""
    f16 = jnp.float16
    k = jax.random.split(jax.random.key(0), 4)
    w = (jax.random.normal(k[0], (3, 8, 8)) * 0.1).astype(f16)
    a = jax.random.normal(k[1], (3, 8, 1)).astype(f16)
    b = (jax.random.normal(k[2], (1, 8)) * 1e-3).astype(f16)
    lw = LoraWeight(w, a, b, LoraSpec(Layout((0, 1), (2,)), 1, 16.0))
    x = (jax.random.normal(k[3], (1, 6, 8)) * 2000).astype(f16)

    def conv(p, x, precision=None):
        return jax.lax.conv_general_dilated(
            x, p["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"),
            precision=precision,
        )  # fmt: skip

    got = jax.jit(jaxlora.lora_apply(conv))({"w": lw}, x)
    want = conv(jaxlora.merge({"w": lw}), x)
    assert bool(jnp.isfinite(want).all()) and bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                               rtol=2e-2, atol=2.0)  # fmt: skip
    preset = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
    lw32 = jax.tree.map(lambda t: t.astype(jnp.float32), lw)
    x32 = x.astype(jnp.float32) / 2000
    got = jaxlora.lora_apply(conv)({"w": lw32}, x32, preset)
    want = conv(jaxlora.merge({"w": lw32}), x32, preset)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)


def jaxlora_factor_dtypes(tree):
    return {f.dtype for ab in factors(tree).values() for f in ab}


def test_multi_head_attention():
    m = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = rand((2, 5, 8))
    p = m.init(jax.random.key(0), x)
    qkv = Layout.dense(3)
    lays = {f"params/{n}/kernel": qkv for n in ("query", "key", "value")}
    lays["params/out/kernel"] = Layout.dense(3, n_in=2)
    check(m.apply, adapt(p, lays), x)


def test_einsum():
    m = nn.Einsum((4, 2, 3), "bti,ihj->bthj")
    x = rand((2, 5, 4))
    lp = adapt(m.init(jax.random.key(0), x), {"params/kernel": Layout.dense(3)})
    check(m.apply, lp, x)


@pytest.mark.parametrize("strides,padding", [(1, "VALID"), (2, "SAME")])
def test_conv(strides, padding):
    m = nn.Conv(6, (3, 3), strides=strides, padding=padding)
    x = rand((2, 9, 9, 3))
    lp = adapt(m.init(jax.random.key(0), x), {"params/kernel": Layout.conv(4)})
    check(m.apply, lp, x)


@pytest.mark.parametrize(
    "features,groups,window,shape",
    [
        (6, 3, (3, 3), (2, 7, 7, 6)),  # grouped: 3 groups of 2 inputs -> 2 outputs
        (8, 4, (3, 3), (2, 7, 7, 4)),  # depthwise, channel multiplier 2
        (4, 2, (3,), (2, 9, 4)),  # 1-D, 2 groups
        (4, 2, (2, 2, 2), (1, 4, 5, 5, 2)),  # 3-D, depthwise
    ],
)
def test_grouped_conv(features, groups, window, shape):
    """``feature_group_count > 1`` (depthwise included) runs factored: a grouped
    conv to groups·r channels, then each group's r channels through its outputs'
    columns of b."""
    m = nn.Conv(features, window, feature_group_count=groups, padding="SAME")
    x = rand(shape)
    lay = Layout.conv(len(window) + 2)
    lp = adapt(m.init(jax.random.key(0), x), {"params/kernel": lay})
    check(m.apply, lp, x)


def test_grouped_conv_nchw_layout():
    """A grouped conv in PyTorch's layout (NCHW input, OIHW kernel)."""
    dn = ("NCHW", "OIHW", "NCHW")

    def fn(p, x):
        return jax.lax.conv_general_dilated(
            x, p["w"], (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2
        )

    w = rand((6, 2, 3, 3), seed=3)  # O, I/G, H, W
    lay = Layout(in_axes=(1, 2, 3), out_axes=(0,))
    check(fn, adapt({"w": w}, {"w": lay}), rand((2, 4, 6, 6)))


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 6)
        h = jnp.tanh(emb(ids))
        return emb.attend(h)


def test_embed_lookup_and_attend():
    ids = jnp.array([[0, 3, 10], [5, 5, 1]])
    p = TiedLM().init(jax.random.key(0), ids)
    lp = adapt(p, {"params/Embed_0/embedding": Layout.dense(2)})
    report = check(TiedLM().apply, lp, ids)
    prims = {u.primitive for u in report.uses["params/Embed_0/embedding"]}
    assert prims == {"gather", "dot_general"}


def _by_columns(p, x):  # output features permuted
    return x @ p["w"][:, jnp.array([6, 0, 2, 1, 3, 5, 4])]


def _by_rows(p, x):  # input features picked (one twice)
    return x[:, :4] @ jnp.take(p["w"], jnp.array([4, 0, 0, 2]), axis=0)


def _by_column_ids(p, x, ids):  # columns picked by a traced index
    return x @ jnp.take(p["w"], ids, axis=1)


@pytest.mark.parametrize("fn", [_by_columns, _by_rows, _by_column_ids])
def test_a_kernel_gathered_before_its_matmul_runs_factored(fn):
    """``x @ w[:, perm]``: the gather is a view of the weight (its indexed factor
    gathered), so the matmul runs factored; it used to form the whole gathered
    update, with ``explain`` saying factored. No contraction of the step lacks a
    batch-sized operand (the dense ``a @ b`` would be (5, r) x (r, 7))."""
    lp = adapt({"w": rand((5, 7), seed=2)}, {"w": Layout.dense(2)})
    ids = (jnp.array([3, 3, 0, 6]),) if fn is _by_column_ids else ()
    args = (rand((9, 5)), *ids)
    report = check(fn, lp, *args)
    assert {u.primitive for u in report.uses["w"]} == {"dot_general"}, str(report)
    loss = lambda t: jnp.sum(_factored.call(fn, (t, *args), {}) ** 2)  # noqa: E731
    found = _contractions(jax.make_jaxpr(jax.grad(loss))(lp).jaxpr)
    assert found and all(9 in lhs + rhs for _, _, lhs, rhs in found), found


_PERM = jnp.array([3, 0, 2, 1])


def _scanned_over_permuted(p, x):  # the stacked kernel's columns permuted, scanned
    ws = p["w"][:, :, _PERM]
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]


def _scanned_remat(p, x):  # ... with each layer's body rematerialized
    step = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
    return jax.lax.scan(step, x, p["w"][:, :, _PERM])[0]


def _jit_of_permuted(p, x):  # a layer's permuted kernel passed to a jitted matmul
    return jax.jit(lambda w, h: jax.nn.gelu(h @ w) + 1.0)(p["w"][1][:, _PERM], x)


def _carried_permuted(p, x):  # carried through the loop and changed there
    step = lambda c, _: ((jnp.tanh(c[0] @ c[1]), c[1] * 0.5), None)  # noqa: E731
    return jax.lax.scan(step, (x, p["w"][0][:, _PERM]), None, length=2)[0][0]


def _carried_unchanged(p, x):  # carried unchanged: JAX makes it a loop constant
    step = lambda c, _: ((jnp.tanh(c[0] @ c[1]), c[1]), None)  # noqa: E731
    return jax.lax.scan(step, (x, p["w"][0][:, _PERM]), None, length=2)[0][0]


@pytest.mark.parametrize(
    "fn", [_scanned_over_permuted, _scanned_remat, _jit_of_permuted, _carried_unchanged]
)
def test_a_gathered_kernel_passed_into_a_loop_or_jit_runs_factored(fn):
    """A gathered kernel used as a weight inside the body it is passed to (a scan
    over layers, a nested ``jit``, a ``remat`` body) is followed there: it used to
    be formed whole by the lookup rule, the weight gradient with it, while
    ``explain`` said factored."""
    lp = adapt({"w": rand((3, 4, 4), seed=3) * 0.5}, {"w": _PER_LAYER})
    x = rand((9, 4), seed=9)
    report = check(fn, lp, x)
    assert {u.primitive for u in report.uses["w"]} == {"dot_general"}, str(report)
    loss = lambda t: jnp.sum(_factored.call(fn, (t, x), {}) ** 2)  # noqa: E731
    found = _contractions(jax.make_jaxpr(jax.grad(loss))(lp).jaxpr)
    assert found and all(9 in lhs + rhs for _, _, lhs, rhs in found), found


def _scanned_and_summed(p, x):  # in the body also an activation (its sum)
    step = lambda h, w: (jnp.tanh(h @ w) + jnp.sum(w), None)  # noqa: E731
    return jax.lax.scan(step, x, p["w"][:, :, _PERM])[0]


@pytest.mark.parametrize("fn", [_scanned_and_summed, _carried_permuted])
def test_a_gathered_kernel_used_otherwise_in_a_body_is_looked_up(fn):
    """Where the body uses the gathered kernel as more than a contraction's
    weight, the lookup rule forms it (or the loop's carry materializes it): the
    values and factor gradients still agree with the merged model."""
    lp = adapt({"w": rand((3, 4, 4), seed=3) * 0.5}, {"w": _PER_LAYER})
    x = rand((9, 4), seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check(fn, lp, x)
    assert "gather" in {u.primitive for u in report.uses["w"]}, str(report)


class EmbedProject(nn.Module):  # an embedding projected (ALBERT's factorization)
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(5)(nn.Embed(11, 4)(ids))


@pytest.mark.parametrize(
    "targets",
    [("Embed_0/embedding",), ("Embed_0/embedding", "Dense_0/kernel")],
    ids=["table", "table-and-kernel"],
)
def test_an_embedding_fed_to_a_dense_layer(targets):
    """A lookup whose rows go straight into a matmul: with the kernel plain the
    gathered table stays symbolic into it (factored), with the kernel adapted the
    lookup forms the rows; both factored, no warning."""
    ids = jnp.array([[0, 3, 10], [5, 5, 1]])
    p = EmbedProject().init(jax.random.key(0), ids)
    lp = adapt(p, {f"params/{t}": Layout.dense(2) for t in targets})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(EmbedProject().apply, lp, ids)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(8)(h)), None


class ScanMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        return stack()(x, None)[0]


def test_scan_stacked():
    x = rand((4, 8))
    p = ScanMLP().init(jax.random.key(0), x)
    assert p["params"]["ScanBlock_0"]["Dense_0"]["kernel"].shape == (3, 8, 8)
    lays = {"params/ScanBlock_0/Dense_0/kernel": Layout.dense(3, n_stack=1)}
    check(ScanMLP().apply, adapt(p, lays), x)


class RematMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = jnp.tanh(nn.remat(nn.Dense)(8)(x))
        return x


def test_remat():
    x = rand((4, 8))
    p = RematMLP().init(jax.random.key(0), x)
    lays = {f"params/CheckpointDense_{i}/kernel": Layout.dense(2) for i in range(2)}
    lp = adapt(p, lays)
    check(RematMLP().apply, lp, x)
    jaxpr = jax.make_jaxpr(
        jax.grad(lambda t: _loss(_factored.call(RematMLP().apply, (t, x), {})))
    )(lp)
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


# -- plain JAX, nested jit, custom_vjp ------------------------------------------------


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


PLAIN = {"w1": Layout.dense(2), "w2": Layout.dense(2)}


def plain_params():
    return {"w1": rand((4, 6), 2), "w2": rand((6, 3), 3)}


def test_plain_function():
    check(mlp, adapt(plain_params(), PLAIN), rand((5, 4)))


def test_nested_jit():
    fn = lambda p, x: jnp.sin(jax.jit(mlp)(p, x))  # noqa: E731
    check(fn, adapt(plain_params(), PLAIN), rand((5, 4)))


@jax.custom_vjp
def matmul_cvjp(x, w):
    return x @ w


matmul_cvjp.defvjp(
    lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g)
)


def test_custom_vjp_and_gelu():
    def fn(p, x):
        return matmul_cvjp(jax.nn.gelu(x @ p["w1"]), p["w2"])

    with pytest.warns(UserWarning, match="whose own derivative rule is kept"):
        report = check(fn, adapt(plain_params(), PLAIN), rand((5, 4)), dense=["w2"])
    assert "custom_vjp function 'matmul_cvjp'" in str(report)


@jax.custom_vjp
def matmul_scaled_grad(x, w):
    return x @ w


matmul_scaled_grad.defvjp(
    lambda x, w: (x @ w, (x, w)),
    lambda res, g: (0.1 * (g @ res[1].T), 0.1 * (res[0].T @ g)),
)


@jax.custom_jvp
def matmul_scaled_tangent(x, w):
    return x @ w


@matmul_scaled_tangent.defjvp
def _matmul_scaled_tangent_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return x @ w, 0.1 * (dx @ w + x @ dw)


@jax.custom_vjp
def fake_quant(w):  # straight-through estimator: round forward, identity backward
    return jnp.round(w * 8) / 8


fake_quant.defvjp(lambda w: (fake_quant(w), None), lambda _, g: (g,))


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: matmul_scaled_grad(x, p["w1"]),
        lambda p, x: matmul_scaled_tangent(x, p["w1"]),
        lambda p, x: x @ fake_quant(p["w1"]),
    ],
    ids=["custom_vjp", "custom_jvp", "straight_through"],
)
def test_a_custom_rule_on_the_weight_decides_its_gradient(fn):
    """A custom derivative that is not the primal's (a gradient scale, a
    straight-through estimator): the factors' and the input's gradients follow the
    rule, as on the merged weight (the primal body's derivative was taken before:
    10x the gradient, or 0 through the rounding)."""
    lp = adapt({"w1": rand((4, 6), 2)}, {"w1": Layout.dense(2)})
    x = rand((5, 4))
    with pytest.warns(UserWarning, match="whose own derivative rule is kept"):
        check(fn, lp, x, dense=["w1"])
    with pytest.warns(UserWarning):
        dx = jax.grad(lambda x: jnp.sum(_factored.call(fn, (lp, x), {}) ** 2))(x)
    want = jax.grad(lambda x: jnp.sum(fn(merged(lp), x) ** 2))(x)
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-6)


# -- NNX and Equinox-style pytrees ----------------------------------------------------


def test_nnx_split_merge():
    model = nnx.Sequential(
        nnx.Linear(4, 6, rngs=nnx.Rngs(0)), jnp.tanh, nnx.Linear(6, 3, rngs=nnx.Rngs(1))
    )
    graphdef, state = nnx.split(model)
    lays = {f"layers/{i}/kernel": Layout.dense(2) for i in (0, 2)}

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    check(fn, adapt(state, lays), rand((5, 4)))


def test_nnx_step_returning_its_state_keeps_the_adapters():
    """The usual NNX step returns ``nnx.state(model)`` (RNG, caches): the adapted
    weights come back as their LoraWeights (they were materialized, so the next
    step lost its adapters), and the next step compiles nothing new."""

    class Dropped(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1))

        def __call__(self, x):
            return self.drop(self.fc(x))

    graphdef, state = nnx.split(Dropped())

    def step(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)

    lp = adapt(state, {"fc/kernel": Layout.dense(2)})
    run = jax.jit(jaxlora.lora_apply(step))
    x = rand((8, 4))
    y1, state1 = run(lp, x)
    y2, state2 = run(state1, x)
    assert run._cache_size() == 1
    assert not np.array_equal(y1, y2)  # the dropout key moved on
    assert set(jaxlora.adapters(state2)) == {"fc/kernel"}
    chex.assert_trees_all_equal(jaxlora.adapters(state2), jaxlora.adapters(lp))
    report = _factored.explain(step, (lp, x), {})
    assert report.status("fc/kernel") == "factored", str(report)


class RematBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(4, 8, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(8, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(x)))


class RematStack(nnx.Module):  # NNX's documented scanned-layers pattern, with remat
    def __init__(self):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return RematBlock(rngs)

        self.blocks = create(nnx.Rngs(0))

    def __call__(self, x):
        fwd = nnx.remat(lambda block, x: block(x))
        return nnx.scan(fwd, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.blocks, x)


def test_a_weight_returned_as_a_value_is_an_array():
    """Returned where no tree holds it (a regulariser reading the weight, a Flax
    ``method`` returning a table), an adapted weight is its merged array."""
    lp = adapt({"k": rand((4, 5), seed=2)}, {"k": Layout.dense(2)})
    with pytest.warns(UserWarning, match="'k' is used by 'output'"):
        got = jaxlora.lora_apply(lambda p: (p["k"], {"w": p["k"]}))(lp)
    np.testing.assert_array_equal(got[0], lp["k"].merged())
    np.testing.assert_array_equal(got[1]["w"], lp["k"].merged())


def test_nnx_remat_inside_scan_runs_factored():
    """``nnx.remat`` in ``nnx.scan`` returns each block's state from the loop body:
    weights passed through unchanged are stacked back as they were, not
    materialized."""
    graphdef, state = nnx.split(RematStack())
    per_layer = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    lp = adapt(state, {f"blocks/{n}/kernel": per_layer for n in ("up", "down")})
    check(lambda st, x: nnx.merge(graphdef, st)(x), lp, rand((5, 4)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PytreeMLP:
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array

    def __call__(self, x):
        return jnp.tanh(x @ self.w1 + self.b1[None]) @ self.w2


def test_equinox_style_pytree():
    model = PytreeMLP(rand((4, 6), 2), jnp.zeros((6,)), rand((6, 3), 3))
    lp = adapt(model, {"w1": Layout.dense(2), "w2": Layout.dense(2)})
    check(lambda m, x: m(x), lp, rand((5, 4)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PytreeLM:
    """Equinox-style: ``eqx.nn.Embedding`` looks up one scalar token
    (``weight[i]``) and is vmapped over the sequence; the read-out is tied."""

    embedding: jax.Array
    w: jax.Array

    def __call__(self, ids):
        h = jax.vmap(lambda i: self.embedding[i])(ids)
        return jnp.tanh(h @ self.w) @ self.embedding.T


def test_vmapped_scalar_embedding_lookup():
    """vmap turns ``table[i]`` into a gather of ``(i, 0)`` windows spanning whole
    rows: the second start index is clamped to 0, so the lookup is still a row
    gather of ``a`` (it used to materialize the whole table)."""
    lp = adapt(
        PytreeLM(rand((11, 6), 2), rand((6, 6), 3)),
        {"embedding": Layout.dense(2), "w": Layout.dense(2)},
    )
    report = check(lambda m, ids: m(ids), lp, jnp.array([0, 3, 10, 5, 5]))
    assert {u.primitive for u in report.uses["embedding"]} == {"gather", "dot_general"}


# -- properties of the engine ----------------------------------------------------------


def test_weight_gradient_is_zero_and_factored_grads_nonzero():
    lp = adapt(plain_params(), PLAIN)
    g = jax.grad(lambda t: _loss(_factored.call(mlp, (t, rand((5, 4))), {})))(lp)
    for x in jax.tree.leaves(g, is_leaf=is_lora):
        chex.assert_trees_all_equal(x.w, jnp.zeros_like(x.w))
        assert jnp.abs(x.a).sum() > 0 and jnp.abs(x.b).sum() > 0


def test_no_recompile_when_factor_values_change():
    x = rand((5, 4))
    step = jax.jit(jax.grad(lambda t: _loss(_factored.call(mlp, (t, x), {}))))
    step(adapt(plain_params(), PLAIN, seed=0))
    assert step._cache_size() == 1
    step(adapt(plain_params(), PLAIN, seed=1))
    assert step._cache_size() == 1


def test_vmap_of_call():
    lp = adapt(plain_params(), PLAIN)
    xs = rand((3, 5, 4))
    ys = jax.vmap(lambda x: _factored.call(mlp, (lp, x), {}))(xs)
    chex.assert_trees_all_close(
        ys, jax.vmap(lambda x: mlp(merged(lp), x))(xs), rtol=1e-5
    )
    # vmap over the adapted tree itself (an ensemble of adapters)
    lps = jax.tree.map(
        lambda *z: jnp.stack(z), lp, adapt(plain_params(), PLAIN, seed=7)
    )
    ys = jax.vmap(lambda t: _factored.call(mlp, (t, xs[0]), {}))(lps)
    ys0 = jax.vmap(lambda t: mlp(merged(t), xs[0]))(lps)
    chex.assert_trees_all_close(ys, ys0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "use",
    [
        lambda w, x: jnp.einsum("btd,dnh->btnh", x, w[:, None, :]),
        lambda w, x: jnp.einsum("btd,dnh->btnh", x, w.reshape(4, 1, 6)),
        lambda w, x: jnp.einsum("btd,ndh->btnh", x, w[None]),
        lambda w, x: jnp.einsum(
            "bth,dnh->btdn", x[..., :2] @ jnp.ones((2, 6)), w[:, None]
        ),
    ],
    ids=["expand", "reshape", "leading", "out-route"],
)
def test_unit_axes_go_to_the_side_the_contraction_needs(use):
    """A size-1 axis (``w[:, None]``, a reshape to ``(d, 1, h)``) carries no data: a
    contraction that needs it on the other factor's side still runs factored."""
    w = rand((4, 6), seed=5)
    lp = adapt({"w": w}, {"w": Layout.dense(2)})
    check(lambda p, x: use(p["w"], x), lp, rand((2, 3, 4)))


@pytest.mark.parametrize(
    "shape,use",
    [
        ((4, 1), lambda w, x: x @ w.reshape(4)),
        ((4, 1), lambda w, x: x @ w[:, 0]),
        ((1, 4), lambda w, x: x @ w[0]),
    ],
    ids=["out-side-reshaped-away", "out-side-indexed-away", "in-side-indexed-away"],
)
def test_weight_with_a_side_squeezed_away(shape, use):
    """A (4, 1) or (1, 4) kernel used as a vector still runs factored (one factor
    keeps no axis of w), as it did before size-1 axes could move between factors."""
    lp = adapt({"w": rand(shape, seed=5)}, {"w": Layout.dense(2)})
    check(lambda p, x: use(p["w"], x), lp, rand((2, 3, 4)))


@pytest.mark.parametrize(
    "use",
    [
        lambda w, x: jnp.einsum("btd,dnh->btnh", x, jnp.repeat(w, 2, axis=1)),
        lambda w, x: jnp.einsum("btd,dnh->btnh", x, jnp.tile(w, (1, 2, 1))),
        lambda w, x: jnp.einsum(
            "btd,dngh->btngh", x, jnp.broadcast_to(w[:, :, None], (4, 2, 3, 5))
        ),
        lambda w, x: jnp.einsum(
            "btdg,dgnh->btnh", x[..., None].repeat(3, -1), jnp.repeat(w[:, None], 3, 1)
        ),
    ],
    ids=["repeat-heads", "tile-heads", "group-axis", "input-side"],
)
def test_a_kernel_broadcast_along_its_heads_runs_factored(use):
    """Grouped-query attention that repeats a k/v kernel's heads (``jnp.repeat``:
    a broadcast to ``(d, kv_heads, groups, head_dim)`` merged into the heads): the
    new axis joins the factor of the heads beside it, so the merge stays within
    ``b``. A broadcast on the input side still joins ``a``."""
    lp = adapt(
        {"w": rand((4, 2, 5), seed=5)}, {"w": Layout(in_axes=(0,), out_axes=(1, 2))}
    )
    check(lambda p, x: use(p["w"], x), lp, rand((3, 6, 4)))


def test_a_single_kv_head_broadcast_to_every_head_runs_factored():
    """Multi-query attention: a ``(d, 1, head_dim)`` kernel broadcast to ``(d, H,
    head_dim)``. Its unit heads axis is an output axis and stays one."""
    lp = adapt(
        {"w": rand((4, 1, 5), seed=5)}, {"w": Layout(in_axes=(0,), out_axes=(1, 2))}
    )

    def mqa(p, x):
        return jnp.einsum("btd,dhk->bthk", x, jnp.broadcast_to(p["w"], (4, 3, 5)))

    check(mqa, lp, rand((3, 6, 4)))


@pytest.mark.parametrize(
    "repeat", [jnp.repeat, lambda k, n, axis: jnp.tile(k, (1, n, 1))]
)
def test_layout_of_a_kernel_repeated_for_grouped_query_attention(repeat):
    def attend(p, x):
        return jnp.einsum("btd,dnh->btnh", x, repeat(p["kernel"], 4, axis=1))

    params = {"kernel": rand((8, 2, 5), seed=5)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "layout inference cannot place it"
        lp = jaxlora.init(
            params,
            jax.random.key(0),
            rank=3,
            apply_fn=attend,
            example_args=(rand((2, 3, 8)),),
        )
    assert (lp["kernel"].a.shape, lp["kernel"].b.shape) == ((8, 3), (3, 2, 5))
    assert jaxlora.explain(attend, lp, rand((2, 3, 8))).statuses == {
        "kernel": "factored"
    }


def _fused_qkv(axis, names=("q", "k", "v")):
    """Separate kernels concatenated into one before a single matmul."""

    def fn(p, x):
        return x @ jnp.concatenate([p[n] for n in names], axis=axis)

    return fn


@pytest.mark.parametrize("axis", [1, 0], ids=["output-axis", "input-axis"])
def test_concatenated_weights_run_factored(axis):
    """``x @ concatenate([wq, wk, wv])`` (a fused q/k/v matmul built from separate
    kernels) runs as one factored contraction of rank 3r, whether the kernels are
    joined along their output or their input axis."""
    shape = (4, 6)
    p = {n: rand(shape, seed=i) for i, n in enumerate("qkv")}
    lp = adapt(p, {n: Layout.dense(2) for n in "qkv"})
    x = rand((2, 5, 4 if axis == 1 else 12))
    check(_fused_qkv(axis), lp, x)


def test_concatenated_with_a_plain_weight_and_different_ranks():
    """A frozen, non-adapted kernel among the parts contributes no update, and the
    adapted parts may have different ranks and scales."""
    lay = Layout.dense(2)

    def lora(seed, rank, alpha):
        w, a, b = (
            rand(s, seed=seed + k) for k, s in enumerate(((4, 6), (4, rank), (rank, 6)))
        )
        return LoraWeight(w, a, b, LoraSpec(lay, rank, alpha))

    lp = {"q": lora(0, 2, 2.0), "k": rand((4, 6), seed=7), "v": lora(3, 3, 9.0)}
    check(_fused_qkv(1), lp, rand((2, 5, 4)))


def test_layouts_inferred_through_a_concatenation():
    """Kernels stored (out, in), as PyTorch does, fused along their output axis and
    used transposed: inference follows the concatenation and finds axis 1 is the
    input side (the default for an unseen 2-D kernel would be axis 0)."""
    p = {n: rand((6, 4), seed=i) for i, n in enumerate("qkv")}
    x = rand((2, 5, 4))

    def fn(p, x):
        return x @ jnp.concatenate([p["q"], p["k"], p["v"]], axis=0).T

    lp = jaxlora.init(
        p,
        jax.random.key(0),
        rank=2,
        targets=["q", "k", "v"],
        apply_fn=fn,
        example_args=(x,),
    )
    want = Layout(in_axes=(1,), out_axes=(0,))
    assert {k: v.spec.layout for k, v in lp.items()} == {n: want for n in "qkv"}
    check(fn, adapt(p, {n: want for n in "qkv"}), x)


@pytest.mark.parametrize("ndim", [2, 3])
def test_layouts_inferred_per_part_of_a_concatenation(ndim):
    """Parts concatenated after different transposes keep their own layouts: q
    stored (in, out...) and k stored (out..., in)."""
    x = rand((2, 3, 4))
    if ndim == 2:
        p = {"q": rand((4, 6)), "k": rand((6, 4), seed=2)}

        def fn(p, x):
            return x @ jnp.concatenate([p["q"], p["k"].T], 1)

        want = {"q": Layout((0,), (1,)), "k": Layout((1,), (0,))}
    else:
        p = {"q": rand((4, 2, 3)), "k": rand((2, 3, 4), seed=2)}

        def fn(p, x):
            kk = p["k"].transpose(2, 0, 1)
            return jnp.einsum("btd,dnh->btnh", x, jnp.concatenate([p["q"], kk], 1))

        want = {"q": Layout((0,), (1, 2)), "k": Layout((2,), (0, 1))}
    lp = jaxlora.init(
        p,
        jax.random.key(0),
        rank=2,
        targets=["q", "k"],
        apply_fn=fn,
        example_args=(x,),
    )
    assert {k: v.spec.layout for k, v in lp.items()} == want
    check(fn, adapt(p, want), x)


_LAYERS = ("l0", "l1", "l2")


def _scan_stacked(p, x):
    """Per-layer kernels stored (out, in), stacked by the model and scanned over."""
    ws = jnp.stack([p[n] for n in _LAYERS])
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w.T), None), x, ws)[0]


def _batched_stacked(p, x):
    ws = jnp.stack([p[n] for n in _LAYERS], axis=1)  # (out, layer, in)
    return jnp.einsum("lbd,hld->lbh", jnp.broadcast_to(x, (3, *x.shape)), ws)


@pytest.mark.parametrize(
    "fn", [_scan_stacked, _batched_stacked], ids=["scan", "batched"]
)
def test_stacked_weights_run_factored_per_layer(fn):
    """``jnp.stack`` of adapted kernels (a hand-written layer stack) is a stacked
    axis of both factors: each layer keeps its own rank-r update, inferred layouts
    follow the stack into the scan (axis 1 of each (out, in) kernel is its input)."""
    p = {n: rand((4, 4), seed=i) * 0.5 for i, n in enumerate(_LAYERS)}
    x = rand((2, 4), seed=9)
    lp = jaxlora.init(
        p,
        jax.random.key(0),
        rank=2,
        targets=list(_LAYERS),
        apply_fn=fn,
        example_args=(x,),
    )
    want = Layout(in_axes=(1,), out_axes=(0,))
    assert {k: v.spec.layout for k, v in lp.items()} == {n: want for n in _LAYERS}
    check(fn, adapt(p, {n: want for n in _LAYERS}), x)


def _split_qkv(p, x):
    q, k, v = jnp.split(p["w"], 3, axis=1)  # a fused (in, 3·out) kernel
    return jnp.tanh(x @ q) * (x @ k) + x @ v


def _unstacked(p, x):
    for w in jnp.unstack(p["w"]):  # a list of layers out of a stacked weight
        x = jnp.tanh(x @ w)
    return x


def _unpacked(p, x):
    q, k, v = p["w"]  # q/k/v kernels stored stacked
    return (x @ q) * (x @ k) + x @ v


def _taken(p, x):  # a layer loop picking w[i] with a gather (jnp.take's default)
    body = lambda i, h: jnp.tanh(h @ jnp.take(p["w"], i, axis=0))  # noqa: E731
    return jax.lax.fori_loop(0, 3, body, x)


def _taken_twice(p, x):  # two layers gathered at once, then scanned over
    pair = jnp.take(p["w"], jnp.array([2, 0]), axis=0, mode="clip")
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, pair)[0]


_PER_LAYER = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))


@pytest.mark.parametrize(
    "fn,shape,want",
    [
        (_split_qkv, (4, 12), Layout(in_axes=(0,), out_axes=(1,))),
        (_unstacked, (3, 4, 4), _PER_LAYER),
        (_unpacked, (3, 4, 4), _PER_LAYER),
        (_taken, (3, 4, 4), _PER_LAYER),
    ],
    ids=["split", "unstack", "unpack", "take"],
)
def test_split_and_unstack_of_a_weight_run_factored(fn, shape, want):
    """``jnp.split`` (one fused kernel, one adapter over all its columns) and
    ``jnp.unstack``, tuple unpacking or ``jnp.take`` of one layer (each picked
    layer its own factors, the picked axis inferred as a layer axis) stay
    factored."""
    p = {"w": rand(shape, seed=3) * 0.5}
    x = rand((2, 4), seed=9)
    lp = jaxlora.init(
        p, jax.random.key(0), rank=2, targets=["w"], apply_fn=fn, example_args=(x,)
    )
    assert lp["w"].spec.layout == want
    report = _factored.explain(fn, (adapt(p, {"w": want}), x), {})
    assert report.status("w") == "factored", str(report)
    check(fn, adapt(p, {"w": want}), x)


def _picked_under_vmap(p, x):  # vmap(w[i]): a gather starting at (i, 0, 0)
    ws = jax.vmap(lambda i: p["w"][i])(jnp.array([1, 2]))
    return jnp.einsum("bi,kio->bko", x, ws, precision="highest")


@pytest.mark.parametrize(
    "fn", [_taken_twice, _picked_under_vmap], ids=["take-ids", "vmap-pick"]
)
def test_layers_gathered_by_an_index_array_run_factored(fn):
    """``jnp.take(w, ids, 0)`` or ``vmap(lambda i: w[i])`` on a stacked axis
    gathers the same layers from each factor: the index axis is a new stacked
    axis (scanned over, or a free axis of the product), factored."""
    p = {"w": rand((3, 4, 4), seed=3) * 0.5}
    lp = adapt(p, {"w": _PER_LAYER})
    x = rand((2, 4), seed=9)
    report = _factored.explain(fn, (lp, x), {})
    assert report.status("w") == "factored", str(report)
    check(fn, lp, x)


def test_stack_with_a_plain_layer():
    """A frozen layer among the stacked ones contributes no update."""
    p = {n: rand((4, 4), seed=i) * 0.5 for i, n in enumerate(_LAYERS)}
    lay = Layout(in_axes=(1,), out_axes=(0,))
    lp = adapt({"l0": p["l0"], "l2": p["l2"]}, {"l0": lay, "l2": lay})
    check(_scan_stacked, {**lp, "l1": p["l1"]}, rand((2, 4), seed=9))


@pytest.mark.parametrize(
    "fn", [_scan_stacked, _batched_stacked], ids=["scan", "batched"]
)
def test_stack_of_different_ranks_runs_factored(fn):
    """Layers of different ranks (EVA, ``rank_pattern``) stack to the largest rank,
    the smaller ones padded with zero factors: factored, no warning, the merged
    model's values and each layer's own factor gradients (their true shapes)."""
    lay = Layout(in_axes=(1,), out_axes=(0,))

    def lora(seed, rank, alpha):
        w, a, b = (
            rand(s, seed=seed + k) for k, s in enumerate(((4, 4), (4, rank), (rank, 4)))
        )
        return LoraWeight(w * 0.5, a, b, LoraSpec(lay, rank, alpha))

    lp = {"l0": lora(0, 2, 2.0), "l1": lora(3, 3, 1.0), "l2": lora(6, 1, 4.0)}
    x = rand((2, 4), seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = _factored.explain(fn, (lp, x), {})
        check(fn, lp, x)
    assert set(report.statuses.values()) == {"factored"}, str(report)


def test_fallback_warns_once_and_is_correct():
    def fn(p, x):
        return jnp.sin(p["w1"]).sum() + mlp(p, x) + jnp.cos(p["w1"]).sum()

    lp = adapt(plain_params(), PLAIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = _factored.call(fn, (lp, rand((5, 4))), {})
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "'w1'" in msgs[0] and "'sin'" in msgs[0], msgs
    chex.assert_trees_all_close(y, fn(merged(lp), rand((5, 4))), rtol=1e-5)
    report = _factored.explain(fn, (lp, rand((5, 4))), {})
    assert report.statuses == {"w1": "materialized", "w2": "factored"}
    assert "materialized" in str(report) and "sin" in str(report)


_DTYPES = st.sampled_from([(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])


@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(1, 2),
    n_out=st.integers(1, 2),
    n_batch=st.integers(0, 2),
    rank=st.integers(1, 4),
    weight_lhs=st.booleans(),
    transpose_w=st.booleans(),
    dtype_tol=_DTYPES,
    sizes=st.lists(st.integers(1, 4), min_size=4, max_size=4),
    seed=st.integers(0, 100),
)
def test_dot_general_property(
    n_in, n_out, n_batch, rank, weight_lhs, transpose_w, dtype_tol, sizes, seed
):
    """Random layouts (in/out axes in any order) contracted either way round."""
    dtype, tol = dtype_tol
    in_shape, out_shape = tuple(sizes[:n_in]), tuple(sizes[2 : 2 + n_out])
    rng = np.random.default_rng(seed)
    perm = tuple(rng.permutation(n_in + n_out)) if transpose_w else None
    base = in_shape + out_shape
    w_shape = tuple(base[i] for i in perm) if perm else base
    inv = np.argsort(perm) if perm else np.arange(n_in + n_out)
    lay = Layout(
        in_axes=tuple(int(inv[i]) for i in range(n_in)),
        out_axes=tuple(int(inv[n_in + i]) for i in range(n_out)),
    )
    batch = tuple(sizes[:n_batch])
    x = rand(batch + in_shape, seed, dtype)
    w_in = [int(inv[i]) for i in range(n_in)]
    x_in = list(range(n_batch, n_batch + n_in))

    def fn(p, x):
        if weight_lhs:
            dn = ((w_in, x_in), ((), ()))
            return jax.lax.dot_general(p["w"], x, dn)
        return jax.lax.dot_general(x, p["w"], ((x_in, w_in), ((), ())))

    lp = adapt({"w": rand(w_shape, seed + 1, dtype)}, {"w": lay}, rank=rank, seed=seed)
    check(fn, lp, x, tol=tol, magnitude=True)


def test_views_and_control_flow_stay_factored():
    """Indexing a stacked kernel, scalar scaling, transposes, reshapes, fori_loop
    and cond all keep the weight symbolic."""

    def fn(p, x):
        w, v = p["w"], p["v"]  # (3, 4, 4) stacked; (4, 2, 2) with two output axes
        h = x
        for i in range(2):
            h = jnp.tanh(h @ w[i])
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w[i] * 0.5), h)
        h = jax.lax.cond(
            h.sum() > 0, lambda h: h @ (w[0] / 2.0), lambda h: h @ w[1].T.T, h
        )
        return jnp.sin(h @ v.reshape(4, 4)) + h @ jnp.transpose(v, (0, 2, 1)).reshape(
            4, 4
        )

    params = {"w": rand((3, 4, 4), 2), "v": rand((4, 2, 2), 3)}
    lays = {"w": Layout.dense(3, n_stack=1), "v": Layout.dense(3)}
    report = check(fn, adapt(params, lays), rand((5, 4)))
    assert {u.primitive for u in report.uses["w"]} == {"dot_general"}


def test_stacked_weight_in_a_plain_scan():
    def fn(p, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, p["w"])[0]

    lp = adapt({"w": rand((3, 4, 4), 2)}, {"w": Layout.dense(3, n_stack=1)})
    check(fn, lp, rand((5, 4)))


def test_weights_handed_back_by_a_loop_body_stay_factored():
    """A weight carried unchanged through ``fori_loop`` (a scan with static bounds, a
    while loop with traced ones), and a stacked weight whose slices a scan returns
    as outputs (as NNX's transforms return module state): JAX forwards both out of
    the loop when it traces it, so no use is materialized."""

    def step(i, carry):
        h, w, v = carry
        return jnp.tanh(h @ w[i % 3] + h @ v), w, v

    def fn(p, x):
        h = jax.lax.fori_loop(0, 3, step, (x, p["w"], p["v"]))[0]

        def layer(h, wi):
            return jnp.tanh(h @ wi), wi

        h, back = jax.lax.scan(layer, h, p["w"], reverse=True)
        return h @ back[1]

    def traced_bounds(p, x, n):  # a while loop: forward only (no reverse mode)
        return jax.lax.fori_loop(0, n, step, (x, p["w"], p["v"]))[0]

    params = {"w": rand((3, 4, 4), 2), "v": rand((4, 4), 3)}
    lp = adapt(params, {"w": Layout.dense(3, n_stack=1), "v": Layout.dense(2)})
    x, n = rand((5, 4)), jnp.int32(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a materialized weight warns: fail on it
        report = check(fn, lp, x)
        got = jax.jit(lambda t, x, n: _factored.call(traced_bounds, (t, x, n), {}))(
            lp, x, n
        )
        looped = _factored.explain(traced_bounds, (lp, x, n), {})
    assert {u.primitive for u in report.uses["w"]} == {"dot_general"}, str(report)
    assert set(looped.statuses.values()) == {"factored"}, str(looped)
    chex.assert_trees_all_close(got, traced_bounds(merged(lp), x, n), rtol=1e-5)


def test_trainable_scalar_times_kernel():
    """``x @ (kernel * gate)`` with a trainable scalar gate: runs factored, the
    factor gradients agree, and the gate's gradient includes the base path (the
    backward used to crash on the re-bound ``mul``, and the fused contraction's
    zero cotangent for the base dropped the gate's ``x·W0`` share)."""

    def fn(p, x):
        return jnp.tanh(x @ (p["w1"] * p["g"])) @ (p["w2"] / p["g"])

    lp = adapt({**plain_params(), "g": jnp.float32(1.7)}, PLAIN)
    x = rand((5, 4))
    check(fn, lp, x)
    got = jax.grad(lambda t: _loss(_factored.call(fn, (t, x), {})))(lp)
    want = jax.grad(lambda t: _loss(fn(merged(t), x)))(lp)
    chex.assert_trees_all_close(got["g"], want["g"], rtol=1e-5)
    for name in ("w1", "w2"):  # the base weights still get no gradient
        chex.assert_trees_all_equal(got[name].w, jnp.zeros_like(got[name].w))


def test_negated_kernel_stays_factored():
    """``-kernel`` is a scalar multiple like ``2 * kernel``: ``a`` takes the sign."""

    def fn(p, x):
        return jnp.tanh(x @ -p["w1"]) @ (-p["w2"]).T.T

    check(fn, adapt(plain_params(), PLAIN), rand((5, 4)))


def test_explain_accepts_abstract_inputs():
    """``explain`` runs no FLOPs, so ``jax.ShapeDtypeStruct`` inputs are enough."""
    lp = adapt(plain_params(), PLAIN)
    x = jax.ShapeDtypeStruct((5, 4), jnp.float32)
    report = _factored.explain(mlp, (lp, x), {})
    assert report.statuses == {"w1": "factored", "w2": "factored"}, str(report)


def test_precision_is_kept():
    def fn(p, x):
        return jnp.dot(x, p["w1"], precision=jax.lax.Precision.HIGHEST)

    lp = adapt(plain_params(), {"w1": Layout.dense(2)})
    jaxpr = jax.make_jaxpr(lambda t: _factored.call(fn, (t, rand((5, 4))), {}))(lp)
    assert "HIGHEST" in str(jaxpr)


def _contractions(jaxpr):
    """``(primitive, precision, lhs shape, rhs shape)`` of every dot and conv in
    ``jaxpr`` and the jaxprs it holds."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            shapes = [tuple(v.aval.shape) for v in eqn.invars]
            found.append((eqn.primitive.name, str(eqn.params["precision"]), *shapes))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    found += _contractions(sub)
    return found


@pytest.mark.parametrize("highest", [True, False], ids=["highest", "default"])
def test_every_added_contraction_runs_at_the_models_precision(highest):
    """A model at HIGHEST precision (dense, conv, embedding lookup): every dot and
    conv of the factored step, forward and backward, runs at HIGHEST, so GPUs (TF32)
    and TPUs (bf16 passes) do not round the rank-r path. At default precision the
    base + low-rank sum (a reduction over the stacked pair) is still HIGHEST: it
    must not round the base term."""
    prec = jax.lax.Precision.HIGHEST if highest else None
    conv_kw = dict(window_strides=(1,), padding="SAME", precision=prec)
    conv_kw["dimension_numbers"] = ("NWC", "WIO", "NWC")

    def fn(p, ids):
        h = jnp.take(p["e"], ids, axis=0)  # (batch, len, 6)
        h = jax.lax.conv_general_dilated(h, p["c"], **conv_kw)
        return jnp.dot(jnp.tanh(h), p["k"], precision=prec)

    params = {"e": rand((11, 6), 1), "c": rand((3, 6, 6), 2), "k": rand((6, 5), 3)}
    lays = {"e": Layout.dense(2), "c": Layout.conv(3), "k": Layout.dense(2)}
    lp = adapt(params, lays)
    ids = jnp.array([[0, 3, 7, 2], [10, 5, 1, 4]])
    loss = lambda t: jnp.sum(_factored.call(fn, (t, ids), {})[0] ** 2)  # noqa: E731
    found = _contractions(jax.make_jaxpr(jax.grad(loss))(lp).jaxpr)
    sums = [c for c in found if c[3] == (2,)]  # the pair (..., 2) reduced by (2,)
    assert sums and all("HIGHEST" in c[1] for c in sums), sums
    if highest:
        low = [c for c in found if "HIGHEST" not in c[1]]
        assert not low, low


@pytest.mark.parametrize("fill", [-1.0, None], ids=["fill-value", "nan-fill-masked"])
def test_out_of_range_ids_get_the_base_fill(fill):
    """``jnp.take``'s fill mode (``nn.Embed``'s): an out-of-range id's row is the
    fill, as with the merged table (the factor rows are 0, not filled), and a
    masked-out padding id leaves the factor gradients finite."""
    table = {"e": rand((11, 6), seed=4)}
    ids = jnp.array([[0, 3, 12], [11, 5, 1]])

    def lookup(p, ids):
        h = jnp.take(p["e"], ids, axis=0, mode="fill", fill_value=fill)
        return jnp.where((ids < 11)[..., None], h, 0.0) if fill is None else h

    check(lookup, adapt(table, {"e": Layout.dense(2)}), ids)


def test_padded_weights_run_factored():
    """``jnp.pad`` of a weight (a vocabulary padded to a multiple, output features
    padded, an axis cropped or interior-padded): the factors are zero-padded."""
    p = {"e": rand((11, 6), seed=4), "k": rand((6, 5), seed=5)}
    lp = adapt(p, {"e": Layout.dense(2), "k": Layout.dense(2)})
    ids = jnp.array([[0, 3, 10], [15, 5, 1]])

    def fn(p, ids):
        h = jnp.pad(p["e"], ((0, 5), (0, 0)))[ids]  # rows 11..15 are padding
        k = jax.lax.pad(p["k"], 0.5, ((0, 0, 0), (-1, 2, 1)))  # crop, interior
        return h @ k

    check(fn, lp, ids)


@pytest.mark.parametrize(
    "model,x",
    [
        (nn.Dense(5), jnp.ones((0, 6))),
        (nn.DenseGeneral(5, batch_dims=(0,)), jnp.ones((3, 0, 6))),
        (nn.Conv(5, (3,)), jnp.ones((0, 7, 4))),
    ],
    ids=["dense", "dense-general", "conv"],
)
def test_an_empty_batch_runs(model, x):
    """A zero-size batch gives the empty output and zero gradients (it crashed)."""
    init_x = jnp.ones(tuple(n or 2 for n in x.shape))
    p = model.init(jax.random.key(0), init_x)
    lp = jaxlora.init(p, jax.random.key(1), scheme="both_random", rank=2)
    apply = jaxlora.lora_apply(model.apply)
    assert apply(lp, x).shape == model.apply(merged(lp), x).shape
    g = jax.grad(lambda t: jnp.sum(apply(t, x)))(lp)
    grads = jax.tree.leaves(factors(g))
    assert len(grads) == 2 and all(float(jnp.abs(f).max()) == 0.0 for f in grads)


def _experts(p, x):  # a mixture of experts: row groups, one expert each
    sizes = jnp.array([4, 1, 5], jnp.int32)
    h = jax.nn.gelu(jax.lax.ragged_dot(x, p["up"], sizes))
    return jax.lax.ragged_dot(h, p["down"], sizes)


def test_ragged_dot_experts_run_factored():
    """``lax.ragged_dot`` over stacked expert weights (MoE): layouts are inferred
    with the expert axis stacked (each expert its own factors), and the grouped
    products run through ``a`` then ``b``, values and factor gradients as merged."""
    p = {"up": rand((3, 8, 6), seed=3) * 0.4, "down": rand((3, 6, 8), seed=4) * 0.4}
    x = rand((10, 8), seed=9)
    lp = jaxlora.init(
        p,
        jax.random.key(0),
        rank=2,
        targets=["up", "down"],
        apply_fn=_experts,
        example_args=(x,),
    )
    per_expert = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    assert {k: v.spec.layout for k, v in lp.items()} == {
        "up": per_expert,
        "down": per_expert,
    }
    check(_experts, adapt(p, {"up": per_expert, "down": per_expert}), x)


@pytest.mark.parametrize(
    "layer,x",
    [(nn.Dense(3), (2, 4)), (nn.Conv(3, (3,)), (2, 8, 4))],
    ids=["dense", "conv"],
)
def test_vmap_over_the_stacked_axis_of_an_ensemble(layer, x):
    """``jax.vmap(lora_apply(apply))`` over per-member factors (stacked axis 0):
    inside the vmap each LoraWeight is one member's, and so is its layout. Used to
    crash in the engine and in `merge` (the layout still had the stacked axis)."""
    x = rand(x)
    members = jax.vmap(lambda k: layer.init(k, x))(
        jax.random.split(jax.random.key(0), 5)
    )
    nd = members["params"]["kernel"].ndim
    lay = Layout(in_axes=tuple(range(1, nd - 1)), out_axes=(nd - 1,), stack_axes=(0,))
    lp = adapt(members, {"params/kernel": lay})
    want = jax.vmap(layer.apply, in_axes=(0, None))(merged(lp), x)
    got = jax.vmap(jaxlora.lora_apply(layer.apply), in_axes=(0, None))(lp, x)
    assert rel_err(got, want) < 1e-5
    chex.assert_trees_all_close(jax.vmap(jaxlora.merge)(lp), merged(lp), rtol=1e-6)
    grads = jax.grad(
        lambda p: _loss(jax.vmap(jaxlora.lora_apply(layer.apply), (0, None))(p, x))
    )(lp)
    want_grads = jax.grad(
        lambda p: _loss(jax.vmap(layer.apply, (0, None))(merged(p), x))
    )(lp)
    for u, v in zip(
        factors(grads)["params/kernel"],
        factors(want_grads)["params/kernel"],
        strict=True,
    ):
        assert rel_err(u, v) < 1e-5


def test_vmap_over_an_axis_that_is_not_stacked_is_a_clear_error():
    """The stacked axis is w's axis 1: mapping axis 0 of w, a and b takes an input
    row of w but a layer of the factors."""
    lay = Layout(in_axes=(0,), out_axes=(2,), stack_axes=(1,))
    lp = adapt({"kernel": rand((5, 5, 3))}, {"kernel": lay})
    with pytest.raises(ValueError, match=r"do not have the 3 axes of its layout"):
        jax.vmap(jaxlora.merge)(lp)


class ConvEnsemble(nn.Module):
    """``nn.vmap`` of a 3×3 conv over ``members`` (inputs shared if ``in_axes`` is
    None)."""

    members: int
    in_axes: int | None = None

    @nn.compact
    def __call__(self, x):
        conv = nn.vmap(
            nn.Conv,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=self.in_axes,
            axis_size=self.members,
        )
        return conv(4, (3, 3), name="conv")(x)


def test_ensemble_of_convs_by_vmap_runs_factored():
    """``nn.vmap`` of a conv with a shared input: JAX permutes the member axis next
    to the output channels (a reshape with ``dimensions``). Layout inference used
    to ignore the permutation (member axis as input, Cin as output) and the engine
    materialized it. The member axis is an output axis, as for a shared-input Dense."""
    model, x = ConvEnsemble(5), rand((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    lp = jaxlora.init(
        variables, jax.random.key(1), rank=2, apply_fn=model.apply, example_args=(x,)
    )
    lw = lp["params"]["conv"]["kernel"]
    assert lw.layout == Layout(in_axes=(1, 2, 3), out_axes=(0, 4))
    lp = adapt(variables, {"params/conv/kernel": lw.layout})
    check(model.apply, lp, x)


@pytest.mark.parametrize("in_axes", [None, 0], ids=["shared-input", "own-input"])
def test_conv_ensemble_with_per_member_factors_runs_factored(in_axes):
    """Per-member factors (an explicit stacked layout) of a vmapped conv: JAX merges
    the members into the output channels, which the engine now reads as the members'
    updates side by side (rank E·r, ``b`` block-diagonal); it materialized them."""
    model = ConvEnsemble(3, in_axes)
    x = rand((2, 6, 6, 3) if in_axes is None else (3, 2, 6, 6, 3))
    variables = model.init(jax.random.key(0), x)
    per_member = Layout(in_axes=(1, 2, 3), out_axes=(4,), stack_axes=(0,))
    check(model.apply, adapt(variables, {"params/conv/kernel": per_member}), x)


# -- state a model writes in place -------------------------------------------------


class BatchNormDropoutNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(self.bn(self.lin(x))))


def _written_state(m):
    return m.bn.mean[...], m.bn.var[...], m.drop.rngs.count[...]


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_nnx_state_written_in_place_reaches_the_callers_module(jit, factored):
    """BatchNorm statistics and the Dropout RNG count, written by the model while it
    runs, land in the module passed to the wrapped function, as they do for the
    merged model (they were dropped: the engine ran on copies; ``factored=False``
    ran on merged copies and dropped them too, reusing one dropout mask)."""
    graphdef, state = nnx.split(BatchNormDropoutNet(nnx.Rngs(0)))
    lp = adapt(state, {"lin/kernel": Layout.dense(2), "out/kernel": Layout.dense(2)})
    x = rand((16, 4)) + 3.0
    step = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    adapted_step = jaxlora.lora_apply(lambda m, x: m(x), factored=factored)
    if jit:
        adapted_step = nnx.jit(adapted_step)
    merged, adapted = nnx.merge(graphdef, jaxlora.merge(lp)), nnx.merge(graphdef, lp)
    want = [step(merged, x) for _ in range(2)]
    got = [adapted_step(adapted, x) for _ in range(2)]
    for g, w in zip(got, want, strict=True):  # same dropout masks, step by step
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(got[0], got[1])  # the mask moved on
    chex.assert_trees_all_close(
        _written_state(adapted), _written_state(merged), rtol=1e-5, atol=1e-5
    )
    assert int(adapted.drop.rngs.count[...]) == 2
    assert jaxlora.is_lora(adapted.lin.kernel.get_value())


@pytest.mark.parametrize("factored", [True, False])
def test_nnx_kv_cache_decoding_matches_the_merged_model(factored):
    """``nnx.MultiHeadAttention(decode=True)`` writes its KV cache in place (with
    ``factored=False`` the cache never advanced: outputs up to 2.7 off)."""
    b, t, d = 1, 4, 16
    mha = nnx.MultiHeadAttention(
        num_heads=2, in_features=d, decode=True, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(mha)
    paths = [f"{n}/kernel" for n in ("query", "key", "value", "out")]
    layouts = {
        p: jaxlora.Layout.dense(3, n_in=2 if p == "out/kernel" else 1) for p in paths
    }
    lp = adapt(state, layouts)
    xs = rand((b, t, d))

    def decode(m, step):
        m.init_cache((b, t, d))
        return jnp.concatenate([step(m, xs[:, i : i + 1]) for i in range(t)], 1)

    merged, adapted = nnx.merge(graphdef, jaxlora.merge(lp)), nnx.merge(graphdef, lp)
    want = decode(merged, lambda m, x: m(x))
    got = decode(adapted, jaxlora.lora_apply(lambda m, x: m(x), factored=factored))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert int(adapted.cache_index[...]) == t


def test_in_place_writes_that_cannot_be_stored_back_are_refused():
    lp = adapt({"k": rand((4, 5), seed=2)}, {"k": Layout.dense(2)})

    def counts_in_a_dict(p, x):
        p["calls"] = p["calls"] + 1  # a plain dict: the caller's is not the one run
        return x @ p["k"]

    with pytest.raises(ValueError, match=r"'0/0/calls' \(not in a Variable\)"):
        jaxlora.lora_apply(counts_in_a_dict)(
            {**lp, "calls": jnp.zeros(())}, rand((2, 4))
        )

    model = nnx.Linear(4, 5, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    adapted = nnx.merge(graphdef, adapt(state, {"kernel": Layout.dense(2)}))

    def overwrites_the_kernel(m, x):
        m.kernel.set_value(m.kernel.get_value() * 2)
        return m(x)

    with pytest.raises(ValueError, match=r"'0/0/kernel' \(an adapted weight\)"):
        jaxlora.lora_apply(overwrites_the_kernel)(adapted, rand((2, 4)))

    def adds_a_variable(m, x):
        m.seen = nnx.BatchStat(jnp.zeros(()))
        return m(x)

    with pytest.raises(ValueError, match="added or removed variables"):
        jaxlora.lora_apply(adds_a_variable)(adapted, rand((2, 4)))


def test_nnx_state_returned_from_a_scan_keeps_its_adapters():
    """``nnx.scan`` stacks each block's state back: returned by the step, the
    adapted kernels are their LoraWeights (they used to be materialized)."""
    graphdef, state = nnx.split(RematStack())
    per_layer = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    lp = adapt(state, {f"blocks/{n}/kernel": per_layer for n in ("up", "down")})

    def step(st, x):
        m = nnx.merge(graphdef, st)
        return m(x), nnx.state(m)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing materialized
        _, back = jaxlora.lora_apply(step)(lp, rand((5, 4)))
    got, given = (t["blocks"]["up"]["kernel"].get_value() for t in (back, lp))
    assert jaxlora.is_lora(got)
    assert (got.w, got.a, got.b) == (given.w, given.a, given.b)  # the same arrays


def test_a_default_layout_on_scanned_layers_says_to_infer_layouts():
    """Without ``apply_fn``, ``init`` takes the layer axis of NNX's stacked blocks
    as the input side; the scan indexes it away, and the report says what to do."""
    graphdef, state = nnx.split(RematStack())
    with pytest.warns(UserWarning, match="default layout"):
        lp = jaxlora.init(state, jax.random.key(0), rank=2)
    report = jaxlora.explain(lambda s, x: nnx.merge(graphdef, s)(x), lp, rand((5, 4)))
    assert report.status("blocks/up/kernel") == "materialized"
    assert "its input side was indexed away" in str(report), str(report)
    assert "apply_fn=" in str(report)


def test_a_materialized_use_of_bf16_factors_is_the_merged_weight():
    """Bfloat16 factors of a float32 model: the fallback forms the weight as
    `LoraWeight.merged` does (factors cast to float32 first), not from a
    bf16-rounded product (7.7e-4 relative off before)."""
    params = {"w": rand((64, 64), 1)}
    mask = jnp.tril(jnp.ones((64, 64)))
    lp = adapt(params, {"w": Layout.dense(2)}, factor_dtype=jnp.bfloat16, alpha=64.0)
    x = rand((4, 64), 2)
    fn = lambda p, x: x @ (p["w"] * mask)  # noqa: E731  (a non-scalar product)
    with pytest.warns(UserWarning, match="materialized"):
        out = jaxlora.lora_apply(fn)(lp, x)
    np.testing.assert_array_equal(out, fn(merged(lp), x))
