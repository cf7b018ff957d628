"""`lora_apply` on every layer kind, and the gradient claims the source articles make.

The model (conftest.Mixed) holds nn.Embed (lookup and tied `attend`), Flax's own
nn.MultiHeadDotProductAttention (DenseGeneral q/k/v and the two-axis out projection),
nn.Dense, nn.Einsum and nn.Conv; every kernel and the embedding table is adapted.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYOUTS
from conftest import all_weights

import jaxlora

ZERO_B = [
    "normal",
    "he",
    "xavier",
    "normalized",
    "kaiming_uniform",
    "gaussian",
    "he_uniform",
]
ZERO_A = ["init_b"]


def adapt(variables, scheme, **kw):
    kw.setdefault("rank", 4)
    return jaxlora.init(
        variables,
        jax.random.key(1),
        scheme=scheme,
        targets=all_weights,
        layouts=LAYOUTS,
        **kw,
    )


def loss_fn(model):
    apply = jaxlora.lora_apply(model.apply)

    def loss(params, tokens, image):
        logits = apply(params, tokens, image)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

    return loss


def lora_grads(model, params, tokens, image):
    grads = jax.grad(loss_fn(model))(params, tokens, image)
    return jaxlora.adapters(grads)


@pytest.mark.parametrize("scheme", ZERO_B + ZERO_A)
def test_output_at_init_is_bitwise_the_base_models(mixed, scheme):
    model, variables, tokens, image = mixed
    params = adapt(variables, scheme)
    assert len(jaxlora.adapters(params)) == 8  # 7 kernels + the embedding table
    want = jax.jit(model.apply)(variables, tokens, image)
    got = jax.jit(jaxlora.lora_apply(model.apply))(params, tokens, image)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("scheme", ZERO_B)
def test_b_zero_gives_zero_grad_for_a_only(mixed, scheme):
    model, variables, tokens, image = mixed
    grads = lora_grads(model, adapt(variables, scheme), tokens, image)
    for path, g in grads.items():
        assert not np.asarray(g.a).any(), f"{path}: ∂L/∂a must be exactly 0 when b = 0"
        assert np.abs(np.asarray(g.b)).max() > 0, f"{path}: ∂L/∂b must be non-zero"


def test_init_b_gives_zero_grad_for_b_only(mixed):
    model, variables, tokens, image = mixed
    for path, g in lora_grads(model, adapt(variables, "init_b"), tokens, image).items():
        assert not np.asarray(g.b).any(), f"{path}: ∂L/∂b must be exactly 0 when a = 0"
        assert np.abs(np.asarray(g.a)).max() > 0, f"{path}: ∂L/∂a must be non-zero"


def test_both_zero_is_a_saddle(mixed):
    model, variables, tokens, image = mixed
    with pytest.warns(UserWarning, match="starts at a saddle"):
        zeros = jaxlora.Scheme(
            jax.nn.initializers.zeros, jax.nn.initializers.zeros, "zero"
        )
    for g in lora_grads(model, adapt(variables, zeros), tokens, image).values():
        assert not np.asarray(g.a).any() and not np.asarray(g.b).any()


def test_both_random_changes_output_unless_compensated(mixed):
    model, variables, tokens, image = mixed
    want = model.apply(variables, tokens, image)
    apply = jaxlora.lora_apply(model.apply)
    moved = apply(adapt(variables, "both_random"), tokens, image)
    assert np.abs(np.asarray(moved - want)).max() > 1e-3
    comp = adapt(variables, "both_random", compensate=True)
    np.testing.assert_allclose(apply(comp, tokens, image), want, atol=2e-5, rtol=1e-5)
    assert all(n.spec.residual for n in jaxlora.adapters(comp).values())
    with pytest.raises(
        ValueError, match=r"hold a residual base .*both_random.*allow_residual"
    ):
        jaxlora.base(comp)


def test_orthogonal_both_grads_nonzero_and_product_zero(mixed):
    model, variables, tokens, image = mixed
    params = adapt(variables, "orthogonal")
    for path, node in jaxlora.adapters(params).items():
        assert float(jnp.abs(node.delta()).max()) < 1e-6, path
    for path, g in lora_grads(model, params, tokens, image).items():
        assert (
            np.abs(np.asarray(g.a)).max() > 0 and np.abs(np.asarray(g.b)).max() > 0
        ), path


def test_base_weights_get_exactly_zero_gradient(mixed):
    model, variables, tokens, image = mixed
    grads = jax.grad(loss_fn(model))(adapt(variables, "both_random"), tokens, image)
    for node in jax.tree.leaves(grads, is_leaf=jaxlora.is_lora):
        if jaxlora.is_lora(node):
            assert not np.asarray(node.w).any()


def random_factors(params, key=2):
    """Both factors non-zero, so the LoRA path matters."""

    def fill(path, node):
        k = jax.random.fold_in(jax.random.key(key), hash(path) % 1000)
        ka, kb = jax.random.split(k)
        return node.replace(
            a=0.3 * jax.random.normal(ka, node.a.shape),
            b=0.3 * jax.random.normal(kb, node.b.shape),
        )

    ads = {p: fill(p, n) for p, n in jaxlora.adapters(params).items()}
    return jaxlora.combine(jaxlora.base(params), ads)


def test_lora_apply_equals_merge_under_jit_grad_vmap(mixed):
    model, variables, tokens, image = mixed
    params = random_factors(adapt(variables, "he"))
    merged = jaxlora.merge(params)
    apply = jaxlora.lora_apply(model.apply)
    want = model.apply(merged, tokens, image)
    np.testing.assert_allclose(
        jax.jit(apply)(params, tokens, image), want, rtol=1e-5, atol=1e-5
    )
    per_example = jax.vmap(lambda t, i: apply(params, t[None], i[None])[0])(
        tokens, image
    )
    np.testing.assert_allclose(per_example, want, rtol=1e-5, atol=1e-5)
    # gradients wrt the factors agree with the chain rule through the merged weight
    g = jaxlora.adapters(jax.grad(loss_fn(model))(params, tokens, image))

    def merged_loss(ads):
        logits = model.apply(
            jaxlora.merge(jaxlora.combine(jaxlora.base(params), ads)), tokens, image
        )
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

    g_ref = jax.grad(merged_loss)(jaxlora.adapters(params))
    chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_forward_mode_jvp_and_jacfwd(mixed):
    """Forward-mode derivatives (``jax.jvp`` under ``jit``, ``jax.jacfwd``) through
    `lora_apply`, in the factors' and the input's direction, agree with the same
    derivatives of ``model.apply`` on the merged weights (a call they perturb runs
    the factored contractions in plain ops: a custom VJP has no forward mode)."""
    model, variables, tokens, image = mixed
    params = random_factors(adapt(variables, "he"))
    apply = jaxlora.lora_apply(model.apply)
    ads = jaxlora.adapters(params)
    base = jaxlora.base(params)
    direction = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), ads
    )

    def factored(ads, image):
        return apply(jaxlora.combine(base, ads), tokens, image)

    def materialized(ads, image):
        return model.apply(jaxlora.merge(jaxlora.combine(base, ads)), tokens, image)

    tangents = (direction, jnp.cos(image))
    out, tan = jax.jit(lambda p, t: jax.jvp(factored, p, t))((ads, image), tangents)
    out_ref, tan_ref = jax.jvp(materialized, (ads, image), tangents)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(tan_ref).max()) > 0
    np.testing.assert_allclose(tan, tan_ref, rtol=1e-4, atol=1e-5)
    jac = jax.jacfwd(lambda i: factored(ads, i))(image[:1])
    jac_ref = jax.jacfwd(lambda i: materialized(ads, i))(image[:1])
    assert float(jnp.abs(jac_ref).max()) > 0
    np.testing.assert_allclose(jac, jac_ref, rtol=1e-4, atol=1e-5)
    # outside forward mode the contractions are the custom-VJP ones again (what
    # reverse mode costs is measured in test_flops_ratio)
    assert "custom_vjp_call" in str(jax.make_jaxpr(factored)(ads, image))


def test_nnx_model_through_split_merge():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(30, 16, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(4, 16, 16, decode=False, rngs=rngs)
            self.conv = nnx.Conv(16, 16, (3,), rngs=rngs)
            self.head = nnx.Linear(16, 5, rngs=rngs)

        def __call__(self, ids):
            h = self.embed(ids)
            h = self.attn(h)
            return self.head(self.conv(h))

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.arange(12).reshape(2, 6)

    def apply(state, ids):
        return nnx.merge(graphdef, state)(ids)

    params = jaxlora.init(
        state, jax.random.key(3), scheme="he", rank=2, targets=all_weights
    )
    assert len(jaxlora.adapters(params)) == 7
    np.testing.assert_array_equal(
        jaxlora.lora_apply(apply)(params, ids), apply(state, ids)
    )
    params = random_factors(params)
    np.testing.assert_allclose(
        jax.jit(jaxlora.lora_apply(apply))(params, ids),
        apply(jaxlora.merge(params), ids),
        rtol=1e-5,
        atol=1e-6,
    )


def test_plain_jax_function():
    def mlp(p, x):
        return jnp.tanh(x @ p["w1"]["kernel"]) @ p["w2"]["kernel"]

    p = {"w1": {"kernel": jnp.ones((6, 10)) / 6}, "w2": {"kernel": jnp.ones((10, 3))}}
    x = jnp.arange(12.0).reshape(2, 6)
    params = random_factors(jaxlora.init(p, jax.random.key(0), rank=2))
    got = jaxlora.lora_apply(mlp)(params, x)
    np.testing.assert_allclose(got, mlp(jaxlora.merge(params), x), rtol=1e-6)
