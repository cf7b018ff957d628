"""CorDA (arXiv 2406.05223) through `jaxlora.init`: against real PEFT on a torch twin,
per layer of a scanned stack, with its damping, modes and refusals."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from peft_twin import Block
from peft_twin import Net
from peft_twin import torch_twin

import jaxlora
from jaxlora import _weight_aware

NET = Net()
# PEFT's CorDA hooks one sample (a (1, tokens, features) batch) per forward call
SAMPLES = [jax.random.normal(jax.random.key(10 + i), (1, 24, 8)) for i in range(5)]
PARAMS = NET.init(jax.random.key(0), SAMPLES[0])


def _peft_corda(method, *, rslora):
    torch = require("torch", "pip install torch==2.13.0 transformers peft")
    peft = require("peft", "pip install peft")
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    net = torch_twin(torch, PARAMS)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=rslora,
        rank_pattern={"head": 3},
        target_modules=["fc1", "layers.0", "layers.1", "head"],
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method),
    )

    def run_model():
        for x in SAMPLES:
            net(torch.from_numpy(np.array(x)))

    preprocess_corda(net, config, run_model=run_model)
    model = peft.get_peft_model(net, config)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = (
                module.lora_A["default"].weight.detach().numpy(),
                module.lora_B["default"].weight.detach().numpy(),
                module.base_layer.weight.detach().numpy(),
                module.scaling["default"],
            )
    return out


def _jaxlora_corda(scheme, *, rslora):
    return jaxlora.init(
        PARAMS,
        jax.random.key(1),
        scheme=scheme,
        rank=4,
        alpha=8,
        rslora=rslora,
        rank_pattern={".*head.*": 3},
        apply_fn=NET.apply,
        batches=SAMPLES,
    )


def _aligned(a, ref):
    """``a``'s columns with the signs of ``ref``'s (an SVD fixes each only up to
    sign; ``a`` and ``b`` flip together)."""
    return np.sign(np.sum(a * ref, axis=0))


@pytest.mark.filterwarnings("ignore:Using Rank-Stabilized LoRA")  # PEFT's own
@pytest.mark.parametrize(
    "scheme, method, rslora",
    [("corda", "ipm", False), ("corda_kpm", "kpm", True)],
)
def test_factors_and_residual_bases_match_peft(scheme, method, rslora):
    """Every target, each scanned layer on its own, has PEFT's ``lora_A`` (as ``aᵀ``),
    ``lora_B`` (as ``bᵀ``) and residual base weight, with rank and alpha patterns
    and rsLoRA."""
    ref = _peft_corda(method, rslora=rslora)
    got = _jaxlora_corda(scheme, rslora=rslora)["params"]
    ours = {
        "fc1": got["fc1"]["kernel"],
        "head": got["head"]["kernel"],
    }
    stack = got["layers"]["layer"]["kernel"]
    assert sorted(ref) == ["fc1", "head", "layers.0", "layers.1"]
    for name, (A, B, W, scaling) in ref.items():
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            a, b, w = (np.asarray(x[i]) for x in (stack.a, stack.b, stack.w))
            node = stack
        else:
            node = ours[name]
            a, b, w = (np.asarray(x) for x in (node.a, node.b, node.w))
        assert node.spec.scheme == scheme and node.spec.residual
        assert node.scale == pytest.approx(scaling)
        assert a.shape == A.T.shape and b.shape == B.T.shape
        sign = _aligned(a, A.T)
        np.testing.assert_allclose(a * sign, A.T, rtol=2e-3, atol=2e-4, err_msg=name)
        np.testing.assert_allclose(
            b * sign[:, None], B.T, rtol=2e-3, atol=2e-4, err_msg=name
        )
        np.testing.assert_allclose(w, W.T, rtol=1e-4, atol=2e-5, err_msg=name)


def test_output_unchanged_at_init_and_ipm_plus_kpm_rebuild_the_weight():
    """The residual keeps the output; IPM at rank r and KPM at rank n − r take
    complementary terms of ``W = U S Vhᵀ C'⁻¹``, so their updates sum to ``W``."""
    ipm = jaxlora.init(
        PARAMS, jax.random.key(1), scheme="corda", rank=5, alpha=5,
        targets=["fc1"], apply_fn=NET.apply, batches=SAMPLES,
    )  # fmt: skip
    kpm = jaxlora.init(
        PARAMS, jax.random.key(1), scheme="corda_kpm", rank=3, alpha=3,
        targets=["fc1"], apply_fn=NET.apply, batches=SAMPLES,
    )  # fmt: skip
    x = SAMPLES[0]
    for adapted in (ipm, kpm):
        out = jaxlora.lora_apply(NET.apply)(adapted, x)
        np.testing.assert_allclose(out, NET.apply(PARAMS, x), atol=2e-5)
    a_i, a_k = ipm["params"]["fc1"]["kernel"], kpm["params"]["fc1"]["kernel"]
    total = a_i.delta() + a_k.delta()  # fc1 is (8, 16): min(in, out) = 8 = 5 + 3
    np.testing.assert_allclose(total, PARAMS["params"]["fc1"]["kernel"], atol=2e-5)
    assert not np.allclose(a_i.delta(), 0, atol=1e-3)


def test_the_damping_doubles_until_the_covariance_inverts():
    """``C' = C + d·mean(diag C)·I`` from d = 0.01, doubled while ``‖C'·C'⁻¹ − I‖_F ≥
    0.05``: a well-conditioned C keeps 0.01; a C with an eigenvalue of exactly
    −0.01·mean(diag C) (in a random basis, so float32 cannot invert C + 0.01·...)
    needs one doubling, as PEFT's own loop finds (its factors agree)."""
    well = jax.random.normal(jax.random.key(2), (200, 16))
    cov = well.T @ well / 200
    fixed, _ = _weight_aware.damped_inverse(cov)
    diag = np.diag(np.asarray(cov))
    np.testing.assert_allclose(
        np.diag(np.asarray(fixed)) - diag, 0.01 * diag.mean(), rtol=1e-4
    )
    n = 6
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    c = -0.01 * (n - 1) / n / (1 + 0.01 / n)  # c + 0.01·mean(diag) = 0
    cov = ((q * np.array([1.0] * (n - 1) + [c])) @ q.T).astype(np.float32)
    mean = np.mean(np.diag(cov))

    def error(d):
        f = jnp.asarray(cov + mean * d * np.eye(n, dtype=np.float32))
        return float(jnp.linalg.norm(f @ jnp.linalg.inv(f) - jnp.eye(n)))

    assert error(0.01) >= 0.05 > error(0.02)
    fixed, inv = _weight_aware.damped_inverse(jnp.asarray(cov))
    np.testing.assert_allclose(
        np.asarray(fixed) - cov, 0.02 * mean * np.eye(n), rtol=1e-5, atol=1e-7
    )
    assert np.linalg.norm(np.asarray(fixed @ inv) - np.eye(n)) < 0.05
    torch = require("torch", "pip install torch==2.13.0 transformers peft")
    require("peft", "pip install peft")
    from peft.tuners.lora.corda import collect_eigens_for_layer

    linear = torch.nn.Linear(n, 4)
    linear.covariance_matrix = torch.from_numpy(cov)
    eig = collect_eigens_for_layer(linear, None)
    u, s, v = eig.U_WC.numpy()[:, :3], eig.S_WC.numpy()[:3], eig.V_WC.numpy()[:, :3]
    ref = (u * s) @ v.T  # PEFT's B·A at rank 3 and scale 1, (out, in)
    k = linear.weight.detach().numpy().T
    a, b, _ = _weight_aware.corda(None, k, cov, 3, 1.0)
    np.testing.assert_allclose(a @ b, ref.T, atol=2e-5)


def test_each_batch_is_one_sample_scaled_by_its_largest_input():
    """The covariance is the mean over batches of ``X̂ᵀX̂``, ``X̂ = X / |max X|``: a
    batch scaled by 10 is the same sample, and the factors do not change."""
    scaled = [x * (10.0 if i % 2 else 1.0) for i, x in enumerate(SAMPLES)]

    def fc1(batches):
        p = jaxlora.init(
            PARAMS, jax.random.key(1), scheme="corda", rank=2, targets=["fc1"],
            apply_fn=NET.apply, batches=batches,
        )  # fmt: skip
        return p["params"]["fc1"]["kernel"].delta()

    np.testing.assert_allclose(fc1(scaled), fc1(SAMPLES), rtol=1e-4, atol=1e-5)
    assert not np.allclose(fc1(SAMPLES[:2]), fc1(SAMPLES), atol=1e-3)


def _corda(params=PARAMS, **kw):
    return jaxlora.init(
        params, jax.random.key(1), **{"scheme": "corda", "rank": 2, **kw}
    )


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="scheme 'corda' initializes from the inputs"):
        _corda(batches=SAMPLES)
    with pytest.raises(ValueError, match="scheme 'corda_kpm' got no batches"):
        _corda(scheme="corda_kpm", apply_fn=NET.apply, batches=[])
    with pytest.raises(ValueError, match="compensate=True has no effect"):
        _corda(apply_fn=NET.apply, batches=SAMPLES, compensate=True)
    with pytest.raises(ValueError, match="niter is only used"):
        _corda(apply_fn=NET.apply, batches=SAMPLES, niter=2)
    with pytest.raises(ValueError, match="call jaxlora.init outside the transform"):
        jax.jit(lambda p: _corda(params=p, apply_fn=NET.apply, batches=SAMPLES))(PARAMS)
    with pytest.raises(ValueError, match="on concrete batches"):
        jax.jit(lambda x: _corda(apply_fn=NET.apply, batches=[x]))(SAMPLES[0])
    # the largest input is tiny next to the others: X̂ = X/|max X| is finite but
    # X̂ᵀX̂ overflows float32 (PEFT: "Invalid value found in covariance")
    tiny = -jnp.abs(SAMPLES[0]).at[0, 0, 0].set(1e-25)
    with pytest.raises(ValueError, match="covariance overflows float32"):
        _corda(apply_fn=NET.apply, batches=[tiny])
    zeros = [jnp.zeros_like(SAMPLES[0])]
    with pytest.raises(
        ValueError, match=r"in batch 0, 'params/fc1/kernel', .* have inputs that"
    ):
        _corda(apply_fn=NET.apply, batches=zeros)


def test_a_convolution_is_refused_with_the_scheme_named():
    conv = nn.Conv(4, (3,))
    x = jnp.ones((1, 10, 2))
    p = conv.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError,
        match=r"(?s)scheme 'corda' needs the inputs.*'params/kernel': used by 'conv_",
    ):
        jaxlora.init(
            p, jax.random.key(1), scheme="corda", rank=2, apply_fn=conv.apply,
            batches=[x],
        )  # fmt: skip


def test_checkpoint_loads_only_onto_the_same_residual(tmp_path):
    adapted = _corda(apply_fn=NET.apply, batches=SAMPLES)
    jaxlora.save(tmp_path / "ad", adapted)
    again = _corda(apply_fn=NET.apply, batches=SAMPLES)
    loaded = jaxlora.load(tmp_path / "ad", again)
    np.testing.assert_allclose(
        jaxlora.merge(loaded)["params"]["head"]["kernel"],
        jaxlora.merge(adapted)["params"]["head"]["kernel"],
        atol=1e-6,
    )
    other = _corda(apply_fn=NET.apply, batches=SAMPLES[:2])
    with pytest.raises(ValueError, match="residual"):
        jaxlora.load(tmp_path / "ad", other)


def test_a_weight_used_twice_in_a_call_has_one_sample_of_all_its_rows():
    """jaxlora's sample is the batch: every row the weight meets in one call, one
    |max| for all (PEFT's hook would count each call of a shared layer apart)."""
    w = {"kernel": jax.random.normal(jax.random.key(3), (8, 6))}
    model = lambda p, x: jnp.tanh(x @ p["kernel"]).sum() + ((3 * x + 1) @ p["kernel"])  # noqa: E731
    xs = [jax.random.normal(jax.random.key(20 + i), (12, 8)) for i in range(3)]
    got = jaxlora.init(
        w, jax.random.key(0), scheme="corda", rank=3, apply_fn=model, batches=xs
    )["kernel"]
    cov = 0
    for x in xs:
        rows = jnp.concatenate([x, 3 * x + 1])
        rows = rows / jnp.abs(rows.max())
        cov = cov + rows.T @ rows
    a, b, res = _weight_aware.corda(None, w["kernel"], cov / len(xs), 3, 1.0)
    np.testing.assert_allclose(got.w, res, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.delta(), a @ b, rtol=1e-4, atol=1e-5)


def _padded_batches(n=3, seed=0):
    """Batches of (3, 7, 8) inputs whose padded positions hold large garbage, with
    their masks; and the same inputs without padding, as one sequence each."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(7)[None] < np.array([7, 4, 2])[:, None]).astype(np.int32)
    padded, clean = [], []
    for _ in range(n):
        x = rng.normal(size=(3, 7, 8)).astype(np.float32)
        junk = 50.0 + rng.normal(size=x.shape).astype(np.float32)
        padded.append({"x": np.where(mask[..., None] > 0, x, junk), "mask": mask})
        clean.append({"x": x[mask > 0][None]})
    return padded, clean


@pytest.mark.parametrize("scheme", ["eva", "corda", "corda_kpm"])
def test_input_mask_leaves_padded_positions_out(scheme):
    """With ``input_mask``, a padded batch gives what its unpadded rows give (in the
    PCA, the covariance and CorDA's max X); without it the padding counts."""
    rng = np.random.default_rng(1)
    w = {
        "q": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
        "o": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
    }
    model = lambda p, b: jnp.tanh(b["x"] @ p["q"]["kernel"]) @ p["o"]["kernel"]  # noqa: E731
    padded, clean = _padded_batches()

    def adapt(batches, **kw):
        return jaxlora.init(
            w, jax.random.key(0), scheme=scheme, rank=2, targets=["q", "o"],
            apply_fn=model, batches=batches, **kw,
        )  # fmt: skip

    masked = adapt(padded, input_mask=lambda b: b["mask"])
    want, unmasked = adapt(clean), adapt(padded)
    for k in ("q", "o"):
        got = masked[k]["kernel"]
        np.testing.assert_allclose(got.a, want[k]["kernel"].a, atol=1e-5)
        np.testing.assert_allclose(got.w, want[k]["kernel"].w, atol=1e-5)

    def differs(x, y):  # another rank (EVA) or other directions
        return x.shape != y.shape or np.abs(np.abs(x) - np.abs(y)).max() > 1e-2

    assert any(
        differs(unmasked[k]["kernel"].a, want[k]["kernel"].a) for k in ("q", "o")
    )


def test_input_mask_refusals():
    padded, _ = _padded_batches(1)
    w = {"head": {"kernel": jnp.ones((8, 2))}}
    pooled = lambda p, b: b["x"].mean(1) @ p["head"]["kernel"]  # noqa: E731
    with pytest.raises(
        ValueError, match=r"shape \(3, 7\).*\n.*'head/kernel': positions \(3,\)"
    ):
        jaxlora.init(
            w, jax.random.key(0), scheme="corda", rank=2, apply_fn=pooled,
            batches=padded, input_mask=lambda b: b["mask"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="input_mask is only used by the schemes"):
        jaxlora.init(w, jax.random.key(0), rank=2, input_mask=lambda b: b["mask"])
    with pytest.raises(TypeError, match="input_mask must be a function"):
        jaxlora.init(
            w, jax.random.key(0), scheme="eva", rank=2, apply_fn=pooled,
            batches=padded, input_mask=padded[0]["mask"],
        )  # fmt: skip


class _Shared(nn.Module):
    """One Dense used twice per call, then a scanned stack of two layers."""

    @nn.compact
    def __call__(self, b):
        shared = nn.Dense(8, name="shared")
        h = shared(b["x"]) + shared(jnp.tanh(b["x"]))
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        h, _ = stack(name="layers")(nn.Dense(16, name="up")(h), None)
        return h


@pytest.mark.parametrize("scheme", ["eva", "corda_kpm"])
def test_input_mask_follows_every_use_and_every_layer(scheme):
    """The mask applies at each use of a shared weight and at each layer of a
    stack; a float mask counts where it is nonzero; a batch an EVA mask empties
    is skipped (it neither feeds nor stops the PCA), CorDA refuses it."""
    model = _Shared()
    padded, clean = _padded_batches()
    params = model.init(jax.random.key(0), clean[0])

    def adapt(batches, **kw):
        tree = jaxlora.init(
            params, jax.random.key(1), scheme=scheme, rank=2, apply_fn=model.apply,
            batches=batches, **kw,
        )  # fmt: skip
        factors = {p: n.a for p, n in jaxlora.adapters(tree).items()}
        return factors, jaxlora.base(tree, allow_residual=True)

    want = adapt(clean)
    got = [adapt(padded, input_mask=lambda b: 2.5 * b["mask"])]
    empty = {"x": padded[0]["x"], "mask": 0 * padded[0]["mask"]}
    with_empty = [padded[0], empty, *padded[1:]]
    if scheme == "eva":
        got.append(adapt(with_empty, input_mask=lambda b: b["mask"]))
    else:
        with pytest.raises(ValueError, match="input_mask keeps none of them"):
            adapt(with_empty, input_mask=lambda b: b["mask"])
    assert len(want[0]) >= 3
    for factors, base in got:
        assert sorted(factors) == sorted(want[0])
        for k, a in factors.items():
            np.testing.assert_allclose(a, want[0][k], atol=2e-5, err_msg=k)
        chex.assert_trees_all_close(base, want[1], atol=2e-5)


def test_input_mask_refuses_positions_it_does_not_fit():
    """A weight applied at every step of a scan over the sequence meets positions
    (batch,) per step, not the mask's (batch, seq): refused, not mis-masked; so is
    an EVA mask that empties every batch."""
    padded, _ = _padded_batches(2)
    w = {"cell": {"kernel": jnp.ones((8, 8)) / 8}}

    def rnn(p, b):
        step = lambda h, x: (jnp.tanh(x @ p["cell"]["kernel"] + h), None)  # noqa: E731
        return jax.lax.scan(step, jnp.zeros((3, 8)), b["x"].transpose(1, 0, 2))[0]

    with pytest.raises(ValueError, match=r"'cell/kernel': positions \(3,\)"):
        jaxlora.init(
            w, jax.random.key(0), scheme="corda", rank=2, apply_fn=rnn,
            batches=padded, input_mask=lambda b: b["mask"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="left out every input row of 'cell/kernel'"):
        jaxlora.init(
            w, jax.random.key(0), scheme="eva", rank=2,
            apply_fn=lambda p, b: b["x"] @ p["cell"]["kernel"],
            batches=padded, input_mask=lambda b: 0 * b["mask"],
        )  # fmt: skip


def test_readme_data_aware_snippet_runs_as_written():
    """The README's LoRA-GA/CorDA block, on the Quickstart's model."""
    import re

    readme = open("README.md", encoding="utf-8").read()
    block = re.search(
        r"data-aware schemes take their data in `init`:\n\n```python\n(.*?)```",
        readme,
        re.S,
    ).group(1)
    model = nn.Sequential([nn.Dense(64), nn.gelu, nn.Dense(8)])
    scope = {"jax": jax, "jnp": jnp, "jaxlora": jaxlora, "model": model}
    exec(block, scope)
    for name, scheme in (("ga", "lora_ga"), ("kpm", "corda_kpm")):
        nodes = jaxlora.adapters(scope[name])
        assert len(nodes) == 2 and {n.spec.scheme for n in nodes.values()} == {scheme}
