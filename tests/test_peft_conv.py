"""PEFT's convolution adapters: ``lora_A`` a conv over the base window to r channels,
``lora_B`` a 1×1 conv. Real PEFT on a torch twin of a Flax CNN, both directions."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import StackedCnn
from conftest import require

import jaxlora

CONVS = ("conv1", "conv2", "conv3")


class Cnn(nn.Module):
    """A 3×3 stride-2 conv, a 1×1 conv and a 1-D conv over the flattened image."""

    groups: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), strides=2, padding=1, name="conv1")(x)
        x = nn.Conv(
            6,
            (1, 1),
            feature_group_count=self.groups,
            kernel_dilation=self.dilation,
            name="conv2",
        )(jax.nn.gelu(x))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, h·w, c): row-major, as torch
        x = nn.Conv(5, (3,), padding="VALID", name="conv3")(jax.nn.gelu(x))
        return nn.Dense(4, name="head")(x.mean(1))


X = np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype(np.float32)


def _torch_twin(torch, params):
    """The same network in torch (NCHW), holding ``params``' weights."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 6, 1)
            self.conv3 = torch.nn.Conv1d(6, 5, 3)
            self.head = torch.nn.Linear(5, 4)

        def forward(self, x):
            gelu = lambda t: torch.nn.functional.gelu(t, approximate="tanh")  # noqa: E731
            x = gelu(self.conv1(x))
            x = gelu(self.conv2(x)).flatten(2)
            return self.head(self.conv3(x).mean(2))

    net = Net()
    p = jax.tree.map(np.asarray, params["params"])
    with torch.no_grad():
        for name, perm in (("conv1", (3, 2, 0, 1)), ("conv2", (3, 2, 0, 1))):
            kernel = p[name]["kernel"].transpose(perm)  # HWIO -> (out, in, kh, kw)
            getattr(net, name).weight.copy_(torch.from_numpy(kernel.copy()))
        kernel = p["conv3"]["kernel"].transpose(2, 1, 0)  # (k, in, out) -> (out, in, k)
        net.conv3.weight.copy_(torch.from_numpy(kernel.copy()))
        net.head.weight.copy_(torch.from_numpy(p["head"]["kernel"].T.copy()))
        for name in (*CONVS, "head"):
            getattr(net, name).bias.copy_(torch.from_numpy(p[name]["bias"].copy()))
    return net.eval()


@pytest.fixture(scope="module")
def cnn():
    torch = require("torch", "pip install torch==2.13.0 transformers peft")
    peft = require("peft", "pip install peft")
    model = Cnn()
    params = model.init(jax.random.key(0), X)

    def torch_out(m):
        with torch.no_grad():
            return m(torch.from_numpy(X.transpose(0, 3, 1, 2).copy())).numpy()

    base = _torch_twin(torch, params)
    np.testing.assert_allclose(torch_out(base), model.apply(params, X), atol=1e-5)
    return torch, peft, model, params, torch_out


def _adapted(model, params, seed, **kw):
    return jaxlora.init(
        params,
        jax.random.key(seed),
        targets=r".*conv\d/kernel",
        apply_fn=model.apply,
        example_args=(X,),
        **kw,
    )


def _names(path, layer):
    return path.split("/")[1]


def test_layouts_record_how_each_convolution_reads_its_kernel(cnn):
    *_, model, params, _ = cnn
    lp = _adapted(model, params, 0, rank=2)
    convs = {n: lp["params"][n]["kernel"].spec.conv for n in CONVS}
    assert convs == {
        "conv1": jaxlora.Conv(axes=(2, 0, 1), groups=1, dilation=(1, 1)),
        "conv2": jaxlora.Conv(axes=(2, 0, 1), groups=1, dilation=(1, 1)),
        "conv3": jaxlora.Conv(axes=(1, 0), groups=1, dilation=(1,)),
    }
    # a kernel flipped or negated before the conv: PEFT's lora_A would not be it
    conv = lambda w, x: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    w = {"kernel": jnp.ones((3, 3, 3, 4))}
    views = {
        "flipped": lambda k: k[::-1],
        "negated": lambda k: -k,
        "scaled": lambda k: 2.0 * k,
        "window cut": lambda k: k[:2],  # PEFT's lora_A would be the whole 3×3
        "padded": lambda k: jnp.pad(k, ((1, 1), (0, 0), (0, 0), (0, 0))),
        "split": lambda k: jnp.split(k, [1], axis=0)[1],
        "rolled": lambda k: jnp.roll(k, 1, axis=1),  # slices joined: same extent
        "as is": None,
        # a slice and a dynamic slice that keep every extent
        "sliced whole": lambda k: jax.lax.slice(k, (0,) * 4, k.shape),
        "dynamic whole": lambda k: jax.lax.dynamic_slice(k, (0,) * 4, k.shape),
    }
    got = {}
    for name, view in views.items():
        fn = lambda p, x, v=view: conv(v(p["kernel"]) if v else p["kernel"], x)  # noqa: E731
        node = jaxlora.init(
            w, jax.random.key(0), rank=2, apply_fn=fn, example_args=(X,)
        )
        got[name] = node["kernel"].spec.conv
    unheld = jaxlora.Conv(None)  # convolved, not as one PEFT conv adapter holds
    assert got == {
        "flipped": unheld,
        "negated": unheld,
        "scaled": unheld,
        "window cut": unheld,
        "padded": unheld,
        "split": unheld,
        "rolled": unheld,
        "as is": convs["conv1"],
        "sliced whole": convs["conv1"],
        "dynamic whole": convs["conv1"],
    }
    # a layer picked out of a stack by w[i] in a loop (a dynamic slice of the layer
    # axis, squeezed away) is still each layer's own conv kernel
    stacked = {"kernel": jnp.ones((4, 3, 3, 3, 3))}
    loop = lambda p, x: jax.lax.fori_loop(  # noqa: E731
        0, 4, lambda i, h: conv(p["kernel"][i], h), x
    )
    node = jaxlora.init(
        stacked, jax.random.key(0), rank=2, apply_fn=loop, example_args=(X,)
    )
    assert node["kernel"].spec.conv == jaxlora.Conv((3, 1, 2), 1, (1, 1))
    # also contracted by a dot: no PEFT conv adapter either
    both = lambda p, x: conv(p["kernel"], x).sum() + (x[0, 0, :3] @ p["kernel"][0, 0])  # noqa: E731
    node = jaxlora.init(w, jax.random.key(0), rank=2, apply_fn=both, example_args=(X,))
    assert node["kernel"].spec.conv == unheld
    # window axes follow the input's spatial order, whatever the kernel spec string
    x_nchw = jnp.ones((1, 3, 7, 6))
    oiwh = lambda p, x: jax.lax.conv_general_dilated(  # noqa: E731
        x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIWH", "NCHW")
    )
    w_oiwh = {"kernel": jnp.ones((4, 3, 5, 3))}  # (out, in, kw, kh)
    node = jaxlora.init(
        w_oiwh, jax.random.key(0), rank=2, apply_fn=oiwh, example_args=(x_nchw,)
    )
    assert node["kernel"].spec.conv == jaxlora.Conv((1, 3, 2), 1, (1, 1))
    # without a model to read: the Flax Conv kernel a "conv" layout assumes
    default = jaxlora.init(params, jax.random.key(0), targets=r".*conv1/kernel", rank=2)
    assert default["params"]["conv1"]["kernel"].spec.conv == jaxlora.Conv((2, 0, 1))


def test_peft_runs_a_jaxlora_conv_adapter_as_jaxlora_does(cnn, tmp_path):
    """2-D (3×3 with stride and padding, 1×1) and 1-D convs: save_peft writes
    PEFT's conv factors, and PeftModel on the torch twin gives jaxlora's output."""
    torch, peft, model, params, torch_out = cnn
    lp = _adapted(model, params, 1, scheme="both_random", rank=3, alpha=5)
    lp = jax.tree.map(
        lambda n: n.replace(b=n.b * 0.1) if jaxlora.is_lora(n) else n,
        lp,
        is_leaf=jaxlora.is_lora,
    )
    want = np.asarray(jaxlora.lora_apply(model.apply)(lp, X))
    assert np.abs(want - model.apply(params, X)).max() > 1e-2  # the adapter matters
    d = jaxlora.save_peft(tmp_path / "cnn", lp, _names)
    net = peft.PeftModel.from_pretrained(_torch_twin(torch, params), d).eval()
    layer = net.base_model.model.conv1
    assert layer.lora_A["default"].weight.shape == (3, 3, 3, 3)  # (r, in, kh, kw)
    assert layer.lora_B["default"].weight.shape == (8, 3, 1, 1)  # (out, r, 1, 1)
    np.testing.assert_allclose(torch_out(net), want, atol=2e-5, rtol=0)
    merged = _torch_twin(torch, jaxlora.merge(lp))  # PEFT's merge: the same weights
    np.testing.assert_allclose(
        torch_out(net.merge_and_unload()), torch_out(merged), atol=2e-5
    )
    back = jaxlora.load_peft(d, _adapted(model, params, 2, rank=3, alpha=5), _names)
    for name in CONVS:  # the factors come back exactly, with their conv record
        got, sent = back["params"][name]["kernel"], lp["params"][name]["kernel"]
        chex.assert_trees_all_equal(
            (got.a, got.b, got.scale), (sent.a, sent.b, sent.scale)
        )
        assert got.spec.conv == sent.spec.conv


def test_a_peft_conv_adapter_runs_in_jaxlora_as_in_peft(cnn, tmp_path):
    """An adapter PEFT made itself (random B, per-module ranks) read with load_peft."""
    torch, peft, model, params, torch_out = cnn
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=list(CONVS),
        rank_pattern={"conv3": 2},
        init_lora_weights=False,
    )
    net = peft.get_peft_model(_torch_twin(torch, params), config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    want = torch_out(net)
    net.save_pretrained(tmp_path / "peft")
    lp = jaxlora.load_peft(
        tmp_path / "peft", _adapted(model, params, 3, rank=4), _names
    )
    assert lp["params"]["conv3"]["kernel"].rank == 2
    got = np.asarray(jaxlora.lora_apply(model.apply)(lp, X))
    assert np.abs(want - model.apply(params, X)).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("field", "match"),
    [
        ("groups", r"'params/conv2/kernel' is a grouped convolution \(2 groups"),
        ("dilation", r"'params/conv2/kernel' is a dilated convolution"),
    ],
)
def test_convolutions_peft_computes_otherwise_are_refused(tmp_path, field, match):
    """PEFT's grouped-conv adapter is another update, and its lora_A ignores the
    kernel dilation: both are refused on export and on import, naming the path."""
    model = Cnn(**{field: 2})
    params = model.init(jax.random.key(0), X)
    lp = _adapted(model, params, 0, rank=2)
    with pytest.raises(ValueError, match=match):
        jaxlora.save_peft(tmp_path / "x", lp, _names)
    assert not (tmp_path / "x").exists()
    plain = _adapted(Cnn(), Cnn().init(jax.random.key(0), X), 0, rank=2)
    d = jaxlora.save_peft(tmp_path / "y", plain, _names)
    with pytest.raises(ValueError, match=match):
        jaxlora.load_peft(d, lp, _names)


def test_convolutions_read_unknowably_or_otherwise_are_refused(cnn, tmp_path):
    """Without inference, a conv's groups and dilation are not known (a dilated
    conv would export wrong): refused with the fix. A kernel convolved in a way no
    PEFT conv adapter holds (here flipped) is refused too, not written as a Linear."""
    *_, model, params, _ = cnn
    default = jaxlora.init(params, jax.random.key(0), targets=r".*conv1/kernel", rank=2)
    with pytest.raises(
        ValueError, match=r"'params/conv1/kernel'.*not known.*apply_fn="
    ):
        jaxlora.save_peft(tmp_path / "x", default, _names)
    fn = lambda p, x: jax.lax.conv(x, p["kernel"][::-1], (1, 1), "SAME")  # noqa: E731
    w = {"kernel": jnp.ones((4, 3, 3, 3))}  # OIHW, the lax.conv default
    x = jnp.ones((1, 3, 6, 6))
    flipped = jaxlora.init(w, jax.random.key(0), rank=2, apply_fn=fn, example_args=(x,))
    with pytest.raises(ValueError, match=r"'kernel' is read by a convolution in a way"):
        jaxlora.save_peft(tmp_path / "x", flipped, {"kernel": "conv"})
    assert not (tmp_path / "x").exists()


def test_stacked_convolutions_are_one_torch_conv_per_layer(cnn, tmp_path):
    """An ``nn.scan`` of convs exports one PEFT conv adapter per layer: PEFT's merged
    torch weights are ``jaxlora.merge``'s, layer by layer, and load_peft reads the
    layers back exactly."""
    torch, peft, *_ = cnn
    model, x = StackedCnn(), jnp.asarray(X[..., :1].repeat(4, -1))
    params = model.init(jax.random.key(0), x)
    lp = jaxlora.init(
        params,
        jax.random.key(1),
        scheme="both_random",
        rank=2,
        apply_fn=model.apply,
        example_args=(x,),
    )
    node = lp["params"]["blocks"]["conv"]["kernel"]
    assert node.spec.conv == jaxlora.Conv((3, 1, 2), groups=1, dilation=(1, 1))
    names = lambda path, layer: f"blocks.{layer[0]}.conv"  # noqa: E731
    d = jaxlora.save_peft(tmp_path / "stacked", lp, names)

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = lambda: torch.nn.ModuleDict({"conv": torch.nn.Conv2d(4, 4, 3)})  # noqa: E731
            self.blocks = torch.nn.ModuleList([layer() for _ in range(3)])

    net = Blocks()
    kernels = np.asarray(params["params"]["blocks"]["conv"]["kernel"])
    with torch.no_grad():
        for i, blk in enumerate(net.blocks):
            blk["conv"].weight.copy_(
                torch.from_numpy(kernels[i].transpose(3, 2, 0, 1).copy())
            )
    merged = peft.PeftModel.from_pretrained(net, d).merge_and_unload()
    want = np.asarray(jaxlora.merge(lp)["params"]["blocks"]["conv"]["kernel"])
    for i, blk in enumerate(merged.blocks):
        got = blk["conv"].weight.detach().numpy().transpose(2, 3, 1, 0)
        np.testing.assert_allclose(got, want[i], atol=1e-6)
    assert not np.allclose(want, kernels, atol=1e-3)  # the update is not negligible
    back = jaxlora.load_peft(d, lp, names)["params"]["blocks"]["conv"]["kernel"]
    chex.assert_trees_all_equal((back.a, back.b), (node.a, node.b))
