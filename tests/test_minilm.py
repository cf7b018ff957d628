"""Tests for the MiniLM port (examples/minilm.py) and the Rotten Tomatoes data."""

import os
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import minilm  # noqa: E402
from examples import rotten_tomatoes as rt  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
]


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def apply(encoder):
    model, _ = encoder
    return jax.jit(model.apply)


def _embed(encoder, apply, texts, max_len):
    batch = minilm.MiniLMTokenizer(max_len)(texts)
    hidden = apply(encoder[1], batch["input_ids"], batch["attention_mask"])
    return np.asarray(minilm.mean_pool(hidden, batch["attention_mask"]))


def _cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------ the model


def test_sentence_similarity(encoder, apply):
    e = _embed(encoder, apply, SENTENCES, max_len=16)
    related, unrelated = _cosine(e[0], e[1]), _cosine(e[0], e[2])
    # Measured: 0.7553 and -0.0461 (sentence-transformers reports 0.755, -0.046).
    assert 0.70 < related < 0.80
    assert abs(unrelated) < 0.15
    assert related > unrelated + 0.5


def test_padding_does_not_change_embeddings(encoder, apply):
    short = _embed(encoder, apply, SENTENCES, max_len=12)
    long = _embed(encoder, apply, SENTENCES, max_len=40)
    np.testing.assert_allclose(short, long, atol=1e-5)


def test_matches_transformers_bert(encoder, apply):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from conftest import require

    torch = require("torch", "pip install torch==2.13.0 transformers")
    transformers = require("transformers", "pip install transformers")
    reference = transformers.BertModel.from_pretrained(minilm.model_dir()).eval()
    texts = [*SENTENCES, "Padding matters: this sentence is the longest one here."]
    batch = minilm.MiniLMTokenizer(24)(texts)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(batch["input_ids"]).long(),
            attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
        ).last_hidden_state.numpy()
    got = np.asarray(apply(encoder[1], batch["input_ids"], batch["attention_mask"]))
    real = batch["attention_mask"].astype(bool)
    assert real.sum() < real.size  # the batch really is padded
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


def test_param_paths_are_lora_friendly(encoder):
    params = encoder[1]["params"]
    paths = {
        jax.tree_util.keystr(p, simple=True, separator="/"): v.shape
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert paths["embeddings/word_embeddings/embedding"] == (30522, 384)
    assert paths["encoder/layer_5/attention/query/kernel"] == (384, 384)
    assert paths["encoder/layer_0/intermediate/kernel"] == (384, 1536)
    assert paths["encoder/layer_0/output/kernel"] == (1536, 384)
    for suffix in ("query", "key", "value", "attn_out", "intermediate", "output"):
        kernels = [p for p in paths if p.endswith(f"/{suffix}/kernel")]
        assert len(kernels) == 6, (suffix, kernels)
        assert all(len(paths[p]) == 2 for p in kernels)
    n_params = sum(int(np.prod(s)) for s in paths.values())
    assert n_params == 22_713_216 - 147_840  # the checkpoint minus the pooler


def test_convert_rejects_unknown_tensors():
    state = {"encoder.layer.0.crossattention.query.weight": np.zeros((2, 2))}
    with pytest.raises(ValueError, match="crossattention"):
        minilm.convert_hf_weights(state)


def test_tokenizer_fixed_shapes():
    tok = minilm.MiniLMTokenizer(8)
    batch = tok(["hello world", "a much longer sentence that gets truncated here"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 8)
    assert batch["input_ids"].dtype == np.int32
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 8]
    assert batch["input_ids"][1, -1] == 102  # [SEP] kept after truncation
    with pytest.raises(TypeError, match="one str"):
        tok("hello")


def test_classifier_params(encoder):
    model, variables = minilm.init_classifier(encoder[1], num_classes=3, seed=1)
    ids = jnp.ones((2, 8), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids, ids)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, expected)
    assert variables["params"]["encoder"] is encoder[1]["params"]["encoder"]
    _, again = minilm.init_classifier(encoder[1], num_classes=3, seed=1)
    _, other = minilm.init_classifier(encoder[1], num_classes=3, seed=2)
    head = variables["params"]["classifier"]["kernel"]
    chex.assert_trees_all_equal(head, again["params"]["classifier"]["kernel"])
    assert not np.allclose(head, other["params"]["classifier"]["kernel"])
    with pytest.raises(ValueError, match="num_classes"):
        minilm.init_classifier(encoder[1], num_classes=0)
    with pytest.raises(ValueError, match="load_minilm"):
        minilm.init_classifier({"embeddings": {}}, num_classes=2)


def test_classifier_dropout_flag(encoder):
    model, variables = minilm.init_classifier(encoder[1], dropout_rate=0.5)
    batch = minilm.MiniLMTokenizer(8)(SENTENCES[:2])
    run = jax.jit(model.apply, static_argnames="deterministic")
    args = (variables, batch["input_ids"], batch["attention_mask"])
    eval_logits = run(*args, deterministic=True)
    assert eval_logits.shape == (2, 2)
    chex.assert_trees_all_equal(eval_logits, run(*args, deterministic=True))
    rngs = {"dropout": jax.random.key(0)}
    train_logits = run(*args, deterministic=False, rngs=rngs)
    assert not np.allclose(eval_logits, train_logits)


# ------------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def corpus():
    return rt.load_rotten_tomatoes()


def test_corpus_counts(corpus):
    texts, labels = corpus
    assert len(texts) == len(labels) == 12_808
    assert int(labels.sum()) == rt.EXPECTED_COUNTS["fresh"] == 7_403
    assert int((labels == 0).sum()) == rt.EXPECTED_COUNTS["rotten"] == 5_405
    assert all(t.strip() for t in texts)


def test_splits(corpus):
    _, labels = corpus
    splits = rt.split_indices(labels, seed=0)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 10_246, "validation": 1_280, "test": 1_282}
    everything = np.concatenate(list(splits.values()))
    assert len(np.unique(everything)) == len(labels)  # disjoint and covering
    for idx in splits.values():  # stratified: each keeps the 57.8% fresh rate
        assert abs(labels[idx].mean() - labels.mean()) < 0.005
    same = rt.split_indices(labels, seed=0)
    chex.assert_trees_all_equal(splits, same)
    different = rt.split_indices(labels, seed=1)
    assert not np.array_equal(splits["test"], different["test"])
    with pytest.raises(ValueError, match="fractions"):
        rt.split_indices(labels, seed=0, fractions=(0.8, 0.3, 0.1))


def test_load_splits_align_texts_and_labels(corpus):
    texts, labels = corpus
    split = rt.load_splits(seed=3)["validation"]
    assert [texts[i] for i in split.indices] == split.texts
    np.testing.assert_array_equal(labels[split.indices], split.labels)
