"""Targeting, patterns, metadata and every error `jaxlora.init` raises."""

import dataclasses
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYOUTS
from conftest import StackedCnn
from conftest import all_weights
from flax import nnx

import jaxlora

KEY = jax.random.key(0)


def adapted_paths(p):
    return sorted(jaxlora.adapters(p))


def test_default_targets_every_kernel_but_not_embeddings(mixed):
    _, variables, _, _ = mixed
    p = jaxlora.init(variables, KEY, rank=2)
    assert adapted_paths(p) == [
        "params/attn/key/kernel",
        "params/attn/out/kernel",
        "params/attn/query/kernel",
        "params/attn/value/kernel",
        "params/conv/kernel",
        "params/einsum/kernel",
        "params/mlp/kernel",
    ]
    assert p["params"]["conv"]["kernel"].a.shape == (3, 3, 3, 2)  # (*window, in, r)
    assert p["params"]["attn"]["query"]["kernel"].b.shape == (
        2,
        4,
        8,
    )  # (r, heads, dim)


def test_targets_by_name_regex_and_predicate(mixed):
    _, variables, _, _ = mixed
    by_name = jaxlora.init(variables, KEY, targets=["query", "value"], rank=2)
    assert adapted_paths(by_name) == [
        "params/attn/query/kernel",
        "params/attn/value/kernel",
    ]
    by_regex = jaxlora.init(
        variables, KEY, targets=r".*attn/(query|key)/kernel", rank=2
    )
    assert adapted_paths(by_regex) == [
        "params/attn/key/kernel",
        "params/attn/query/kernel",
    ]
    by_pred = jaxlora.init(variables, KEY, targets=all_weights, rank=2, layouts=LAYOUTS)
    assert "params/embed/embedding" in adapted_paths(by_pred)
    assert by_pred["params"]["embed"]["embedding"].spec.embedding


def test_rank_and_alpha_patterns(mixed):
    _, variables, _, _ = mixed
    p = jaxlora.init(
        variables,
        KEY,
        rank=4,
        alpha=8,
        rank_pattern={"query": 2, "mlp": 8},
        alpha_pattern={"value": 1.0},
    )["params"]
    assert p["attn"]["query"]["kernel"].rank == 2
    assert p["mlp"]["kernel"].rank == 8
    assert p["attn"]["key"]["kernel"].rank == 4
    assert p["attn"]["query"]["kernel"].scale == 8 / 2
    assert p["attn"]["value"]["kernel"].scale == 1.0 / 4


def test_alpha_defaults_to_rank_and_rslora_scale():
    tree = {"kernel": jnp.zeros((64, 64))}
    assert jaxlora.init(tree, KEY, rank=16)["kernel"].scale == 1.0
    assert jaxlora.init(tree, KEY, rank=16, alpha=32)["kernel"].scale == 2.0
    rs = jaxlora.init(tree, KEY, rank=16, alpha=32, rslora=True)["kernel"]
    assert rs.scale == 32 / 4


def test_init_is_pure(mixed):
    _, variables, _, _ = mixed
    before = jax.tree.map(np.asarray, variables)
    jaxlora.init(variables, KEY, compensate=True, scheme="both_random")
    jax.tree.map(
        np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables)
    )


def test_paths_whose_31_bit_hashes_collide_get_different_factors():
    """Each target's key came from crc32(path) & 0x7FFFFFFF; these two paths share
    that value, so same-shape targets got bitwise equal factors."""
    import zlib

    paths = ["params/decoder/layers_290/attn/q_proj/kernel", "layer_16/mlp/fc1/kernel"]
    hashes = {zlib.crc32(p.encode()) & 0x7FFFFFFF for p in paths}
    assert len(hashes) == 1
    tree = {}
    for path in paths:
        *mods, leaf = path.split("/")
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = jnp.ones((6, 6))
    adapted = jaxlora.init(tree, KEY, rank=2, scheme="both_random")
    x, y = jaxlora.adapters(adapted).values()
    assert not np.array_equal(x.a, y.a) and not np.array_equal(x.b, y.b)
    # every other path keeps the key checkpoints were made with (a residual base
    # re-created by init must be the one saved)
    from jaxlora._init import path_keys

    keys = path_keys(KEY, [*paths, "params/Dense_0/kernel"])
    want = jax.random.fold_in(KEY, zlib.crc32(b"params/Dense_0/kernel") & 0x7FFFFFFF)
    got = keys["params/Dense_0/kernel"]
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))


def test_nnx_state_and_its_pure_dict_give_the_same_adapters():
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1))
    )
    _, state = nnx.split(model)
    from_state = jaxlora.adapters(jaxlora.init(state, KEY, scheme="he", rank=2))
    from_dict = jaxlora.adapters(
        jaxlora.init(nnx.to_pure_dict(state), KEY, scheme="he", rank=2)
    )
    assert (
        sorted(from_state)
        == sorted(from_dict)
        == ["layers/0/kernel", "layers/1/kernel"]
    )
    for k in from_state:
        np.testing.assert_array_equal(from_state[k].a, from_dict[k].a)


# ---- errors: each names the path, what was received and the fix ----------------------


def test_unknown_scheme_lists_available():
    with pytest.raises(
        ValueError, match=r"Unknown LoRA scheme 'lora_fa'.*normal.*orthogonal"
    ):
        jaxlora.init({"kernel": jnp.zeros((4, 4))}, KEY, scheme="lora_fa")
    with pytest.raises(TypeError, match=r"scheme must be a name or a jaxlora.Scheme"):
        jaxlora.init({"kernel": jnp.zeros((4, 4))}, KEY, scheme=3)


def test_rank_below_one():
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
        jaxlora.init({"kernel": jnp.zeros((4, 4))}, KEY, rank=0)
    with pytest.raises(ValueError, match=r"'k/kernel': rank 0 is outside"):
        jaxlora.init({"k": {"kernel": jnp.zeros((4, 4))}}, KEY, rank_pattern={"k": 0})


def test_rank_above_min_fan_lists_every_bad_target():
    tree = {
        "small": {"kernel": jnp.zeros((4, 64))},
        "tiny": {"kernel": jnp.zeros((64, 2))},
        "ok": {"kernel": jnp.zeros((64, 64))},
    }
    with pytest.raises(ValueError) as err:
        jaxlora.init(tree, KEY, rank=8)
    msg = str(err.value)
    assert "'small/kernel': rank 8 is outside [1, min(fan_in, fan_out)] = [1, 4]" in msg
    assert "'tiny/kernel': rank 8" in msg and "fan_out=2" in msg
    assert "'ok/kernel'" not in msg
    assert "rank_pattern" in msg  # the fix


def test_rank_and_alpha_values_are_checked_per_target():
    tree = {"a": {"kernel": jnp.zeros((8, 8))}, "b": {"kernel": jnp.zeros((8, 8))}}
    with pytest.raises(ValueError) as err:
        jaxlora.init(tree, KEY, rank=2, rank_pattern={"a": 2.7, "b": "3"})
    msg = str(err.value)
    assert "'a/kernel': rank_pattern gives rank 2.7 of type float" in msg
    assert "'b/kernel': rank_pattern gives rank '3' of type str" in msg
    assert "a rank is an integer" in msg and "rank_pattern=" in msg
    with pytest.raises(ValueError) as err:
        jaxlora.init(tree, KEY, rank=2, alpha_pattern={"a": "16", "b": float("inf")})
    msg = str(err.value)
    assert (
        "'a/kernel': alpha_pattern gives an alpha that must be a number, got '16'"
        in msg
    )
    assert (
        "'b/kernel': alpha_pattern gives an alpha that must be finite, got inf" in msg
    )
    assert "alpha_pattern=" in msg
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got True"):
        jaxlora.init(tree, KEY, rank=True)
    with pytest.raises(ValueError, match=r"alpha must be a number, got '16'"):
        jaxlora.init(tree, KEY, rank=2, alpha="16")
    with pytest.raises(ValueError, match=r"alpha must be finite, got nan"):
        jaxlora.init(tree, KEY, rank=2, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"alpha must not be 0: .* zero gradients"):
        jaxlora.init(tree, KEY, rank=2, alpha=0)
    # numpy scalars (e.g. from a config file) are fine
    p = jaxlora.init(tree, KEY, rank=np.int64(2), rank_pattern={"a": np.int32(4)})
    assert (p["a"]["kernel"].rank, p["b"]["kernel"].rank) == (4, 2)
    assert type(p["a"]["kernel"].rank) is int


def test_factor_dtype_and_rng_are_checked():
    tree = {"kernel": jnp.zeros((8, 8))}
    for scheme in ("normal", "pissa"):
        with pytest.raises(
            ValueError, match=r"dtype .* must be floating, got int32. Pass e.g."
        ):
            jaxlora.init(tree, KEY, rank=2, scheme=scheme, dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"rng must be a single JAX key, got int 0\."):
        jaxlora.init(tree, 0, rank=2)
    with pytest.raises(
        TypeError, match=r"got PRNGKeyArray of dtype key<fry> and shape \(2,\)"
    ):
        jaxlora.init(tree, jax.random.split(KEY), rank=2)
    legacy = jaxlora.init(tree, jax.random.PRNGKey(0), rank=2)
    assert legacy["kernel"].a.shape == (8, 2)


def test_apply_fn_and_example_inputs_go_together(mixed):
    model, variables, tokens, image = mixed
    with pytest.raises(
        ValueError,
        match=r"apply_fn is used with scheme 'normal' only to infer .*"
        r"pass example_args=\(x, \.\.\.\)",
    ):
        jaxlora.init(variables, KEY, rank=2, apply_fn=model.apply)
    for kw in ({"example_args": (tokens, image)}, {"example_kwargs": {"x": 1}}):
        with pytest.raises(
            ValueError,
            match=r"example_args/example_kwargs are only used with apply_fn=",
        ):
            jaxlora.init(variables, KEY, rank=2, **kw)
    # keyword-only example inputs are traced too: a DenseGeneral contracting two
    # axes gets two input axes (the default layout would have one)
    proj = nn.DenseGeneral(4, axis=(-2, -1), name="proj")
    x = jnp.ones((2, 3, 5))
    plain = proj.init(KEY, x)
    assert jaxlora.init(plain, KEY, rank=2)["params"]["kernel"].layout.in_axes == (0,)
    by_kw = jaxlora.init(
        plain,
        KEY,
        rank=2,
        apply_fn=lambda p, *, x: proj.apply(p, x),
        example_kwargs={"x": x},
    )
    assert by_kw["params"]["kernel"].layout == jaxlora.Layout.dense(3, n_in=2)


def test_targets_matching_nothing():
    tree = {"Dense_0": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(
        ValueError, match=r"names \['q_proj'\] match no parameter.*'Dense_0/kernel'"
    ):
        jaxlora.init(tree, KEY, targets=["q_proj", "Dense_0"], rank=2)
    with pytest.raises(
        ValueError, match=r"targets='.*q_proj.*' .*matched no parameter.*Dense_0/kernel"
    ):
        jaxlora.init(tree, KEY, targets=".*q_proj.*", rank=2)
    with pytest.raises(  # a module name as a string: a whole-path regex
        ValueError, match=r"'Dense_0' is a module name.*targets=\['Dense_0'\]"
    ):
        jaxlora.init(tree, KEY, targets="Dense_0", rank=2)
    with pytest.raises(ValueError, match=r"predicate .*matched no parameter"):
        jaxlora.init(tree, KEY, targets=lambda p, x: False, rank=2)
    with pytest.raises(ValueError, match=r"default targets .*matched no parameter"):
        jaxlora.init({"w": jnp.zeros((4, 4))}, KEY, rank=2)


def test_patterns_matching_nothing():
    tree = {"Dense_0": {"kernel": jnp.zeros((4, 4))}}
    with pytest.raises(
        ValueError, match=r"rank_pattern keys \['q_proj'\] match no LoRA target"
    ):
        jaxlora.init(tree, KEY, rank=2, rank_pattern={"q_proj": 1})
    with pytest.raises(
        ValueError, match=r"alpha_pattern keys \['v'\] match no LoRA target"
    ):
        jaxlora.init(tree, KEY, rank=2, alpha_pattern={"v": 1.0})
    with pytest.raises(
        ValueError, match=r"layouts keys \['conv'\] match no LoRA target"
    ):
        jaxlora.init(tree, KEY, rank=2, layouts={"conv": "conv"})


def test_non_floating_and_1d_targets_are_collected():
    tree = {
        "Dense_0": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
        "ids": {"kernel": jnp.zeros((4, 4), jnp.int32)},
    }
    with pytest.raises(ValueError) as err:
        jaxlora.init(tree, KEY, targets=r"(Dense_0/.*|ids/kernel)", rank=2)
    msg = str(err.value)
    assert (
        "'Dense_0/bias': expected a floating kernel with ndim >= 2, got shape (4,)"
        in msg
    )
    assert (
        "'ids/kernel': expected a floating kernel with ndim >= 2, "
        "got shape (4, 4) of int32" in msg
    )
    assert "exclude them with targets=" in msg


def test_two_leaves_with_the_same_path_are_refused():
    tree = {
        "a/b": {"kernel": jnp.ones((4, 3))},
        "a": {"b": {"kernel": jnp.ones((5, 3))}},
    }
    with pytest.raises(
        ValueError, match=r"Several parameters share the path 'a/b/kernel'.*Rename"
    ):
        jaxlora.init(tree, KEY, rank=2)


def test_already_adapted_tree():
    p = jaxlora.init({"kernel": jnp.zeros((4, 4))}, KEY, rank=2)
    with pytest.raises(
        ValueError, match=r"already holds LoRA adapters at 'kernel'.*jaxlora.base"
    ):
        jaxlora.init(p, KEY, rank=2)


def test_bad_layout_and_embedding_values():
    tree = {"kernel": jnp.zeros((4, 4, 4))}
    with pytest.raises(
        ValueError, match=r"names 2 axes but the weight has shape \(4, 4, 4\)"
    ):
        jaxlora.init(tree, KEY, rank=2, layouts={"kernel": jaxlora.Layout.dense(2)})
    with pytest.raises(
        ValueError, match=r"must be a jaxlora.Layout, 'dense' or 'conv'; got 'bogus'"
    ):
        jaxlora.init(tree, KEY, rank=2, layouts={"kernel": "bogus"})
    with pytest.raises(ValueError, match=r"embedding must be 'scheme' or 'peft'"):
        jaxlora.init(tree, KEY, rank=2, embedding="lora")
    with pytest.raises(
        ValueError, match=re.escape("must name each axis 0..2 exactly once")
    ):
        jaxlora.Layout(in_axes=(0,), out_axes=(0, 1))


def test_model_apply_on_adapted_tree_fails_loudly(mixed):
    model, variables, tokens, image = mixed
    p = jaxlora.init(variables, KEY, rank=2)
    with pytest.raises(
        TypeError, match=r"LoraWeight .* was used as an array.*lora_apply"
    ):
        model.apply(p, tokens, image)
    with pytest.raises(TypeError, match=r"jaxlora.merge\(params\)"):
        jax.jit(model.apply)(p, tokens, image)


def test_nnx_model_holding_adapters_fails_loudly():
    """An NNX layer reads its kernel as ``self.kernel[...]``: called directly, or
    captured by a closure inside lora_apply, the model says what to do."""
    graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    model = nnx.merge(graphdef, jaxlora.init(state, KEY, rank=2))
    x = jnp.ones((2, 4))
    with pytest.raises(TypeError, match=r"was used as an array.*lora_apply"):
        model(x)
    with pytest.raises(TypeError, match=r"rather than capturing it in a closure"):
        jaxlora.lora_apply(lambda x: model(x))(x)


def _mlp_params():
    return {
        f"layers_{i}": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}
        for i in range(3)
    }


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"targets": "*/kernel"}, r"targets '\*/kernel' is not a valid regular"),
        ({"rank_pattern": {"layers_[": 4}}, r"rank_pattern key 'layers_\[' is not a"),
        ({"layouts": {"*kernel": "dense"}}, r"layouts key '\*kernel' is not a valid"),
        (
            {"rank_pattern": {"layers_.": 4, "layers_2": 8}},
            r"rank_pattern keys \['layers_2'\] are never used: every target they match",
        ),
        ({"alpha": -16}, r"alpha must be > 0, got -16"),
        ({"alpha_pattern": {"layers_1": -2.0}}, r"must be > 0, got -2.0"),
        ({"dtype": "foo"}, r"dtype is the dtype of the LoRA factors, got 'foo'"),
        ({"dtype": None}, r"dtype is the dtype of the LoRA factors, got None"),
        ({"dtype": jnp.float64}, r"dtype=float64 .* 64-bit types are off in JAX"),
        ({"dtype": float}, r"dtype=float64 .*'jax_enable_x64'"),
        ({"alpha": 10**400}, r"alpha must be finite, got 1000"),
    ],
)
def test_bad_patterns_and_values_are_named(kw, match):
    """A glob or broken regex used to raise a bare re.error, a key shadowed by an
    earlier one was silently unused, a negative alpha silently flipped the update."""
    with pytest.raises(ValueError, match=match):
        jaxlora.init(_mlp_params(), KEY, rank=2, **kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            {"targets": ["layers_0", 1]},
            r"targets names must be strings .* got 1 \(int\)",
        ),
        ({"targets": [None]}, r"targets names must be strings .* got None"),
        ({"targets": b"layers_0"}, r"targets takes module names .* got bytes"),
    ],
)
def test_target_names_must_be_strings(kw, match):
    """A non-string name used to raise a bare 'can only concatenate str' from the
    matcher; bytes were read as a sequence of ints."""
    with pytest.raises(TypeError, match=match):
        jaxlora.init(_mlp_params(), KEY, rank=2, **kw)


def test_quantized_kernels_are_named_when_nothing_is_targeted():
    tree = {"d1": {"kernel": jnp.ones((4, 4), jnp.int8)}}
    with pytest.raises(
        ValueError,
        match=r"not floating \(quantized\) are not adapted: 'd1/kernel \(int8\)'",
    ):
        jaxlora.init(tree, KEY, rank=2)


def test_numpy_integers_are_integers():
    tree = {"d": {"kernel": jax.random.normal(KEY, (8, 6))}}
    got = jaxlora.init(tree, KEY, rank=2, scheme="pissa", niter=np.int64(2))
    want = jaxlora.init(tree, KEY, rank=2, scheme="pissa", niter=2)
    chex.assert_trees_all_equal(got, want)
    u, s, vt = jaxlora.svd_lowrank(
        KEY, tree["d"]["kernel"], np.int32(2), niter=np.int64(1)
    )
    assert u.shape == (8, 2) and s.shape == (2,) and vt.shape == (2, 6)


@pytest.mark.parametrize("flag", ["rslora", "compensate"])
def test_flags_must_be_booleans(flag):
    """``rslora='no'`` used to turn rsLoRA on (and was saved in checkpoints)."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        jaxlora.init(_mlp_params(), KEY, rank=2, **{flag: "no"})


def test_a_custom_initializer_must_return_what_it_is_asked_for():
    """A transposed ``(r, fan_in)`` result used to be reshaped into ``(fan_in, r)``
    (a scrambled factor), and an ignored ``dtype`` gave float32 factors for bf16."""
    normal = jax.nn.initializers.normal(0.02)
    transposed = jaxlora.Scheme(
        lambda k, s, d: normal(k, s[::-1], d), jax.nn.initializers.zeros, "t"
    )
    with pytest.raises(
        ValueError, match=r"a_init was asked for shape \(8, 2\) and dtype"
    ):
        jaxlora.init(_mlp_params(), KEY, scheme=transposed, rank=2)
    f32 = jaxlora.Scheme(lambda k, s, d: normal(k, s), jax.nn.initializers.zeros, "f")
    with pytest.raises(ValueError, match=r"returned shape \(8, 2\) and dtype float32"):
        jaxlora.init(_mlp_params(), KEY, scheme=f32, rank=2, dtype=jnp.bfloat16)


def test_a_custom_initializer_need_not_be_hashable():
    """An initializer that is an ordinary (unhashable) dataclass instance used to
    fail inside jit with "Non-hashable static arguments"."""

    @dataclasses.dataclass
    class Scaled:
        std: float

        def __call__(self, key, shape, dtype):
            return self.std * jax.random.normal(key, shape, dtype)

    scheme = jaxlora.Scheme(Scaled(0.5), jax.nn.initializers.zeros, "scaled")
    from jaxlora import _init

    before = _init._draw._cache_size()
    one = jaxlora.init(_mlp_params(), KEY, scheme=scheme, rank=2)
    assert _init._draw._cache_size() == before + 1  # three targets, one compilation
    two = jaxlora.init(_mlp_params(), KEY, scheme=scheme, rank=2)
    a = one["layers_0"]["kernel"].a
    assert float(jnp.std(a)) > 0.2 and bool((a == two["layers_0"]["kernel"].a).all())


def test_a_small_first_axis_taken_as_input_by_default_is_named():
    """``nn.scan``-stacked ``(L, in, out)`` kernels adapted without ``apply_fn`` got
    the default "first axis is input" layout silently (``a`` (L, r), ``b`` (r, in,
    out)), and a rank above L blamed only the rank."""
    stacked = {"layers": {"kernel": jnp.ones((4, 16, 16))}}
    with pytest.warns(UserWarning, match=r"'layers/kernel' \(4, 16, 16\): Layout\("):
        jaxlora.init(stacked, KEY, rank=2)
    with pytest.raises(ValueError, match=r"pass apply_fn= and example_args= to infer"):
        jaxlora.init(stacked, KEY, rank=8)
    with warnings.catch_warnings():  # a DenseGeneral (embed, heads, head_dim) kernel
        warnings.simplefilter("error")
        jaxlora.init({"q": {"kernel": jnp.ones((32, 4, 8))}}, KEY, rank=2)


def test_a_stacked_conv_kernel_under_the_default_layout_is_warned_of():
    """Without the model, a conv kernel stacked by ``nn.scan`` looks like a 3-D
    conv: its layer axis a window axis, one b for all layers. Said, and fixed by
    inference; a 2-D conv's square window is not warned of."""
    x = jnp.ones((1, 5, 5, 4))
    params = StackedCnn().init(KEY, x)
    with pytest.warns(
        UserWarning, match=r"'params/blocks/conv/kernel' \(3, 3, 3, 4, 4\)"
    ):
        guessed = jaxlora.init(params, KEY, rank=2)
    assert guessed["params"]["blocks"]["conv"]["kernel"].b.shape == (2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp = jaxlora.init(
            params, KEY, rank=2, apply_fn=StackedCnn().apply, example_args=(x,)
        )
        jaxlora.init(nn.Conv(4, (3, 3)).init(KEY, x), KEY, rank=2)
        for window in ((1, 3), (3, 3, 3)):  # a plain conv's bias is 1-D: no stack
            x_ = jnp.ones((1, *(5,) * len(window), 4))
            conv = nn.Conv(4, window).init(KEY, x_)["params"]
            jaxlora.init({"params": {"conv": conv}}, KEY, rank=2)
    assert lp["params"]["blocks"]["conv"]["kernel"].b.shape == (3, 2, 4)


def test_rank_errors_on_several_default_layouts_are_listed_together():
    """A rank error on one kernel then a 3-D kernel with a small first axis used to
    crash with an AttributeError (a list was overwritten by a flag)."""
    params = {"a": {"kernel": jnp.ones((4, 2))}, "b": {"kernel": jnp.ones((2, 8, 8))}}
    with pytest.raises(ValueError) as e:
        jaxlora.init(params, KEY, rank=3)
    assert "'a/kernel': rank 3" in str(e.value) and "'b/kernel': rank 3" in str(e.value)
    lp = jaxlora.init({"k": {"kernel": jnp.ones((4, 3))}}, KEY, rank=2, rslora=np.True_)
    assert lp["k"]["kernel"].spec.rslora


def test_partitioned_trees_pickle_and_name_each_factors_axes():
    """Boxes from nn.with_partitioning around adapted kernels: Flax's spec recipe
    names ``a``'s and ``b``'s own axes, and the tree still pickles."""
    import pickle

    part = nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model"))
    model = nn.Dense(6, kernel_init=part)
    variables = model.init(KEY, jnp.ones((2, 4)))
    lp = jaxlora.init(variables, KEY, rank=2)
    specs = nn.get_partition_spec(lp)["params"]["kernel"].value
    assert (specs.w, specs.a, specs.b) == (
        jax.sharding.PartitionSpec("data", "model"),
        jax.sharding.PartitionSpec("data", None),
        jax.sharding.PartitionSpec(None, "model"),
    )
    back = pickle.loads(pickle.dumps(lp))
    chex.assert_trees_all_equal(back, lp)
    assert type(back["params"]["kernel"]) is type(lp["params"]["kernel"])


@pytest.mark.parametrize(
    "box", [nn.with_partitioning, nn.with_logical_partitioning], ids=["mesh", "logical"]
)
def test_merge_and_base_of_a_boxed_tree_have_the_models_structure(box):
    """The plain trees hold the model's own box class again (not jaxlora's), so they
    map together with the model's variables and its optimizer state."""
    model = nn.Dense(6, kernel_init=box(nn.initializers.lecun_normal(), (None, "m")))
    variables = model.init(KEY, jnp.ones((2, 4)))
    lp = jaxlora.init(variables, KEY, rank=2)
    boxed = type(variables["params"]["kernel"])
    for plain in (jaxlora.merge(lp), jaxlora.base(lp)):
        assert type(plain["params"]["kernel"]) is boxed
        jax.tree.map(jnp.subtract, plain, variables)  # the same structure
    chex.assert_trees_all_equal(jaxlora.base(lp), variables)
