"""Several JAX processes (multi-host, as on a TPU slice): two processes on this
machine, joined by `jax.distributed` with two CPU devices each, train an adapter of
weights split over all four devices, then save it, load it and export it for PEFT;
EVA and CorDA read inputs split over both (with and without ``input_mask``).
The files they write are then read by this (single-process) test and compared with
the same training run on one device.
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora

WORKER = textwrap.dedent(
    """
    import os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2])
    )
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[4])
    import test_multihost as t
    import jaxlora

    out = sys.argv[3]
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"up": P("data", "model"), "down": P("model", "data")}
    host = t.weights()
    params = {
        k: jax.make_array_from_callback(
            v.shape, NamedSharding(mesh, specs[k]), lambda i, v=v: v[i]
        )
        for k, v in host.items()
    }
    x = jax.make_array_from_callback(
        t.X.shape, NamedSharding(mesh, P("data")), lambda i: t.X[i]
    )
    for scheme in t.SCHEMES:
        lp = t.adapt(params, scheme)
        for k in specs:  # each factor split like its weight's matching axis
            assert not lp[k].a.is_fully_addressable, (scheme, k)
            assert lp[k].w.sharding == params[k].sharding, (scheme, k, lp[k].w)
        assert lp["up"].b.sharding.spec == P(None, "model"), lp["up"].b.sharding
        trained, losses = t.train(lp, x)
        jaxlora.save(f"{out}/{scheme}", trained)
        back = jaxlora.load(f"{out}/{scheme}", lp)  # the residual tree for PiSSA
        for k in specs:
            for f in ("a", "b"):
                same = jax.jit(lambda u, v: (u == v).all())(
                    getattr(back[k], f), getattr(trained[k], f)
                )
                assert bool(same), (scheme, k, f)
        plain = trained
        if scheme != "normal":
            plain = jaxlora.to_plain_lora(trained, params)
        jaxlora.save_peft(f"{out}/peft-{scheme}", plain, {"up": "up", "down": "down"})
        if jax.process_index() == 0:
            np.save(f"{out}/{scheme}-losses.npy", np.asarray(losses))
    # EVA runs its collectives target by target: in the same order on both
    # processes, whose PYTHONHASHSEEDs differ (a set's order did not: they hung)
    eva = t.adapt_eva(params, x)
    jaxlora.save(f"{out}/eva", eva)
    # CorDA's covariances of inputs split over the processes (its residual differs
    # from one device's by rounding, so it is compared as arrays, not loaded)
    from jax.experimental import multihost_utils

    xc = jax.make_array_from_callback(
        t.XC.shape, NamedSharding(mesh, P("data")), lambda i: t.XC[i]
    )
    corda = t.adapt_eva(params, xc, scheme="corda")
    whole = {
        f"{k}.{f}": multihost_utils.process_allgather(getattr(corda[k], f), tiled=True)
        for k in specs
        for f in ("w", "a", "b")
    }
    if jax.process_index() == 0:
        np.savez(f"{out}/corda.npz", **whole)
    # input_mask on batches split over the processes: padded rows interleaved, so
    # each process holds kept and masked rows; the mask is split like the batch
    for scheme, rows in (("eva", t.X), ("corda", t.XC)):
        padded, keep = t.pad(rows)
        batch = {
            k: jax.make_array_from_callback(
                v.shape, NamedSharding(mesh, P("data")), lambda i, v=v: v[i]
            )
            for k, v in (("x", padded), ("m", keep))
        }
        masked = t.adapt_eva(params, batch, scheme, masked=True)
        whole = {
            f"{k}.{f}": multihost_utils.process_allgather(
                getattr(masked[k], f), tiled=True
            )
            for k in specs
            for f in ("w", "a", "b")
        }
        if jax.process_index() == 0:
            np.savez(f"{out}/{scheme}-masked.npz", **whole)

    # a failure on the first process only (the parent is a file) raises on both
    try:
        jaxlora.save(f"{out}/a-file/adapter", trained)
    except OSError as e:  # the first process's own error, the other's account of it
        assert "a-file" in str(e), e
    else:
        raise AssertionError("saved under a file")
    # a write failing on the first process only (a full disk) raises on both, and
    # leaves nothing behind
    from jaxlora import _checkpoint

    def full_disk(file, data):
        raise OSError(28, "No space left on device (simulated)")

    written = _checkpoint.write_synced
    if jax.process_index() == 0:
        _checkpoint.write_synced = full_disk
    try:
        jaxlora.save(f"{out}/full-disk", trained)
    except OSError as e:
        assert jax.process_index() == 0 and "No space" in str(e), e
    except RuntimeError as e:
        assert jax.process_index() == 1 and "another JAX process" in str(e), e
    else:
        raise AssertionError("a failed write saved")
    finally:
        _checkpoint.write_synced = written
    if jax.process_index() == 0:
        assert not [n for n in os.listdir(out) if "full-disk" in n], os.listdir(out)
    # factors each process holds on its own devices: a clear refusal on both
    local = {"up": jax.numpy.asarray(host["up"])}
    local = jaxlora.init(local, jax.random.key(0), rank=2, targets=["up"])
    try:
        jaxlora.save(f"{out}/local", local)
    except ValueError as e:
        assert "with 2 JAX processes" in str(e) and "'up'" in str(e), e
    else:
        raise AssertionError("saved process-local factors")
    print("OK", jax.process_index())
    """
)

SCHEMES = ("normal", "pissa")
X = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
XC = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)  # CorDA's


def weights():
    rng = np.random.default_rng(0)
    return {
        "up": rng.normal(size=(16, 32)).astype(np.float32),
        "down": rng.normal(size=(32, 16)).astype(np.float32) / 4,
    }


def adapt(params, scheme):
    return jaxlora.init(
        params, jax.random.key(2), scheme=scheme, rank=2, targets=["up", "down"]
    )


def adapt_eva(params, x, scheme="eva", *, masked=False):
    """EVA (or another input-reading scheme) on two batches, ``x`` and ``-x``; with
    ``masked``, ``x`` is ``{"x": rows, "m": mask}`` and ``input_mask`` reads ``m``."""
    neg = {"x": -x["x"], "m": x["m"]} if masked else -x
    return jaxlora.init(
        params,
        jax.random.key(2),
        scheme=scheme,
        rank=2,
        targets=["up", "down"],
        apply_fn=(lambda p, b: model(p, b["x"])) if masked else model,
        batches=[x, neg],
        input_mask=(lambda b: b["m"]) if masked else None,
    )


def pad(rows):
    """``rows`` with a large garbage row after each one, and the mask that keeps
    the originals: ``(padded, mask)``."""
    junk = 50 * np.random.default_rng(3).normal(size=rows.shape).astype(np.float32)
    padded = np.stack([rows, junk], axis=1).reshape(-1, rows.shape[1])
    return padded, np.tile(np.array([1, 0], np.int32), len(rows))


def model(p, x):
    return jnp.tanh(x @ p["up"]) @ p["down"]


def train(lp, x):
    """Three Adam steps on the factors; the adapted tree and the losses."""
    apply = jaxlora.lora_apply(model)
    tx = jaxlora.freeze_base(optax.adam(1e-2))

    @jax.jit
    def step(p, s, x):
        loss, g = jax.value_and_grad(lambda q: jnp.sum(apply(q, x) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    s, losses = tx.init(lp), []
    for _ in range(3):
        lp, s, loss = step(lp, s, x)
        losses.append(float(loss))
    return lp, losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_save_load_and_export_what_one_device_does(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    here = os.path.dirname(os.path.abspath(__file__))
    port = str(free_port())
    (tmp_path / "a-file").write_text("not a directory")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, port, str(i), str(tmp_path), here],
            env={**env, "PYTHONHASHSEED": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the two processes did not finish in 240 s (a collective hung)")
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-4000:]

    # the same run on one device, from the same numbers
    params = {k: jnp.asarray(v) for k, v in weights().items()}
    for scheme in SCHEMES:
        lp = adapt(params, scheme)
        want, losses = train(lp, jnp.asarray(X))
        np.testing.assert_allclose(
            np.load(tmp_path / f"{scheme}-losses.npy"), losses, rtol=1e-5
        )
        # written by two processes, read by one (onto the residual tree for PiSSA,
        # whose checksums of the split residual agree with this one's)
        got = jaxlora.load(str(tmp_path / scheme), lp)
        peft_got = jaxlora.load_peft(
            tmp_path / f"peft-{scheme}",
            lp if scheme == "normal" else jaxlora.to_plain_lora(lp, params),
            {"up": "up", "down": "down"},
        )
        plain_want = want if scheme == "normal" else jaxlora.to_plain_lora(want, params)
        for k in ("up", "down"):
            for f in ("a", "b"):
                np.testing.assert_allclose(
                    getattr(got[k], f), getattr(want[k], f), rtol=1e-4, atol=1e-6
                )
                np.testing.assert_allclose(
                    getattr(peft_got[k], f),
                    getattr(plain_want[k], f),
                    rtol=1e-4,
                    atol=1e-6,
                )
    eva_got = jaxlora.load(str(tmp_path / "eva"), params)
    eva_want = adapt_eva(params, jnp.asarray(X))
    for k in ("up", "down"):
        assert eva_got[k].spec == eva_want[k].spec, (eva_got[k], eva_want[k])
        np.testing.assert_allclose(eva_got[k].a, eva_want[k].a, rtol=1e-4, atol=1e-5)
    corda_want = adapt_eva(params, jnp.asarray(XC), scheme="corda")
    corda_got = np.load(tmp_path / "corda.npz")
    for k in ("up", "down"):
        want = corda_want[k]
        np.testing.assert_allclose(corda_got[f"{k}.w"], want.w, rtol=1e-4, atol=1e-5)
        delta = want.scale * corda_got[f"{k}.a"] @ corda_got[f"{k}.b"]
        np.testing.assert_allclose(delta, want.delta(), rtol=1e-4, atol=1e-5)
    # masked padded batches on two processes = the unpadded rows on one device
    for scheme, rows in (("eva", X), ("corda", XC)):
        want = adapt_eva(params, jnp.asarray(rows), scheme=scheme)
        got = np.load(tmp_path / f"{scheme}-masked.npz")
        for k in ("up", "down"):
            np.testing.assert_allclose(got[f"{k}.w"], want[k].w, rtol=1e-4, atol=1e-5)
            if scheme == "eva":  # b = 0: the components, up to sign
                got_a, want_a = np.abs(got[f"{k}.a"]), np.abs(want[k].a)
                np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-5)
            else:
                delta = want[k].scale * got[f"{k}.a"] @ got[f"{k}.b"]
                np.testing.assert_allclose(delta, want[k].delta(), rtol=1e-4, atol=1e-5)
