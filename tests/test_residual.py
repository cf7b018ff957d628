"""Weight- and data-aware schemes through `jaxlora.init`: residual bases done right."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LAYOUTS

import jaxlora

RESIDUAL = ["pissa", "pissa_niter_4", "olora", "milora"]


def init(variables, scheme, **kw):
    kw.setdefault("rank", 2)
    return jaxlora.init(
        variables, jax.random.key(5), scheme=scheme, alpha=4, layouts=LAYOUTS, **kw
    )


@pytest.mark.parametrize("scheme", RESIDUAL)
def test_output_at_init_is_preserved_fp32(mixed, scheme):
    model, variables, tokens, image = mixed
    params = init(variables, scheme)
    nodes = jaxlora.adapters(params)
    assert len(nodes) == 7 and all(n.spec.residual for n in nodes.values())
    assert all(float(jnp.abs(n.a).max()) > 0 for n in nodes.values())
    want = model.apply(variables, tokens, image)
    got = jaxlora.lora_apply(model.apply)(params, tokens, image)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


class Bf16(nn.Module):
    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        h = nn.gelu(nn.Dense(96, name="up", **kw)(x))
        return nn.Dense(48, name="down", **kw)(h)


@pytest.mark.parametrize("scheme", RESIDUAL)
def test_output_at_init_is_preserved_bf16(scheme):
    model = Bf16()
    x = jax.random.normal(jax.random.key(0), (16, 48), jnp.bfloat16)
    variables = model.init(jax.random.key(1), x)
    params = jaxlora.init(variables, jax.random.key(2), scheme=scheme, rank=8)
    node = params["params"]["up"]["kernel"]
    assert node.w.dtype == jnp.bfloat16 and node.a.dtype == jnp.float32
    # the merged weight is the original up to the bf16 roundings of the residual and
    # of the sum (half an ulp each: 2^-8 relative, bf16 keeps 7 mantissa bits)
    merged = jaxlora.merge(params)["params"]["up"]["kernel"].astype(jnp.float32)
    w = variables["params"]["up"]["kernel"].astype(jnp.float32)
    w_res = node.w.astype(jnp.float32)
    assert bool(jnp.all(jnp.abs(merged - w) <= 2**-8 * (jnp.abs(w) + jnp.abs(w_res))))
    want = model.apply(variables, x).astype(jnp.float32)
    got = jaxlora.lora_apply(model.apply)(params, x).astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("scheme", RESIDUAL)
def test_low_precision_factors_on_a_float32_model_merge_back_exactly(scheme):
    w = jax.random.normal(jax.random.key(0), (24, 16))
    for dtype in (jnp.bfloat16, jnp.float16):
        params = jaxlora.init(
            {"d": {"kernel": w}}, jax.random.key(1), scheme=scheme, rank=4, dtype=dtype
        )
        node = params["d"]["kernel"]
        assert node.a.dtype == dtype and node.w.dtype == jnp.float32
        # the residual was formed from the stored factors in float32, so the merge
        # (formed in float32 too) gives W back to float32 rounding
        merged = jaxlora.merge(params)["d"]["kernel"]
        chex.assert_trees_all_close(merged, w, atol=1e-5, rtol=1e-5)


def test_pissa_is_the_best_rank_r_approximation():
    k = jax.random.normal(jax.random.key(0), (40, 30))
    node = jaxlora.init(
        {"kernel": k}, jax.random.key(1), scheme="pissa", rank=5, alpha=10
    )["kernel"]
    s = np.linalg.svd(np.asarray(k), compute_uv=False)
    approx = np.asarray(node.delta())
    np.testing.assert_allclose(
        np.sum((np.asarray(k) - approx) ** 2), np.sum(s[5:] ** 2), rtol=1e-4
    )
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(node.w), compute_uv=False)[:25],
        s[5:],
        rtol=1e-4,
        atol=1e-5,
    )


def test_fast_pissa_names_niter_and_is_reproducible():
    tree = {"kernel": jax.random.normal(jax.random.key(0), (64, 48))}
    by_name = jaxlora.init(tree, jax.random.key(1), scheme="pissa_niter_2", rank=4)
    by_kw = jaxlora.init(tree, jax.random.key(1), scheme="pissa", niter=2, rank=4)
    chex.assert_trees_all_equal(by_name, by_kw)
    assert by_name["kernel"].spec.scheme == "pissa_niter_2"
    other = jaxlora.init(tree, jax.random.key(2), scheme="pissa_niter_2", rank=4)
    assert not np.array_equal(other["kernel"].a, by_name["kernel"].a)


def test_stacked_kernels_are_factored_per_layer():
    k = jax.random.normal(jax.random.key(0), (3, 24, 16))
    layout = jaxlora.Layout.dense(3, n_stack=1)
    node = jaxlora.init(
        {"kernel": k},
        jax.random.key(1),
        scheme="pissa",
        rank=2,
        layouts={"kernel": layout},
    )["kernel"]
    assert node.a.shape == (3, 24, 2) and node.b.shape == (3, 2, 16)
    for i in range(3):
        single = jaxlora.init(
            {"kernel": k[i]}, jax.random.key(1), scheme="pissa", rank=2
        )["kernel"]
        np.testing.assert_allclose(
            np.asarray(node.delta())[i], single.delta(), atol=1e-5
        )


def test_to_plain_lora_reproduces_the_trained_model(mixed):
    model, variables, tokens, image = mixed
    apply = jaxlora.lora_apply(model.apply)
    params = init(variables, "pissa")
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    state = tx.init(params)
    loss = lambda p: jnp.mean(apply(p, tokens, image) ** 2)  # noqa: E731
    for _ in range(5):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    plain = jaxlora.to_plain_lora(params, variables)
    for path, node in jaxlora.adapters(plain).items():
        assert not node.spec.residual and node.rank == 4, path
    jax.tree.map(np.testing.assert_array_equal, jaxlora.base(plain), variables)
    np.testing.assert_allclose(
        apply(plain, tokens, image), apply(params, tokens, image), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(
        ValueError, match=r"'params/mlp/kernel': original weight missing"
    ):
        jaxlora.to_plain_lora(params, {"params": {}})


def test_to_plain_lora_needs_originals_of_the_same_dtype():
    w = jax.random.normal(jax.random.key(0), (12, 8))
    params = jaxlora.init(
        {"d": {"kernel": w}}, jax.random.key(1), scheme="pissa", rank=2
    )
    with pytest.raises(ValueError) as e:
        jaxlora.to_plain_lora(params, {"d": {"kernel": w.astype(jnp.bfloat16)}})
    msg = str(e.value)
    assert (
        "'d/kernel': original weight of shape (12, 8) and dtype bfloat16, residual "
        "base of shape (12, 8) and dtype float32" in msg
    )
    assert "Pass the plain tree you gave jaxlora.init" in msg


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_to_plain_lora_refuses_other_weights_of_the_same_shape(dtype):
    """Another checkpoint of the same model (same shapes and dtypes) used to give a
    silently wrong adapter: W − W_res is then not of the adapter's rank."""
    w = jax.random.normal(jax.random.key(0), (3, 32, 16)).astype(dtype)
    layouts = {"d/kernel": jaxlora.Layout((1,), (2,), (0,))}
    params = jaxlora.init(
        {"d": {"kernel": w}}, jax.random.key(1), scheme="pissa", rank=2, layouts=layouts
    )
    plain = jaxlora.to_plain_lora(params, {"d": {"kernel": w}})  # the right one
    assert not plain["d"]["kernel"].spec.residual
    other = w + (0.03 * jax.random.normal(jax.random.key(2), w.shape)).astype(dtype)
    with pytest.raises(ValueError) as e:
        jaxlora.to_plain_lora(params, {"d": {"kernel": other}})
    assert "'d/kernel': the original weight minus the residual base is not of the " in (
        str(e.value)
    )
    assert "Pass the plain tree you gave jaxlora.init" in str(e.value)


def test_residual_base_is_explicit(mixed):
    _, variables, _, _ = mixed
    params = init(variables, "olora")
    with pytest.raises(ValueError, match=r"hold a residual base \(scheme 'olora'\)"):
        jaxlora.base(params)
    res = jaxlora.base(params, allow_residual=True)
    assert not np.array_equal(
        res["params"]["mlp"]["kernel"], variables["params"]["mlp"]["kernel"]
    )


def test_lora_ga_through_init_preserves_output_and_uses_the_gradient():
    model = nn.Dense(24)
    x = jax.random.normal(jax.random.key(0), (64, 32))
    y = jax.random.normal(jax.random.key(1), (64, 24))
    variables = model.init(jax.random.key(2), x)
    loss_fn = lambda p, batch: jnp.mean((model.apply(p, batch[0]) - batch[1]) ** 2)  # noqa: E731
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    params = jaxlora.init(
        variables,
        jax.random.key(3),
        scheme="lora_ga",
        rank=4,
        loss_fn=loss_fn,
        batches=batches,
    )
    apply = jaxlora.lora_apply(model.apply)
    np.testing.assert_allclose(apply(params, x), model.apply(variables, x), atol=1e-5)
    # a spans G's top right-singular directions (A = Vᵀ[:r] in PEFT orientation)
    g = jax.grad(lambda p: (loss_fn(p, batches[0]) + loss_fn(p, batches[1])) / 2)(
        variables
    )
    u, _, _ = np.linalg.svd(np.asarray(g["params"]["kernel"]))  # (in, out) = Gᵀ
    a = np.asarray(params["params"]["kernel"].a)
    q, _ = np.linalg.qr(a)
    np.testing.assert_allclose(np.linalg.norm(u[:, :4].T @ q, axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize(
    "niter,label", [(None, "lora_ga"), (4, "lora_ga"), (1, "lora_ga_niter_1")]
)
def test_lora_ga_records_a_non_default_niter(niter, label):
    """The stored scheme says how the residual was made: LoRA-GA with other than
    its default 4 power iterations is ``lora_ga_niter_K``, a name ``init`` takes
    back (the same factors)."""
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(0), (16, 8))
    variables = model.init(jax.random.key(2), x)
    loss_fn = lambda p, b: jnp.mean(model.apply(p, b) ** 2)  # noqa: E731
    kw = dict(rank=2, loss_fn=loss_fn, batches=[x])
    got = jaxlora.init(
        variables, jax.random.key(3), scheme="lora_ga", niter=niter, **kw
    )
    assert got["params"]["kernel"].spec.scheme == label
    again = jaxlora.init(variables, jax.random.key(3), scheme=label, **kw)
    chex.assert_trees_all_equal(got, again)


def test_data_aware_and_option_errors():
    tree = {"kernel": jnp.ones((8, 8))}
    with pytest.raises(
        ValueError, match=r"'lora_ga' initializes from the gradient.*loss_fn="
    ):
        jaxlora.init(tree, jax.random.key(0), scheme="lora_ga", rank=2)
    with pytest.raises(ValueError, match=r"loss_fn is only used by scheme 'lora_ga'"):
        jaxlora.init(tree, jax.random.key(0), scheme="pissa", rank=2, loss_fn=len)
    with pytest.raises(ValueError, match=r"batches are only used by the data-aware"):
        jaxlora.init(tree, jax.random.key(0), scheme="he", rank=2, batches=[1])
    with pytest.raises(
        ValueError, match=r"niter is only used by 'pissa' and 'lora_ga'"
    ):
        jaxlora.init(tree, jax.random.key(0), scheme="he", rank=2, niter=2)
    with pytest.raises(ValueError, match=r"compensate=True has no effect with 'pissa'"):
        jaxlora.init(tree, jax.random.key(0), scheme="pissa", rank=2, compensate=True)
    for scheme, why in (
        ("he", "b starts at 0"),
        ("init_b", "a starts at 0"),
        ("orthogonal", r"a @ b = 0 by construction"),
    ):
        with pytest.raises(ValueError, match=f"no effect with '{scheme}': {why}"):
            jaxlora.init(
                tree, jax.random.key(0), scheme=scheme, rank=2, compensate=True
            )
    with pytest.raises(
        ValueError, match=r"grad_memory is only used by scheme 'lora_ga'"
    ):
        jaxlora.init(tree, jax.random.key(0), scheme="pissa", rank=2, grad_memory=8)
    for bad in (-5, 0, 0.5, float("inf"), True, "1GB"):
        with pytest.raises(ValueError, match=r"grad_memory is a number of bytes"):
            jaxlora.init(
                tree,
                jax.random.key(0),
                scheme="lora_ga",
                rank=2,
                loss_fn=lambda p, b: jnp.sum(p["kernel"]),
                batches=[None],
                grad_memory=bad,
            )
    with pytest.raises(ValueError, match=r"embedding='peft' sets how embedding tables"):
        jaxlora.init(tree, jax.random.key(0), rank=2, embedding="peft")
    with pytest.raises(TypeError, match=r"a_init must be an initializer.*got 0.02"):
        jaxlora.Scheme(a_init=0.02, b_init=jax.nn.initializers.zeros)
    with pytest.raises(ValueError, match=r"'kernel': rank 9 is outside \[1, min"):
        jaxlora.init(tree, jax.random.key(0), scheme="pissa", rank=9)
    q = {"kernel": jnp.ones((8, 8), jnp.int8)}
    with pytest.raises(ValueError, match=r"'kernel': expected a floating kernel.*int8"):
        jaxlora.init(q, jax.random.key(0), scheme="pissa", rank=2, targets="kernel")


def test_niter_is_never_silently_ignored():
    tree = {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}
    for scheme in ("olora", "milora"):
        with pytest.raises(
            ValueError,
            match=rf"niter is only used by 'pissa' and 'lora_ga', not '{scheme}'; "
            "remove it",
        ):
            jaxlora.init(tree, jax.random.key(0), scheme=scheme, rank=2, niter=3)
    with pytest.raises(
        ValueError,
        match=r"scheme 'pissa_niter_4' already sets niter=4, but niter=2 was passed",
    ):
        jaxlora.init(tree, jax.random.key(0), scheme="pissa_niter_4", rank=2, niter=2)
    with pytest.raises(ValueError, match=r"niter must be an integer >= 0, got True"):
        jaxlora.init(tree, jax.random.key(0), scheme="pissa", rank=2, niter=True)
    same = jaxlora.init(
        tree, jax.random.key(0), scheme="pissa_niter_4", niter=4, rank=2
    )
    assert same["kernel"].spec.scheme == "pissa_niter_4"


def test_lora_ga_in_gradient_groups_gives_the_same_factors():
    model = nn.Sequential([nn.Dense(24), nn.tanh, nn.Dense(16)])
    x = jax.random.normal(jax.random.key(0), (32, 20))
    variables = model.init(jax.random.key(1), x)
    loss_fn = lambda p, b: jnp.mean(model.apply(p, b) ** 2)  # noqa: E731
    kw = dict(scheme="lora_ga", rank=2, loss_fn=loss_fn, batches=iter([x[:16], x[16:]]))
    one_pass = jaxlora.init(variables, jax.random.key(2), **kw)
    kw["batches"] = iter([x[:16], x[16:]])  # an iterator is read once per group
    per_target = jaxlora.init(variables, jax.random.key(2), grad_memory=1, **kw)
    chex.assert_trees_all_close(one_pass, per_target, atol=1e-6)


def test_lora_ga_passes_the_other_weights_as_arguments():
    """The weights LoRA-GA does not adapt reach the jitted gradient function as
    arguments: closed over, XLA folded them in as constants (a tied 49152×576
    embedding made one init take 8.9 s instead of 1.2 s)."""
    model = nn.Sequential([nn.Dense(24), nn.tanh, nn.Dense(16)])
    x = jax.random.normal(jax.random.key(0), (32, 20))
    variables = model.init(jax.random.key(1), x)
    seen = []

    def loss_fn(p, b):
        seen.append(isinstance(p["params"]["layers_2"]["kernel"], jax.core.Tracer))
        return jnp.mean(model.apply(p, b) ** 2)

    jaxlora.init(
        variables,
        jax.random.key(2),
        scheme="lora_ga",
        rank=2,
        targets=".*layers_0/kernel",
        loss_fn=loss_fn,
        batches=[x],
    )
    assert seen == [True]


def test_weight_aware_errors_name_the_parameter_path():
    """Errors raised while a weight-aware scheme decomposes a target used to name
    the scheme ('lora_ga') where the user needs the target that failed (`init`
    checks the rank limits first; this is the decomposition's own guard)."""
    from jaxlora import _residual
    from jaxlora import _schemes

    w, grad = jnp.ones((4, 3)), jnp.ones((4, 3))
    spec = jaxlora.LoraSpec(jaxlora.Layout.dense(2), rank=2, alpha=2.0)
    scheme = _schemes.resolve("lora_ga")
    with pytest.raises(
        ValueError, match=r"Cannot initialize LoRA-GA for 'head/kernel'"
    ):
        _residual.adapt(
            scheme, jax.random.key(0), w, spec, jnp.float32, grad, path="head/kernel"
        )


def test_niter_zero_is_honoured_and_labelled():
    """``niter=0`` (a sketch without power iterations) used to run LoRA-GA with 4
    iterations, and PiSSA with it was labelled exact "pissa" in checkpoints."""
    w = {"d": {"kernel": jax.random.normal(jax.random.key(0), (16, 12))}}
    pissa0 = jaxlora.init(w, jax.random.key(1), scheme="pissa", niter=0, rank=2)
    assert pissa0["d"]["kernel"].spec.scheme == "pissa_niter_0"
    x = jax.random.normal(jax.random.key(2), (64, 16))  # a full-rank gradient

    def loss(p, batch):
        return jnp.mean((batch @ p["d"]["kernel"]) ** 2)

    ga = {
        n: jaxlora.init(
            w,
            jax.random.key(1),
            scheme="lora_ga",
            niter=n,
            rank=2,
            loss_fn=loss,
            batches=[x],
        )["d"]["kernel"].a
        for n in (0, 4)
    }
    assert float(jnp.abs(ga[0] - ga[4]).max()) > 1e-3


def test_lora_ga_rank_limit_is_checked_for_every_target_before_the_data():
    params = {"a": {"kernel": jnp.ones((6, 3))}, "b": {"kernel": jnp.ones((3, 6))}}

    def loss(p, batch):
        raise AssertionError("the data must not be read before the ranks are checked")

    with pytest.raises(ValueError) as e:
        jaxlora.init(
            params,
            jax.random.key(0),
            scheme="lora_ga",
            rank=2,
            loss_fn=loss,
            batches=[0],
        )
    for path in ("'a/kernel'", "'b/kernel'"):
        assert f"{path}: LoRA-GA uses the top 2·rank = 4 singular vectors" in str(
            e.value
        )
