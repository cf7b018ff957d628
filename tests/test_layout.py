"""infer_layouts reads input / output / stacked axes off the model's contractions."""

import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx
from test_factored import RematMLP
from test_factored import ScanMLP
from test_factored import TiedLM
from test_factored import adapt
from test_factored import check

import jaxlora
from jaxlora._layout import infer_layouts
from jaxlora._node import Layout

D2 = Layout.dense(2)


def infer(module, x, **kw):
    return infer_layouts(module.apply, module.init(jax.random.key(0), x), (x,), **kw)


def test_dense_conv_einsum():
    x = jnp.ones((2, 4))
    assert infer(nn.Dense(3), x) == {"params/kernel": D2}
    img = jnp.ones((1, 6, 6, 2))
    assert infer(nn.Conv(4, (3, 3)), img) == {"params/kernel": Layout.conv(4)}
    seq = jnp.ones((2, 5, 4))
    got = infer(nn.Einsum((4, 2, 3), "bti,ihj->bthj"), seq)
    assert got == {"params/kernel": Layout.dense(3)}


def test_attention_projections():
    x = jnp.ones((2, 5, 8))
    got = infer(nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8), x)
    for n in ("query", "key", "value"):
        assert got[f"params/{n}/kernel"] == Layout.dense(3)
    assert got["params/out/kernel"] == Layout.dense(3, n_in=2)


def test_embedding_lookup_wins_over_attend():
    ids = jnp.array([[0, 3]])
    assert infer(TiedLM(), ids) == {"params/Embed_0/embedding": D2}


def test_vmapped_scalar_lookup_indexes_one_axis():
    """``vmap(lambda i: table[:, i])`` gathers ``(0, i)`` windows spanning the
    whole first axis: only the second axis is indexed (the input side)."""
    table = {"e": jnp.ones((4, 10))}
    got = infer_layouts(
        lambda p, ids: jax.vmap(lambda i: p["e"][:, i])(ids),
        table,
        (jnp.array([1, 2, 3]),),
    )
    assert got == {"e": Layout(in_axes=(1,), out_axes=(0,))}


def test_attend_only_table_contracts_features():
    table = {"e": jnp.ones((10, 4))}
    got = infer_layouts(lambda p, h: h @ p["e"].T, table, (jnp.ones((2, 4)),))
    assert got == {"e": Layout(in_axes=(1,), out_axes=(0,))}


def test_scan_stacked_and_remat():
    x = jnp.ones((4, 8))
    got = infer(ScanMLP(), x)
    assert got == {"params/ScanBlock_0/Dense_0/kernel": Layout.dense(3, n_stack=1)}
    got = infer(RematMLP(), x)
    assert got == {f"params/CheckpointDense_{i}/kernel": D2 for i in range(2)}


def test_a_layer_picked_by_index_is_a_layer_axis():
    """A loop over layers that picks ``w[i]`` (``fori_loop``, ``jnp.take``, or a
    Python loop over ``w[0]``, ``w[1]``...) makes the indexed axis a stacked axis:
    each layer gets its own factors. A size-1 axis squeezed away is not a layer
    axis."""
    stack = {"w": jnp.ones((3, 4, 4)), "u": jnp.ones((1, 4, 4))}
    x = jnp.ones((2, 4))
    per_layer = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    unit = Layout(in_axes=(1,), out_axes=(0, 2))  # as x @ u.reshape(4, 4)'s: no layers

    def fori(p, x):
        x = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)
        return x @ p["u"][0]

    def unrolled(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["w"][i])
        return x @ p["u"][0]

    def taken(p, x):  # jnp.take's gather at one traced index: a pick, not a lookup
        body = lambda i, h: jnp.tanh(h @ jnp.take(p["w"], i, axis=0))  # noqa: E731
        return jax.lax.fori_loop(0, 3, body, x) @ jnp.take(p["u"], 0, axis=0)

    for fn in (fori, unrolled, taken):
        assert infer_layouts(fn, stack, (x,)) == {"w": per_layer, "u": unit}


@pytest.mark.parametrize(
    "pick",
    [lambda w, ids: w[ids], lambda w, ids: jnp.take(w, ids, axis=0)],
    ids=["index", "take"],
)
def test_experts_picked_per_token_are_stacked(pick):
    """A top-k MoE that gathers each token's expert matrices (``w[topk_ids]``) gets
    per-expert factors. It used to be read as an embedding lookup: the expert axis
    as ``a``'s input side and one ``b`` of full (D, F) size shared by all experts,
    as many factor entries as the experts' own and no low-rank update per expert."""
    params = {"w": jnp.ones((4, 8, 6)), "router": jnp.ones((8, 4))}

    def moe(p, x):
        top, ids = jax.lax.top_k(x @ p["router"], 2)
        return jnp.einsum("td,tkdf,tk->tf", x, pick(p["w"], ids), jax.nn.softmax(top))

    x = jax.random.normal(jax.random.key(0), (5, 8))
    per_expert = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    assert infer_layouts(moe, params, (x,)) == {"w": per_expert, "router": D2}
    check(moe, adapt(params, {"w": per_expert}), x)  # outputs and factor gradients


def test_matrices_looked_up_by_id_and_not_contracted_are_table_rows():
    """A (vocab, heads, dim) table looked up by an array of ids and only added to
    activations: its slices are matrices, like the experts' above, but nothing
    contracts them, so it stays an embedding lookup (vocab as the input side)."""
    table = {"table": jax.random.normal(jax.random.key(0), (10, 4, 6))}

    def embed(p, ids, h):
        return h + p["table"][ids]

    args = (jnp.array([1, 7, 3]), jnp.ones((3, 4, 6)))
    lookup = Layout(in_axes=(0,), out_axes=(1, 2))
    assert infer_layouts(embed, table, args) == {"table": lookup}
    check(embed, adapt(table, {"table": lookup}), *args)

    # per-head relative-position keys: contracted, but only over the slices' own
    # feature axis with the heads batched (no output axis of their own)
    ids = jnp.clip(jnp.arange(5)[:, None] - jnp.arange(5)[None, :] + 4, 0, 9)

    def rel_keys(p, q):
        return jnp.einsum("bqhd,qkhd->bhqk", q, p["table"][ids])

    q = jax.random.normal(jax.random.key(1), (2, 5, 4, 6))
    assert infer_layouts(rel_keys, table, (q,)) == {"table": lookup}
    check(rel_keys, adapt(table, {"table": lookup}), q)


def test_an_out_in_head_used_one_row_at_a_time_keeps_its_output_axis():
    """``x @ w[c]`` for each class ``c`` of an ``(out, in)`` head: the picked axis
    is the only output axis, so it stays the output, not a layer axis."""
    head = {"w": jnp.ones((3, 6))}

    def per_class(p, x):
        return jnp.stack([x @ p["w"][c] for c in range(3)], -1)

    got = infer_layouts(per_class, head, (jnp.ones((2, 6)),))
    assert got == {"w": Layout(in_axes=(1,), out_axes=(0,))}


def test_a_row_picked_from_a_table_used_whole_is_not_a_layer():
    """A decoding step picks one embedding row by a traced id (``e[tok]``) and
    attends to the whole table: the vocabulary axis stays the table's output."""
    table = {"e": jnp.ones((10, 4))}

    def decode(p, tok):
        h = jnp.tanh(p["e"][tok])
        return h @ p["e"].T

    got = infer_layouts(decode, table, (jnp.array(3),))
    assert got == {"e": Layout(in_axes=(1,), out_axes=(0,))}


def test_nnx_state_and_paths_filter_and_omissions():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    assert infer_layouts(fn, state, (x,)) == {"kernel": D2}
    assert infer_layouts(fn, state, (x,), paths=["bias"]) == {}
    # a weight only used elementwise is omitted
    params = {"w": jnp.ones((3, 3)), "v": jnp.ones((3, 3))}
    x3 = jnp.ones((2, 3))
    got = infer_layouts(lambda p, x: x @ p["w"] + jnp.sin(p["v"])[:1], params, (x3,))
    assert got == {"w": D2}


class NormedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8, use_bias=False, name="fc")(nn.RMSNorm()(x)), None


class NormedStack(nn.Module):  # a Llama-style stack: RMSNorm scales are (layers, d)
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            NormedBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        return blocks(name="layers")(x, None)[0]


def test_a_stacked_norm_scale_does_not_hide_the_kernels_after_it():
    """``x * scale`` with a stacked (2-D) norm scale is an activation, not a view
    of the scale: the kernel it feeds is still inferred (it got no layout, so the
    default made its layer axis the input), in Linen and in plain JAX."""
    per_layer = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    got = infer(NormedStack(), jnp.ones((2, 4, 8)))
    assert got == {"params/layers/fc/kernel": per_layer}

    def plain(p, x):  # the scale picked per layer, a scalar gate on the kernel
        def body(i, h):
            return jnp.tanh((h * p["scale"][i][None]) @ (p["w"][i] * 0.5))

        return jax.lax.fori_loop(0, 3, body, x)

    stack = {"w": jnp.ones((3, 4, 4)), "scale": jnp.ones((3, 4))}
    assert infer_layouts(plain, stack, (jnp.ones((2, 4)),)) == {"w": per_layer}


def test_targets_the_model_does_not_contract_are_named():
    """With ``apply_fn``, a target that inference cannot place gets the default
    layout with a warning naming it; without a model, defaults are silent."""
    p = {"used": jnp.ones((4, 3)), "unused": jnp.ones((3, 3, 2))}
    used = lambda p, x: x @ p["used"]  # noqa: E731
    kw = {"rank": 2, "targets": ["used", "unused"]}
    x = jnp.ones((2, 4))
    with pytest.warns(UserWarning, match=r"'unused' \(3, 3, 2\): Layout\(in_axes"):
        jaxlora.init(p, jax.random.key(0), apply_fn=used, example_args=(x,), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxlora.init(p, jax.random.key(0), **kw)


def test_one_row_of_a_table_is_a_lookup_and_a_pad_value_is_not_a_view():
    """``jnp.take(e, tok, 0)`` at one token picks a row (a lookup, not a layer);
    a weight's entry used as another array's pad value is not that array; a
    (1, 1) gate scales a weight like a scalar."""
    p = {"e": jnp.ones((11, 6)), "h": jnp.ones((3, 6)), "k": jnp.ones((4, 5))}

    def fn(p, tok, x):
        row = p["h"] @ jnp.take(p["e"], tok, 0)
        padded = jax.lax.pad(x, p["k"][0, 0], ((0, 0, 0), (0, 1, 0)))  # (2, 4)
        return row.sum() + (padded @ (p["k"] * x[:1, :1])).sum()

    got = infer_layouts(fn, p, (jnp.array(3), jnp.ones((2, 3))))
    assert got == {
        "e": Layout(in_axes=(0,), out_axes=(1,)),
        "h": Layout(in_axes=(1,), out_axes=(0,)),
        "k": Layout(in_axes=(0,), out_axes=(1,)),
    }


def test_a_kernel_reordered_or_subset_by_constant_ids_keeps_its_axes():
    """``x @ w[:, perm]`` (columns reordered or a fixed subset kept, by ids that do
    not depend on the inputs) contracts ``w``'s first axis: it is the input side,
    not an embedding's vocabulary axis looked up. It used to be read as a lookup on
    axis 1, giving ``a`` and ``b`` swapped shapes. It is followed into loop bodies
    (a carry that becomes an activation counts as one), and computed factored,
    plain and stacked by a scan. Ids from the inputs make it a lookup: a two-tower
    ``q @ items[ids].T`` keeps the table's lookup layout (so does sampled softmax,
    ``x @ take(w, ids, 1)``, which needs ``layouts=``)."""
    perm = jnp.array([2, 0, 1, 3, 5, 4])
    p = {"w": jax.random.normal(jax.random.key(0), (4, 6))}
    x = jax.random.normal(jax.random.key(1), (2, 4))

    def reordered(p, x):
        return x @ p["w"][:, perm]

    def pruned(p, x):  # a fixed subset of columns, used in a loop from h = 0
        w = jnp.take(p["w"], perm[:4], axis=1)
        body = lambda h, xt: (jnp.tanh(h @ w + xt), None)  # noqa: E731
        return jax.lax.scan(body, jnp.zeros(4), x)[0]

    assert infer_layouts(reordered, p, (x,)) == {"w": D2}
    assert infer_layouts(pruned, p, (x,)) == {"w": D2}
    check(reordered, adapt(p, {"w": D2}), x)
    check(pruned, adapt(p, {"w": D2}), x)

    def scanned(p, x):  # a layer stack, each layer's kernel reordered
        body = lambda h, w: (jnp.tanh(h @ w[:, perm])[:, :4], None)  # noqa: E731
        return jax.lax.scan(body, x, p["w"])[0]

    stack = {"w": jax.random.normal(jax.random.key(2), (3, 4, 6))}
    per_layer = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    assert infer_layouts(scanned, stack, (x,)) == {"w": per_layer}
    check(scanned, adapt(stack, {"w": per_layer}), x)

    def two_tower(p, q, ids):
        return q @ p["items"][ids].T

    items = {"items": jnp.ones((10, 4))}
    got = infer_layouts(two_tower, items, (x, jnp.array([3, 1, 7])))
    assert got == {"items": D2}


class EmbedInto(nn.Module):
    """Embedding rows fed straight (scaled, not added to) into a Dense, a Conv and
    an LSTM scanned over the sequence, positions' rows (constant ids) into a
    weight-normed Dense (its kernel computed from weights alone), and a tied
    table's rows at candidate ids scored by attending to them."""

    @nn.compact
    def __call__(self, ids, cands):
        emb = nn.Embed(11, 6)
        rows = emb(ids) * 2.0
        h = nn.Dense(5)(rows) + nn.Conv(5, (3,))(rows)
        pos = nn.Embed(3, 6, name="pos")(jnp.arange(3))  # constant ids
        h = h + nn.WeightNorm(nn.Dense(5, name="normed"))(pos)[None]
        h = h + nn.RNN(nn.OptimizedLSTMCell(5))(rows)
        return jnp.tanh(h[..., :1] * rows) @ emb(cands).T


def test_embedding_rows_used_as_activations_stay_a_lookup():
    ids, cands = jnp.array([[0, 3, 10], [5, 5, 1]]), jnp.array([1, 4])
    model = EmbedInto()
    got = infer_layouts(
        model.apply, model.init(jax.random.key(0), ids, cands), (ids, cands)
    )
    assert got["params/Embed_0/embedding"] == D2
    assert got["params/Dense_0/kernel"] == D2
    assert got["params/Conv_0/kernel"] == Layout.conv(3)
    cell = "params/OptimizedLSTMCell_0"
    assert {k: v for k, v in got.items() if k.startswith(cell)}
    assert all(v == D2 for k, v in got.items() if k.startswith(cell))
    assert got["params/pos/embedding"] == D2

    def heads(p, ids):  # rows of a (vocab, heads, dim) table into a projection
        return jnp.einsum("bthd,hde->bte", p["e"][ids], p["w"])

    p = {"e": jnp.ones((10, 2, 4)), "w": jnp.ones((2, 4, 6))}
    assert infer_layouts(heads, p, (ids,)) == {
        "e": Layout(in_axes=(0,), out_axes=(1, 2)),
        "w": Layout(in_axes=(0, 1), out_axes=(2,)),
    }


def test_matrices_picked_by_ids_are_followed_like_weights():
    """Experts or layers picked by ids are matrices, followed through every view
    and into scans as weights are: a top-1 MoE's ``squeeze(w[ids], 1)`` and a
    reordered layer stack ``scan(body, x, w[order])`` keep per-expert / per-layer
    factors (a first version of the lookup-rows rule read them as a table)."""
    per = Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    x = jax.random.normal(jax.random.key(0), (5, 8))

    def top1(p, x):
        _, ids = jax.lax.top_k(x @ p["router"], 1)
        return jnp.einsum("td,tdf->tf", x, jnp.squeeze(p["w"][ids], 1))

    moe = {"w": jnp.ones((4, 8, 6)), "router": jnp.ones((8, 4))}
    assert infer_layouts(top1, moe, (x,))["w"] == per

    def reordered(p, x):
        body = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731
        return jax.lax.scan(body, x, p["w"][jnp.array([0, 2, 1, 1])])[0]

    stack = {"w": jnp.ones((3, 8, 8))}
    assert infer_layouts(reordered, stack, (x,)) == {"w": per}


def test_an_embedding_looked_up_by_constant_ids_stays_a_lookup():
    """nn.Embed's learned queries (``E[arange(n)]``) contracted straight with an
    activation keep the table's lookup layout, so PEFT gets an nn.Embedding's
    ``lora_embedding_A (r, n)``; a layout the user gives is theirs, and does not
    make the weight a table."""

    class Queries(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.Embed(7, 8, name="queries")(jnp.arange(7))
            return jnp.einsum("qd,bkd->bqk", q, x)

    x = jnp.ones((2, 5, 8))
    model = Queries()
    variables = model.init(jax.random.key(0), x)
    got = infer_layouts(model.apply, variables, (x,))
    assert got == {"params/queries/embedding": D2}

    def sampled(p, x, ids):  # inferred: a lookup of axis 1 (a table)
        return x @ jnp.take(p["w"], ids, axis=1)

    p, args = {"w": jnp.ones((8, 20))}, (jnp.ones((3, 8)), jnp.array([1, 5, 7]))
    kw = {"rank": 2, "targets": ["w"], "apply_fn": sampled, "example_args": args}
    assert jaxlora.init(p, jax.random.key(0), **kw)["w"].spec.embedding
    mine = jaxlora.init(p, jax.random.key(0), layouts={"w": D2}, **kw)["w"].spec
    assert mine.layout == D2 and not mine.embedding


def test_a_use_on_an_activation_decides_over_one_on_weights_alone():
    """A hand-written spectral norm's power iteration (``w @ u``, ``u`` a 1-D
    weight) comes first but applies ``w`` to no activation: the model's ``x @ w``
    decides (the power iteration made the output axis the input)."""
    p = {"w": jax.random.normal(jax.random.key(0), (4, 6)), "u": jnp.ones(6)}

    def normed(p, x):
        v = p["w"] @ p["u"]
        sigma = jnp.linalg.norm(v) / jnp.linalg.norm(p["u"])
        return x @ (p["w"] / sigma)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    assert infer_layouts(normed, p, (x,)) == {"w": D2}
