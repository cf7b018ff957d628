"""EVA through `jaxlora.init`: inputs captured by the engine, ranks by variance."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora


def two_inputs(p, batch):
    """A plain function: weight A sees ``batch[0]``, weight B sees ``batch[1]``."""
    xa, xb = batch
    return jnp.tanh(xa @ p["A"]["kernel"]).sum() + jnp.tanh(xb @ p["B"]["kernel"]).sum()


FOUR_AXES = jnp.array([1.0] * 4 + [0.01] * 4)  # B's variance in 4 directions
DECAYING = 2.0 ** -jnp.arange(8.0)  # distinct eigenvalues: components well defined


def make_batches(n, decay=FOUR_AXES, key=0):
    keys = jax.random.split(jax.random.key(key), n)
    return [
        (
            jax.random.normal(jax.random.fold_in(k, 0), (128, 64)),  # A: isotropic
            jax.random.normal(jax.random.fold_in(k, 1), (128, 8)) * decay[None, :],
        )
        for k in keys
    ]


PARAMS = {"A": {"kernel": jnp.ones((64, 16)) / 8}, "B": {"kernel": jnp.ones((8, 16))}}


def test_ranks_follow_explained_variance_and_sum_to_the_budget():
    p = jaxlora.init(
        PARAMS,
        jax.random.key(0),
        scheme="eva",
        rank=2,
        alpha=4,
        apply_fn=two_inputs,
        batches=make_batches(3),
    )
    ads = jaxlora.adapters(p)
    # B's top 4 components (~1/4 each) explain more than any of A's (~1/64): A gets 0
    assert list(ads) == ["B/kernel"] and ads["B/kernel"].rank == 4  # = budget 2 + 2
    assert not isinstance(p["A"]["kernel"], jaxlora.LoraWeight)
    node = ads["B/kernel"]
    assert node.spec.alpha == 8.0 and node.scale == 4 / 2  # alpha_l = alpha·r_l/r
    assert not np.asarray(node.b).any()
    np.testing.assert_allclose(node.a.T @ node.a, np.eye(4), atol=1e-5)


def eva_rank_2(params, apply_fn, batches, target):
    """EVA at rank 2 on the one target ``target``."""
    return jaxlora.init(
        params,
        jax.random.key(0),
        scheme="eva",
        rank=2,
        targets=[target],
        apply_fn=apply_fn,
        batches=batches,
    )


def test_components_match_an_exact_pca_of_the_inputs():
    batch = make_batches(1, DECAYING)[0]
    p = eva_rank_2(PARAMS, two_inputs, [batch], "B")
    a = np.asarray(p["B"]["kernel"].a)  # (8, 2): the whole budget of one target
    x = np.asarray(batch[1], np.float64)
    x = x - x.mean(0)
    _, vecs = np.linalg.eigh(x.T @ x)
    top = vecs[:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(np.sum(a * top, axis=0)), 1.0, atol=1e-4)


def test_output_unchanged_and_layouts_inferred_from_the_first_batch():
    model = nn.Sequential([nn.Dense(32), nn.gelu, nn.DenseGeneral((4, 8))])
    batches = [jax.random.normal(jax.random.key(i), (6, 10, 16)) for i in range(4)]
    variables = model.init(jax.random.key(9), batches[0])
    p = jaxlora.init(
        variables,
        jax.random.key(0),
        scheme="eva",
        rank=4,
        apply_fn=model.apply,
        batches=iter(batches),
    )
    assert sum(n.rank for n in jaxlora.adapters(p).values()) == 8
    np.testing.assert_array_equal(
        jaxlora.lora_apply(model.apply)(p, batches[0]),
        model.apply(variables, batches[0]),
    )


def test_eva_errors():
    with pytest.raises(
        ValueError, match=r"'eva' initializes from the inputs.*apply_fn="
    ):
        jaxlora.init(PARAMS, jax.random.key(0), scheme="eva", rank=2)
    with pytest.raises(ValueError, match=r"'eva' got no batches"):
        jaxlora.init(
            PARAMS,
            jax.random.key(0),
            scheme="eva",
            rank=2,
            apply_fn=two_inputs,
            batches=[],
        )
    conv = nn.Conv(4, (3, 3), name="conv")
    x = jnp.ones((1, 6, 6, 2))
    variables = conv.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match=r"'params/kernel': used by 'conv_general_dilated'"
    ):
        jaxlora.init(
            variables,
            jax.random.key(0),
            scheme="eva",
            rank=2,
            apply_fn=conv.apply,
            batches=[x],
        )


def eva(batches, target=None, **kw):
    """EVA at rank 2 on ``two_inputs`` (``target``: one of its weights)."""
    kw = dict(rank=2, apply_fn=two_inputs, batches=batches, **kw)
    if target is not None:
        kw["targets"] = [target]
    return jaxlora.init(PARAMS, jax.random.key(0), scheme="eva", **kw)


def test_eva_config_rho_1_keeps_every_rank_and_alpha_can_stay():
    """``rho=1`` keeps ``r`` components per target, so the budget cannot move;
    ``adjust_scaling_factors=False`` keeps alpha (the scale follows ``r_l``)."""
    cfg = jaxlora.EvaConfig(rho=1.0)
    with pytest.warns(UserWarning, match="had not converged"):  # A is isotropic
        ads = jaxlora.adapters(eva(make_batches(3), eva_config=cfg))
    assert {p: n.rank for p, n in ads.items()} == {"A/kernel": 2, "B/kernel": 2}
    cfg = jaxlora.EvaConfig(adjust_scaling_factors=False)
    with pytest.warns(UserWarning, match="had not converged"):
        node = eva(make_batches(3), alpha=4, eva_config=cfg)["B"]["kernel"]
    assert node.rank == 4 and node.spec.alpha == 4.0 and node.scale == 1.0


def test_eva_config_whiten_divides_by_the_root_of_the_singular_values():
    """PEFT's ``whiten=True``: component i / √σᵢ, σ the singular values of the
    centred inputs (here one batch of them); directions as without it."""
    batch = make_batches(1, DECAYING)[0]
    with pytest.warns(UserWarning, match="one batch cannot show"):
        plain = eva([batch], "B")["B"]["kernel"].a
        white = eva([batch], "B", eva_config=jaxlora.EvaConfig(whiten=True))
    x = np.asarray(batch[1], np.float64)
    sigma = np.linalg.svd(x - x.mean(0), compute_uv=False)[:2]
    np.testing.assert_allclose(
        np.asarray(white["B"]["kernel"].a),
        np.asarray(plain) / np.sqrt(sigma),
        rtol=1e-4,
    )


def test_eva_warns_only_where_the_components_had_not_settled():
    """EVA stops feeding a target once successive estimates agree; a target
    given rank whose components had not (one batch; PEFT raises) is named in a
    warning. Well separated variances settle: no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eva(make_batches(8, DECAYING), "B")
    with pytest.warns(UserWarning, match=r"'B/kernel' had not converged: one batch"):
        eva(make_batches(1, DECAYING), "B")


@pytest.mark.parametrize(
    "kw,error",
    [
        (dict(rho=0.5), r"rho must be a finite number >= 1.*got 0.5"),
        (dict(tau=0.0), r"tau is a threshold .* in \(0, 1\].*got 0.0"),
        (dict(tau=float("nan")), r"tau is a threshold"),
        (dict(whiten="yes"), r"whiten must be True or False, got 'yes'"),
    ],
)
def test_eva_config_errors(kw, error):
    with pytest.raises(ValueError, match=error):
        jaxlora.EvaConfig(**kw)


def test_eva_config_only_with_eva():
    with pytest.raises(ValueError, match=r"eva_config is only used by scheme 'eva'"):
        jaxlora.init(PARAMS, jax.random.key(0), eva_config=jaxlora.EvaConfig())
    with pytest.raises(TypeError, match=r"eva_config must be a jaxlora.EvaConfig"):
        eva(make_batches(2), eva_config={"rho": 1.0})


@pytest.mark.parametrize(
    "use,reason",
    [
        (
            lambda p, x: x @ jnp.concatenate([p["q"], p["plain"]], 1),
            r"'q': combined with other arrays \(concatenate or stack\) before its use",
        ),
        (
            lambda p, x: jax.lax.fori_loop(  # traced bounds: a while loop
                0, 2 + (x.sum() > 0), lambda i, h: h + (x @ p["q"]).sum(), 0.0
            ),
            r"'q': used inside a loop \(while\)",
        ),
        (
            lambda p, x: jax.lax.cond(
                x.sum() > 0, lambda x: x @ p["q"], lambda x: -x @ p["q"], x
            ),
            r"'q': used inside a branch of cond/switch",
        ),
    ],
    ids=["concatenated", "while", "cond"],
)
def test_eva_refuses_inputs_that_are_not_one_weights(use, reason):
    """A weight fused with other arrays before the matmul does not see rows of its
    own; inside a while loop or a cond
    branch its rows cannot be taken out of the traced body (they used to escape as
    tracers): a clear error, not a crash."""
    p = {"q": jnp.ones((4, 6)), "plain": jnp.ones((4, 2))}
    batches = [jax.random.normal(jax.random.key(i), (4, 3, 4)) for i in range(2)]
    with pytest.raises(ValueError, match=reason):
        eva_rank_2(p, use, batches, "q")


W4 = jax.random.normal(jax.random.key(0), (4, 6))
W223 = jax.random.normal(jax.random.key(0), (2, 2, 6))
W243 = jax.random.normal(jax.random.key(0), (2, 4, 6))  # a stack of two (4, 6)


def _flipped_scan(p, x):
    def body(h, wi):
        return h, jnp.tanh(h @ wi[::-1]).sum()

    return jax.lax.scan(body, x, p["q"])[1].sum()


def _scan_of_flipped_inputs(p, x):
    def body(h, wi):
        return h, jnp.tanh(h[..., ::-1] @ wi).sum()

    return jax.lax.scan(body, x, p["q"])[1].sum()


VIEWS = {  # a use through a view of the input side, and the same model without it
    "reversed": (
        W4,
        lambda p, x: jnp.tanh(x @ p["q"][::-1]),
        lambda p, x: jnp.tanh(x[..., ::-1] @ p["q"]),
    ),
    "transposed-then-merged": (
        W223,
        lambda p, x: jnp.tanh(x @ jnp.transpose(p["q"], (1, 0, 2)).reshape(4, 6)),
        lambda p, x: jnp.tanh(
            jnp.einsum("btji,ijo->bto", x.reshape(*x.shape[:-1], 2, 2), p["q"])
        ),
    ),
    "sliced": (
        W4,
        lambda p, x: jnp.tanh(x[..., :2] @ p["q"][:2]),
        lambda p, x: jnp.tanh(x.at[..., 2:].set(0.0) @ p["q"]),
    ),
    "tiled": (
        W4,
        lambda p, x: jnp.tanh(
            jnp.concatenate([x, x[..., ::-1]], -1) @ jnp.tile(p["q"], (2, 1))
        ),
        lambda p, x: jnp.tanh((x + x[..., ::-1]) @ p["q"]),
    ),
    "reversed-in-bf16": (
        W4,
        lambda p, x: jnp.tanh(
            x.astype(jnp.bfloat16) @ p["q"].astype(jnp.bfloat16)[::-1]
        ).astype(jnp.float32),
        lambda p, x: jnp.tanh(
            x[..., ::-1].astype(jnp.bfloat16) @ p["q"].astype(jnp.bfloat16)
        ).astype(jnp.float32),
    ),
    "reversed-in-a-scan": (W243, _flipped_scan, _scan_of_flipped_inputs),
}


@pytest.mark.parametrize("scheme", ["eva", "corda"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_a_view_of_the_input_side_gives_the_weights_own_rows(view, scheme):
    """``x @ w[::-1]`` is ``x[..., ::-1] @ w``: the weight's own input rows are the
    reversed ones, and EVA's PCA / CorDA's covariance must be of those. They used to
    be recorded in the view's order (EVA's ``a`` rows swapped; CorDA's residual off
    by up to 2), or refused for a slice. Every view (a reversal, a transpose then a
    merge of input axes, a slice, a tile, under a bf16 cast, per layer of a scan)
    gives the factors of the model written without it."""
    w, used, plain = VIEWS[view]
    p = {"q": w}
    scales = jnp.array([3.0, 1.0, 0.3, 0.1])
    batches = [
        jax.random.normal(jax.random.key(i), (8, 5, 4)) * scales[None, None]
        for i in range(3)
    ]
    got, want = (
        jaxlora.init(
            p,
            jax.random.key(1),
            scheme=scheme,
            rank=2,
            targets=["q"],
            apply_fn=fn,
            batches=batches,
        )["q"]
        for fn in (used, plain)
    )
    assert float(jnp.abs(want.a).max()) > 0
    np.testing.assert_allclose(got.a, want.a, atol=1e-5)
    np.testing.assert_allclose(got.b, want.b, atol=1e-5)
    np.testing.assert_allclose(got.w, want.w, atol=1e-5)


def test_a_weight_scaled_into_float8_is_captured_and_one_out_of_range_refused():
    """The probe numbers each input row of the weight in its ``a`` (ratios 1 or 2),
    scaled to the weight's own magnitude: the usual per-tensor float8 recipe
    (``w * 448 / max|w|``, a scale in the thousands here) keeps it in range and
    gives the factors of the model with a float32 weight. A weight the model
    casts out of float8's range (NaN in the model too) loses the row numbers:
    refused by name, not rows put in the wrong place."""
    f8 = jnp.float8_e4m3fn
    p = {"q": jax.random.normal(jax.random.key(0), (8, 6)) / 10}
    batches = [jax.random.normal(jax.random.key(i), (8, 8)) for i in range(2)]

    def recipe(p, x):
        s = 448.0 / jnp.max(jnp.abs(p["q"]))
        return (x.astype(f8) @ (p["q"] * s).astype(f8)[::-1]).astype(jnp.float32) / s

    def plain(p, x):  # the inputs the weight meets are float8 too
        return x.astype(f8).astype(jnp.float32)[..., ::-1] @ p["q"]

    got, want = (eva_rank_2(p, fn, batches, "q")["q"] for fn in (recipe, plain))
    np.testing.assert_array_equal(got.a, want.a)

    def overflowing(p, x):
        return x.astype(f8) @ ((p["q"] * 100).astype(f8) * jnp.asarray(300.0, f8))

    with pytest.raises(ValueError, match=r"'q': its input rows cannot be told apart"):
        eva_rank_2(p, overflowing, batches, "q")


def test_a_weight_gated_by_zero_is_captured_in_its_order_with_a_warning():
    """``tanh(gate) * w`` with a gate that starts at 0 zeroes the probe's row
    numbers too: its inputs are taken as they meet it (what a gate of 1e-3 gives),
    with a warning once that a reordering at that use could not be seen."""
    w = jax.random.normal(jax.random.key(0), (4, 6))
    batches = [
        jax.random.normal(jax.random.key(i), (8, 5, 4))
        * jnp.array([3.0, 1, 0.3, 0.1])[None, None]
        for i in range(3)
    ]

    def gated(p, x):
        return x @ (jnp.tanh(p["gate"]) * p["q"])

    with pytest.warns(UserWarning, match=r"'q' is scaled by zero at a use") as got:
        zero = eva_rank_2({"q": w, "gate": jnp.zeros(())}, gated, batches, "q")
    assert sum("scaled by zero" in str(m.message) for m in got) == 1
    small = eva_rank_2({"q": w, "gate": jnp.asarray(1e-3)}, gated, batches, "q")
    np.testing.assert_array_equal(zero["q"].a, small["q"].a)

    def cut(p, x):
        return x[..., :2] @ (jnp.tanh(p["gate"]) * p["q"])[:2]

    with pytest.raises(ValueError, match=r"'q': scaled by zero at a use where a view"):
        eva_rank_2({"q": w, "gate": jnp.zeros(())}, cut, batches, "q")


def test_eva_names_a_weight_only_used_as_a_dense_array():
    """A weight multiplied by a mask before the matmul is a dense array there, not
    the weight: refused for what it is, not as 'not used by apply_fn'."""
    p = {"q": jnp.ones((4, 6))}
    mask = jnp.tril(jnp.ones((4, 6)))
    batches = [jax.random.normal(jax.random.key(i), (8, 4)) for i in range(2)]
    with pytest.raises(ValueError, match=r"'q': only used as a dense array \(by 'mul'"):
        eva_rank_2(p, lambda p, x: x @ (p["q"] * mask), batches, "q")


def test_eva_through_a_size_1_axis_matches_the_plain_use():
    """``w[:, None, :]`` contracted over its input axis sees the same input rows as
    ``x @ w``: EVA gives the same factors."""
    p = {"q": jax.random.normal(jax.random.key(0), (4, 6))}
    batches = [jax.random.normal(jax.random.key(i), (8, 3, 4)) for i in range(3)]

    def expanded(p, x):
        return jnp.einsum("btd,dnh->btnh", x, p["q"][:, None, :])

    def plain(p, x):
        return x @ p["q"]

    got, want = (eva_rank_2(p, fn, batches, "q")["q"] for fn in (expanded, plain))
    assert float(jnp.abs(want.a).max()) > 0
    np.testing.assert_array_equal(got.a, want.a)
    np.testing.assert_array_equal(got.b, want.b)


def test_eva_through_remat_matches_the_plain_model():
    """Gradient checkpointing (``jax.checkpoint``, Linen's ``nn.remat``) does not
    change what a weight sees: EVA gives the factors of the same model without it
    (its captured inputs used to escape the checkpointed body as tracers)."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(6, name="q")(x))

    class Model(nn.Module):
        remat: bool

        @nn.compact
        def __call__(self, x):
            block = nn.remat(Block) if self.remat else Block
            return block(name="block")(x)

    batches = [jax.random.normal(jax.random.key(i), (8, 3, 4)) for i in range(3)]
    params = Model(False).init(jax.random.key(0), batches[0])
    got, want = (
        eva_rank_2(params, Model(remat).apply, batches, "params/block/q/kernel")
        for remat in (True, False)
    )
    got, want = jaxlora.adapters(got), jaxlora.adapters(want)
    assert float(jnp.abs(want["params/block/q/kernel"].a).max()) > 0
    np.testing.assert_array_equal(
        got["params/block/q/kernel"].a, want["params/block/q/kernel"].a
    )

    def plain(p, x):
        return jax.checkpoint(lambda x, w: jnp.tanh(x @ w))(x, p["q"])

    q = {"q": params["params"]["block"]["q"]["kernel"]}
    got = eva_rank_2(q, plain, batches, "q")["q"]
    np.testing.assert_array_equal(got.a, want["params/block/q/kernel"].a)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        h = h + jnp.tanh(nn.Dense(8, name="up")(h)) @ jnp.eye(8) * 0.5
        return nn.Dense(8, name="down")(jax.nn.gelu(h)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        return stack(name="layers")(x, None)[0]


def _unrolled(p, x):
    """The scanned model's layers one after another, each its own weights."""
    for layer in range(3):
        x = _Block().apply({"params": p[f"layer{layer}"]}, x, None)[0]
    return x


def test_eva_on_scanned_layers_matches_the_unrolled_model():
    """``nn.scan``-stacked kernels: each layer's inputs leave the loop on their own,
    so every layer gets its own PCA and its own rank from the pooled budget, as
    the same layers unrolled do. A stacked weight takes its layers' largest rank;
    a layer given fewer has zero columns of ``a`` (with ``b = 0`` they stay zero)."""
    model = _Scanned()
    scales = jnp.array([10.0] + [0.1] * 7)  # layer 0 sees one direction
    batches = [
        jax.random.normal(jax.random.key(i), (16, 5, 8)) * scales[None, None]
        for i in range(4)
    ]
    variables = model.init(jax.random.key(0), batches[0])
    stacked = variables["params"]["layers"]
    unrolled = {
        f"layer{i}": jax.tree.map(lambda v, i=i: v[i], stacked) for i in range(3)
    }
    kw = dict(scheme="eva", rank=2, alpha=2, batches=batches)
    got = jaxlora.adapters(
        jaxlora.init(variables, jax.random.key(1), apply_fn=model.apply, **kw)
    )
    want = jaxlora.adapters(
        jaxlora.init(unrolled, jax.random.key(1), apply_fn=_unrolled, **kw)
    )
    ranks = {p: w.rank for p, w in want.items()}
    assert sum(ranks.values()) == 2 * 6 and len(set(ranks.values())) > 1, ranks
    for name in ("up", "down"):
        node = got[f"params/layers/{name}/kernel"]
        assert node.a.shape[0] == 3 and node.spec.layout.stack_axes == (0,)
        layer_ranks = [ranks.get(f"layer{i}/{name}/kernel", 0) for i in range(3)]
        assert node.rank == max(layer_ranks)
        assert float(jnp.abs(node.b).max()) == 0.0
        for i, r in enumerate(layer_ranks):
            a = node.a[i]
            assert float(jnp.abs(a[:, r:]).max(initial=0.0)) == 0.0
            if r:
                w = want[f"layer{i}/{name}/kernel"]
                # same components up to sign; the scale is alpha / r at every rank
                np.testing.assert_allclose(
                    jnp.abs(a[:, :r]), jnp.abs(w.a), rtol=1e-4, atol=1e-5
                )
                assert node.scale == pytest.approx(w.scale)
    p = jaxlora.init(variables, jax.random.key(1), apply_fn=model.apply, **kw)
    np.testing.assert_array_equal(
        jaxlora.lora_apply(model.apply)(p, batches[0]),
        model.apply(variables, batches[0]),
    )


def test_eva_on_a_weight_shared_by_every_step_of_a_scan():
    """A weight used at every step of a scan (not stacked: a recurrent weight) sees
    all the steps' rows: EVA gives the factors of the same rows in one matmul."""
    p = {"q": jax.random.normal(jax.random.key(0), (4, 6))}
    batches = [jax.random.normal(jax.random.key(i), (3, 8, 4)) for i in range(3)]

    def recurrent(p, x):  # x: (time, batch, features)
        step = lambda h, xt: (jnp.tanh(h + xt @ p["q"]), None)  # noqa: E731
        return jax.lax.scan(step, jnp.zeros((8, 6)), x)[0]

    def plain(p, x):
        return x @ p["q"]

    got, want = (eva_rank_2(p, fn, batches, "q")["q"] for fn in (recurrent, plain))
    assert float(jnp.abs(want.a).max()) > 0
    np.testing.assert_allclose(got.a, want.a, rtol=1e-5, atol=1e-6)


_D = 6
_STACK = (
    jax.random.normal(jax.random.key(1), (3, _D, _D))
    * jnp.array([0.3, 1.0, 3.0])[:, None, None]
)


_TEN = (
    jax.random.normal(jax.random.key(2), (10, _D, _D))
    * jnp.linspace(0.3, 3, 10)[:, None, None]
)  # ten layers: two base-8 digits tag each


def _layer(h, w):
    return jnp.tanh(h @ w)


def _flipped(p, x):
    return jax.lax.scan(lambda h, w: (_layer(h, w), None), x, jnp.flip(p["w"], 0))[0]


def _flipped_unrolled(p, x):
    for i in reversed(range(len(p))):
        x = _layer(x, p[f"w{i}"])
    return x


def _flipped_bf16(p, x):  # the layers run in bfloat16, their weights scaled
    step = lambda h, w: (_layer(h, w.astype(jnp.bfloat16) * 0.1), None)  # noqa: E731
    return jax.lax.scan(step, x.astype(jnp.bfloat16), jnp.flip(p["w"], 0))[0]


def _flipped_bf16_unrolled(p, x):
    x = x.astype(jnp.bfloat16)
    for i in reversed(range(len(p))):
        x = _layer(x, p[f"w{i}"].astype(jnp.bfloat16) * 0.1)
    return x


def _first_in_body(p, x):
    step = lambda h, w: (_layer(_layer(h, w), p["w"][0]), None)  # noqa: E731
    return jax.lax.scan(step, x, p["w"])[0]


def _first_in_body_unrolled(p, x):
    for i in range(3):
        x = _layer(_layer(x, p[f"w{i}"]), p["w0"])
    return x


def _layers_per_time_step(p, xs):  # xs: (time, batch, d)
    layers = lambda x: jax.lax.scan(  # noqa: E731
        lambda h, w: (_layer(h, w), None), x, p["w"]
    )[0]
    return jax.lax.scan(lambda c, x: (c, layers(x)), 0.0, xs)[1]


def _layers_per_time_step_unrolled(p, xs):
    for i in range(3):
        xs = _layer(xs, p[f"w{i}"])
    return xs


def _fori(p, x):  # a loop over layers that picks w[i]
    return jax.lax.fori_loop(0, 3, lambda i, h: _layer(h, p["w"][i]), x)


def _fori_take(p, x):  # the same loop picking with a gather (jnp.take)
    pick = lambda i, h: _layer(h, jnp.take(p["w"], i, axis=0))  # noqa: E731
    return jax.lax.fori_loop(0, 3, pick, x)


def _in_order_unrolled(p, x):
    for i in range(len(p)):
        x = _layer(x, p[f"w{i}"])
    return x


def _nested(p, x):  # p["w"]: (2, 3, d, d), blocks of layers
    inner = lambda h, ws: (  # noqa: E731
        jax.lax.scan(lambda h, w: (_layer(h, w), None), h, ws)[0],
        None,
    )
    return jax.lax.scan(inner, x, p["w"])[0]


@pytest.mark.parametrize(
    "fn,unrolled,stack,batch",
    [
        (_flipped, _flipped_unrolled, _STACK, (32, _D)),
        (_flipped_bf16, _flipped_bf16_unrolled, _TEN, (32, _D)),
        (_first_in_body, _first_in_body_unrolled, _STACK, (32, _D)),
        (_layers_per_time_step, _layers_per_time_step_unrolled, _STACK, (4, 8, _D)),
        (_fori, _in_order_unrolled, _STACK, (32, _D)),
        (_fori_take, _in_order_unrolled, _STACK, (32, _D)),
        (
            _nested,
            _in_order_unrolled,
            jnp.concatenate([_STACK, -_STACK]).reshape(2, 3, _D, _D),
            (32, _D),
        ),
    ],
    ids=[
        "flipped",
        "flipped-10-bf16",
        "first-in-body",
        "in-a-time-loop",
        "fori-w[i]",
        "fori-take",
        "nested-stacks",
    ],
)
def test_eva_rows_go_to_the_layer_they_met(fn, unrolled, stack, batch):
    """Rows are told apart by the layer they met, not by the scan step: a flipped
    stack, a fixed layer used inside the body, the layer loop inside a loop over
    time, a ``fori_loop`` picking ``w[i]`` (or ``jnp.take``) and stacks of stacks
    all give the unrolled model's ranks and factors (ten layers scaled in
    bfloat16: two tag digits that survive the cast and the rounding of the
    product)."""
    batches = [jax.random.normal(jax.random.key(i), batch) for i in range(3)]
    layers = stack.reshape(-1, _D, _D)
    got = eva_rank_2({"w": stack}, fn, batches, "w")["w"]
    names = [f"w{i}" for i in range(len(layers))]
    want = jaxlora.adapters(
        jaxlora.init(
            dict(zip(names, layers, strict=True)),
            jax.random.key(0),
            scheme="eva",
            rank=2,
            targets=names,
            apply_fn=unrolled,
            batches=batches,
        )
    )
    a = got.a.reshape(len(layers), _D, got.rank)
    ranks = [want[n].rank if n in want else 0 for n in names]
    assert got.rank == max(ranks) and sum(ranks) == 2 * len(layers)
    for i, (name, r) in enumerate(zip(names, ranks, strict=True)):
        assert float(jnp.abs(a[i, :, r:]).max(initial=0.0)) == 0.0
        if r:
            np.testing.assert_allclose(
                jnp.abs(a[i, :, :r]), jnp.abs(want[name].a), rtol=1e-4, atol=1e-5
            )


def test_eva_refuses_a_stack_scanned_in_part():
    """A scan over part of a stack leaves layers with no input: named."""
    batches = [jax.random.normal(jax.random.key(i), (32, _D)) for i in range(2)]

    def first_two(p, x):
        return jax.lax.scan(lambda h, w: (_layer(h, w), None), x, p["w"][:2])[0]

    with pytest.raises(ValueError, match=r"'w': layers 2 of its 3 meet no input"):
        eva_rank_2({"w": _STACK}, first_two, batches, "w")


@jax.custom_vjp
def _scaled_grad_matmul(x, w):
    return x @ w


_scaled_grad_matmul.defvjp(
    lambda x, w: (x @ w, (x, w)),
    lambda res, g: (g @ res[1].T, 0.1 * (res[0].T @ g)),
)


@pytest.mark.parametrize("scheme", ["eva", "corda"])
def test_a_target_inside_a_custom_vjp_function_is_captured(scheme):
    """The capture reads forward values, which a custom rule does not change: a
    weight used through a custom_vjp matmul gets what the plain matmul gives (in
    training its rule is kept, and the weight materialized for it)."""
    params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    batches = [jax.random.normal(jax.random.key(i), (12, 16)) for i in range(3)]
    kw = dict(scheme=scheme, rank=2, batches=batches, targets=["w"])
    got = jaxlora.init(
        params,
        jax.random.key(1),
        apply_fn=lambda p, x: _scaled_grad_matmul(x, p["w"]),
        **kw,
    )["w"]
    want = jaxlora.init(
        params, jax.random.key(1), apply_fn=lambda p, x: x @ p["w"], **kw
    )["w"]
    np.testing.assert_allclose(got.a, want.a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.b, want.b, rtol=1e-5, atol=1e-6)
