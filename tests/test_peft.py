"""PEFT adapter format: round trips, the file layout, real PEFT on MiniLM, errors."""

import json
import os
import pathlib
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

import jaxlora
from jaxlora import _peft
from jaxlora import _safetensors

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import minilm  # noqa: E402

TARGETS = r".*(kernel|embedding)$"
# asserted where it matters (test_peft_extras_are_read_or_refused)
pytestmark = pytest.mark.filterwarnings("ignore:jaxlora.(save|load)_peft.*embedding")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
        return x + nn.Dense(16, name="fc")(jnp.tanh(h)), None


class Stacked(nn.Module):
    """Embed, attention (DenseGeneral q/k/v and the two-axis out projection) and
    Dense, the blocks stacked by ``nn.scan``."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 16, name="embed")(ids)
        blocks = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x = blocks(name="blocks")(x, None)[0]
        return nn.Dense(7, name="head")(x)


def dotted(path, layer):
    """``params/blocks/attn/query/kernel`` layer (1,) -> ``blocks.1.attn.query``."""
    parts = path.split("/")[1:-1]
    if layer:
        parts = [parts[0], *map(str, layer), *parts[1:]]
    return ".".join(parts)


@pytest.fixture(scope="module")
def stacked():
    model, ids = Stacked(), jnp.arange(12).reshape(2, 6) % 50
    params = model.init(jax.random.key(0), ids)

    def adapted(seed, **kw):
        return jaxlora.init(
            params,
            jax.random.key(seed),
            targets=TARGETS,
            apply_fn=model.apply,
            example_args=(ids,),
            **kw,
        )

    return model, ids, adapted


def _nodes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jaxlora.is_lora)[0]
    return {jax.tree_util.keystr(k): x for k, x in flat if jaxlora.is_lora(x)}


@pytest.mark.parametrize(
    "kw",
    [
        {"rank": 4, "alpha": 8.0, "rank_pattern": {"head": 2}},
        {"rank": 4, "alpha": 3.0, "rslora": True},
    ],
    ids=["rank-pattern", "rslora"],
)
def test_round_trip_restores_factors_and_scales_exactly(stacked, tmp_path, kw):
    """save_peft then load_peft onto an adapted tree of another scheme and rank
    gives back every factor bitwise, each spec's layout, rank and scale, and the
    same model output; stacked layers are one torch module each."""
    model, ids, adapted = stacked
    lp = adapted(1, scheme="both_random", **kw)
    d = jaxlora.save_peft(tmp_path / "adapter", lp, dotted)
    back = jaxlora.load_peft(d, adapted(5, scheme="normal", rank=3), dotted)
    want, got = _nodes(lp), _nodes(back)
    assert want.keys() == got.keys()
    for k in want:
        w, g = want[k], got[k]
        assert (g.rank, g.scale, g.layout) == (w.rank, w.scale, w.layout), k
        np.testing.assert_array_equal(g.a, w.a)
        np.testing.assert_array_equal(g.b, w.b)
        assert g.w is w.w or np.array_equal(g.w, w.w)
    apply = jaxlora.lora_apply(model.apply)
    np.testing.assert_array_equal(apply(back, ids), apply(lp, ids))
    config = json.loads((tmp_path / "adapter" / _peft.CONFIG).read_text())
    assert "blocks.2.attn.out" in config["target_modules"]
    assert len(config["target_modules"]) == 3 * 5 + 2
    assert config["use_rslora"] == kw.get("rslora", False)


def test_file_is_what_peft_reads(stacked, tmp_path):
    """The safetensors file (read by the reference reader) holds PEFT's keys,
    orientations and dtypes: A (r, in), B (out, r), the embedding's A (r, vocab)
    and B (dim, r); in/out axes flattened in the weight's order; bf16 kept."""
    require("safetensors", "pip install safetensors", load=False)
    import safetensors  # the reference reader (bfloat16 as well, via "flax")

    _, _, adapted = stacked
    lp = adapted(1, scheme="both_random", rank=4, dtype=jnp.bfloat16)
    jaxlora.save_peft(tmp_path / "a", lp, dotted)
    file = str(tmp_path / "a" / _peft.WEIGHTS)
    with safetensors.safe_open(file, "flax") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    pre = "base_model.model."
    out = lp["params"]["blocks"]["attn"]["out"]["kernel"]  # (3, heads, dim, 16)
    A = got[f"{pre}blocks.1.attn.out.lora_A.weight"]
    B = got[f"{pre}blocks.1.attn.out.lora_B.weight"]
    assert A.dtype == jnp.bfloat16 and A.shape == (4, 16) and B.shape == (16, 4)
    np.testing.assert_array_equal(A, out.a[1].reshape(16, 4).T)
    np.testing.assert_array_equal(B, out.b[1].T)
    delta = (B.astype(np.float32) @ A.astype(np.float32)) * out.scale
    merged_delta = out.delta(jnp.float32)[1].reshape(16, 16)  # (in, out)
    np.testing.assert_allclose(delta, merged_delta.T, rtol=1e-6, atol=1e-6)
    embed = lp["params"]["embed"]["embedding"]
    np.testing.assert_array_equal(got[f"{pre}embed.lora_embedding_A"], embed.a.T)
    np.testing.assert_array_equal(got[f"{pre}embed.lora_embedding_B"], embed.b.T)
    assert f"{pre}embed.lora_A.weight" not in got
    assert len(got) == 2 * (3 * 5 + 2)


# -- real PEFT on the MiniLM model ---------------------------------------------------

MINILM_TARGETS = [
    "query/kernel",
    "value/kernel",
    "intermediate/kernel",
    "word_embeddings/embedding",
]


@pytest.fixture(scope="module")
def torch_minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = require("torch", "pip install torch==2.13.0 transformers peft")
    transformers = require("transformers", "pip install transformers peft")
    peft = require("peft", "pip install peft")
    model, variables = minilm.load_minilm()
    batch = minilm.MiniLMTokenizer(16)(
        ["A man is eating food.", "The new movie is awesome, said nobody."]
    )

    def torch_model():
        return transformers.BertModel.from_pretrained(minilm.model_dir()).eval()

    def torch_hidden(m):
        with torch.no_grad():
            return m(
                input_ids=torch.from_numpy(batch["input_ids"]).long(),
                attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
            ).last_hidden_state.numpy()

    def jax_hidden(tree):
        apply = jaxlora.lora_apply(model.apply)
        return np.asarray(apply(tree, batch["input_ids"], batch["attention_mask"]))

    def template(seed, **kw):
        return jaxlora.init(
            variables,
            jax.random.key(seed),
            targets=MINILM_TARGETS,
            **kw,
        )

    real = batch["attention_mask"].astype(bool)
    return torch, peft, torch_model, torch_hidden, jax_hidden, template, real


def _names(path, layer):
    return minilm.torch_module_name(path)


def test_peft_runs_a_jaxlora_adapter_as_jaxlora_does(torch_minilm, tmp_path):
    """A trained-looking jaxlora adapter (b ≠ 0; ranks and alphas per target,
    rsLoRA off; the word embeddings adapted too) exported with save_peft and
    loaded by ``peft.PeftModel.from_pretrained`` onto transformers' BertModel
    gives jaxlora's hidden states."""
    torch, peft, torch_model, torch_hidden, jax_hidden, template, real = torch_minilm
    lp = template(
        1,
        scheme="both_random",
        rank=4,
        alpha=8,
        rank_pattern={"intermediate": 2},
        alpha_pattern={"value": 5},
    )
    lp = jax.tree.map(  # smaller updates: a realistic adapter, not a new model
        lambda n: n.replace(b=n.b * 0.05) if jaxlora.is_lora(n) else n,
        lp,
        is_leaf=jaxlora.is_lora,
    )
    want = jax_hidden(lp)
    base = jax_hidden(jaxlora.base(lp))
    assert np.abs(want - base)[real].max() > 1e-2  # the adapter matters
    d = jaxlora.save_peft(tmp_path / "minilm", lp, _names)
    bert = torch_model()
    modules = dict(bert.named_modules())
    for p, _ in jax.tree_util.tree_flatten_with_path(lp["params"])[0]:
        path = "params/" + "/".join(k.key for k in p if hasattr(k, "key"))
        if path.endswith(("kernel", "embedding")):  # every weight's module exists
            assert minilm.torch_module_name(path) in modules, path
    model = peft.PeftModel.from_pretrained(bert, d).eval()
    got = torch_hidden(model)
    np.testing.assert_allclose(got[real], want[real], atol=2e-4, rtol=0)


def test_a_peft_adapter_runs_in_jaxlora_as_in_peft(torch_minilm, tmp_path):
    """An adapter made by PEFT itself (random B, rsLoRA, a rank pattern, the
    embedding adapted) read with load_peft: jaxlora's hidden states are PEFT's."""
    torch, peft, torch_model, torch_hidden, jax_hidden, template, real = torch_minilm
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["query", "value", "intermediate.dense", "word_embeddings"],
        rank_pattern={"value": 2},
        init_lora_weights=False,  # B random too: the adapter changes the output
    )
    model = peft.get_peft_model(torch_model(), config).eval()
    with torch.no_grad():  # smaller updates, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.05)
    want = torch_hidden(model)
    model.save_pretrained(tmp_path / "peft")
    lp = jaxlora.load_peft(tmp_path / "peft", template(3, rank=8), _names)
    value = lp["params"]["encoder"]["layer_0"]["attention"]["value"]["kernel"]
    query = lp["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert (value.rank, query.rank) == (2, 4)
    assert query.scale == pytest.approx(6 / 2)  # rsLoRA: alpha / sqrt(r)
    got = jax_hidden(lp)
    base = jax_hidden(jaxlora.base(lp))
    assert np.abs(want - base)[real].max() > 1e-2
    np.testing.assert_allclose(got[real], want[real], atol=2e-4, rtol=0)


# -- refusals ------------------------------------------------------------------------


def _small():
    params = {"enc": {"fc": {"kernel": jnp.ones((4, 3))}}}
    return params, jaxlora.init(params, jax.random.key(0), scheme="both_random", rank=2)


def test_residual_adapters_are_refused_with_the_fix(tmp_path):
    params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}}
    lp = jaxlora.init(params, jax.random.key(1), scheme="pissa", rank=2)
    with pytest.raises(ValueError, match=r"'fc/kernel' \(pissa\).*to_plain_lora"):
        jaxlora.save_peft(tmp_path / "x", lp, {"fc/kernel": "fc"})
    assert not (tmp_path / "x").exists()
    plain = jaxlora.to_plain_lora(lp, params)
    jaxlora.save_peft(tmp_path / "x", plain, {"fc/kernel": "fc"})


def test_names_must_be_given_and_distinct(tmp_path):
    params, lp = _small()
    lp = {**lp, "dec": {"fc": lp["enc"]["fc"]}}
    with pytest.raises(ValueError, match=r"'dec/fc/kernel': not in module_names"):
        jaxlora.save_peft(tmp_path / "x", lp, {"enc/fc/kernel": "fc"})
    with pytest.raises(ValueError, match=r"gave 'fc' to both"):
        jaxlora.save_peft(tmp_path / "x", lp, lambda p, layer: "fc")
    with pytest.raises(ValueError, match=r"gave '' for '(enc|dec)/fc/kernel'"):
        jaxlora.save_peft(tmp_path / "x", lp, lambda p, layer: "")
    assert not (tmp_path / "x").exists()


def test_stacked_names_from_a_mapping(stacked, tmp_path):
    """A mapping gives a stacked weight one name per layer, or is refused."""
    _, _, adapted = stacked
    lp = adapted(1, rank=2)
    names = {p: dotted(p, ()) for p in _flat_paths(lp)}
    with pytest.raises(ValueError, match=r"holds 3 stacked layers \(3,\)"):
        jaxlora.save_peft(tmp_path / "x", lp, names)
    for p in names:
        if p.startswith("params/blocks"):
            names[p] = [dotted(p, (i,)) for i in range(3)]
    jaxlora.save_peft(tmp_path / "x", lp, names)
    back = jaxlora.load_peft(tmp_path / "x", adapted(2, rank=2), dotted)
    np.testing.assert_array_equal(
        back["params"]["blocks"]["fc"]["kernel"].a,
        lp["params"]["blocks"]["fc"]["kernel"].a,
    )


def _flat_paths(tree):
    return [
        "/".join(str(getattr(k, "key", k)) for k in kp)
        for kp, x in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=jaxlora.is_lora
        )[0]
        if jaxlora.is_lora(x)
    ]


def test_existing_directories_are_kept(tmp_path):
    params, lp = _small()
    names = {"enc/fc/kernel": "enc.fc"}
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        jaxlora.save_peft(other, lp, names)
    with pytest.raises(ValueError, match=r"holds 'todo.txt', which"):
        jaxlora.save_peft(other, lp, names, overwrite=True)
    assert (other / "todo.txt").read_text() == "mine"
    d = jaxlora.save_peft(tmp_path / "a", lp, names)
    jaxlora.save_peft(d, lp, names, overwrite=True)  # a PEFT adapter: replaced
    for bad in ("enc..fc", ".enc", "enc.", ""):  # an empty part: no torch module
        with pytest.raises(ValueError, match=rf"module_names gave {bad!r}"):
            jaxlora.save_peft(tmp_path / "b", lp, {"enc/fc/kernel": bad})
    assert not (tmp_path / "b").exists()


def test_load_names_every_mismatch(tmp_path):
    """Missing modules, a linear/embedding mix-up, shapes that do not fit, tensors
    nobody reads, configs plain LoRA cannot hold, corrupt files: each named."""
    params, lp = _small()
    d = jaxlora.save_peft(tmp_path / "a", lp, {"enc/fc/kernel": "enc.fc"})
    with pytest.raises(ValueError, match=r"'enc/fc/kernel' layer \(\): "):
        jaxlora.load_peft(d, lp, {"enc/fc/kernel": "dec.fc"})
    wide = {"enc": {"fc": {"kernel": jnp.ones((5, 3))}}}
    wide = jaxlora.init(wide, jax.random.key(0), rank=2)
    with pytest.raises(ValueError, match=r"A \[2, 4\] and B \[3, 2\] do not fit"):
        jaxlora.load_peft(d, wide, {"enc/fc/kernel": "enc.fc"})
    both = {**lp, "dec": {"fc": lp["enc"]["fc"]}}
    d2 = jaxlora.save_peft(
        tmp_path / "b", both, {"enc/fc/kernel": "enc.fc", "dec/fc/kernel": "dec.fc"}
    )
    with pytest.raises(ValueError, match=r"tensors no target reads: \['base_model"):
        jaxlora.load_peft(d2, lp, {"enc/fc/kernel": "enc.fc"})
    config = json.loads((tmp_path / "a" / _peft.CONFIG).read_text())
    for field, value in (("use_dora", True), ("bias", "all"), ("peft_type", "IA3")):
        (tmp_path / "a" / _peft.CONFIG).write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=field if field != "peft_type" else "IA3"):
            jaxlora.load_peft(d, lp, {"enc/fc/kernel": "enc.fc"})
    for alpha in (0, -4, float("nan"), float("inf")):  # loaded as no-op, reversed..
        (tmp_path / "a" / _peft.CONFIG).write_text(
            json.dumps({**config, "lora_alpha": alpha})
        )
        with pytest.raises(ValueError, match=r"lora_alpha=.* \(a finite number > 0"):
            jaxlora.load_peft(d, lp, {"enc/fc/kernel": "enc.fc"})
    (tmp_path / "a" / _peft.CONFIG).write_text(json.dumps(config))
    weights = tmp_path / "a" / _peft.WEIGHTS
    tensors = _safetensors.read(str(weights))
    good = weights.read_bytes()
    extra = {**tensors, "base_model.model.enc.fc.steps": np.zeros(3, np.float32)}
    blob = _safetensors.encode(extra, {"format": "pt"})  # then relabelled I32
    steps = b'"base_model.model.enc.fc.steps":{"dtype":"F32"'
    assert steps in blob
    weights.write_bytes(blob.replace(steps, steps.replace(b"F32", b"I32")))
    with pytest.raises(
        ValueError, match=r"'base_model.model.enc.fc.steps' has dtype I32"
    ):
        jaxlora.load_peft(d, lp, {"enc/fc/kernel": "enc.fc"})
    weights.write_bytes(good)
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        jaxlora.load_peft(d, lp, {"enc/fc/kernel": "enc.fc"})
    with pytest.raises(FileNotFoundError, match="no such directory"):
        jaxlora.load_peft(tmp_path / "nothing", lp, {"enc/fc/kernel": "enc.fc"})


# -- what PEFT itself reads ------------------------------------------------------------


def _torch_peft():
    torch = require("torch", "pip install torch==2.13.0 transformers peft")
    peft = require("peft", "pip install peft")
    return torch, peft


def test_names_that_end_other_names_keep_their_own_scales(tmp_path):
    """PEFT gives a module the first pattern key matching its name *or a dotted
    suffix of it*: ``fc`` would catch ``dec.fc``. Each module gets PEFT's scale
    and rank as jaxlora's, in PEFT and back through load_peft."""
    torch, peft = _torch_peft()

    class Sub(torch.nn.Module):
        def __init__(self, n_in):
            super().__init__()
            self.fc = torch.nn.Linear(n_in, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.dec, self.enc = torch.nn.Linear(4, 4), Sub(4), Sub(4)

        def forward(self, x):
            return self.enc.fc(self.dec.fc(self.fc(x)))

    params = {k: {"kernel": jnp.ones((4, 4))} for k in ("fc", "dec.fc", "enc.fc")}
    lp = jaxlora.init(
        params,
        jax.random.key(0),
        rank=2,
        alpha=8.0,
        rank_pattern={r"^fc": 3},
        alpha_pattern={r"^fc": 16.0},
    )
    names = lambda path, layer: path.rsplit("/", 1)[0]  # noqa: E731
    d = jaxlora.save_peft(tmp_path / "a", lp, names)
    model = peft.PeftModel.from_pretrained(Net(), d)
    for name in ("fc", "dec.fc", "enc.fc"):
        layer = model.base_model.model.get_submodule(name)
        node = lp[name]["kernel"]
        assert (layer.r["default"], layer.scaling["default"]) == (node.rank, node.scale)
    back = jaxlora.load_peft(d, lp, names)
    assert {n: (x.rank, x.scale) for n, x in _nodes(back).items()} == {
        n: (x.rank, x.scale) for n, x in _nodes(lp).items()
    }


def test_peft_extras_are_read_or_refused(tmp_path):
    """PEFT stores a targeted embedding's base table (accepted when it is the base
    here) and a head tied to the embedding (accepted when its factors are the
    embedding's); a config that does not target a module, PiSSA-initialized
    adapters (a residual base) and unknown variants are refused by name."""
    torch, peft = _torch_peft()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(10, 4)
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed_tokens.weight  # tied

        def forward(self, ids):
            return self.lm_head(self.embed_tokens(ids))

    torch.manual_seed(0)
    net = Net()
    config = peft.LoraConfig(
        r=2,
        target_modules=["embed_tokens", "lm_head"],
        init_lora_weights=False,
        ensure_weight_tying=True,
    )
    model = peft.get_peft_model(net, config)
    with torch.no_grad():  # tied as PEFT ties a transformers model's head
        emb, head = model.base_model.model.embed_tokens, model.base_model.model.lm_head
        head.lora_A["default"].weight.copy_(emb.lora_embedding_B["default"].T)
        head.lora_B["default"].weight.copy_(emb.lora_embedding_A["default"].T)
    model.save_pretrained(tmp_path / "tied")
    ids = torch.tensor([[1, 2, 9]])
    with torch.no_grad():
        want = model(ids).numpy()
    table = net.embed_tokens.weight.detach().numpy()
    # what PEFT adds for a transformers model (save_embedding_layers="auto")
    file = tmp_path / "tied" / _peft.WEIGHTS
    tensors = _safetensors.read(str(file))
    tensors["base_model.model.embed_tokens.base_layer.weight"] = table
    tensors["base_model.model.lm_head.base_layer.weight"] = table  # the tied head's
    file.write_bytes(_safetensors.encode(tensors, {"format": "pt"}))
    names = {"embed/embedding": "embed_tokens"}
    params = {"embed": {"embedding": jnp.asarray(table)}}
    tmpl = jaxlora.init(params, jax.random.key(0), rank=2, targets=["embed"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tied: no warning about the read-out
        back = jaxlora.load_peft(tmp_path / "tied", tmpl, names)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # a bf16 port
    jaxlora.load_peft(
        tmp_path / "tied",
        jaxlora.init(bf16, jax.random.key(0), rank=2, targets=["embed"]),
        names,
    )

    def tied(p, ids):  # lookup, then the tied read-out (attend)
        e = p["embed"]["embedding"]
        return e[ids] @ e.T

    got = np.asarray(jaxlora.lora_apply(tied)(back, jnp.asarray(ids.numpy())))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
    other = {"embed": {"embedding": jnp.asarray(table) + 1}}
    other = jaxlora.init(other, jax.random.key(0), rank=2, targets=["embed"])
    with pytest.raises(ValueError, match=r"stores a base weight for 'embed_tokens'"):
        jaxlora.load_peft(tmp_path / "tied", other, names)

    cfg_file = tmp_path / "tied" / _peft.CONFIG
    config = json.loads(cfg_file.read_text())
    for edit, match in (
        ({"target_modules": ["lm_head"]}, r"does not target 'embed_tokens'"),
        ({"exclude_modules": ["embed_tokens"]}, r"does not target 'embed_tokens'"),
        ({"init_lora_weights": "pissa_niter_4"}, r"rewrites the base weights"),
        ({"kasa_config": {}}, r"sets kasa_config=\{\}"),
        ({"layers_to_transform": [0]}, r"sets layers_to_transform=\[0\]"),
        ({"layers_to_transform": 0}, r"sets layers_to_transform=0"),  # 0 == False
        ({"alpha_pattern": {"lm_head": 1}}, r"'lm_head' is tied to 'embed_tokens'"),
        ({"ensure_weight_tying": False}, r"tensors no target reads: \['base_model"),
    ):
        cfg_file.write_text(json.dumps({**config, **edit}))
        with pytest.raises(ValueError, match=match):
            jaxlora.load_peft(tmp_path / "tied", tmpl, names)


def test_a_table_named_otherwise_is_a_peft_embedding(tmp_path):
    """A table that is not a leaf named ``embedding`` (``self.param("wte")``, a
    plain tree) used to be written as a Linear's ``lora_A``/``lora_B``, which PEFT
    silently leaves unread on its ``nn.Embedding`` (no effect at all). A model
    that looks it up (init's ``apply_fn``) makes it a table; load_peft reads an
    embedding adapter onto a target initialised without the model, as the file's
    keys say what the torch module is."""
    torch, peft = _torch_peft()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(10, 6)

        def forward(self, ids):
            return self.wte(ids)

    torch.manual_seed(0)
    net = Net()
    table = net.wte.weight.detach().numpy()
    params = {"wte": jnp.asarray(table)}
    ids = jnp.array([[1, 2, 9], [0, 0, 3]])
    lookup = lambda p, ids: p["wte"][ids]  # noqa: E731
    lp = jaxlora.init(
        params,
        jax.random.key(1),
        rank=2,
        targets=["wte"],
        scheme="both_random",
        apply_fn=lookup,
        example_args=(ids,),
    )
    assert lp["wte"].spec.embedding
    d = jaxlora.save_peft(tmp_path / "a", lp, {"wte": "wte"})
    keys = set(_safetensors.read(os.path.join(d, _peft.WEIGHTS)))
    assert keys == {
        "base_model.model.wte.lora_embedding_A",
        "base_model.model.wte.lora_embedding_B",
    }
    model = peft.PeftModel.from_pretrained(net, d)
    with torch.no_grad():
        got = model(torch.tensor(np.asarray(ids))).numpy()
    want = np.asarray(jaxlora.lora_apply(lookup)(lp, ids))
    assert np.abs(want - table[np.asarray(ids)]).max() > 1e-2  # the adapter acts
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    plain = jaxlora.init(params, jax.random.key(2), rank=2, targets=["wte"])
    assert not plain["wte"].spec.embedding  # no model: a name is all there is
    back = jaxlora.load_peft(d, plain, {"wte": "wte"})
    assert back["wte"].spec.embedding
    np.testing.assert_array_equal(back["wte"].a, lp["wte"].a)
    np.testing.assert_array_equal(back["wte"].b, lp["wte"].b)


@pytest.mark.parametrize("vocab", [10, 6])  # 6: the table is square
def test_a_table_only_read_out_through_is_written_as_peft_reads_it(vocab, tmp_path):
    """A table the model only reads out through (``x @ tableᵀ``, Embed.attend)
    gets the feature axis as its input, and its factors were written as a
    transposed kernel's: PEFT refused the file (a size mismatch), or for a square
    table merged the transposed update. A torch embedding's update is laid out like
    the table; both ways (save_peft, then PEFT's own file read back by load_peft)
    the merged tables are PEFT's."""
    torch, peft = _torch_peft()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(vocab, 6)

    torch.manual_seed(0)
    net = Net()
    table = net.wte.weight.detach().numpy()
    params = {"wte": {"embedding": jnp.asarray(table)}}  # an Embed's leaf
    x = jax.random.normal(jax.random.key(0), (3, 6))
    read_out = lambda p, x: x @ p["wte"]["embedding"].T  # noqa: E731
    lp = jaxlora.init(
        params, jax.random.key(1), rank=2, scheme="both_random",
        targets=["wte/embedding"], apply_fn=read_out, example_args=(x,),
    )  # fmt: skip
    node = lp["wte"]["embedding"]
    assert node.spec.layout.in_axes == (1,) and node.spec.embedding
    want = np.asarray(jaxlora.merge(lp)["wte"]["embedding"])
    assert np.abs(want - table).max() > 1e-3  # the adapter acts
    names = {"wte/embedding": "wte"}
    d = jaxlora.save_peft(tmp_path / "a", lp, names)
    model = peft.PeftModel.from_pretrained(net, d)
    got = model.merge_and_unload().wte.weight.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    back = jaxlora.load_peft(d, lp, names)
    np.testing.assert_array_equal(jaxlora.merge(back)["wte"]["embedding"], want)


def test_tables_warn_that_peft_adapts_lookups_only(stacked, tmp_path):
    _, _, adapted = stacked
    lp = adapted(1, rank=2)
    with pytest.warns(UserWarning, match=r"save_peft: \['embed'\] are embedding"):
        jaxlora.save_peft(tmp_path / "a", lp, dotted)
    with pytest.warns(UserWarning, match=r"load_peft: \['embed'\] are embedding"):
        jaxlora.load_peft(tmp_path / "a", lp, dotted)


def test_a_pickled_peft_adapter_is_named_not_read(tmp_path):
    """PEFT's safe_serialization=False writes adapter_model.bin: a raw
    FileNotFoundError for the .safetensors used to be all the user got."""
    _, lp = _small()
    names = {"enc/fc/kernel": "enc.fc"}
    d = jaxlora.save_peft(tmp_path / "a", lp, names)
    os.rename(os.path.join(d, _peft.WEIGHTS), os.path.join(d, "adapter_model.bin"))
    with pytest.raises(ValueError, match=r"holds adapter_model.bin .* safe_serial"):
        jaxlora.load_peft(d, lp, names)


def test_saving_keeps_the_model_card_and_the_directory_readable(tmp_path):
    params, lp = _small()
    names = {"enc/fc/kernel": "enc.fc"}
    d = jaxlora.save_peft(tmp_path / "a", lp, names)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700
    (tmp_path / "a" / "README.md").write_text("my model card")
    os.chmod(d, 0o750)
    jaxlora.save_peft(d, lp, names, overwrite=True)
    assert (tmp_path / "a" / "README.md").read_text() == "my model card"
    assert os.stat(d).st_mode & 0o777 == 0o750


def test_malformed_safetensors_are_refused(tmp_path):
    """Trailing bytes, overlapping tensors and a repeated name (which the
    reference reader refuses too) are errors, not silently read."""
    good = _safetensors.encode(
        {"x": np.arange(4, dtype=np.float32), "y": np.ones(2, np.float32)}, {}
    )
    (n,) = np.frombuffer(good[:8], "<u8")
    header = json.loads(good[8 : 8 + n])
    cases = {
        "trailing": (header, good[8 + n :] + b"\0" * 8, r"8 bytes after"),
        "overlap": (
            {**header, "y": {**header["y"], "data_offsets": [0, 8]}},
            good[8 + n :],
            r"starts at byte",
        ),
    }
    for name, (head, data, match) in cases.items():
        text = json.dumps(head).encode()
        text += b" " * (-len(text) % 8)
        file = tmp_path / name
        file.write_bytes(np.uint64(len(text)).tobytes() + text + data)
        with pytest.raises(ValueError, match=match):
            _safetensors.read(str(file))
    text = good[8 : 8 + n].decode().replace('"y":', '"x":', 1).encode()
    (tmp_path / "dup").write_bytes(good[:8] + text + good[8 + n :])
    with pytest.raises(ValueError, match=r"names \['x'\] more than once"):
        _safetensors.read(str(tmp_path / "dup"))


def test_the_export_example_runs_a_saved_adapter_in_peft(torch_minilm, tmp_path):
    """``python -m examples.export_peft ADAPTER OUT``: a ``jaxlora.save``d MiniLM
    adapter, exported and run by PEFT on transformers, gives jaxlora's values
    (measured on the main job's trained adapter: 3.1e-6, against an effect of 2.4)."""
    from examples import export_peft

    template = torch_minilm[5]
    lp = template(2, scheme="both_random", rank=4, alpha=8)
    lp = jax.tree.map(
        lambda n: n.replace(b=n.b * 0.05) if jaxlora.is_lora(n) else n,
        lp,
        is_leaf=jaxlora.is_lora,
    )
    jaxlora.save(tmp_path / "adapter", lp)
    path, params = export_peft.export(tmp_path / "adapter", tmp_path / "peft")
    diff, effect = export_peft.compare(path, params)
    assert effect > 1e-2 and diff < 2e-4, (diff, effect)
