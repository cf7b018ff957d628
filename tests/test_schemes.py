"""Each scheme's factors follow its source's formula; randomness comes only from rng."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora

N, R = 1024, 64  # a 1024×1024 kernel at rank 64: 65,536 samples per factor


def factors(scheme, n_in=N, n_out=N, rank=R, key=0):
    p = jaxlora.init(
        {"kernel": jnp.zeros((n_in, n_out))},
        jax.random.key(key),
        scheme=scheme,
        rank=rank,
    )["kernel"]
    return np.asarray(p.a), np.asarray(p.b)


# scheme -> (std of a, std of b); None = exactly zero. From REFERENCE.md §2.
NORMAL_STDS = {
    "normal": (0.02, None),
    "he": (1 / math.sqrt(N), None),
    "kaiming_normal": (1 / math.sqrt(N), None),
    "xavier": (math.sqrt(2 / (N + R)), None),
    "normalized": (1 / math.sqrt(R), None),
    "gaussian": (1 / R, None),
    "init_b": (None, 1 / math.sqrt(R)),
    "reversed": (None, 1 / math.sqrt(R)),
}


def check_normal(x, std):
    # the sample std of 65,536 normal draws is within ~0.3% of std (1 sigma); allow 2%
    assert abs(x.std() / std - 1) < 0.02, (x.std(), std)
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size)
    # untruncated: the tails reach beyond 3.5 std (truncated normals stop at 2 std)
    assert np.abs(x).max() > 3.5 * std
    kurtosis = ((x - x.mean()) ** 4).mean() / x.var() ** 2
    assert abs(kurtosis - 3) < 0.1


@pytest.mark.parametrize("scheme", sorted(NORMAL_STDS))
def test_normal_schemes_match_formula(scheme):
    a, b = factors(scheme)
    for x, std in zip((a, b), NORMAL_STDS[scheme], strict=True):
        if std is None:
            assert not x.any(), "the zero factor must be exactly 0"
        else:
            check_normal(x, std)


@pytest.mark.parametrize(
    "scheme,bound",
    [("kaiming_uniform", 1 / math.sqrt(N)), ("he_uniform", math.sqrt(6 / N))],
)
def test_uniform_schemes_match_formula(scheme, bound):
    a, b = factors(scheme)
    assert not b.any()
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.999 * bound  # fills the interval
    assert abs(a.std() / (bound / math.sqrt(3)) - 1) < 0.02  # uniform std = bound/√3


def test_both_random_is_nonzero_on_both_sides():
    a, b = factors("both_random")
    assert np.abs(a).max() <= 1 / math.sqrt(N)
    check_normal(b, 1 / math.sqrt(R))
    assert np.abs(a @ b).max() > 1e-3


def test_orthogonal_is_nonzero_but_product_vanishes():
    a, b = factors("orthogonal")
    assert np.abs(a).max() > 0.1 and np.abs(b).max() > 0.1
    assert np.abs(a @ b).max() < 1e-5
    # a = N^{in×r/2} @ q0 / 10: var = (column norm² of q0 = 1/2 on average) / 100
    assert abs(a.std() / (math.sqrt(0.5) / 10) - 1) < 0.05


def test_orthogonal_needs_even_rank():
    with pytest.raises(ValueError, match=r"'kernel'.*orthogonal.*even rank.*rank=3"):
        factors("orthogonal", n_in=16, n_out=16, rank=3)


def test_fan_in_counts_every_input_axis():
    # a conv kernel (3, 3, 16, 32): fan_in = 3·3·16 = 144
    p = jaxlora.init(
        {"conv": {"kernel": jnp.zeros((3, 3, 16, 32))}},
        jax.random.key(0),
        scheme="kaiming_uniform",
        rank=8,
    )["conv"]["kernel"]
    assert p.a.shape == (3, 3, 16, 8) and p.b.shape == (8, 32)
    assert float(jnp.abs(p.a).max()) <= 1 / 12


def test_same_key_same_factors_and_targets_differ():
    tree = {"x": {"kernel": jnp.zeros((64, 64))}, "y": {"kernel": jnp.zeros((64, 64))}}
    p1 = jaxlora.init(tree, jax.random.key(7), scheme="both_random", rank=4)
    p2 = jaxlora.init(tree, jax.random.key(7), scheme="both_random", rank=4)
    chex.assert_trees_all_equal(jaxlora.adapters(p1), jaxlora.adapters(p2))
    assert not np.array_equal(p1["x"]["kernel"].a, p1["y"]["kernel"].a)
    assert not np.array_equal(p1["x"]["kernel"].b, p1["y"]["kernel"].b)
    p3 = jaxlora.init(tree, jax.random.key(8), scheme="both_random", rank=4)
    assert not np.array_equal(p1["x"]["kernel"].a, p3["x"]["kernel"].a)


def test_stacked_layers_get_independent_factors():
    tree = {"layers": {"kernel": jnp.zeros((3, 32, 32))}}
    layout = jaxlora.Layout.dense(3, n_stack=1)
    p = jaxlora.init(
        tree, jax.random.key(0), scheme="he", rank=4, layouts={"layers": layout}
    )["layers"]["kernel"]
    assert p.a.shape == (3, 32, 4) and p.b.shape == (3, 4, 32)
    assert not np.array_equal(p.a[0], p.a[1])
    assert abs(float(p.a.std()) * math.sqrt(32) - 1) < 0.1  # fan_in is 32, not 3·32


def test_custom_scheme_from_jax_initializers():
    scheme = jaxlora.Scheme(
        a_init=jax.nn.initializers.constant(0.5),
        b_init=jax.nn.initializers.ones,
        name="halves",
    )
    p = jaxlora.init(
        {"kernel": jnp.zeros((8, 6))}, jax.random.key(0), scheme=scheme, rank=2
    )["kernel"]
    np.testing.assert_array_equal(p.a, np.full((8, 2), 0.5))
    np.testing.assert_array_equal(p.b, np.ones((2, 6)))
    assert p.spec.scheme == "halves"


def test_a_custom_scheme_is_checked_when_made():
    """Both factors at zero (a saddle: no gradient ever) warns (kept: the saddle is
    a claim to test); a non-string name, which went into checkpoints, is refused."""
    zeros = jax.nn.initializers.zeros
    with pytest.warns(UserWarning, match=r"'zz': a_init and b_init are both zeros"):
        jaxlora.Scheme(zeros, zeros, name="zz")
    with pytest.raises(TypeError, match=r"must be a non-empty string, got 3"):
        jaxlora.Scheme(jax.nn.initializers.normal(0.02), zeros, name=3)


def test_peft_embedding_convention():
    tree = {"embed": {"embedding": jnp.zeros((500, 64))}}
    p = jaxlora.init(
        tree,
        jax.random.key(0),
        scheme="he",
        rank=8,
        targets=["embed"],
        embedding="peft",
    )["embed"]["embedding"]
    assert p.a.shape == (500, 8) and not np.asarray(p.a).any()
    assert abs(float(p.b.std()) - 1) < 0.1
    default = jaxlora.init(
        tree, jax.random.key(0), scheme="he", rank=8, targets=["embed"]
    )["embed"]["embedding"]
    assert not np.asarray(default.b).any()  # the scheme's own rule: b = 0, a random
    assert abs(float(default.a.std()) * math.sqrt(500) - 1) < 0.05


def test_factor_dtype_defaults_to_float32_for_bf16_models():
    tree = {"kernel": jnp.zeros((32, 32), jnp.bfloat16)}
    p = jaxlora.init(tree, jax.random.key(0), rank=4)["kernel"]
    assert p.a.dtype == jnp.float32 and p.b.dtype == jnp.float32
    assert p.w.dtype == jnp.bfloat16
    p16 = jaxlora.init(tree, jax.random.key(0), rank=4, dtype=jnp.bfloat16)["kernel"]
    assert p16.a.dtype == jnp.bfloat16


def test_schemes_lists_every_name():
    assert set(jaxlora.SCHEMES) >= {
        "normal",
        "he",
        "kaiming_normal",
        "xavier",
        "normalized",
        "kaiming_uniform",
        "gaussian",
        "he_uniform",
        "init_b",
        "reversed",
        "both_random",
        "orthogonal",
    }
