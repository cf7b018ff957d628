"""jaxlora.save / jaxlora.load: bitwise round trips, atomicity and every error."""

import json
import os
import pickle
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import LAYOUTS
from conftest import all_weights

import jaxlora
from jaxlora import _checkpoint


def _trained(variables, *, seed=1, **kw):
    """An adapted tree whose factors are all non-zero (as after training)."""
    params = jaxlora.init(
        variables,
        jax.random.key(seed),
        rank=2,
        targets=all_weights,
        layouts=LAYOUTS,
        **kw,
    )
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [
        x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    trained = jax.tree.unflatten(treedef, leaves)
    # Base weights must stay the originals (or residuals): put them back.
    return jax.tree.map(
        lambda t, p: t.replace(w=p.w) if jaxlora.is_lora(t) else p,
        trained,
        params,
        is_leaf=jaxlora.is_lora,
    )


def _nodes(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jaxlora.is_lora)
    return {jax.tree_util.keystr(p): x for p, x in flat if jaxlora.is_lora(x)}


@pytest.fixture
def saved(mixed, tmp_path):
    model, variables, tokens, image = mixed
    params = _trained(variables)
    path = jaxlora.save(tmp_path / "adapter", params)
    return path, params


def test_round_trip_is_bitwise(mixed, saved):
    model, variables, tokens, image = mixed
    path, params = saved
    restored = jaxlora.load(path, variables)
    want, got = _nodes(params), _nodes(restored)
    assert list(got) == list(want) and len(got) == 8
    for k in want:
        assert got[k].spec == want[k].spec, k
        assert got[k].a.dtype == want[k].a.dtype and got[k].b.dtype == want[k].b.dtype
    chex.assert_trees_all_equal(restored, params)
    apply = jaxlora.lora_apply(model.apply)
    out, ref = apply(restored, tokens, image), apply(params, tokens, image)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert not np.array_equal(np.asarray(ref), model.apply(variables, tokens, image))


def test_load_replaces_factors_of_an_adapted_tree(mixed, saved):
    _, variables, _, _ = mixed
    path, params = saved
    other = jaxlora.init(
        variables, jax.random.key(7), rank=4, targets=all_weights, layouts=LAYOUTS
    )
    chex.assert_trees_all_equal(jaxlora.load(path, other), params)


def test_low_precision_factors_and_base_round_trip(mixed, tmp_path):
    _, variables, _, _ = mixed
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    params = _trained(base16, dtype=jnp.bfloat16)
    path = jaxlora.save(tmp_path / "bf16", params)
    restored = jaxlora.load(path, base16)
    chex.assert_trees_all_equal(restored, params)
    assert {x.a.dtype for x in _nodes(restored).values()} == {jnp.dtype("bfloat16")}


def test_metadata_describes_every_target(saved):
    path, params = saved
    with open(os.path.join(path, "jaxlora.json")) as f:
        meta = json.load(f)
    assert meta["format"] == "jaxlora.adapters" and meta["version"] == 1
    by_path = {e["path"]: e for e in meta["targets"]}
    for p, node in jaxlora.adapters(params).items():
        e = by_path[p]
        spec = node.spec
        assert (e["scheme"], e["rank"], e["alpha"], e["rslora"]) == (
            spec.scheme,
            spec.rank,
            spec.alpha,
            spec.rslora,
        )
        assert (e["residual"], e["embedding"]) == (spec.residual, spec.embedding)
        assert tuple(e["layout"]["in_axes"]) == spec.layout.in_axes
        assert tuple(e["layout"]["out_axes"]) == spec.layout.out_axes
        assert tuple(e["layout"]["stack_axes"]) == spec.layout.stack_axes
        assert e["a_shape"] == list(node.a.shape) and e["a_dtype"] == "float32"
        assert e["b_shape"] == list(node.b.shape) and e["b_dtype"] == "float32"
    assert by_path["params/attn/out/kernel"]["base_shape"] == [4, 8, 32]
    assert by_path["params/embed/embedding"]["embedding"] is True
    conv = {"axes": [2, 0, 1], "groups": None, "dilation": None}  # the Flax default
    assert by_path["params/conv/kernel"]["conv"] == conv
    assert by_path["params/mlp/kernel"]["conv"] is None


def test_checkpoints_without_a_conv_record_still_load(mixed, saved):
    """Checkpoints written before jaxlora recorded convolutions (no ``conv`` key)
    get the record ``init`` gives without inference, or the adapted tree's they
    are loaded onto; a record that contradicts the layout is refused."""
    path, params = saved
    meta_file = os.path.join(path, _checkpoint.METADATA)
    with open(meta_file) as f:
        meta = json.load(f)
    for e in meta["targets"]:
        del e["conv"]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    old = _nodes(jaxlora.load(path, mixed[1]))
    want = {p: x.spec.conv for p, x in _nodes(params).items()}  # what init assumes
    assert {p: x.spec.conv for p, x in old.items()} == want
    assert [p for p, c in want.items() if c] == ["['params']['conv']['kernel']"]
    for p, x in _nodes(params).items():
        chex.assert_trees_all_equal((old[p].a, old[p].b), (x.a, x.b))
    # onto an adapted tree: its own records (here, inferred from the model)
    model, variables, tokens, image = mixed
    inferred = jaxlora.init(
        variables,
        jax.random.key(5),
        rank=2,
        targets=all_weights,
        apply_fn=model.apply,
        example_args=(tokens, image),
    )
    onto = _nodes(jaxlora.load(path, inferred))["['params']['conv']['kernel']"]
    assert onto.spec.conv == jaxlora.Conv((2, 0, 1), groups=1, dilation=(1, 1))
    conv = next(e for e in meta["targets"] if e["path"] == "params/conv/kernel")
    conv["conv"] = {"axes": [3, 0, 1], "groups": 1, "dilation": [1, 1]}
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(
        ValueError, match=r"'params/conv/kernel'.*conv axes \[3, 0, 1\]"
    ):
        jaxlora.load(path, mixed[1])


def test_only_factors_are_written(tmp_path):
    big = {"dense": {"kernel": jnp.ones((512, 512)), "bias": jnp.zeros(512)}}
    params = jaxlora.init(big, jax.random.key(0), rank=1)  # 4 KB of factors
    path = jaxlora.save(tmp_path / "big", params)
    size = sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
    )
    assert size < 100_000  # the base kernel alone is 1 MB


def test_no_pickle_anywhere(mixed, saved, monkeypatch):
    _, variables, _, _ = mixed
    path, _ = saved
    for root, _, files in os.walk(path):
        for name in files:
            assert not name.endswith((".pkl", ".pickle", ".npy")), name
            with open(os.path.join(root, name), "rb") as f:
                head = f.read(2)
            is_pickle = len(head) == 2 and head[0] == 0x80 and head[1] in range(2, 6)
            assert not is_pickle, f"{name} looks like a pickle"

    def refuse(*_, **__):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(np, "load", refuse)
    jaxlora.load(path, variables)


def test_refuses_to_overwrite(mixed, saved):
    _, variables, _, _ = mixed
    path, params = saved
    newer = _trained(variables, seed=5)
    with pytest.raises(ValueError, match="already exists. Pass overwrite=True"):
        jaxlora.save(path, newer)
    chex.assert_trees_all_equal(jaxlora.load(path, variables), params)
    jaxlora.save(path, newer, overwrite=True)
    chex.assert_trees_all_equal(jaxlora.load(path, variables), newer)
    assert os.listdir(os.path.dirname(path)) == ["adapter"]  # no temp dirs left


def test_failed_save_keeps_the_old_checkpoint(mixed, saved, monkeypatch):
    _, variables, _, _ = mixed
    path, params = saved

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        jaxlora.save(path, _trained(variables, seed=5), overwrite=True)
    assert os.listdir(os.path.dirname(path)) == ["adapter"]
    chex.assert_trees_all_equal(jaxlora.load(path, variables), params)


def test_overwrite_never_replaces_what_save_did_not_write(mixed, tmp_path):
    _, variables, _, _ = mixed
    params = _trained(variables)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    (project / "arrays").mkdir()
    with pytest.raises(ValueError) as e:
        jaxlora.save(project, params, overwrite=True)
    msg = str(e.value)
    assert f"Cannot overwrite {str(project)!r}: it is not a jaxlora checkpoint" in msg
    assert "(it holds 'notes.txt')" in msg and "Choose another path" in msg
    assert (project / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("data")
    with pytest.raises(ValueError, match=r"it holds a file\)"):
        jaxlora.save(tmp_path / "file", params, overwrite=True)
    assert (tmp_path / "file").read_text() == "data"
    other = tmp_path / "other"
    other.mkdir()
    (other / _checkpoint.METADATA).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="without a jaxlora.json written by jaxlora"):
        jaxlora.save(other, params, overwrite=True)
    assert (other / _checkpoint.METADATA).exists()
    results = tmp_path / "results"  # only a folder named like the factors' one
    (results / "arrays").mkdir(parents=True)
    (results / "arrays" / "run.csv").write_text("precious")
    with pytest.raises(ValueError, match=r"\['arrays'\] without a jaxlora.json"):
        jaxlora.save(results, params, overwrite=True)
    assert (results / "arrays" / "run.csv").read_text() == "precious"
    (tmp_path / "empty").mkdir()  # an empty directory may be replaced
    jaxlora.save(tmp_path / "empty", params, overwrite=True)
    chex.assert_trees_all_equal(jaxlora.load(tmp_path / "empty", variables), params)
    assert sorted(os.listdir(tmp_path)) == [
        "empty",
        "file",
        "other",
        "project",
        "results",
    ]


def test_what_appears_at_the_path_during_a_save_is_kept(tmp_path, monkeypatch):
    """The path was checked only before writing: a directory made there while the
    factors were being written (another run saving to the same place) was moved
    aside and deleted at the rename, even with overwrite=False. It is checked
    again at the rename; a failed save also removes the parent directories it
    made."""
    plain = {"fc": {"kernel": jnp.ones((4, 3))}}
    params = jaxlora.init(plain, jax.random.key(0), rank=2)
    target = tmp_path / "ck"
    orig = ocp.StandardCheckpointer.save

    def racing(self, *args, **kwargs):
        target.mkdir(exist_ok=True)
        (target / "precious.txt").write_text("mine")
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", racing)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"ck'"):
            jaxlora.save(target, params, overwrite=overwrite)
        assert (target / "precious.txt").read_text() == "mine"
        assert sorted(os.listdir(tmp_path)) == ["ck"]  # no staging left
    monkeypatch.undo()

    def racing_peft(*args, **kwargs):
        (tmp_path / "peft").mkdir(exist_ok=True)
        (tmp_path / "peft" / "precious.txt").write_text("mine")
        return b""

    monkeypatch.setattr(_checkpoint, "write_synced", racing_peft)
    monkeypatch.setattr("jaxlora._peft.write_synced", racing_peft)
    with pytest.raises(ValueError, match=r"peft' already exists"):
        jaxlora.save_peft(tmp_path / "peft", params, {"fc/kernel": "fc"})
    assert (tmp_path / "peft" / "precious.txt").read_text() == "mine"
    monkeypatch.undo()

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        jaxlora.save(tmp_path / "runs" / "a" / "ck", params)
    assert sorted(os.listdir(tmp_path)) == ["ck", "peft"]


def test_numpy_scalars_in_a_spec_are_saved_as_numbers(tmp_path):
    """``init(rslora=np.bool_(True))`` is accepted, and its spec held the NumPy
    bool: save failed with a raw 'not JSON serializable' (the tree could never be
    saved). Specs hold plain Python values."""
    plain = {"fc": {"kernel": jnp.ones((4, 3))}}
    params = jaxlora.init(
        plain,
        jax.random.key(0),
        rank=np.int64(2),
        alpha=np.float32(4),
        rslora=np.bool_(True),
    )
    spec = params["fc"]["kernel"].spec
    assert (type(spec.rank), type(spec.alpha), type(spec.rslora)) == (int, float, bool)
    by_hand = jaxlora.LoraSpec(
        spec.layout, np.int32(2), jnp.float32(4), np.bool_(True), "normal"
    )
    assert by_hand == spec and hash(by_hand) == hash(spec)
    jaxlora.save(tmp_path / "ck", params)
    back = jaxlora.load(tmp_path / "ck", plain)
    assert back["fc"]["kernel"].spec == spec


def test_loading_needs_base_weights_and_one_leaf_per_path(tmp_path):
    """Loading onto `adapters`' tree (no base) raised a bare AttributeError in
    load_peft and a shape-() complaint in load; a tree whose keys make one path
    name two leaves got one adapter on both (init refuses such a tree)."""
    plain = {"enc": {"kernel": jnp.ones((4, 3))}}
    params = jaxlora.init(plain, jax.random.key(0), rank=2)
    jaxlora.save(tmp_path / "ck", params)
    d = jaxlora.save_peft(tmp_path / "peft", params, {"enc/kernel": "enc"})
    baseless = jaxlora.adapters(params)
    with pytest.raises(ValueError, match=r"load: 'enc/kernel' hold adapters without"):
        jaxlora.load(tmp_path / "ck", baseless)
    with pytest.raises(ValueError, match=r"load_peft: 'enc/kernel' hold adapters"):
        jaxlora.load_peft(d, baseless, {"enc/kernel": "enc"})
    clash = {"enc": {"kernel": jnp.ones((4, 3))}, "enc/kernel": jnp.zeros((4, 3))}
    for fn in (
        lambda: jaxlora.load(tmp_path / "ck", clash),
        lambda: jaxlora.combine(clash, baseless),
        lambda: jaxlora.load_peft(
            d, {**params, "enc/kernel": params["enc"]["kernel"]}, {"enc/kernel": "enc"}
        ),
    ):
        with pytest.raises(ValueError, match=r"share the path 'enc/kernel'"):
            fn()


def test_save_under_a_file_names_it(tmp_path):
    plain = {"fc": {"kernel": jnp.ones((4, 3))}}
    params = jaxlora.init(plain, jax.random.key(0), rank=2)
    (tmp_path / "notes").write_text("mine")
    for save in (
        jaxlora.save,
        lambda p, t: jaxlora.save_peft(p, t, {"fc/kernel": "fc"}),
    ):
        with pytest.raises(NotADirectoryError) as info:
            save(tmp_path / "notes" / "run" / "adapter", params)
        assert f"{str(tmp_path / 'notes')!r} is a file, not a directory" in str(
            info.value
        )
    assert (tmp_path / "notes").read_text() == "mine"


def test_save_without_adapters(mixed, tmp_path):
    _, variables, _, _ = mixed
    with pytest.raises(ValueError, match="no LoRA adapters"):
        jaxlora.save(tmp_path / "x", variables)
    assert not os.path.exists(tmp_path / "x")


def test_save_of_adapters_without_base_weights(mixed, tmp_path):
    _, variables, _, _ = mixed
    params = _trained(variables)
    with pytest.raises(ValueError) as e:
        jaxlora.save(tmp_path / "x", jaxlora.adapters(params))
    msg = str(e.value)
    assert "'params/mlp/kernel'" in msg and "without a base weight" in msg
    assert "jaxlora.combine(base, adapters)" in msg
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------- bad input


def test_missing_directory(mixed, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        jaxlora.load(tmp_path / "nope", mixed[1])


def test_missing_metadata(mixed, saved):
    path, _ = saved
    os.remove(os.path.join(path, "jaxlora.json"))
    with pytest.raises(ValueError, match=r"jaxlora.json is missing \(truncated"):
        jaxlora.load(path, mixed[1])


def test_corrupted_metadata(mixed, saved):
    path, _ = saved
    with open(os.path.join(path, "jaxlora.json"), "w") as f:
        f.write('{"format": "jaxlora.adap')
    with pytest.raises(ValueError, match="Corrupted jaxlora checkpoint"):
        jaxlora.load(path, mixed[1])


def test_newer_format_version(mixed, saved):
    path, _ = saved
    meta_file = os.path.join(path, "jaxlora.json")
    with open(meta_file) as f:
        meta = json.load(f)
    meta["version"] = 99
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="format version 99; .* reads version 1"):
        jaxlora.load(path, mixed[1])


def test_factors_of_another_checkpoint_are_refused(tmp_path):
    """arrays/ of a rank-4 save under a rank-2 save's metadata (a mixed-up copy)
    used to load with rank 2 and (8, 4) factors: the update scaled by alpha/2."""
    variables = {"d": {"kernel": jnp.ones((8, 6))}}
    key = jax.random.key(0)
    two = jaxlora.save(tmp_path / "two", jaxlora.init(variables, key, rank=2))
    four = jaxlora.save(tmp_path / "four", jaxlora.init(variables, key, rank=4))
    shutil.rmtree(os.path.join(two, _checkpoint.ARRAYS))
    shutil.copytree(
        os.path.join(four, _checkpoint.ARRAYS), os.path.join(two, _checkpoint.ARRAYS)
    )
    with pytest.raises(ValueError) as e:
        jaxlora.load(two, variables)
    msg = str(e.value)
    assert "do not hold the factors jaxlora.json records" in msg
    assert re.search(r"a is stored as float32\[8, 4\] where .* float32\[8, 2\]", msg)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t[0].pop("base_dtype"), r"no \['base_dtype'\]"),
        (lambda t: t[0].update(a_dtype="float99"), r"data type 'float99' not under"),
        (lambda t: t.clear() or t.append("x"), r"entry 0 is a str"),
    ],
    ids=["missing-field", "bad-dtype", "not-a-record"],
)
def test_metadata_with_a_broken_field_names_it(mixed, saved, edit, match):
    """A missing field or an unknown dtype name used to raise a bare KeyError or
    TypeError naming no checkpoint."""
    path, _ = saved
    meta_file = os.path.join(path, _checkpoint.METADATA)
    with open(meta_file) as f:
        meta = json.load(f)
    edit(meta["targets"])
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(
        ValueError, match=r"(?s)Corrupted jaxlora checkpoint .*" + match
    ):
        jaxlora.load(path, mixed[1])


def test_a_long_directory_name_saves_and_overwrites(tmp_path):
    """The hidden staging / aside names embedded the whole name: a legal 245-byte
    name failed with 'File name too long', and overwriting a 230-byte one too."""
    p = jaxlora.init({"kernel": jnp.ones((4, 3))}, jax.random.key(0), rank=2)
    for name in ("a" * 245, "é" * 120):
        d = jaxlora.save(tmp_path / name, p)
        jaxlora.save(tmp_path / name, p, overwrite=True)
        chex.assert_trees_all_equal(jaxlora.load(d, {"kernel": jnp.ones((4, 3))}), p)
    assert sorted(os.listdir(tmp_path)) == sorted(["a" * 245, "é" * 120])


def test_metadata_that_contradicts_itself(mixed, saved):
    _, variables, _, _ = mixed
    path, _ = saved
    meta_file = os.path.join(path, _checkpoint.METADATA)
    with open(meta_file) as f:
        meta = json.load(f)
    meta["targets"][0]["rank"] = 3  # the factors have rank 2: the scale would be off
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError) as e:
        jaxlora.load(path, variables)
    msg = str(e.value)
    assert "Corrupted jaxlora checkpoint" in msg and "contradicts itself" in msg
    assert f"{meta['targets'][0]['path']!r}: rank 3 and base shape" in msg
    assert "Save it again" in msg


def test_missing_arrays_directory(mixed, saved):
    path, _ = saved
    shutil.rmtree(os.path.join(path, "arrays"))
    with pytest.raises(ValueError, match=r"arrays/ directory .* is missing"):
        jaxlora.load(path, mixed[1])


def test_missing_array_files(mixed, saved):
    path, _ = saved
    arrays = os.path.join(path, "arrays")
    for root, _, files in os.walk(arrays):
        for name in files:
            if os.path.basename(root) == "d":  # the data files of the factors
                os.remove(os.path.join(root, name))
    with pytest.raises(ValueError, match="Could not read the factors"):
        jaxlora.load(path, mixed[1])


def test_path_missing_from_base(mixed, saved):
    _, variables, _, _ = mixed
    path, _ = saved
    params = dict(variables["params"])
    del params["mlp"]
    with pytest.raises(ValueError, match=r"'params/mlp/kernel': not in params"):
        jaxlora.load(path, {"params": params})


def test_checkpoint_for_another_model(saved):
    path, _ = saved
    other = {"params": {"Dense_0": {"kernel": jnp.ones((3, 3))}}}
    with pytest.raises(
        ValueError, match="None of the 8 adapter paths .* saved for another model"
    ):
        jaxlora.load(path, other)


def test_shape_and_dtype_mismatch_all_reported(mixed, saved):
    _, variables, _, _ = mixed
    path, _ = saved
    params = jax.tree.map(lambda x: x, variables)
    params["params"]["mlp"]["kernel"] = jnp.ones((32, 16))
    params["params"]["einsum"]["kernel"] = params["params"]["einsum"]["kernel"].astype(
        jnp.bfloat16
    )
    with pytest.raises(ValueError) as info:
        jaxlora.load(path, params)
    msg = str(info.value)
    assert (
        "'params/mlp/kernel': the checkpoint was trained on a base weight of shape "
        "(32, 32) and dtype float32, got shape (32, 16) and dtype float32"
    ) in msg
    assert (
        "'params/einsum/kernel'" in msg
        and "got shape (32, 32) and dtype bfloat16" in msg
    )


def test_adapters_the_checkpoint_lacks(mixed, tmp_path):
    _, variables, _, _ = mixed
    mlp = jaxlora.init(variables, jax.random.key(0), rank=2, targets=["mlp"])
    path = jaxlora.save(tmp_path / "mlp", mlp)
    both = jaxlora.init(variables, jax.random.key(0), rank=2, targets=["mlp", "conv"])
    with pytest.raises(
        ValueError, match=r"adapters the checkpoint lacks: 'params/conv/kernel';"
    ):
        jaxlora.load(path, both)
    chex.assert_trees_all_equal(jaxlora.load(path, jaxlora.base(both)), mlp)


def test_residual_adapter_needs_its_residual_base(mixed, tmp_path):
    _, variables, _, _ = mixed
    params = _trained(variables, scheme="both_random", compensate=True)
    path = jaxlora.save(tmp_path / "res", params)
    with pytest.raises(ValueError) as info:
        jaxlora.load(path, variables)
    msg = str(info.value)
    assert "'params/mlp/kernel': the adapter (scheme 'both_random') was" in msg
    assert "residual base" in msg and "is not that residual" in msg
    assert "jaxlora.init(...) using the same scheme" in msg
    residual = jaxlora.base(params, allow_residual=True)
    chex.assert_trees_all_equal(jaxlora.load(path, residual), params)
    again = jaxlora.init(
        variables,
        jax.random.key(1),
        rank=2,
        targets=all_weights,
        layouts=LAYOUTS,
        scheme="both_random",
        compensate=True,
    )
    chex.assert_trees_all_equal(jaxlora.load(path, again), params)


def test_plain_adapter_is_refused_on_a_residual_base(mixed, saved):
    """A plain adapter loaded onto a residual tree (PiSSA's) would keep the residual
    as its base: wrong outputs, and the residual then passes for the original."""
    _, variables, _, _ = mixed
    path, params = saved
    residual = jaxlora.init(
        variables,
        jax.random.key(1),
        rank=2,
        targets=["params/mlp/kernel"],
        scheme="pissa",
    )
    with pytest.raises(ValueError) as info:
        jaxlora.load(path, residual)
    msg = str(info.value)
    assert (
        "'params/mlp/kernel': the adapter (scheme 'normal') was trained on the " in msg
    )
    assert "is a residual (scheme 'pissa'" in msg and "original model's params" in msg
    chex.assert_trees_all_equal(jaxlora.load(path, variables), params)


def test_fingerprint_tells_residual_from_original(mixed):
    _, variables, _, _ = mixed
    w = variables["params"]["mlp"]["kernel"]
    fp = _checkpoint._fingerprint(w)
    assert _checkpoint._same_fingerprint(_checkpoint._fingerprint(w), fp)
    assert not _checkpoint._same_fingerprint(_checkpoint._fingerprint(w[::-1]), fp)
    assert not _checkpoint._same_fingerprint(_checkpoint._fingerprint(w + 1e-6), fp)


def test_save_refuses_factors_that_do_not_fit_and_keeps_the_old_checkpoint(
    mixed, tmp_path
):
    """A tree batched by ``jax.vmap`` over keys (w batched, the layout not) used to
    save, and ``overwrite=True`` replaced a good checkpoint with one `load` refuses."""
    _, variables, _, _ = mixed
    params = _trained(variables)
    path = str(tmp_path / "adapter")
    jaxlora.save(path, params)
    batched = jax.vmap(lambda k: jaxlora.init(variables, k, rank=2, layouts=LAYOUTS))(
        jax.random.split(jax.random.key(3), 2)
    )
    with pytest.raises(
        ValueError, match="Cannot save: these LoraWeights' factors"
    ) as e:
        jaxlora.save(path, batched, overwrite=True)
    assert "save each, e.g. jax.tree.map(lambda x: x[i], tree)" in str(e.value)
    chex.assert_trees_all_equal(jaxlora.load(path, variables), params)


def test_a_step_jitted_before_load_does_not_compile_again(mixed, tmp_path):
    """Loaded factors are placed as `init` places them (uncommitted), so neither
    the first step on them nor the next one compiles anything new."""
    _, variables, _, _ = mixed
    params = _trained(variables)
    step = jax.jit(lambda p: jax.tree.map(lambda x: x * 0.5, p))
    params = step(step(params))
    jaxlora.save(tmp_path / "adapter", params)
    before = step._cache_size()
    loaded = step(step(jaxlora.load(tmp_path / "adapter", jaxlora.base(params))))
    assert step._cache_size() == before
    chex.assert_trees_all_equal(loaded, step(step(params)))
