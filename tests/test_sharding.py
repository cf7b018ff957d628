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

    # an adapter loaded onto sharded weights is laid out the same way
    with tempfile.TemporaryDirectory() as tmp:
        adapted = jaxlora.init(
            params, jax.random.key(2), scheme="he", rank=2, targets=["up", "down"]
        )
        jaxlora.save(tmp + "/adapter", adapted)
        back = jaxlora.load(tmp + "/adapter", params)["params"]
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
    print("OK")
    """
)


def test_sharded_weights_and_constraints_run_factored_on_a_mesh():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), (
        run.stdout[-3000:] + run.stderr[-3000:]
    )
