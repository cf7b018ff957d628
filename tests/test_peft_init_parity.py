"""Every init scheme that PEFT 0.21 also has, against real PEFT on torch twins:
PiSSA (exact and ``pissa_niter_K``), OLoRA, LoRA-GA and MiCA (the minor directions
of MiLoRA) factor by factor; PEFT's random inits (``True``, ``"gaussian"``,
``"orthogonal"``, the embedding rule) by the same formulas and constructions, since
torch's draws cannot be reproduced. PEFT orientation: ``A`` (r, in) = ``aᵀ``, ``B``
(out, r) = ``bᵀ``, base ``W`` (out, in) = ``kernelᵀ``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from peft_twin import N_LAYERS
from peft_twin import Net
from peft_twin import torch_twin

import jaxlora
from jaxlora import _residual

TARGETS = ["fc1", "layers.0", "layers.1", "head"]
# PEFT's rank and alpha patterns and jaxlora's, for the same targets
PEFT_PATTERNS = {"rank_pattern": {"head": 3}, "alpha_pattern": {"fc1": 4}}
JAX_PATTERNS = {"rank_pattern": {".*head.*": 3}, "alpha_pattern": {".*fc1.*": 4}}


NET = Net()
BATCHES = [jax.random.normal(jax.random.key(10 + i), (1, 24, 8)) for i in range(3)]
PARAMS = NET.init(jax.random.key(0), BATCHES[0])


def _truncated(k, rank):
    u, s, vt = np.linalg.svd(np.asarray(k, np.float64), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(np.float32)


def _low_rank(params):
    """``params`` with every kernel cut to exactly its adapter's rank (head: 3, the
    others 4): a sketch of q = r columns finds its range exactly, so fast PiSSA is
    exact on both sides."""
    p = jax.tree.map(np.asarray, params["params"])
    out = {
        name: {**p[name], "kernel": _truncated(p[name]["kernel"], rank)}
        for name, rank in (("fc1", 4), ("head", 3))
    }
    stack = p["layers"]["layer"]
    kernels = np.stack([_truncated(k, 4) for k in stack["kernel"]])
    out["layers"] = {"layer": {**stack, "kernel": kernels}}
    return {"params": jax.tree.map(jnp.asarray, out)}


LOW_RANK = _low_rank(PARAMS)


def _torch():
    torch = require("torch", "pip install torch==2.13.0 transformers peft")
    peft = require("peft", "pip install peft")
    return torch, peft


def _peft_layers(model):
    """``{target: (A, B, residual W, scaling)}`` of a PEFT model, as numpy."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = (
                module.lora_A["default"].weight.detach().numpy().copy(),
                module.lora_B["default"].weight.detach().numpy().copy(),
                module.base_layer.weight.detach().numpy().copy(),
                module.scaling["default"],
            )
    return out


def _adapt(params, scheme, **kw):
    """jaxlora's side of a parity test: rank 4, alpha 8 (as the PEFT configs), key 1,
    layouts inferred from the model."""
    return jaxlora.init(
        params,
        jax.random.key(1),
        scheme=scheme,
        rank=4,
        alpha=8,
        apply_fn=NET.apply,
        example_args=(BATCHES[0],),
        **kw,
    )


def _jax_layers(tree):
    """``{target: (a, b, w, scale, spec)}`` of an adapted tree, PEFT's target names."""
    got = tree["params"]
    out = {}
    for name in ("fc1", "head"):
        node = got[name]["kernel"]
        out[name] = (*(np.asarray(x) for x in (node.a, node.b, node.w)), node.scale)
        out[name] += (node.spec,)
    stack = got["layers"]["layer"]["kernel"]
    for i in range(N_LAYERS):
        out[f"layers.{i}"] = (
            *(np.asarray(x[i]) for x in (stack.a, stack.b, stack.w)),
            stack.scale,
            stack.spec,
        )
    return out


def _kernel(params, name):
    p = params["params"]
    if name.startswith("layers."):
        return np.asarray(p["layers"]["layer"]["kernel"][int(name.split(".")[1])])
    return np.asarray(p[name]["kernel"])


def _signs(x, ref, axis=0):
    """Per column (axis 0) or row (axis 1) signs aligning ``x`` with ``ref``: an SVD
    or QR fixes each singular vector (or Q column) only up to sign."""
    return np.sign(np.sum(x * ref, axis=axis))


@pytest.mark.filterwarnings("ignore:Using Rank-Stabilized LoRA")  # PEFT's own
@pytest.mark.parametrize(
    "scheme, params, rslora",
    [
        ("pissa", PARAMS, False),
        ("pissa", PARAMS, True),
        ("pissa_niter_2", LOW_RANK, False),
        ("olora", PARAMS, False),
        ("olora", PARAMS, True),
    ],
    ids=["pissa", "pissa-rslora", "pissa_niter_2", "olora", "olora-rslora"],
)
def test_weight_aware_factors_and_residuals_match_peft(scheme, params, rslora):
    """``lora_A`` (as ``aᵀ``), ``lora_B`` (as ``bᵀ``), the residual base and the scale
    of every target, each scanned layer on its own, with rank and alpha patterns (so
    the scale differs between targets: PiSSA divides S by it, OLoRA does not)."""
    torch, peft = _torch()
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=rslora,
        target_modules=TARGETS,
        init_lora_weights=scheme,
        **PEFT_PATTERNS,
    )
    ref = _peft_layers(peft.get_peft_model(torch_twin(torch, params), config))
    got = _jax_layers(_adapt(params, scheme, rslora=rslora, **JAX_PATTERNS))
    assert sorted(ref) == sorted(TARGETS)
    scales = {name: ref[name][3] for name in TARGETS}
    assert len(set(scales.values())) == 3  # fc1 (alpha 4), head (rank 3), layers
    for name, (A, B, W, scaling) in ref.items():
        a, b, w, scale, spec = got[name]
        assert spec.scheme == scheme and spec.residual
        assert scale == pytest.approx(scaling, rel=1e-12), name
        assert a.shape == A.T.shape and b.shape == B.T.shape, name
        sign = _signs(a, A.T)
        tol = {"rtol": 1e-4, "atol": 2e-5, "err_msg": name}
        np.testing.assert_allclose(a * sign, A.T, **tol)
        np.testing.assert_allclose(b * sign[:, None], B.T, **tol)
        np.testing.assert_allclose(w, W.T, **tol)
        # the residual is what the factors leave of the original weight
        k = _kernel(params, name)
        np.testing.assert_allclose(w + scale * a @ b, k, atol=2e-5, err_msg=name)


def test_fast_pissa_approximates_like_peft():
    """``pissa_niter_K`` is randomized (torch's and JAX's draws differ), so compare
    the distribution of its error: 128 layers of one full-rank weight whose spectrum
    decays as 0.8ⁱ, each layer its own sketch. The excess ``‖W_res‖² − Σ_{i>r} σᵢ²``
    over exact PiSSA has the same median in PEFT and jaxlora for K = 1 and 2 (both:
    q = r sketch columns, K power iterations), while one power iteration more or
    less moves PEFT's median ≥ 3×, beyond the tolerance."""
    torch, peft = _torch()
    n_layers, fan_in, fan_out, rank = 128, 32, 48, 4
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(fan_out, fan_in)))
    v, _ = np.linalg.qr(rng.normal(size=(fan_in, fan_in)))
    spectrum = 0.8 ** np.arange(fan_in)
    weight = ((u * spectrum) @ v.T).astype(np.float32)  # PEFT's W (out, in)
    tail = np.sum(spectrum[rank:] ** 2)

    def excess(residuals):
        squares = np.sum(np.asarray(residuals, np.float64) ** 2, axis=(1, 2))
        return np.median(squares - tail)

    def peft_excess(niter):
        torch.manual_seed(0)
        net = torch.nn.Module()
        net.stack = torch.nn.ModuleList(
            [torch.nn.Linear(fan_in, fan_out, bias=False) for _ in range(n_layers)]
        )
        with torch.no_grad():
            for layer in net.stack:
                layer.weight.copy_(torch.from_numpy(weight))
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=r"stack\.\d+",
            init_lora_weights=f"pissa_niter_{niter}",
        )
        model = peft.get_peft_model(net, config)
        return excess([m.base_layer.weight.detach().numpy() for m in model.stack])

    def jax_excess(niter):
        tree = {
            "stack": {"kernel": jnp.broadcast_to(weight.T, (n_layers, *weight.T.shape))}
        }
        got = jaxlora.init(
            tree, jax.random.key(0), scheme=f"pissa_niter_{niter}", rank=rank,
            layouts={"stack": jaxlora.Layout.dense(3, n_stack=1)},
        )["stack"]["kernel"]  # fmt: skip
        return excess(got.w)

    theirs = {k: peft_excess(k) for k in (0, 1, 2)}
    for k in (1, 2):
        ours = jax_excess(k)
        assert 2 / 3 < ours / theirs[k] < 3 / 2, (k, ours, theirs[k])
    assert theirs[0] > 3 * theirs[1] > 9 * theirs[2], theirs


@pytest.fixture(scope="module")
def lora_ga():
    """PEFT's LoRA-GA (``preprocess_loraga`` with a ``train_step`` that runs one
    backward pass per batch; the gradient it averages is kept) and jaxlora's on the
    same loss and batches. Rank 4 (head: 3) makes the sketch ``q = min(4r, dims)``
    cover the whole gradient, so both randomized SVDs are exact."""
    torch, peft = _torch()
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    net = torch_twin(torch, PARAMS)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),  # ArB2r, "stable", γ = 16: jaxlora's
        **PEFT_PATTERNS,
    )

    def train_step():
        for x in BATCHES:
            (net(torch.from_numpy(np.array(x))) ** 2).mean().backward()

    preprocess_loraga(net, config, train_step)
    grads = {
        name: m._peft_loraga_grad.numpy().copy()
        for name, m in net.named_modules()
        if hasattr(m, "_peft_loraga_grad")
    }
    ref = _peft_layers(peft.get_peft_model(net, config))

    def loss_fn(p, x):
        return jnp.mean(NET.apply(p, x) ** 2)

    got = _jax_layers(
        _adapt(PARAMS, "lora_ga", loss_fn=loss_fn, batches=BATCHES, **JAX_PATTERNS)
    )
    paths = ["params/fc1/kernel", "params/layers/layer/kernel", "params/head/kernel"]
    ours = _residual.average_gradients(loss_fn, PARAMS, BATCHES, paths)
    jax_grads = {
        "fc1": ours[paths[0]],
        "head": ours[paths[2]],
        **{f"layers.{i}": ours[paths[1]][i] for i in range(N_LAYERS)},
    }
    return ref, got, grads, {k: np.asarray(g).T for k, g in jax_grads.items()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # PEFT's hook
def test_lora_ga_gradient_and_singular_vectors_match_peft(lora_ga):
    """The same averaged gradient G (out, in) and scale as PEFT; with ``U S Vhᵀ = G``
    and ``c = out^¼/√γ``, jaxlora takes the LoRA-GA paper's and the authors'
    repository's ``A = c·Vh[:r]``, ``B = c·U[:, r:2r]``, PEFT 0.21's port ``A =
    Vh[:r]``, ``B = c·U[:, r:2r]·diag(S[r:2r])``: the same singular vectors, scaled
    differently (the README says jaxlora follows the authors, not PEFT's port); each
    residual is ``W − s·B·A`` of its own factors."""
    ref, got, grads, jax_grads = lora_ga
    assert sorted(ref) == sorted(TARGETS)
    for name, (A, B, W, scaling) in ref.items():
        a, b, w, scale, spec = got[name]
        g = grads[name]
        np.testing.assert_allclose(jax_grads[name], g, rtol=1e-5, atol=1e-7)
        assert spec.scheme == "lora_ga" and spec.residual
        assert scale == pytest.approx(scaling, rel=1e-12), name
        r = A.shape[0]
        u, s, vh = np.linalg.svd(g.astype(np.float64))
        c = g.shape[0] ** 0.25 / math.sqrt(16)
        tol = {"atol": 2e-5, "err_msg": name}
        # jaxlora: the paper's factors
        np.testing.assert_allclose(
            a.T * _signs(a.T, vh[:r], 1)[:, None], c * vh[:r], **tol
        )
        np.testing.assert_allclose(
            b.T * _signs(b.T, u[:, r : 2 * r]), c * u[:, r : 2 * r], **tol
        )
        # PEFT: A unscaled, B also multiplied by the singular values
        np.testing.assert_allclose(A * _signs(A, vh[:r], 1)[:, None], vh[:r], **tol)
        want_b = c * u[:, r : 2 * r] * s[r : 2 * r]
        np.testing.assert_allclose(B * _signs(B, want_b), want_b, atol=1e-7)
        k = _kernel(PARAMS, name)
        np.testing.assert_allclose(w, k - scale * a @ b, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(W, k.T - scaling * B @ A, atol=2e-6, err_msg=name)


def test_milora_minor_directions_are_peft_mica_ones():
    """PEFT has no MiLoRA; its ``"mica"`` (MiCA, arXiv 2604.01694) is another method:
    ``B = U[:, -r:]`` (the left singular vectors of the r smallest singular values),
    ``A = 0``, B frozen and the base unchanged. jaxlora's ``milora`` (MiLoRA, arXiv
    2406.09044) puts the same minor components in both factors with a residual
    base; its ``b`` rows, normalised, are MiCA's ``B`` columns in the same order."""
    torch, peft = _torch()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="mica"
    )
    ref = _peft_layers(peft.get_peft_model(torch_twin(torch, PARAMS), config))
    got = _jax_layers(_adapt(PARAMS, "milora"))
    assert sorted(ref) == sorted(TARGETS)
    for name, (A, B, W, _) in ref.items():
        a, b, *_ = got[name]
        assert not A.any()  # MiCA: A = 0, the base is the original weight
        np.testing.assert_array_equal(W.T, _kernel(PARAMS, name))
        directions = b / np.linalg.norm(b, axis=1, keepdims=True)
        sign = _signs(directions, B.T, 1)
        np.testing.assert_allclose(
            directions * sign[:, None], B.T, atol=2e-5, err_msg=name
        )
        # and its a: the matching right singular vectors of W, scaled as b
        np.testing.assert_allclose(
            np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4
        )


def _one_linear(torch, peft, init, *, fan_in=512, fan_out=64, rank=16):
    """PEFT's ``(A, B)`` for one ``Linear(fan_in, fan_out)`` and jaxlora's ``(aᵀ,
    bᵀ)`` of the same kernel shape, in PEFT's orientation."""
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["lin"], init_lora_weights=init
    )
    net = torch.nn.Sequential()
    net.add_module("lin", torch.nn.Linear(fan_in, fan_out))
    A, B, _, _ = _peft_layers(peft.get_peft_model(net, config))["lin"]
    scheme = {True: "kaiming_uniform"}.get(init, init)
    node = jaxlora.init(
        {"lin": {"kernel": jnp.zeros((fan_in, fan_out))}},
        jax.random.key(0),
        scheme=scheme,
        rank=rank,
    )["lin"]["kernel"]
    return (A, B), (np.asarray(node.a).T, np.asarray(node.b).T)


def test_kaiming_uniform_is_peft_default_for_linear_and_conv():
    """PEFT's ``init_lora_weights=True``: ``kaiming_uniform_(A, a=√5)``, i.e.
    ``U(±gain·√(3/fan_in))`` with ``gain = √(2/(1+5))``: ``U(±1/√fan_in)``, and
    ``B = 0``. For a 3×3 conv, PEFT's ``lora_A`` is a conv with the base window, so
    fan_in = 3·3·C_in, as jaxlora's input axes."""
    torch, peft = _torch()
    bound = math.sqrt(2 / (1 + 5)) * math.sqrt(3 / 512)
    assert bound == pytest.approx(1 / math.sqrt(512))
    for A, B in _one_linear(torch, peft, True):
        assert A.shape == (16, 512) and not B.any()
        assert np.abs(A).max() <= bound and np.abs(A).max() > 0.995 * bound
        assert abs(A.std() / (bound / math.sqrt(3)) - 1) < 0.03
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(16, 8, 3))
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["conv"])
    A, B, _, _ = _peft_layers(peft.get_peft_model(net, config))["conv"]
    node = jaxlora.init(
        {"conv": {"kernel": jnp.zeros((3, 3, 16, 8))}},
        jax.random.key(0),
        scheme="kaiming_uniform",
        rank=8,
    )["conv"]["kernel"]
    assert A.shape == (8, 16, 3, 3) and node.a.shape == (3, 3, 16, 8)
    bound = 1 / math.sqrt(3 * 3 * 16)
    for a, b in ((A, B), (np.asarray(node.a), np.asarray(node.b))):
        assert not b.any()
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
        assert abs(a.std() / (bound / math.sqrt(3)) - 1) < 0.05


def test_gaussian_is_peft_gaussian():
    """PEFT's ``"gaussian"``: ``A ~ N(0, (1/r)²)`` (untruncated), ``B = 0``."""
    torch, peft = _torch()
    for A, B in _one_linear(torch, peft, "gaussian"):
        assert not B.any()
        assert abs(A.std() * 16 - 1) < 0.03 and abs(A.mean()) < 0.06 / 16
        assert np.abs(A).max() > 3.5 / 16  # not truncated


def test_orthogonal_is_peft_orthogonal():
    """PEFT's ``"orthogonal"``: ``Q = qr(N^{r×r})``, ``A = (N^{in×r/2}·Q[0::2])ᵀ/10``,
    ``B = N^{out×r/2}·Q[1::2]/10``. So ``B·A = 0`` though neither is; ``A``'s column
    space and ``B``'s row space are complementary halves of R^r; and as Q's rows
    are orthonormal, ``‖A‖_F = ‖N‖_F/10``: the mean square entry of each factor is
    ``(r/2)/r/100 = 1/200`` in expectation. Odd ranks are refused."""
    torch, peft = _torch()
    r = 16
    for A, B in _one_linear(torch, peft, "orthogonal", rank=r):
        assert np.abs(B @ A).max() < 1e-5 < 0.1 < min(np.abs(A).max(), np.abs(B).max())
        left = np.linalg.svd(A.astype(np.float64))[0][:, : r // 2]
        right = np.linalg.svd(B.astype(np.float64))[2][: r // 2].T
        sv_a = np.linalg.svd(A, compute_uv=False)
        sv_b = np.linalg.svd(B, compute_uv=False)
        assert sv_a[r // 2] < 1e-5 * sv_a[0] and sv_b[r // 2] < 1e-5 * sv_b[0]
        projectors = left @ left.T + right @ right.T
        np.testing.assert_allclose(projectors, np.eye(r), atol=1e-5)
        for x in (A, B):
            assert abs(np.mean(x.astype(np.float64) ** 2) * 200 - 1) < 0.05
    with pytest.raises(ValueError, match="even"):
        _one_linear(torch, peft, "orthogonal", rank=3)
    with pytest.raises(ValueError, match="even rank"):
        jaxlora.init(
            {"kernel": jnp.zeros((8, 8))}, jax.random.key(0), scheme="orthogonal",
            rank=3,
        )  # fmt: skip


def test_embedding_rule_is_peft_default_for_tables():
    """PEFT's embedding adapters: ``lora_embedding_A`` (r, vocab) = 0 and
    ``lora_embedding_B`` (dim, r) ~ N(0, 1) for ``init_lora_weights=True`` (and
    ``"gaussian"``); jaxlora's ``embedding="peft"``, asked for explicitly."""
    torch, peft = _torch()
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("embed", torch.nn.Embedding(500, 128))
    config = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["embed"])
    layer = peft.get_peft_model(net, config).base_model.model.embed
    A = layer.lora_embedding_A["default"].detach().numpy()
    B = layer.lora_embedding_B["default"].detach().numpy()
    node = jaxlora.init(
        {"embed": {"embedding": jnp.zeros((500, 128))}}, jax.random.key(0),
        scheme="kaiming_uniform", rank=16, targets=["embed"], embedding="peft",
    )["embed"]["embedding"]  # fmt: skip
    assert A.shape == (16, 500) and node.a.shape == (500, 16)
    for a, b in ((A, B), (np.asarray(node.a).T, np.asarray(node.b).T)):
        assert b.shape == (128, 16) and not a.any()
        assert abs(b.std() - 1) < 0.05 and np.abs(b).max() > 3.5
