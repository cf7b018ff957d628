"""On a device mesh: `init` lays each factor out like its weight, and `lora_apply`
runs sharded base weights and sharding constraints inside the model factored, with
factor gradients sharded like their weights.

Runs in a subprocess with four host CPU devices (``XLA_FLAGS`` must be set before
JAX starts; the test session's JAX already has one device).
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import tempfile
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from flax import linen as nn
    from jax.ad_checkpoint import checkpoint_name
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jaxlora

    warnings.simplefilter("error")  # a materialized weight warns: fail on it
    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            up = self.param("up", nn.initializers.lecun_normal(), (8, 16))
            down = self.param("down", nn.initializers.lecun_normal(), (16, 4))
            up = jax.lax.with_sharding_constraint(
                up, NamedSharding(mesh, P(None, "model"))
            )
            up = checkpoint_name(up, "up_kernel")
            down = jax.lax.with_sharding_constraint(
                down, NamedSharding(mesh, P("model"))
            )
            return jnp.tanh(x @ up) @ down

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = model.init(jax.random.key(1), x)
    specs = {"up": P(None, "model"), "down": P("model", None)}
    params = {
        "params": {
            k: jax.device_put(v, NamedSharding(mesh, specs[k]))
            for k, v in params["params"].items()
        }
    }
    lp = jaxlora.init(
        params, jax.random.key(2), scheme="he", rank=2, targets=["up", "down"]
    )

    def spec2(x):  # a 2-D array's spec with trailing Nones written out
        spec = tuple(x.sharding.spec)
        return spec + (None,) * (2 - len(spec))

    # init lays the factors out like their weights: a weight axis keeps its mesh
    # axis in the factor that holds it, the rank axis is not sharded
    for scheme in ("he", "pissa"):
        placed = jaxlora.init(
            params, jax.random.key(2), scheme=scheme, rank=2, targets=["up", "down"]
        )["params"]
        up, down = placed["up"], placed["down"]
        assert spec2(up.a) == (None, None), (scheme, up.a.sharding)
        assert spec2(up.b) == (None, "model"), (scheme, up.b.sharding)
        assert spec2(down.a) == ("model", None), (scheme, down.a.sharding)
        assert spec2(down.b) == (None, None), (scheme, down.b.sharding)
        assert up.a.sharding.mesh == mesh

    # an adapter loaded onto sharded weights is laid out the same way, read by
    # orbax straight into those shardings (each process reads its own shards)
    read_into = []
    restore = ocp.StandardCheckpointer.restore

    def spy(self, directory, target=None, **kw):
        read_into.extend(x.sharding for x in jax.tree.leaves(target))
        return restore(self, directory, target, **kw)

    ocp.StandardCheckpointer.restore = spy
    with tempfile.TemporaryDirectory() as tmp:
        adapted = jaxlora.init(
            params, jax.random.key(2), scheme="he", rank=2, targets=["up", "down"]
        )
        jaxlora.save(tmp + "/adapter", adapted)
        back = jaxlora.load(tmp + "/adapter", params)["params"]
    ocp.StandardCheckpointer.restore = restore
    assert len(read_into) == 4 and all(
        isinstance(s, NamedSharding) and s.mesh == mesh for s in read_into
    ), read_into
    assert spec2(back["up"].b) == (None, "model"), back["up"].b.sharding
    assert spec2(back["down"].a) == ("model", None), back["down"].a.sharding
    np.testing.assert_array_equal(back["up"].a, adapted["params"]["up"].a)

    # b = 0 at init: move it so the low-rank path shows in outputs and gradients
    lp = jax.tree.map(lambda t: t + 0.25, lp)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    apply = jaxlora.lora_apply(model.apply)

    report = jaxlora.explain(model.apply, lp, xs)
    assert set(report.statuses.values()) == {"factored"}, str(report)

    out = jax.jit(apply)(lp, xs)
    want = model.apply(jaxlora.merge(lp), x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert out.sharding.spec == P("data"), out.sharding

    def loss(t):
        return jnp.sum(apply(t, xs) ** 2)

    def merged_loss(ads):
        base = jaxlora.base(lp)
        return jnp.sum(model.apply(jaxlora.merge(jaxlora.combine(base, ads)), x) ** 2)

    g = jaxlora.adapters(jax.jit(jax.grad(loss))(lp))
    g_ref = jax.grad(merged_loss)(jaxlora.adapters(lp))
    for k in g:
        np.testing.assert_allclose(g[k].a, g_ref[k].a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g[k].b, g_ref[k].b, rtol=1e-4, atol=1e-6)
    # factor gradients come out sharded like their weights' matching axes (XLA's
    # sharding propagation; the factors themselves are not constrained)
    assert spec2(g["params/up"].b) == (None, "model"), g["params/up"].b.sharding
    assert spec2(g["params/down"].a) == ("model", None), g["params/down"].a.sharding

    # jax.device_put of a weight inside the model: a layout hint, or a base kept in
    # host memory streamed to the device (the factors live in device memory)
    def streamed(p, x):
        return x @ jax.device_put(
            p["up"], NamedSharding(mesh, P("data", "model"), memory_kind="device")
        )

    w = jax.random.normal(jax.random.key(5), (8, 16))
    for home in ("device", "pinned_host"):
        put = jax.device_put(
            w, NamedSharding(mesh, P("data", "model"), memory_kind=home)
        )
        lp = jaxlora.init({"up": put}, jax.random.key(1), rank=2, targets=["up"])
        lp = jax.tree.map(lambda t: t + 0.25, lp)
        assert lp["up"].a.sharding.memory_kind == "device", lp["up"].a.sharding
        fn = streamed
        assert jaxlora.explain(fn, lp, x).statuses == {"up": "factored"}
        np.testing.assert_allclose(
            jax.jit(jaxlora.lora_apply(fn))(lp, x),
            jax.jit(fn)(jaxlora.merge(lp), x),
            rtol=1e-5,
            atol=1e-5,
        )
        assert jaxlora.merge(lp)["up"].sharding.memory_kind == home
        merged = jax.jit(jaxlora.merge)(lp)["up"]  # under jit too
        assert merged.sharding.memory_kind == home
        np.testing.assert_allclose(merged, jaxlora.merge(lp)["up"], rtol=1e-6)

    # a weight sent to another device inside the model (a pipeline stage): the
    # factors go along (the committed factors on device 0 clashed with it)
    dev = jax.devices()[1]

    def stage(p, x):
        return jax.device_put(x, dev) @ jax.device_put(p["w"], dev)

    on_0 = {"w": jax.device_put(w, jax.devices()[0])}
    lp = jaxlora.init(on_0, jax.random.key(1), rank=2, targets=["w"])
    lp = jax.tree.map(lambda t: t + 0.25, lp)
    for wrap in (lambda f: f, jax.jit):  # placed as the plain model places it
        out = wrap(jaxlora.lora_apply(stage))(lp, x)
        want = wrap(stage)(jaxlora.merge(lp), x)
        assert out.sharding == want.sharding, (out.sharding, want.sharding)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

    # NNX with Flax's sharding metadata (nnx.with_partitioning): NnxOptimizer lays the
    # moments out like the factors (the kernel's metadata split the rank axis, or
    # failed to at a rank 'model' does not divide), and a step keeps the factors'
    from flax import nnx

    class Up(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(
                nnx.initializers.lecun_normal(), ("data", "model")
            )
            self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)

        def __call__(self, x):
            return self.up(x)

    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(nnx.jit(lambda: Up(nnx.Rngs(0)))())
        model = nnx.merge(graphdef, jaxlora.init(state, jax.random.key(1), rank=3))
        tx = jaxlora.freeze_base(optax.adam(1e-2))
        opt = jaxlora.NnxOptimizer(model, tx, wrt=nnx.Param)
        apply = jaxlora.lora_apply(lambda m, x: m(x))

        @nnx.jit
        def step(model, opt, x):
            opt.update(model, nnx.grad(lambda m: jnp.sum(apply(m, x) ** 2))(model))

        step(model, opt, x)
        kernel = nnx.state(model)["up"]["kernel"].get_value()
        states = jax.tree.leaves(nnx.as_pure(opt.opt_state), is_leaf=jaxlora.is_lora)
        moments = [m for m in states if jaxlora.is_lora(m)]  # Adam's mu and nu
        assert len(moments) == 2, states
        for node in (kernel, *moments):
            assert spec2(node.a) == ("data", None), node.a.sharding
            assert spec2(node.b) == (None, "model"), node.b.sharding

        # Flax's recipe gives a and b the kernel's spec (rank 3 on a 2-way 'model':
        # an IndivisibleError); jaxlora's names each array's own axes
        state = nnx.state(model)
        spec = jaxlora.nnx_partition_spec(state)["up"]["kernel"].get_value()
        assert (spec.w, spec.a, spec.b) == (
            P("data", "model"), P("data", None), P(None, "model")
        ), spec
        placed = jax.device_put(state, jaxlora.nnx_named_sharding(state, mesh))
        node = placed["up"]["kernel"].get_value()
        assert spec2(node.a) == ("data", None) and spec2(node.b) == (None, "model")
        assert spec2(node.w) == ("data", "model"), node.w.sharding
        pinned = jax.jit(
            lambda t: jax.lax.with_sharding_constraint(
                t, jaxlora.nnx_partition_spec(t)
            )
        )(state)
        assert spec2(pinned["up"]["kernel"].get_value().b) == (None, "model")

    # Linen boxes (nn.with_logical_partitioning, also under nn.scan): Flax's own
    # recipe (get_partition_spec -> logical_to_mesh_sharding) gives each factor its
    # own layout (it gave a and b the kernel's: the rank axis split, or an error)
    rules = (("embed", "data"), ("mlp", "model"), ("layers", None))
    init = nn.initializers.lecun_normal()
    part = lambda names: nn.with_logical_partitioning(init, names)  # noqa: E731

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(8, kernel_init=part(("embed", "mlp")))(h)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, h):
            scan = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=2,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scan(name="blocks")(h, None)[0]

    model, h = Stack(), jax.random.normal(jax.random.key(6), (4, 8))
    abstract = jax.eval_shape(model.init, jax.random.key(0), h)
    boxed = jax.jit(
        model.init,
        out_shardings=nn.logical_to_mesh_sharding(
            nn.get_partition_spec(abstract), mesh, rules
        ),
    )(jax.random.key(0), h)
    lp = jaxlora.init(
        boxed, jax.random.key(1), rank=3, apply_fn=model.apply, example_args=(h,)
    )
    lp = jax.tree.map(lambda t: t + 0.25, lp)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(lp), mesh, rules)
    node = jax.jit(lambda t: t, out_shardings=shardings)(lp)["params"]["blocks"]
    node = node["Dense_0"]["kernel"].value
    assert node.w.sharding.spec == P(None, "data", "model"), node.w.sharding
    assert node.a.sharding.spec == P(None, "data", None), node.a.sharding
    assert node.b.sharding.spec == P(None, None, "model"), node.b.sharding
    unboxed = nn.unbox(lp)["params"]["blocks"]["Dense_0"]["kernel"]
    assert jaxlora.is_lora(unboxed) and unboxed.a.shape == (2, 8, 3)
    np.testing.assert_allclose(
        jax.jit(jaxlora.lora_apply(model.apply), in_shardings=(shardings, None))(lp, h),
        model.apply(jaxlora.merge(lp), h),
        rtol=1e-5,
        atol=1e-5,
    )
    print("OK")
    """
)


def run_on_four_devices(script: str) -> None:
    """Runs ``script`` in a fresh Python with four host CPU devices; it must print
    ``OK`` last."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), (
        run.stdout[-3000:] + run.stderr[-3000:]
    )


def test_sharded_weights_and_constraints_run_factored_on_a_mesh():
    run_on_four_devices(SCRIPT)


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import warnings
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, PartitionSpec as P

    import jaxlora

    assert jax.device_count() == 4

    def tp_mlp(params, x, *, mesh, check):
        # tensor parallel: up split on its columns, down on its rows, partial
        # outputs summed over 'model'; the batch split over 'data'
        def body(up, down, x):
            return jax.lax.psum(jnp.tanh(x @ up) @ down, "model")

        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(None, "model"), P("model", None), P("data")),
            out_specs=P("data"),
            check_vma=check,
        )(params["up"], params["down"], x)

    def dp_layers(params, x, *, mesh, check):
        # data parallel: stacked layers replicated, scanned inside the body
        def body(stack, x):
            return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, stack)[0]

        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(("data", "model"))),
            out_specs=P(("data", "model")),
            check_vma=check,
        )(params["stack"], x)

    def check_against_merged(model, params, x, targets, **init_kw):
        init_kw = init_kw or {"apply_fn": model, "example_args": (x,)}
        lp = jaxlora.init(
            params, jax.random.key(3), scheme="he", rank=2, targets=targets, **init_kw
        )
        lp = jax.tree.map(lambda t: t + 0.25, lp)  # b = 0 at init: move it
        # factors as a user might build them: not laid out on the mesh
        unplaced = lambda f: jnp.asarray(np.asarray(f))
        lp = {
            k: type(v)(v.w, unplaced(v.a), unplaced(v.b), v.spec)
            for k, v in lp.items()
        }
        apply = jaxlora.lora_apply(model)
        report = jaxlora.explain(model, lp, x)
        assert set(report.statuses.values()) == {"factored"}, str(report)
        want = jax.jit(model)(jaxlora.merge(lp), x)
        np.testing.assert_allclose(jax.jit(apply)(lp, x), want, rtol=1e-5, atol=1e-6)

        def merged_loss(ads):
            tree = jaxlora.combine(jaxlora.base(lp), ads)
            return jnp.sum(model(jaxlora.merge(tree), x) ** 2)

        g = jaxlora.adapters(
            jax.jit(jax.grad(lambda t: jnp.sum(apply(t, x) ** 2)))(lp)
        )
        g_ref = jax.jit(jax.grad(merged_loss))(jaxlora.adapters(lp))
        for k in g:  # to float32 rounding of differently ordered sums
            for u, v in ((g[k].a, g_ref[k].a), (g[k].b, g_ref[k].b)):
                err = np.linalg.norm(np.asarray(u) - np.asarray(v))
                assert err <= 1e-4 * np.linalg.norm(v), (k, err, np.linalg.norm(v))
        return lp

    key = lambda i: jax.random.key(i)
    mlp = {
        "up": jax.random.normal(key(0), (8, 16)) / 3,
        "down": jax.random.normal(key(1), (16, 4)) / 4,
    }
    layers = {"stack": jax.random.normal(key(2), (3, 8, 8)) / 3}
    x = jax.random.normal(key(4), (8, 8))
    warnings.simplefilter("error")  # a materialized weight warns: fail on it
    configs = [  # (mesh axis type, check_vma)
        (AxisType.Auto, True),
        (AxisType.Auto, False),
        (AxisType.Explicit, True),
    ]
    for kind, check in configs:
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(kind, kind))
        put = lambda t, spec: jax.device_put(t, jax.NamedSharding(mesh, spec))
        # inputs laid out as the in_specs say (explicit axes require it); the
        # factors are left unplaced: lora_apply splits (or reshards) them itself
        mlp_m = {
            "up": put(mlp["up"], P(None, "model")),
            "down": put(mlp["down"], P("model")),
        }
        layers_m = {"stack": put(layers["stack"], P())}
        x_tp, x_dp = put(x, P("data")), put(x, P(("data", "model")))
        with jax.set_mesh(mesh):  # explicit axes need the mesh in context
            check_against_merged(
                partial(tp_mlp, mesh=mesh, check=check), mlp_m, x_tp, ["up", "down"]
            )
            lp = check_against_merged(
                partial(dp_layers, mesh=mesh, check=check), layers_m, x_dp, ["stack"]
            )
        # the layer axis is found inside the body: per-layer factors
        assert lp["stack"].a.shape == (3, 8, 2), lp["stack"].a.shape

    auto = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def conv(p, x):  # output channels split over 'model'
        body = lambda k, x: jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.shard_map(
            body,
            mesh=auto,
            in_specs=(P(None, None, None, "model"), P("data")),
            out_specs=P("data", None, None, "model"),
        )(p["k"], x)

    def embed(p, ids):  # embedding dims split over 'model'
        return jax.shard_map(
            lambda t, i: jnp.take(t, i, axis=0),
            mesh=auto,
            in_specs=(P(None, "model"), P("data")),
            out_specs=P("data", None, "model"),
        )(p["emb"], ids)

    def nested(p, x):  # 'data' manual outside, 'model' inside
        def inner(w, x):
            return jax.lax.psum(x @ w, "model")

        def outer(w, x):
            return jax.shard_map(
                inner,
                mesh=jax.sharding.get_abstract_mesh(),
                in_specs=(P("model"), P(None, "model")),
                out_specs=P(),
                axis_names={"model"},
            )(w, x)

        return jax.shard_map(
            outer,
            mesh=auto,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
            axis_names={"data"},
        )(p["up"], x)

    def closed_over(p, x):  # weights closed over by the body (JAX reshards them)
        layer = lambda h, w: (jnp.tanh(h @ w), None)
        return jax.shard_map(
            lambda x: jax.lax.scan(layer, x, p["stack"])[0],
            mesh=auto,
            in_specs=P("data"),
            out_specs=P("data"),
        )(x)

    def fsdp(p, x):  # weights stored split over 'data', gathered whole for use
        def body(up, stack, x):
            up = jax.lax.all_gather(up, "data", axis=1, tiled=True)
            stack = jax.lax.all_gather(stack, "data", axis=0, tiled=True)
            layer = lambda h, w: (jnp.tanh(h @ w), None)
            return jax.lax.scan(layer, jnp.tanh(x @ up), stack)[0]

        return jax.shard_map(
            body,
            mesh=auto,
            in_specs=(P(None, "data"), P("data"), P("data")),
            out_specs=P("data"),
        )(p["up"], p["stack"], x)

    with jax.set_mesh(auto):
        sharded = {"up": mlp["up"], "stack": jax.random.normal(key(8), (2, 16, 16)) / 4}
        lp = check_against_merged(fsdp, sharded, x, ["up", "stack"])
        assert lp["stack"].a.shape == (2, 16, 2), lp["stack"].a.shape
        conv_k = {"k": jax.random.normal(key(5), (3, 3, 4, 8))}
        images = jax.random.normal(key(6), (4, 6, 6, 4))
        check_against_merged(conv, conv_k, images, ["k"])
        table = {"emb": jax.random.normal(key(7), (16, 8))}
        ids = jnp.arange(8).reshape(4, 2)
        layouts = {"emb": jaxlora.Layout(in_axes=(0,), out_axes=(1,))}
        check_against_merged(embed, table, ids, ["emb"], layouts=layouts)
        check_against_merged(nested, {"up": mlp["up"][:, :8]}, x, ["up"])
        replicated = jax.NamedSharding(auto, P())
        on_mesh = {"stack": jax.device_put(layers["stack"], replicated)}
        lp = check_against_merged(closed_over, on_mesh, x, ["stack"])
        assert lp["stack"].a.shape == (3, 8, 2), lp["stack"].a.shape

    # explicit axes: no mesh context needed when shard_map is given the mesh; a
    # partly manual shard_map ('data' stays an explicit automatic axis); and a
    # plain model on explicitly sharded activations
    explicit = jax.make_mesh(
        (2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2
    )
    put = lambda t, spec: jax.device_put(t, jax.NamedSharding(explicit, spec))
    w_e = {"w": put(mlp["down"][:8], P("model"))}
    x_e = put(x, P("data", "model"))

    def tp(p, x, **kw):
        return jax.shard_map(
            lambda w, x: jax.lax.psum(x @ w, "model"),
            mesh=explicit,
            in_specs=(P("model"), P(*kw.pop("x_spec"), "model")),
            **kw,
        )(p["w"], x)

    split = partial(tp, x_spec=("data",), out_specs=P("data"))
    check_against_merged(split, w_e, x_e, ["w"])
    with jax.set_mesh(explicit):
        partly = partial(tp, x_spec=(None,), out_specs=P(), axis_names={"model"})
        check_against_merged(partly, w_e, x_e, ["w"])
        plain = lambda p, x: jnp.tanh(jax.reshard(x, P("data", None)) @ p["w"])
        check_against_merged(plain, w_e, x_e, ["w"])
    warnings.resetwarnings()

    # a weight returned from the body is materialized for that use, with a warning
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def returns_weight(params, x):
        return jax.shard_map(
            lambda w, x: (x @ w, w * 2.0),
            mesh=mesh,
            in_specs=(P(None, "model"), P("data")),
            out_specs=(P("data", "model"), P(None, "model")),
        )(params["up"], x)

    lp = jaxlora.init(mlp, key(3), scheme="he", rank=2, targets=["up"])
    lp = jax.tree.map(lambda t: t + 0.25, lp)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = jaxlora.lora_apply(returns_weight)(lp, x)
    assert any("'up'" in str(w.message) for w in seen), [str(w) for w in seen]
    want = returns_weight(jaxlora.merge(lp), x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    # EVA cannot see whole activations inside shard_map: refused, naming the path
    try:
        jaxlora.init(
            mlp,
            key(0),
            scheme="eva",
            rank=2,
            targets=["up"],
            apply_fn=partial(tp_mlp, mesh=mesh, check=True),
            batches=[x],
        )
    except ValueError as e:
        assert "shard_map" in str(e) and "up" in str(e), str(e)
    else:
        raise AssertionError("EVA inside shard_map was not refused")
    print("OK")
    """
)


def test_shard_map_bodies_run_factored_with_gradients_summed_over_shards():
    """Tensor- and data-parallel ``shard_map`` bodies (``check_vma`` on and off, auto
    and explicit mesh axes, partly manual, nested, weights closed over; matmuls,
    convolutions, embedding lookups): outputs and factor gradients equal the merged
    model's, every weight runs factored (also weights stored split and all-gathered
    whole, FSDP), a stacked layer axis is inferred inside the body; a weight returned
    from the body is materialized; EVA refuses."""
    run_on_four_devices(SHARD_MAP_SCRIPT)


EXPLICIT_SCRIPT = textwrap.dedent(
    """
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn
    from jax.sharding import AxisType, PartitionSpec as P, auto_axes

    import jaxlora

    warnings.simplefilter("error")  # a materialized weight warns: fail on it
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    put = lambda t, spec: jax.device_put(t, jax.NamedSharding(mesh, spec))
    rand = lambda i, shape: jax.random.normal(jax.random.key(i), shape)

    def check(fn, lp, x, status="factored"):
        # outputs (values and layout) and factor gradients equal the merged model's
        lp = jax.tree.map(lambda t: t + 0.25, lp)  # b = 0 at init: move it
        apply = jaxlora.lora_apply(fn)
        report = jaxlora.explain(fn, lp, x)
        assert set(report.statuses.values()) == {status}, str(report)
        got, want = jax.jit(apply)(lp, x), jax.jit(fn)(jaxlora.merge(lp), x)
        assert got.sharding.spec == want.sharding.spec, (got.sharding, want.sharding)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

        def merged_loss(ads):
            tree = jaxlora.combine(jaxlora.base(lp), ads)
            return jnp.sum(fn(jaxlora.merge(tree), x) ** 2)

        g = jaxlora.adapters(jax.jit(jax.grad(lambda t: jnp.sum(apply(t, x) ** 2)))(lp))
        g_ref = jax.jit(jax.grad(merged_loss))(jaxlora.adapters(lp))
        for k in g:
            np.testing.assert_allclose(g[k].a, g_ref[k].a, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(g[k].b, g_ref[k].b, rtol=1e-4, atol=1e-4)

    def adapt(params, fn=None, x=None, **kw):
        if fn is not None:
            kw.update(apply_fn=fn, example_args=(x,))
        if "params" not in params:  # a plain dict of weights: adapt them all
            kw.setdefault("targets", list(params))
        return jaxlora.init(params, jax.random.key(1), rank=kw.pop("rank", 2), **kw)

    with jax.set_mesh(mesh):
        # DenseGeneral (3-D kernel) on a batch split over 'data'
        dg = nn.DenseGeneral((2, 4))
        x3 = put(rand(0, (4, 6, 8)), P("data"))
        p = jax.tree.map(lambda t: put(t, P()), dg.init(jax.random.key(0), x3))
        check(dg.apply, adapt(p, dg.apply, x3), x3)

        # a stacked weight contracted over an axis split on both sides
        w = put(rand(1, (2, 16, 8)) / 4, P(None, "model", None))
        xs = put(rand(2, (2, 8, 16)), P(None, "data", "model"))
        stacked = lambda p, x: jnp.einsum(
            "lbi,lio->lbo", x, p["w"], out_sharding=P(None, "data", None)
        )
        check(stacked, adapt({"w": w}, stacked, xs), xs)

        # the model's own out_sharding decides the output's layout, also as a carry
        x2 = put(rand(3, (8, 8)), P())
        split_w = {"w": put(rand(4, (8, 8)) / 3, P(None, "model"))}
        whole = lambda p, x: jnp.dot(x, p["w"], out_sharding=P())
        looped = lambda p, x: jax.lax.scan(
            lambda c, _: (jnp.tanh(whole(p, c)), None), x, None, length=2
        )[0]
        check(looped, adapt(split_w), x2)
        to_data = lambda p, x: jnp.dot(x, p["w"], out_sharding=P("data", None))
        check(to_data, adapt({"w": put(rand(4, (8, 8)), P())}), x2)

        # a region with automatic axes (auto_axes), and a batch-split lookup
        xd = put(rand(5, (8, 8)), P("data"))
        in_auto = lambda p, x: auto_axes(
            lambda x, w: x @ w, out_sharding=P("data", None)
        )(x, p["w"])
        check(in_auto, adapt({"w": put(rand(6, (8, 16)), P(None, "model"))}), xd)
        ids = put(jnp.arange(8).reshape(4, 2), P("data"))
        lookup = lambda p, i: p["emb"].at[i].get(out_sharding=P("data", None, None))
        table = {"emb": put(rand(7, (16, 8)), P())}
        lay = {"emb": jaxlora.Layout(in_axes=(0,), out_axes=(1,))}
        check(lookup, adapt(table, layouts=lay), ids)

        # a convolution whose output channels are split, at a rank 'model' does not
        # divide
        k = {"k": put(rand(8, (3, 3, 4, 8)) / 4, P(None, None, None, "model"))}
        xc = put(rand(9, (4, 6, 6, 4)), P("data"))
        conv = lambda p, x: jax.lax.conv_general_dilated(
            x,
            p["k"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            out_sharding=P("data", None, None, "model"),
        )
        check(conv, adapt(k, conv, xc, rank=3), xc)
        # FSDP: a weight's output axis split over the batch's mesh axis, which the
        # model's out_sharding leaves whole (the rank-r term used 'data' twice)
        down = {"down": put(rand(13, (16, 8)), P("model", "data"))}
        h = put(rand(14, (8, 16)), P("data", "model"))
        fsdp = lambda p, h: jnp.einsum(
            "bf,fd->bd", h, p["down"], out_sharding=P("data")
        )
        check(fsdp, adapt(down), h)
        kd = {"k": put(rand(15, (3, 3, 4, 8)) / 4, P(None, None, None, "data"))}
        conv_fsdp = lambda p, x: jax.lax.conv_general_dilated(
            x,
            p["k"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            out_sharding=P("data", None, None, None),
        )
        check(conv_fsdp, adapt(kd, conv_fsdp, xc), xc)
        # a grouped one is materialized (JAX doubles the kernel gradient of a grouped
        # conv with a split batch, which the rank-r conv would inherit), correctly
        grouped = lambda p, x: jax.lax.conv_general_dilated(
            x,
            p["k"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
            out_sharding=P("data", None, None, "model"),
        )
        kg = {"k": put(rand(12, (3, 3, 2, 8)) / 4, P(None, None, None, "model"))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the materialized use warns
            check(grouped, adapt(kg, grouped, xc), xc, status="materialized")

        # init under jit: the weight's layout is in its type, and the factors (and a
        # residual base) get the same layouts as eagerly (were replicated, and the
        # SVD of a split weight raised)
        wj = {"up": put(rand(16, (8, 16)), P("data", "model"))}
        for scheme in ("normal", "pissa"):
            make = lambda w: adapt(w, scheme=scheme)  # noqa: E731
            eager, traced = make(wj)["up"], jax.jit(make)(wj)["up"]
            for f in ("w", "a", "b"):
                e, t = getattr(eager, f), getattr(traced, f)
                assert e.sharding.spec == t.sharding.spec, (scheme, f, t.sharding)
                np.testing.assert_allclose(e, t, rtol=1e-5, atol=1e-6)
        assert eager.a.sharding.spec == P("data", None)

        # weight-aware schemes on a split weight: SVD/QR of the whole matrix, the
        # residual base keeps the weight's layout
        up = {"up": put(rand(10, (8, 16)), P(None, "model"))}
        for scheme in ("pissa", "olora"):
            node = adapt(up, scheme=scheme)["up"]
            assert node.w.sharding.spec == P(None, "model"), node.w.sharding
            merged = jaxlora.merge({"up": node})["up"]
            np.testing.assert_allclose(merged, up["up"], atol=1e-5)
            # made plain LoRA on the split original (its range finder's QR raised
            # on a split input), laid out like it, computing the same weight
            moved = {"up": node.replace(b=node.b + 0.1)}
            plain = jaxlora.to_plain_lora(moved, up)["up"]
            assert plain.w is up["up"] and plain.b.sharding.spec[-1] == "model"
            np.testing.assert_allclose(
                jaxlora.merge({"up": plain})["up"],
                jaxlora.merge(moved)["up"],
                atol=1e-5,
            )

        # EVA on batches split over 'data' captures the same inputs as unsplit ones
        dense = nn.Dense(4)
        xe = rand(11, (16, 8))
        pe = jax.tree.map(lambda t: put(t, P()), dense.init(jax.random.key(0), xe))
        with warnings.catch_warnings():  # one batch: EVA says it cannot converge
            warnings.filterwarnings("ignore", "jaxlora: EVA's components")
            eva = [
                jaxlora.adapters(
                    adapt(pe, scheme="eva", apply_fn=dense.apply, batches=[put(xe, s)])
                )["params/kernel"].a
                for s in (P(), P("data"))
            ]
        np.testing.assert_allclose(eva[0], eva[1], atol=1e-6)
    print("OK")
    """
)


def test_explicit_mesh_axes_run_factored_with_the_models_layouts():
    """With shardings in the types (explicit mesh axes): 3-D kernels, stacked
    weights, the model's own ``out_sharding``, ``auto_axes`` regions, batch-split
    lookups and convolutions run factored with the merged model's values, output
    layouts and factor gradients; PiSSA/OLoRA initialize split weights and EVA
    captures split batches."""
    run_on_four_devices(EXPLICIT_SCRIPT)


LAYOUT_SCRIPT = textwrap.dedent(
    """
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import jaxlora

    assert jax.device_count() == 4
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    # a stacked q projection (layers, embed, heads, head_dim) split two ways
    spec = P(None, "model", None, "data")
    w = np.random.default_rng(0).normal(size=(2, 8, 2, 4)).astype(np.float32)
    params = {
        "scale": jax.device_put(np.ones(8, np.float32), NamedSharding(mesh, P())),
        "q": jax.device_put(w, NamedSharding(mesh, spec)),
    }
    layouts = {"q": jaxlora.Layout(in_axes=(1,), out_axes=(2, 3), stack_axes=(0,))}

    def adapt(scheme, p=params):
        return jaxlora.init(
            p, jax.random.key(1), scheme=scheme, rank=2, targets=["q"], layouts=layouts
        )

    # a residual base keeps the weight's layout (was P(None, 'model'): replicated
    # over 'data'), the factors follow it, and to_plain_lora's factors too
    for scheme in ("pissa", "olora", "milora", "normal"):
        q = adapt(scheme)["q"]
        assert q.w.sharding == params["q"].sharding, (scheme, q.w.sharding)
        assert q.a.sharding.spec == P(None, "model"), (scheme, q.a.sharding)
        assert q.b.sharding.spec == P(None, None, None, "data"), (scheme, q.b.sharding)
        np.testing.assert_allclose(jaxlora.merge({"q": q})["q"], w, atol=1e-5)
    plain = jaxlora.to_plain_lora(adapt("pissa"), params)["q"]
    assert plain.a.sharding.spec == P(None, "model"), plain.a.sharding
    assert plain.b.sharding.spec == P(None, None, None, "data"), plain.b.sharding

    # a jitted training step returns every leaf in the layout it took, so its
    # second call reuses the first compilation (the factors' specs had a trailing
    # None, which the step's outputs drop: every run compiled twice)
    apply = jaxlora.lora_apply(
        lambda p, x: jnp.einsum("bd,ldhk->lbhk", x * p["scale"], p["q"])
    )
    tx = jaxlora.freeze_base(optax.adamw(1e-3))
    x = jax.device_put(np.ones((4, 8), np.float32), NamedSharding(mesh, P("data")))

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: jnp.sum(apply(q, x) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for scheme in ("normal", "pissa"):
        p = adapt(scheme)
        replicated = NamedSharding(mesh, P())  # optax's step count, committed
        s = jax.tree.map(
            lambda t: jax.device_put(t, replicated) if t.ndim == 0 else t, tx.init(p)
        )
        out = step(p, s)
        before = jax.tree_util.tree_flatten_with_path((p, s))[0]
        for (k, v0), v1 in zip(before, jax.tree.leaves(out), strict=True):
            assert v0.sharding == v1.sharding, (
                scheme, jax.tree_util.keystr(k), v0.sharding, v1.sharding
            )

    # init under jax.jit cannot see an Auto-axes layout: it says so once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(lambda p: adapt("normal", p))(params)
    said = [str(m.message) for m in caught]
    said = [m for m in said if "jaxlora.init runs under" in m]
    assert len(said) == 1 and "- q" in said[0] and "outside jax.jit" in said[0], said
    print("OK")
    """
)


def test_layouts_survive_residual_schemes_export_and_jitted_steps():
    """On an automatic-axes mesh: PiSSA/OLoRA/MiLoRA keep a split weight's layout
    for the residual base, `to_plain_lora` lays its factors out like the weight, a
    jitted step returns every leaf in the layout it took (one compilation), and
    `init` under ``jax.jit`` warns that it cannot see the weights' layouts."""
    run_on_four_devices(LAYOUT_SCRIPT)


MASKED_CAPTURE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jaxlora

    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 16)).astype(np.float32)
    x = rng.normal(size=(4, 6, 8)).astype(np.float32)
    m = (np.arange(6)[None] < np.array([6, 3, 2, 5])[:, None]).astype(np.float32)
    model = lambda p, b: jnp.tanh(b["x"] @ p["up"])
    def adapt(params, batch, scheme):
        return jaxlora.init(
            params, jax.random.key(2), scheme=scheme, rank=2, targets=["up"],
            apply_fn=model, batches=[batch], input_mask=lambda b: b["m"],
        )["up"]
    for scheme in ("eva", "corda"):
        want = adapt({"up": jnp.asarray(w)}, {"x": x, "m": m}, scheme)
        with jax.set_mesh(mesh):
            split = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
            params = {"up": jax.device_put(w, NamedSharding(mesh, P()))}
            got = adapt(params, {"x": split(x), "m": split(m)}, scheme)
        np.testing.assert_allclose(np.asarray(got.delta()), want.delta(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.w), want.w, atol=1e-5)
        assert scheme == "corda" or np.abs(np.asarray(got.a)).max() > 0.1
    print("OK")
    """
)


def test_masked_eva_and_corda_read_a_batch_split_over_an_explicit_mesh():
    """A batch and its input mask split on 'data' (Explicit axes) give what one
    device gives (the mask is gathered like the captured rows)."""
    run_on_four_devices(MASKED_CAPTURE_SCRIPT)
