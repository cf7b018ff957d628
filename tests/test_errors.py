"""Bad input is refused by name, with what was received and the fix; nothing is
silently ignored (a review of every public function's arguments)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora

PLAIN = {"d0": {"kernel": jnp.ones((6, 4))}, "d1": {"kernel": jnp.ones((4, 3))}}


def _adapted(scheme="normal"):
    return jaxlora.init(PLAIN, jax.random.key(0), rank=2, scheme=scheme)


def test_yes_no_flags_must_be_bools(tmp_path):
    """Flags were only tested for truthiness: ``overwrite="no"`` replaced a saved
    checkpoint, ``allow_residual="no"`` handed out a residual as the base."""
    lp = _adapted()
    jaxlora.save(tmp_path / "ck", lp)
    with pytest.raises(TypeError, match=r"overwrite must be True or False, got 'no'"):
        jaxlora.save(tmp_path / "ck", _adapted("he"), overwrite="no")
    with pytest.raises(TypeError, match=r"overwrite must be True or False"):
        jaxlora.save_peft(tmp_path / "p", lp, {"d0/kernel": "d0"}, overwrite=1)
    jaxlora.load(tmp_path / "ck", PLAIN)  # still the first checkpoint
    pissa = _adapted("pissa")
    with pytest.raises(TypeError, match=r"allow_residual must be True or False"):
        jaxlora.base(pissa, allow_residual="no")
    with pytest.raises(TypeError, match=r"allow_residual must be True or False"):
        jaxlora.combine(PLAIN, jaxlora.adapters(pissa), allow_residual="no")
    with pytest.raises(TypeError, match=r"factored must be True or False, got None"):
        jaxlora.lora_apply(lambda p, x: x, factored=None)
    for fn in (jaxlora.lora_apply, lambda f: jaxlora.explain(f, lp)):
        with pytest.raises(TypeError, match=r"apply_fn must be a function"):
            fn(3)


def test_options_a_scheme_does_not_use_and_batches_of_the_wrong_kind():
    """``niter`` with a Scheme object was dropped; one array given as ``batches``
    was read row by row as many one-row batches; a dict failed deep inside."""
    model = nn.Dense(3)
    x = jnp.ones((8, 4))
    params = model.init(jax.random.key(0), x)
    scheme = jaxlora.Scheme(jax.nn.initializers.normal(), jax.nn.initializers.zeros)
    with pytest.raises(ValueError, match=r"niter is only used by the named schemes"):
        jaxlora.init(params, jax.random.key(1), scheme=scheme, niter=3)
    for batches in (x, {"x": x}):
        with pytest.raises(TypeError, match=r"batches must be a list .*=\[batch\]"):
            jaxlora.init(
                params, jax.random.key(1), scheme="eva", apply_fn=model.apply,
                batches=batches,
            )  # fmt: skip
    with pytest.raises(TypeError, match=r"example_args must be a tuple .*=\(x,\)"):
        jaxlora.init(params, jax.random.key(1), apply_fn=model.apply, example_args=x)
    with pytest.raises(TypeError, match=r"example_kwargs must be a dict"):
        jaxlora.init(
            params, jax.random.key(1), apply_fn=model.apply, example_args=(x,),
            example_kwargs=[1],
        )  # fmt: skip


def test_nan_inputs_of_weight_and_data_aware_schemes_are_named():
    """PiSSA, EVA and LoRA-GA gave NaN factors for a NaN weight, batch or loss with
    no word (CorDA already refused)."""
    model = nn.Dense(6)
    x = jnp.ones((8, 4))
    params = model.init(jax.random.key(0), x)
    nan_w = jax.tree.map(lambda t: t.at[0].set(jnp.nan) if t.ndim == 2 else t, params)
    with pytest.raises(ValueError, match=r"'params/kernel': its weight holds NaN"):
        jaxlora.init(nan_w, jax.random.key(1), rank=2, scheme="pissa")
    with pytest.raises(ValueError, match=r"inputs of 'params/kernel' hold NaN"):
        jaxlora.init(
            params, jax.random.key(1), rank=2, scheme="eva", apply_fn=model.apply,
            batches=[x.at[0, 0].set(jnp.nan)] * 2,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"its gradient of loss_fn holds NaN"):
        jaxlora.init(
            params, jax.random.key(1), rank=2, scheme="lora_ga", batches=[x],
            loss_fn=lambda p, b: jnp.sum(model.apply(p, b)) * jnp.nan,
        )  # fmt: skip


def test_lora_ga_warns_where_the_gradient_is_zero():
    """A target the loss does not reach got arbitrary LoRA-GA directions and a
    rewritten base with no word; the other targets say nothing."""

    def loss(p, x):  # 'b' never reaches the loss
        return jnp.sum(jnp.tanh(x @ p["a"])) + 0.0 * jnp.sum(
            jax.lax.stop_gradient(p["b"])
        )

    params = {"a": jnp.ones((4, 6)) / 4, "b": jnp.ones((4, 6))}
    x = jax.random.normal(jax.random.key(0), (8, 4))
    with pytest.warns(
        UserWarning,
        match=r"with respect to 'b', averaged over the batches, is exactly zero",
    ) as got:
        jaxlora.init(
            params, jax.random.key(1), rank=2, scheme="lora_ga",
            targets=["a", "b"], batches=[x], loss_fn=loss,
        )  # fmt: skip
    assert not any("'a'" in str(w.message) for w in got), [str(w.message) for w in got]


def test_peft_names_combine_and_keys():
    """module_names of the wrong type failed with "'list' object is not callable";
    entries for paths params does not adapt were ignored; combine with no
    adapters returned the plain tree; a raw key of another PRNG implementation
    was refused without saying how to pass it."""
    lp = _adapted()
    for names in (["d0"], "d0", None):
        with pytest.raises(TypeError, match=r"module_names must be a function"):
            jaxlora.save_peft("/tmp/never-written", lp, names)
    names = {"d0/kernel": "d0", "d1/kernel": "d1", "d2/kernel": "d2"}
    with pytest.raises(ValueError, match=r"names 'd2/kernel', which params does not"):
        jaxlora.save_peft("/tmp/never-written", lp, names)
    with pytest.raises(ValueError, match=r"holds no adapters \(an empty mapping\)"):
        jaxlora.combine(PLAIN, {})
    with pytest.raises(TypeError, match=r"wrap_key_data\(key, impl=...\)"):
        jaxlora.init(PLAIN, jax.random.PRNGKey(0, impl="rbg"), rank=2)
    rbg = jaxlora.init(PLAIN, jax.random.key(0, impl="rbg"), rank=2)
    assert rbg["d0"]["kernel"].a.shape == (6, 2)


def test_nnx_helpers_check_their_arguments():
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"NnxOptimizer needs an optax transformation"):
        jaxlora.NnxOptimizer(model, optax.adam, wrt=nnx.Param)
    state = nnx.state(model)
    with pytest.raises(TypeError, match=r"nnx_named_sharding needs a jax.sharding"):
        jaxlora.nnx_named_sharding(state, None)
    mesh = jax.make_mesh((1,), ("d",))
    got = jaxlora.nnx_named_sharding(state, mesh)
    assert all(
        isinstance(s, jax.sharding.NamedSharding) for s in jax.tree.leaves(got)
    ), got
    assert np.shape(jax.tree.leaves(got)) == (len(jax.tree.leaves(state)),)


def test_jax_scalars_empty_trees_and_a_file_for_a_checkpoint(tmp_path):
    """rank=jnp.int32(2) was refused as "not an integer"; an empty tree got
    "Available paths: ."; load of a file said "no such directory"."""
    lp = jaxlora.init(PLAIN, jax.random.key(0), rank=jnp.int32(2), alpha=jnp.float32(4))
    spec = lp["d0"]["kernel"].spec
    assert (spec.rank, spec.alpha, type(spec.rank)) == (2, 4.0, int)
    for empty in ({}, None):
        with pytest.raises(ValueError, match=r"params holds no arrays"):
            jaxlora.init(empty, jax.random.key(0))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"a file, not a directory"):
        jaxlora.load(tmp_path / "file", PLAIN)


def test_eva_ignores_what_the_mask_leaves_out_even_nan():
    """A NaN in a masked-out row (a padded position after a -inf attention mask)
    made every factor NaN (0·NaN in the statistics): the rows the mask drops are
    dropped before any arithmetic, so the result is that of the clean rows."""
    params = {"W": {"kernel": jax.random.normal(jax.random.key(1), (6, 4))}}
    fn = lambda p, b: b["x"] @ p["W"]["kernel"]  # noqa: E731
    mask = jnp.ones((2, 5)).at[1, 3:].set(0)
    clean = [
        {"x": jax.random.normal(jax.random.key(10 + i), (2, 5, 6)), "m": mask}
        for i in range(3)
    ]
    dirty = [{**b, "x": b["x"].at[1, 3:].set(jnp.nan)} for b in clean]
    kw = {"scheme": "eva", "rank": 2, "apply_fn": fn, "input_mask": lambda b: b["m"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # three batches: not converged
        want = jaxlora.init(params, jax.random.key(0), batches=clean, **kw)
        got = jaxlora.init(params, jax.random.key(0), batches=dirty, **kw)
    np.testing.assert_array_equal(got["W"]["kernel"].a, want["W"]["kernel"].a)
    assert bool(jnp.isfinite(got["W"]["kernel"].a).all())


def test_an_empty_batch_is_no_news_for_eva_and_refused_by_corda():
    """A batch of zero rows made EVA call its target converged (estimates that did
    not change) and crashed CorDA on a zero-size max."""
    params = {"W": {"kernel": jax.random.normal(jax.random.key(1), (6, 4))}}
    fn = lambda p, x: x @ p["W"]["kernel"]  # noqa: E731
    xs = [jax.random.normal(jax.random.key(10 + i), (16, 6)) for i in range(3)]
    kw = {"rank": 2, "apply_fn": fn}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        want = jaxlora.init(params, jax.random.key(0), scheme="eva", batches=xs, **kw)
        got = jaxlora.init(
            params, jax.random.key(0), scheme="eva",
            batches=[xs[0], jnp.zeros((0, 6)), *xs[1:]], **kw,
        )  # fmt: skip
    np.testing.assert_array_equal(got["W"]["kernel"].a, want["W"]["kernel"].a)
    with pytest.raises(ValueError, match=r"in batch 1, 'W/kernel' get no input rows"):
        jaxlora.init(
            params, jax.random.key(0), scheme="corda",
            batches=[xs[0], jnp.zeros((0, 6))], **kw,
        )  # fmt: skip


def test_layout_axes_must_be_ints():
    """Layout("01", "2") read as (0, 1), (2,); 0.5 as 0; an int as a raw error."""
    for bad in (("01", "2"), ((0.5,), (1,)), (0, 1), ((0,), (1,), None)):
        with pytest.raises(TypeError, match=r"must be a tuple of axis indices"):
            jaxlora.Layout(*bad)
    got = jaxlora.Layout([np.int64(1)], (0,))
    assert got == jaxlora.Layout((1,), (0,)) and type(got.in_axes[0]) is int


def test_hand_built_specs_and_weights_are_checked():
    """A LoraSpec of rank 0, a NaN alpha, a float rank or an int flag used to be
    accepted; a LoraWeight whose factors are not of its spec's rank merged (and ran)
    with the wrong scale, silently."""
    lay = jaxlora.Layout.dense(2)
    for kw, error in [
        ({"rank": 0, "alpha": 1.0}, r"rank must be a positive int, got 0"),
        ({"rank": 2.0, "alpha": 1.0}, r"rank must be a positive int, got 2.0"),
        ({"rank": 2, "alpha": float("nan")}, r"alpha must be a finite number"),
        ({"rank": 2, "alpha": 1.0, "rslora": 1}, r"rslora must be a bool, got 1"),
    ]:
        with pytest.raises((ValueError, TypeError), match=error):
            jaxlora.LoraSpec(lay, **kw)
    with pytest.raises(TypeError, match=r"layout must be a jaxlora.Layout"):
        jaxlora.LoraSpec((0, 1), 2, 1.0)
    spec = jaxlora.LoraSpec(lay, 2, 4)
    assert (spec.alpha, type(spec.alpha)) == (4.0, float)
    w = jaxlora.LoraWeight(jnp.ones((4, 6)), jnp.ones((4, 3)), jnp.ones((3, 6)), spec)
    rank = r"factors a \(4, 3\) and b \(3, 6\) have rank 3 and 3, but its spec says"
    with pytest.raises(ValueError, match=rank):
        jaxlora.merge({"q": w})
    with pytest.raises(ValueError, match=rank):
        jaxlora.lora_apply(lambda p, x: x @ p["q"])({"q": w}, jnp.ones((2, 4)))


def test_pattern_dicts_wrt_filters_losses_and_sketch_keys_are_named():
    """rank_pattern as a list got "key must be a regex string, got ('d0', 3)";
    wrt='Param' got "wrt=Param leaves out ... held by Param variables"; wrt=3 got
    NNX's "Invalid format specifier"; a non-scalar LoRA-GA loss got JAX's
    gradient error; svd_lowrank(0, ...) got JAX's key-data error."""
    with pytest.raises(TypeError, match=r"rank_pattern must be a dict \{regex: value"):
        jaxlora.init(PLAIN, jax.random.key(0), rank=2, rank_pattern=[("d0", 3)])
    graphdef, state = nnx.split(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    model = nnx.merge(graphdef, jaxlora.init(state, jax.random.key(0), rank=2))
    tx = jaxlora.freeze_base(optax.adam(1e-3))
    with pytest.raises(
        ValueError, match=r"wrt='Param' .* a Variable's tag, not its type, e.g."
    ):
        jaxlora.NnxOptimizer(model, tx, wrt="Param")
    with pytest.raises(TypeError, match=r"wrt=3 is not an NNX filter"):
        jaxlora.NnxOptimizer(model, tx, wrt=3)
    for loss, got in [
        (lambda p, x: x @ p["d0"]["kernel"], r"shape \(3, 4\)"),
        (lambda p, x: (jnp.sum(x @ p["d0"]["kernel"]), {}), r"tuple"),
    ]:
        with pytest.raises(
            TypeError, match=r"must return a scalar; it returned " + got
        ):
            jaxlora.init(
                PLAIN, jax.random.key(0), rank=2, scheme="lora_ga",
                targets=["d0"], batches=[jnp.ones((3, 6))], loss_fn=loss,
            )  # fmt: skip
    with pytest.raises(TypeError, match=r"svd_lowrank's key must be a single JAX key"):
        jaxlora.svd_lowrank(0, jnp.ones((8, 6)), 2)


def test_nnx_optimizer_names_wrt_variables_without_gradients():
    """wrt=nnx.Variable also selects BatchNorm statistics, which nnx.grad does not
    differentiate: the first update failed with freeze_base's 'take gradients of
    the adapted tree, not of merge(params)', the wrong diagnosis."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.lin(x))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    model = nnx.merge(graphdef, jaxlora.init(state, jax.random.key(0), rank=2))
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    opt = jaxlora.NnxOptimizer(model, tx, wrt=nnx.Variable)
    apply = jaxlora.lora_apply(lambda m, x: m(x))
    grads = nnx.grad(lambda m: jnp.sum(apply(m, jnp.ones((4, 8))) ** 2))(model)
    with pytest.raises(ValueError, match=r"selects 'bn/mean', 'bn/var', which the"):
        opt.update(model, grads)
