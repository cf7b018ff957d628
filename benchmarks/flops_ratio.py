"""FLOPs and temp memory of a LoRA training step against full fine-tuning (XLA's count).

A transformer built from Flax's own layers (``nn.Embed``,
``nn.MultiHeadDotProductAttention``, ``nn.Dense`` MLP and head), in three forms:
a Python loop of Linen blocks, the same blocks under ``nn.scan`` (a while loop, and
``unroll=True``: the same stacked kernels and scan, emitted by XLA without a loop), and
Flax NNX.
Every kernel is adapted (``jaxlora.init`` default targets: the embedding table is
not a kernel) with layouts inferred from the model. Both steps are ``jax.grad`` +
``optax.adam`` + ``optax.apply_updates`` under ``jax.jit``; the LoRA step is
``jaxlora.lora_apply`` + ``jaxlora.freeze_base(optax.adam)``.

For the Linen variants the same step is also measured on a hand-factored reference
(`HandLoraDot`: Flax's layers given a ``dot_general`` that adds ``s·(x@a)@b`` to
``x@stop_gradient(W0)``, differentiated by plain JAX), the yardstick the engine must
not exceed.

Run: ``python benchmarks/flops_ratio.py`` (``--small`` for the test-sized model).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx
from flax import traverse_util

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jaxlora  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
    d_model: int = 512
    heads: int = 8
    layers: int = 4
    vocab: int = 1000
    batch: int = 32
    seq: int = 128
    rank: int = 8


FULL = Size()
SMALL = Size(d_model=256, heads=4, layers=2, vocab=500, batch=8, seq=64)


# -- models ---------------------------------------------------------------------------


class HandLoraDot(nn.Module):
    """The hand-factored reference: a ``dot_general`` for Flax's own layers that adds
    ``s·(x@a)@b`` to ``x@stop_gradient(W0)`` and leaves the rest to plain JAX autodiff.

    Passed as ``dot_general_cls`` to ``nn.Dense`` and as ``qkv_dot_general_cls`` /
    ``out_dot_general_cls`` to ``nn.MultiHeadDotProductAttention``; it owns the
    ``lora_a`` (contracted axes of the kernel, r) and ``lora_b`` (r, other axes) params.
    Written independently of jaxlora's engine: the yardstick the engine is held to.
    """

    rank: int
    alpha: float = 16.0  # s = alpha / rank = 2 at r = 8, as in the main job

    @nn.compact
    def __call__(self, x, kernel, dimension_numbers, precision=None):
        (x_c, k_c), (x_b, _k_b) = dimension_numbers
        if x_b:
            raise ValueError("HandLoraDot covers unbatched contractions only")
        k_out = [kernel.shape[i] for i in range(kernel.ndim) if i not in k_c]
        normal = nn.initializers.normal(1.0 / math.sqrt(self.rank))
        a = self.param("lora_a", normal, (*(kernel.shape[i] for i in k_c), self.rank))
        b = self.param("lora_b", normal, (self.rank, *k_out))
        frozen = jax.lax.stop_gradient(kernel)
        base = jax.lax.dot_general(x, frozen, dimension_numbers, precision=precision)
        t = jax.lax.dot_general(x, a, ((x_c, tuple(range(len(k_c)))), ((), ())))
        return base + jnp.tensordot(t * (self.alpha / self.rank), b, axes=1)


class Block(nn.Module):
    size: Size
    lora: int = 0  # > 0: every kernel hand-factored at this rank (the reference)

    @nn.compact
    def __call__(self, x, _=None):
        s = self.size
        dot = functools.partial(HandLoraDot, self.lora) if self.lora else None
        dense = functools.partial(nn.Dense, dot_general_cls=dot)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=s.heads, qkv_dot_general_cls=dot, out_dot_general_cls=dot
        )
        h = nn.LayerNorm()(x)
        x = x + attn(h)
        h = dense(4 * s.d_model)(nn.LayerNorm()(x))
        x = x + dense(s.d_model)(jax.nn.gelu(h))
        return x, None


class LinenLM(nn.Module):
    size: Size
    scan: bool = False
    lora: int = 0
    unroll: int | bool = 1  # nn.scan's: True emits the layers without a while loop

    @nn.compact
    def __call__(self, ids):
        s = self.size
        x = nn.Embed(s.vocab, s.d_model)(ids)
        if self.scan:
            blocks = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=s.layers,
                unroll=self.unroll,
            )
            x = blocks(s, self.lora)(x, None)[0]
        else:
            for _ in range(s.layers):
                x = Block(s, self.lora)(x)[0]
        dot = functools.partial(HandLoraDot, self.lora) if self.lora else None
        return nn.Dense(s.vocab, dot_general_cls=dot)(nn.LayerNorm()(x))


class NnxBlock(nnx.Module):
    def __init__(self, s: Size, rngs):
        d = s.d_model
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(s.heads, d, decode=False, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class NnxLM(nnx.Module):
    def __init__(self, s: Size, rngs):
        self.embed = nnx.Embed(s.vocab, s.d_model, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(s, rngs) for _ in range(s.layers)])
        self.ln = nnx.LayerNorm(s.d_model, rngs=rngs)
        self.head = nnx.Linear(s.d_model, s.vocab, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


VARIANTS = ("linen", "scan", "scan_unrolled", "nnx")
_LINEN = {  # LinenLM's fields per Linen variant
    "linen": {},
    "scan": {"scan": True},
    "scan_unrolled": {"scan": True, "unroll": True},
}


def build(variant: str, s: Size):
    """``(apply_fn, params, ids)`` for ``variant`` in `VARIANTS`."""
    ids = jax.random.randint(jax.random.key(1), (s.batch, s.seq), 0, s.vocab)
    if variant == "nnx":
        graphdef, state = nnx.split(NnxLM(s, nnx.Rngs(0)))
        return (lambda st, ids: nnx.merge(graphdef, st)(ids)), state, ids
    model = LinenLM(s, **_LINEN[variant])
    return model.apply, model.init(jax.random.key(0), ids), ids


# -- steps ----------------------------------------------------------------------------


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def full_step_fn(apply_fn, tx):
    def step(params, opt_state, ids):
        loss, g = jax.value_and_grad(lambda p: _xent(apply_fn(p, ids), ids))(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def lora_step_fn(apply_fn, tx, *, factored=True):
    """A LoRA training step through ``jaxlora.lora_apply(apply_fn, factored=...)``."""
    lora = jaxlora.lora_apply(apply_fn, factored=factored)

    def step(lp, opt_state, ids):
        def loss(t):
            return _xent(lora(t, ids), ids)

        value, g = jax.value_and_grad(loss)(lp)
        updates, opt_state = tx.update(g, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, value

    return step


def naive_step_fn(apply_fn, tx):
    """LoRA formed the naive way: merge ``w + s·a@b`` and differentiate through it."""
    return lora_step_fn(apply_fn, tx, factored=False)


def reference_cost(variant: str, s: Size):
    """``(flops, temp_bytes)`` of the hand-factored reference's LoRA step (Linen
    variants): the same model with `HandLoraDot` in every layer, ``jax.grad`` over
    the ``lora_a``/``lora_b`` leaves only, ``optax.adam`` on them, jitted."""
    model = LinenLM(s, lora=s.rank, **_LINEN[variant])
    ids = build(variant, s)[2]
    flat = traverse_util.flatten_dict(model.init(jax.random.key(0), ids), sep="/")
    is_lora = lambda k: k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")
    frozen = {k: v for k, v in flat.items() if not is_lora(k)}
    train = {k: v for k, v in flat.items() if is_lora(k)}
    tx = optax.adam(1e-3)

    def step(train, opt_state, frozen, ids):
        def loss(t):
            tree = traverse_util.unflatten_dict({**frozen, **t}, sep="/")
            return _xent(model.apply(tree, ids), ids)

        value, g = jax.value_and_grad(loss)(train)
        updates, opt_state = tx.update(g, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, value

    return compiled_cost(step, train, tx.init(train), frozen, ids)


def compiled_cost(fn, *args):
    """``(flops, temp_bytes)`` of ``jax.jit(fn)`` compiled for ``args``."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"]), int(compiled.memory_analysis().temp_size_in_bytes)


def setup(variant: str, s: Size):
    """Everything a step needs: apply_fn, params, adapted params, ids, optimizers.

    The adapted tree comes from the public API: ``jaxlora.init`` with the default
    targets (every kernel; embedding tables are not kernels) and the layouts inferred
    from ``apply_fn``; the LoRA optimizer is ``jaxlora.freeze_base(optax.adam)``.
    """
    apply_fn, params, ids = build(variant, s)
    lp = jaxlora.init(
        params,
        jax.random.key(2),
        scheme="he",
        rank=s.rank,
        apply_fn=apply_fn,
        example_args=(ids,),
    )
    tx = optax.adam(1e-3)
    ltx = jaxlora.freeze_base(optax.adam(1e-3))
    return apply_fn, params, lp, ids, tx, ltx, jaxlora.adapters(lp)


def measure(variant: str, s: Size = FULL) -> dict:
    apply_fn, params, lp, ids, tx, ltx, layouts = setup(variant, s)
    full_flops, full_temp = compiled_cost(
        full_step_fn(apply_fn, tx), params, tx.init(params), ids
    )
    lora_flops, lora_temp = compiled_cost(
        lora_step_fn(apply_fn, ltx), lp, ltx.init(lp), ids
    )
    ref_flops, ref_temp = (
        reference_cost(variant, s) if variant in _LINEN else (None, None)
    )
    return {
        "variant": variant,
        "adapted": len(layouts),
        "ref_flops": ref_flops,
        "ref_temp": ref_temp,
        "full_flops": full_flops,
        "lora_flops": lora_flops,
        "ratio": lora_flops / full_flops,
        "full_temp": full_temp,
        "lora_temp": lora_temp,
    }


def _cell(x, scale, fmt):
    return "-" if x is None else format(x / scale, fmt)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the test-sized model")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    s = SMALL if args.small else FULL
    print(f"model: {s}")
    print(
        "| variant | adapted | full GFLOPs | LoRA GFLOPs | LoRA / full | "
        "hand-factored / full | full temp MiB | LoRA temp MiB | "
        "hand-factored temp MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v in args.variants.split(","):
        r = measure(v, s)
        ref = None if r["ref_flops"] is None else r["ref_flops"] / r["full_flops"]
        print(
            f"| {v} | {r['adapted']} | {r['full_flops'] / 1e9:.2f} | "
            f"{r['lora_flops'] / 1e9:.2f} | {r['ratio']:.4f} | "
            f"{_cell(ref, 1, '.4f')} | "
            f"{r['full_temp'] / 2**20:.1f} | {r['lora_temp'] / 2**20:.1f} | "
            f"{_cell(r['ref_temp'], 2**20, '.1f')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
