"""A small, reusable fine-tuning loop for the MiniLM sentence classifier.

Everything an experiment on the encoder task needs, for any LoRA scheme, rank,
alpha, learning rate or seed, and for full fine-tuning as the comparison:

- :func:`tokenize_splits` / :func:`batches`: fixed-shape numpy batches (one
  compilation), shuffled per epoch by a seeded ``numpy`` generator.
- :func:`make_schedule` / :func:`make_optimizer`: warmup + cosine or linear
  decay; AdamW on the factors and the ``classifier`` head only
  (``jaxlora.freeze_base``), optionally LoRA+, or on every weight.
- :func:`adapt`: ``jaxlora.init`` with a :class:`TrainConfig` (or the plain
  tree for full fine-tuning).
- :func:`make_train_step` / :func:`evaluate`: the jitted step and accuracy/loss.
- :func:`train`: the loop, with a ``callback(step, metrics)`` hook; returns the
  trained params and the curves.

Example:
    >>> from examples import finetune, minilm, rotten_tomatoes
    >>> _, enc = minilm.load_minilm()
    >>> model, variables = minilm.init_classifier(enc)
    >>> data = finetune.tokenize_splits(rotten_tomatoes.load_splits(seed=0), 48)
    >>> cfg = finetune.TrainConfig(steps=20, eval_every=10)
    >>> result = finetune.train(model, variables, data, cfg)  # doctest: +SKIP
    >>> result.history.val_accuracy[-1]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora

PyTree = Any
Batch = dict[str, np.ndarray]
#: ``callback(step, metrics)``: called after every step; ``metrics`` holds
#: ``loss``, ``lr``, ``examples_per_s`` and, after an evaluation,
#: ``val_accuracy`` and ``val_loss``.
Callback = Callable[[int, dict[str, float]], None]

HEAD = ("classifier",)
ALL_TARGETS = ("query", "key", "value", "attn_out", "intermediate", "output")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run.

    Attributes:
        scheme: a ``jaxlora.SCHEMES`` name.
        rank: LoRA rank.
        alpha: LoRA alpha (``None`` = rank).
        rslora: scale by ``alpha / sqrt(rank)``.
        targets: module names to adapt (PEFT ``target_modules`` style).
        lr: peak learning rate (factors and head; all weights when full).
        lora_plus_ratio: if set, ``b`` learns this many times faster (LoRA+).
        weight_decay: AdamW weight decay.
        warmup: warmup length as a fraction of the total steps.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after warmup.
        steps: total steps; ``None`` means ``epochs`` passes over the data.
        epochs: used when ``steps`` is None.
        batch_size: training batch size (every batch has exactly this size).
        eval_every: validate every this many steps (0 = only at the end).
        eval_batch_size: batch size of :func:`evaluate`.
        seed: seeds the adapters, the head, and the batch order.
        full_finetune: train every weight, no adapters.
        head_dropout: dropout on the pooled embedding before the head.
        max_grad_norm: global-norm gradient clipping (``None`` = off).
        buckets: sequence lengths batches are trimmed to (length grouping, see
            :func:`batches`); ``None`` or ``()`` keeps the tokenized length.
    """

    scheme: str = "kaiming_uniform"
    rank: int = 8
    alpha: float | None = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = ALL_TARGETS
    lr: float = 1e-3
    lora_plus_ratio: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.06
    schedule: str = "cosine"
    steps: int | None = None
    epochs: float = 2.0
    batch_size: int = 32
    eval_every: int = 200
    eval_batch_size: int = 128
    seed: int = 0
    full_finetune: bool = False
    head_dropout: float = 0.0
    max_grad_norm: float | None = 1.0
    buckets: tuple[int, ...] | None = (16, 24, 32, 40)

    def total_steps(self, n_train: int) -> int:
        """The number of steps of a run on ``n_train`` examples."""
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * (n_train // self.batch_size)))


@dataclasses.dataclass
class History:
    """Curves of a run (plain lists, JSON-ready with ``dataclasses.asdict``)."""

    step: list[int] = dataclasses.field(default_factory=list)
    loss: list[float] = dataclasses.field(default_factory=list)
    eval_step: list[int] = dataclasses.field(default_factory=list)
    val_accuracy: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns."""

    params: PyTree
    history: History
    seconds: float
    examples_per_s: float


# ----------------------------------------------------------------------- data


def tokenize_splits(splits: Mapping[str, Any], max_len: int) -> dict[str, Batch]:
    """Tokenizes ``rotten_tomatoes.load_splits()`` output to fixed-length arrays.

    Returns:
        ``{split: {"input_ids", "attention_mask", "labels"}}`` numpy int32 arrays.
    """
    from examples.minilm import MiniLMTokenizer

    tok = MiniLMTokenizer(max_len=max_len)
    out = {}
    for name, split in splits.items():
        enc = tok(split.texts)
        out[name] = {**enc, "labels": np.asarray(split.labels, np.int32)}
    return out


def subset(data: Batch, n: int) -> Batch:
    """The first ``n`` rows of every array of ``data``."""
    return {k: v[:n] for k, v in data.items()}


def lengths(data: Batch) -> np.ndarray:
    """Real token count of every row (the attention mask's row sums)."""
    return data["attention_mask"].sum(axis=1)


def _trim(batch: Batch, buckets: tuple[int, ...] | None) -> Batch:
    """Cuts padding columns down to the smallest bucket that holds every row."""
    if not buckets:
        return batch
    longest = int(lengths(batch).max())
    width = next((b for b in sorted(buckets) if b >= longest), None)
    if width is None:
        return batch
    return {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}


def batches(
    data: Batch,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    buckets: tuple[int, ...] | None = None,
    group: int = 50,
) -> Iterator[Batch]:
    """One epoch of full batches (the last partial batch is dropped).

    With ``buckets``, rows are grouped by length: each run of ``group`` batches
    (after shuffling) is sorted by length, cut into batches, and each batch is
    trimmed to the smallest bucket length that fits it; the batch order is then
    shuffled. Shapes stay few (one compilation per bucket) and much less
    padding is processed.

    Args:
        data: ``{"input_ids", "attention_mask", "labels"}`` arrays of equal length.
        batch_size: rows per batch.
        rng: shuffles the rows when given; ``None`` keeps the order.
        buckets: allowed sequence lengths, e.g. ``(16, 24, 32, 40, 48)``.
        group: batches per length-sorted group.

    Raises:
        ValueError: if ``data`` has fewer than ``batch_size`` rows.
    """
    n = len(data["labels"])
    if n < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} examples.")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    order = order[: n - n % batch_size]
    if buckets:
        size = lengths(data)
        span = group * batch_size
        order = np.concatenate(
            [
                chunk[np.argsort(size[chunk], kind="stable")]
                for chunk in np.split(order, range(span, len(order), span))
            ]
        )
    cuts = order.reshape(-1, batch_size)
    if buckets and rng is not None:
        cuts = cuts[rng.permutation(len(cuts))]
    for idx in cuts:
        yield _trim({k: v[idx] for k, v in data.items()}, buckets)


def _forever(
    data: Batch, batch_size: int, seed: int, buckets: tuple[int, ...] | None
) -> Iterator[Batch]:
    rng = np.random.default_rng(seed)
    while True:
        yield from batches(data, batch_size, rng=rng, buckets=buckets)


# ------------------------------------------------------------------ optimizer


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``cfg.warmup · total_steps``, then ``cfg.schedule``."""
    warm = int(round(cfg.warmup * total_steps))
    rest = max(1, total_steps - warm)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, rest)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, rest)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(
            f"schedule must be 'cosine', 'linear' or 'constant', got {cfg.schedule!r}."
        )
    if warm == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, warm)
    return optax.join_schedules([warmup, decay], [warm])


def make_optimizer(
    cfg: TrainConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the schedule; factors + head only unless ``full_finetune``."""
    schedule = make_schedule(cfg, total_steps)
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    adamw = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    if cfg.full_finetune:
        return optax.chain(*clip, adamw), schedule
    # the clip inside the wrapper sees the trained leaves only, whatever gradients
    # the frozen ones get (here none: the step's stop_frozen; in general lora_apply
    # zeroes only the adapted weights' own)
    if not cfg.lora_plus_ratio:
        return jaxlora.freeze_base(
            optax.chain(*clip, adamw), trainable=list(HEAD)
        ), schedule
    tx = jaxlora.lora_plus(
        optax.adamw,
        schedule,
        ratio=cfg.lora_plus_ratio,
        trainable=list(HEAD),
        weight_decay=cfg.weight_decay,
    )
    if clip:
        tx = optax.chain(jaxlora.freeze_base(clip[0], trainable=list(HEAD)), tx)
    return tx, schedule


#: Schemes that read the inputs each target meets (``apply_fn=``, ``batches=``).
INPUT_SCHEMES = ("eva", "corda", "corda_ipm", "corda_kpm")


def scheme_name(text: str) -> str:
    """An argparse ``type=`` for a scheme name: one of ``jaxlora.SCHEMES`` or a
    fast PiSSA with its power iterations, PEFT's ``pissa_niter_K``."""
    if text in jaxlora.SCHEMES or re.fullmatch(r"pissa_niter_\d+", text):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown scheme {text!r}; available: {', '.join(jaxlora.SCHEMES)}, "
        "pissa_niter_K"
    )


def adapt(
    variables: PyTree,
    cfg: TrainConfig,
    *,
    model: Any = None,
    train_data: Batch | None = None,
    n_batches: int = 4,
) -> PyTree:
    """``jaxlora.init`` on ``variables`` per ``cfg`` (unchanged if full fine-tune).

    The data-aware schemes get ``n_batches`` seeded training batches: LoRA-GA the
    classification loss (``loss_fn``), EVA and CorDA the model's forward
    (``apply_fn``; CorDA counts each batch as one sample), with the padded positions
    left out by the attention mask (``input_mask``, as PEFT's EVA does).
    """
    if cfg.full_finetune:
        return variables
    extra = {}
    if cfg.scheme in ("lora_ga", *INPUT_SCHEMES):
        if model is None or train_data is None:
            raise ValueError(
                f"scheme {cfg.scheme!r} needs data: pass model= and train_data=."
            )
        it = batches(train_data, cfg.batch_size, rng=np.random.default_rng(cfg.seed))
        few = [next(it) for _ in range(n_batches)]

        def forward(v, b):
            return model.apply(v, b["input_ids"], b["attention_mask"])

        def loss_fn(v, b):
            ones = jnp.ones(b["labels"].shape, jnp.float32)
            return _loss(forward(v, b), b["labels"], ones)

        if cfg.scheme == "lora_ga":
            extra = {"loss_fn": loss_fn, "batches": few}
        else:
            mask = lambda b: b["attention_mask"]  # noqa: E731
            extra = {"apply_fn": forward, "batches": few, "input_mask": mask}
    return jaxlora.init(
        variables,
        jax.random.key(cfg.seed),
        scheme=cfg.scheme,
        rank=cfg.rank,
        alpha=cfg.alpha,
        rslora=cfg.rslora,
        targets=list(cfg.targets),
        **extra,
    )


def count_params(params: PyTree, cfg: TrainConfig) -> tuple[int, int]:
    """``(trainable, total)`` numbers of scalars in ``params``."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    if cfg.full_finetune:
        return total, total
    mask = jaxlora.trainable_mask(params, trainable=list(HEAD))
    sizes = jax.tree.map(lambda m, x: int(np.prod(x.shape)) * bool(m), mask, params)
    return sum(jax.tree.leaves(sizes)), total


# ------------------------------------------------------------------ step, eval


def _loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def stop_frozen(params: PyTree, trainable: tuple[str, ...] = HEAD) -> PyTree:
    """``stop_gradient`` on every leaf that is not trained (the factors and the
    ``trainable`` patterns), so XLA skips its gradient."""
    mask = jaxlora.trainable_mask(params, trainable=list(trainable))
    return jax.tree.map(lambda m, x: x if m else jax.lax.stop_gradient(x), mask, params)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    *,
    dropout: bool = False,
    full_finetune: bool = False,
) -> Callable:
    """A jitted ``step(params, opt_state, batch, key) -> (params, opt_state, loss)``.

    ``model.apply`` is wrapped with ``jaxlora.lora_apply``, so ``params`` may be an
    adapted tree (base weights get zero gradient) or a plain one. Unless
    ``full_finetune``, only the factors and the ``classifier`` head are
    differentiated (no backward pass for frozen weights).
    """
    apply = jaxlora.lora_apply(model.apply)

    def loss_fn(params, batch, key):
        if not full_finetune:
            params = stop_frozen(params)
        logits = apply(
            params,
            batch["input_ids"],
            batch["attention_mask"],
            deterministic=not dropout,
            rngs={"dropout": key} if dropout else None,
        )
        labels = batch["labels"]
        return _loss(logits, labels, jnp.ones(labels.shape, jnp.float32))

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_eval_step(model: Any) -> Callable:
    """A jitted ``(params, batch) -> (n_correct, loss_sum)`` (``batch["weights"]``)."""
    apply = jaxlora.lora_apply(model.apply)

    @jax.jit
    def step(params, batch):
        logits = apply(params, batch["input_ids"], batch["attention_mask"])
        w = batch["weights"]
        per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return jnp.sum(correct * w), jnp.sum(per * w)

    return step


def evaluate(
    model: Any,
    params: PyTree,
    data: Batch,
    *,
    batch_size: int = 128,
    buckets: tuple[int, ...] | None = (16, 24, 32, 40),
    eval_step: Callable | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``params`` on every row of ``data``.

    Rows are sorted by length and each batch trimmed to a bucket length (see
    :func:`batches`); the last batch is padded to ``batch_size`` rows with zero
    weight, so shapes are few and repeated calls compile nothing.

    Returns:
        ``{"accuracy": ..., "loss": ..., "n": ...}``.
    """
    eval_step = eval_step or make_eval_step(model)
    n = len(data["labels"])
    order = np.argsort(lengths(data), kind="stable") if buckets else np.arange(n)
    correct = loss = 0.0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        chunk = _trim({k: v[idx] for k, v in data.items()}, buckets)
        m = len(chunk["labels"])
        pad = batch_size - m
        chunk = {
            k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in chunk.items()
        }
        chunk["weights"] = (np.arange(batch_size) < m).astype(np.float32)
        c, s = eval_step(params, chunk)
        correct += float(c)
        loss += float(s)
    return {"accuracy": correct / n, "loss": loss / n, "n": n}


# ----------------------------------------------------------------------- train


def train(
    model: Any,
    variables: PyTree,
    data: Mapping[str, Batch],
    cfg: TrainConfig,
    *,
    callback: Callback | None = None,
    params: PyTree | None = None,
) -> TrainResult:
    """Fine-tunes ``model`` on ``data["train"]``, validating on ``data["validation"]``.

    Args:
        model: a Flax module whose ``apply(variables, input_ids, attention_mask,
            deterministic=..., rngs=...)`` returns logits (``SentenceClassifier``).
        variables: the plain ``{"params": ...}`` tree (pretrained encoder + head).
        data: :func:`tokenize_splits` output (``"validation"`` optional).
        cfg: the hyperparameters.
        callback: ``callback(step, metrics)`` after every step (progress bars, logs).
        params: an already adapted tree to start from (skips :func:`adapt`).

    Returns:
        A :class:`TrainResult` with the trained (adapted) params and the curves.
    """
    train_data = data["train"]
    total = cfg.total_steps(len(train_data["labels"]))
    if params is None:
        params = adapt(variables, cfg, model=model, train_data=train_data)
    tx, schedule = make_optimizer(cfg, total)
    opt_state = tx.init(params)
    step_fn = make_train_step(
        model, tx, dropout=cfg.head_dropout > 0, full_finetune=cfg.full_finetune
    )
    eval_step = make_eval_step(model)
    history = History()
    key = jax.random.key(cfg.seed + 1)
    stream = _forever(train_data, cfg.batch_size, cfg.seed, cfg.buckets)
    start = last = time.perf_counter()
    for step in range(1, total + 1):
        batch = next(stream)
        key, sub = jax.random.split(key)
        params, opt_state, loss = step_fn(params, opt_state, batch, sub)
        loss = float(loss)
        now = time.perf_counter()
        metrics = {
            "loss": loss,
            "lr": float(schedule(step - 1)),
            "examples_per_s": cfg.batch_size / max(now - last, 1e-9),
        }
        last = now
        history.step.append(step)
        history.loss.append(loss)
        due = cfg.eval_every and step % cfg.eval_every == 0
        if "validation" in data and (due or step == total):
            ev = evaluate(
                model,
                params,
                data["validation"],
                batch_size=cfg.eval_batch_size,
                buckets=cfg.buckets,
                eval_step=eval_step,
            )
            history.eval_step.append(step)
            history.val_accuracy.append(ev["accuracy"])
            history.val_loss.append(ev["loss"])
            metrics.update(val_accuracy=ev["accuracy"], val_loss=ev["loss"])
            last = time.perf_counter()  # do not count evaluation in throughput
        if callback is not None:
            callback(step, metrics)
    seconds = time.perf_counter() - start
    rate = total * cfg.batch_size / seconds
    return TrainResult(params, history, seconds, rate)
