"""Compare your training curves: LoRA initialization schemes, each at its best LR.

Source article A ends with "compare your training curves" across init schemes;
this script does it properly: every scheme gets its own learning-rate sweep (one
shared learning rate favours whichever scheme it happens to suit), several seeds,
and the comparison is made at each scheme's best learning rate.

Quick mode (default, a few minutes on a 2-core CPU) uses the synthetic
teacher–student task of ``examples/teacher_student.py`` (Hayou et al. 2024,
arXiv 2406.08447); all seeds × learning rates of a scheme run as one jitted,
``jax.vmap``-ed program. It also runs the width experiment Hayou et al. call for:
the largest stable and the best learning rate of Init[A]-type schemes (``he``,
``kaiming_uniform``) versus Init[B] (``init_b``) as the width grows.

``--full`` runs the real task instead: MiniLM + a classification head on Rotten
Tomatoes, LoRA on every attention and FFN kernel, head trained in full, each run
trained by the loop of ``examples/finetune.py``. It is slow on a CPU (one run
per scheme × LR × seed); size it with ``--steps``, ``--seeds`` and ``--lrs``.

Data-aware schemes (LoRA-GA; EVA and CorDA with ``--schemes``) get their extra
``jaxlora.init`` arguments from `scheme_kwargs`, the one place that knows about
them; weight-aware schemes (PiSSA, OLoRA) need nothing extra. PiSSA, OLoRA and
LoRA-GA join the default list only when ``jaxlora.SCHEMES`` has them.

Outputs (in ``--out``, default ``runs/compare_inits``): ``curves.png``,
``results.md`` (the table, and the width finding in quick mode), ``width.png``
and ``results.json`` (every curve and final value, for re-plotting).

Usage:
    PYTHONPATH=. python examples/compare_inits.py
    PYTHONPATH=. python examples/compare_inits.py --schemes he,init_b --seeds 2
    PYTHONPATH=. python examples/compare_inits.py --full --steps 300 --lrs 1e-4,1e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxlora

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import finetune  # noqa: E402
from examples import teacher_student as ts  # noqa: E402

PyTree = Any

#: Compared by default (when present in ``jaxlora.SCHEMES``), in this order.
BASE_SCHEMES = (
    "normal",
    "he",
    "xavier",
    "normalized",
    "kaiming_uniform",
    "gaussian",
    "he_uniform",
    "init_b",
    "both_random",
    "orthogonal",
)
#: Weight-aware schemes, compared only if this version of jaxlora has them.
WEIGHT_AWARE = ("pissa", "olora", "lora_ga")
#: Hayou et al.'s two families, for the width experiment.
INIT_A = ("he", "kaiming_uniform")
INIT_B = ("init_b",)


def default_schemes() -> tuple[str, ...]:
    """Every scheme of `BASE_SCHEMES` and `WEIGHT_AWARE` that jaxlora offers."""
    return tuple(s for s in BASE_SCHEMES + WEIGHT_AWARE if s in jaxlora.SCHEMES)


def log_grid(lo: float, hi: float, per_decade: int) -> tuple[float, ...]:
    """Log-spaced learning rates from ``lo`` to ``hi``, ``per_decade`` per decade."""
    n = round(math.log10(hi / lo) * per_decade) + 1
    return tuple(float(f"{x:.3g}") for x in np.geomspace(lo, hi, n))


# ------------------------------------------------------------------ results


@dataclasses.dataclass
class SweepResult:
    """Everything one scheme's sweep measured.

    Attributes:
        scheme: the scheme name.
        lrs: the learning rates, ``(n_lr,)``.
        steps: the steps at which ``curves`` were measured, ``(n_points,)``.
        curves: losses ``(n_lr, n_seed, n_points)``.
        final_loss: the final loss ``(n_lr, n_seed)`` (on held-out data).
        final_acc: the final accuracy ``(n_lr, n_seed)``, or None (regression).
    """

    scheme: str
    lrs: np.ndarray
    steps: np.ndarray
    curves: np.ndarray
    final_loss: np.ndarray
    final_acc: np.ndarray | None = None


def best_lr_index(final_loss: np.ndarray) -> int:
    """The learning rate with the lowest mean final loss over seeds.

    A learning rate at which any seed diverged (NaN or inf) counts as infinitely
    bad, so a lucky seed cannot make an unstable learning rate "best". Ties go to
    the smaller learning rate (the first index).

    Args:
        final_loss: ``(n_lr, n_seed)`` final losses.

    Returns:
        The row index of the best learning rate (0 if every one diverged).
    """
    losses = np.where(np.isfinite(final_loss), final_loss, np.inf)
    return int(np.argmin(losses.mean(axis=1)))


def steps_to_threshold(
    curves: np.ndarray, steps: np.ndarray, threshold: float
) -> np.ndarray:
    """Per seed, the first measured step whose loss is ``<= threshold`` (NaN: never).

    Args:
        curves: ``(n_seed, n_points)`` losses of one learning rate.
        steps: ``(n_points,)`` the step of each point.
        threshold: the loss to reach.
    """
    hit = np.nan_to_num(curves, nan=np.inf) <= threshold
    first = np.argmax(hit, axis=-1)
    return np.where(hit.any(axis=-1), steps[first], np.nan)


def max_stable_lr_index(final_loss: np.ndarray, initial_loss: float) -> int | None:
    """The largest learning rate at which no seed diverged or ended worse than start.

    "Stable" means every seed's final loss is finite and below ``initial_loss``.

    Returns:
        Its index into the (ascending) learning rates, or None if none is stable.
    """
    ok = np.all(np.isfinite(final_loss) & (final_loss < initial_loss), axis=1)
    return int(np.flatnonzero(ok)[-1]) if ok.any() else None


def _mean_std(x: np.ndarray, fmt: str = "{:.4f}") -> str:
    x = np.asarray(x, float)
    if not np.all(np.isfinite(x)):
        return f"diverged ({np.sum(~np.isfinite(x))}/{x.size})"
    return f"{fmt.format(x.mean())} ± {fmt.format(x.std())}"


def summary_row(r: SweepResult, threshold: float) -> dict[str, str]:
    """One table row: the scheme at its best learning rate."""
    i = best_lr_index(r.final_loss)
    lr = f"{r.lrs[i]:.3g}"
    if len(r.lrs) > 1 and i in (0, len(r.lrs) - 1):
        lr += " (grid edge)"
    hit = steps_to_threshold(r.curves[i], r.steps, threshold)
    reached = np.isfinite(hit)
    steps = (
        f"{np.mean(hit[reached]):.0f} ({reached.sum()}/{hit.size} seeds)"
        if reached.any()
        else f"not reached (0/{hit.size})"
    )
    acc = "—" if r.final_acc is None else _mean_std(r.final_acc[i])
    return {
        "scheme": r.scheme,
        "best LR": lr,
        "final loss": _mean_std(r.final_loss[i]),
        "final accuracy": acc,
        f"steps to loss ≤ {threshold:g}": steps,
    }


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """A GitHub-markdown table of ``rows`` (dicts sharing their keys)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(results: Sequence[SweepResult], path: str, *, ylabel: str) -> None:
    """Left: each scheme's curve at its best LR (mean over seeds, ±1 std band).

    Right: final loss against learning rate (each scheme's sweep).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.colormaps["tab20"](np.linspace(0, 1, max(len(results), 2)))
    for r, c in zip(results, colors, strict=False):
        i = best_lr_index(r.final_loss)
        mean, std = r.curves[i].mean(axis=0), r.curves[i].std(axis=0)
        ax.plot(r.steps, mean, color=c, label=f"{r.scheme} (lr {r.lrs[i]:.3g})")
        ax.fill_between(
            r.steps,
            np.maximum(mean - std, 1e-6),
            mean + std,
            color=c,
            alpha=0.2,
            linewidth=0,
        )
        finals = np.where(np.isfinite(r.final_loss), r.final_loss, np.nan)
        ax_lr.plot(r.lrs, np.nanmean(finals, axis=1), "o-", color=c, label=r.scheme)
    ax.set(xlabel="step", ylabel=ylabel, yscale="log", title="best LR per scheme")
    ax_lr.set(
        xlabel="learning rate",
        ylabel=f"final {ylabel}",
        xscale="log",
        yscale="log",
        title="learning-rate sweep (mean over seeds)",
    )
    ax.legend(fontsize=8)
    ax_lr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------- the synthetic task sweep


def scheme_kwargs(
    scheme: str, loss_and_batches: Callable[[], tuple[Callable, list]]
) -> dict[str, Any]:
    """Extra ``jaxlora.init`` keyword arguments of a data-aware scheme.

    The one place that knows which schemes need data. LoRA-GA needs the loss and a
    few batches (``jaxlora.init`` averages the gradient of the loss with respect to
    each full target weight over them); EVA and CorDA read the inputs each target
    meets while a function of the params runs on the batches (the loss serves;
    padded token batches get their attention mask as ``input_mask``);
    ``loss_and_batches()`` is called only when needed. Add future data-aware
    schemes here.
    """
    if scheme == "lora_ga":
        loss_fn, batches = loss_and_batches()
        return {"loss_fn": loss_fn, "batches": batches}
    if scheme in finetune.INPUT_SCHEMES:
        loss_fn, batches = loss_and_batches()
        kw = {"apply_fn": loss_fn, "batches": batches}
        if isinstance(batches[0], dict) and "attention_mask" in batches[0]:
            kw["input_mask"] = lambda b: b["attention_mask"]  # padding left out
        return kw
    return {}


def _task_data(task: ts.Task, key: jax.Array, n_batches: int = 4):
    """The task loss ``(params, x) -> scalar`` and ``n_batches`` fresh input batches."""
    xs = jax.random.normal(
        key, (n_batches, task.x_eval.shape[0], task.x_eval.shape[-1])
    )
    return (lambda p, x: ts.relative_mse(p, task, x)), list(xs)


def init_student(
    scheme: str, task: ts.Task, key: jax.Array, *, rank: int, alpha: float
) -> PyTree:
    """The task's base with LoRA factors of ``scheme`` on its hidden kernels."""
    k_init, k_data = jax.random.split(key)
    extra = scheme_kwargs(scheme, lambda: _task_data(task, k_data))
    return ts.student(task, k_init, scheme=scheme, rank=rank, alpha=alpha, **extra)


def schedule(peak_lr, steps: int, warmup: float = 0.1) -> optax.Schedule:
    """Linear warm-up over ``warmup · steps`` steps, then cosine decay to 0."""
    unit = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, max(1, int(warmup * steps)), steps
    )
    return lambda t: peak_lr * unit(t)  # peak_lr may be traced (vmap over LRs)


def _train_one(params, task, lr, key, *, steps, eval_every, batch):
    """Adam on the factors from ``params``; the eval loss every ``eval_every`` steps."""
    tx = jaxlora.freeze_base(optax.adam(schedule(lr, steps)))
    d_in = task.x_eval.shape[-1]
    loss = lambda p, x: ts.relative_mse(p, task, x)  # noqa: E731

    def step(carry, k):
        p, state = carry
        grads = jax.grad(loss)(p, jax.random.normal(k, (batch, d_in)))
        updates, state = tx.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    def chunk(carry, keys):
        carry, _ = jax.lax.scan(step, carry, keys)
        return carry, ts.relative_mse(carry[0], task)

    keys = jax.random.split(key, steps).reshape(steps // eval_every, eval_every)
    _, curve = jax.lax.scan(chunk, (params, tx.init(params)), keys)
    return jnp.concatenate([ts.relative_mse(params, task)[None], curve])


@functools.partial(jax.jit, static_argnames=("steps", "eval_every", "batch"))
def _train_grid(params, tasks, lrs, keys, *, steps, eval_every, batch):
    """``_train_one`` over seeds (params, tasks, keys) × learning rates."""
    one = functools.partial(_train_one, steps=steps, eval_every=eval_every, batch=batch)
    over_lrs = jax.vmap(one, in_axes=(None, None, 0, None))
    return jax.vmap(over_lrs, in_axes=(0, 0, None, 0))(params, tasks, lrs, keys)


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _anonymous(params: PyTree) -> PyTree:
    """Drops the scheme name from every spec, so schemes share one compilation."""

    def strip(x):
        return x.replace(spec=dataclasses.replace(x.spec, scheme=""))

    return jax.tree.map(
        lambda x: strip(x) if jaxlora.is_lora(x) else x, params, is_leaf=jaxlora.is_lora
    )


def synthetic_sweep(
    scheme: str,
    *,
    cfg: ts.TaskConfig,
    lrs: Sequence[float],
    seeds: int,
    steps: int,
    eval_every: int,
    rank: int,
    alpha: float,
) -> SweepResult:
    """One scheme on the teacher–student task: every seed × learning rate.

    Seed ``s`` fixes the task (base, teacher, eval set), the LoRA init and the
    data, so schemes are compared on identical tasks and batches.
    """
    if steps % eval_every:
        raise ValueError(
            f"steps ({steps}) must be a multiple of eval_every ({eval_every})."
        )
    tasks, students, data_keys = [], [], []
    for s in range(seeds):
        k_task, k_init, k_data = jax.random.split(jax.random.key(s), 3)
        task = ts.make_task(k_task, cfg)
        tasks.append(task)
        students.append(init_student(scheme, task, k_init, rank=rank, alpha=alpha))
        data_keys.append(k_data)
    curves = _train_grid(
        _anonymous(_stack(students)),
        _stack(tasks),
        jnp.asarray(lrs, jnp.float32),
        jnp.stack(data_keys),
        steps=steps,
        eval_every=eval_every,
        batch=cfg.batch,
    )
    curves = np.asarray(curves).transpose(1, 0, 2)  # (lr, seed, point)
    return SweepResult(
        scheme=scheme,
        lrs=np.asarray(lrs, float),
        steps=np.arange(0, steps + 1, eval_every),
        curves=curves,
        final_loss=curves[..., -1],
    )


# ------------------------------------------------------- the width experiment


def _merge_lrs(a: SweepResult, b: SweepResult) -> SweepResult:
    """The two sweeps of one scheme as one, sorted by learning rate."""
    lrs = np.concatenate([a.lrs, b.lrs])
    order = np.argsort(lrs)
    pick = lambda x, y: np.concatenate([x, y])[order]  # noqa: E731
    return dataclasses.replace(
        a,
        lrs=lrs[order],
        curves=pick(a.curves, b.curves),
        final_loss=pick(a.final_loss, b.final_loss),
    )


def width_experiment(
    widths: Sequence[int],
    *,
    schemes: Sequence[str],
    lrs: Sequence[float],
    seeds: int,
    steps: int,
    batch: int,
    rank: int,
    alpha: float,
    refine: int = 3,
) -> dict[int, list[SweepResult]]:
    """Learning-rate sweeps of ``schemes`` on the teacher–student task per width.

    After the grid sweep, ``refine`` log-spaced learning rates between the largest
    stable one and the next (unstable) grid point are added, so the largest stable
    learning rate is known to a finer factor than the grid's.
    """
    out = {}
    bar = tqdm([(n, s) for n in widths for s in schemes], desc="width sweep")
    for n, scheme in bar:
        bar.set_postfix(width=n, scheme=scheme)
        sweep = functools.partial(
            synthetic_sweep,
            scheme,
            cfg=ts.TaskConfig(width=n, batch=batch, eval_size=512),
            seeds=seeds,
            steps=steps,
            eval_every=max(1, steps // 10),
            rank=rank,
            alpha=alpha,
        )
        r = sweep(lrs=lrs)
        i = max_stable_lr_index(r.final_loss, 1.0)
        if refine and i is not None and i + 1 < len(r.lrs):
            between = np.geomspace(r.lrs[i], r.lrs[i + 1], refine + 2)[1:-1]
            r = _merge_lrs(r, sweep(lrs=tuple(float(x) for x in between)))
        out.setdefault(n, []).append(r)
    return out


def _lr_text(lrs, i, edge_word):
    if i is None:
        return "none stable"
    text = f"{lrs[i]:.3g}"
    return text + f" ({edge_word})" if i == len(lrs) - 1 else text


def width_rows(results: dict[int, list[SweepResult]]) -> list[dict[str, str]]:
    """Per width and scheme: max stable LR, best LR, final loss at the best LR."""
    rows = []
    for n, sweeps in results.items():
        for r in sweeps:
            i = best_lr_index(r.final_loss)
            rows.append(
                {
                    "width": str(n),
                    "scheme": r.scheme,
                    "max stable LR": _lr_text(
                        r.lrs, max_stable_lr_index(r.final_loss, 1.0), "≥, grid edge"
                    ),
                    "best LR": _lr_text(r.lrs, i, "grid edge"),
                    "final loss at best LR": _mean_std(r.final_loss[i]),
                }
            )
    return rows


def width_finding(results: dict[int, list[SweepResult]]) -> str:
    """A sentence per width comparing Init[A] and Init[B], computed from the sweeps.

    Compares the largest stable learning rate of each Init[A]-type scheme with
    init_b's, the best learning rates, and the final losses at the best learning
    rates; says whether the stable-LR ratio grows with width.
    """
    lines, ratios = [], {}
    for n, sweeps in results.items():
        by = {r.scheme: r for r in sweeps}
        b = next((by[s] for s in INIT_B if s in by), None)
        if b is None:
            continue
        ib = max_stable_lr_index(b.final_loss, 1.0)
        best_b = best_lr_index(b.final_loss)
        loss_b = np.mean(b.final_loss[best_b])
        for a_name in (s for s in INIT_A if s in by):
            a = by[a_name]
            ia = max_stable_lr_index(a.final_loss, 1.0)
            best_a = best_lr_index(a.final_loss)
            loss_a = np.mean(a.final_loss[best_a])
            if ia is None:
                lines.append(f"- n={n}: {a_name} is unstable at every LR tried.")
                continue
            edge = " (Init[A] at the grid's top: a lower bound)" * (
                ia == len(a.lrs) - 1
            )
            jb, b_text, bound = ib, None, ""
            if ib is None:  # init_b unstable even at the smallest LR tried
                jb, b_text, bound = 0, "none", "≥"
                edge = (
                    f" (init_b is unstable at every LR tried, down to {b.lrs[0]:.3g}: "
                    "the ratio is a lower bound)"
                )
            ratio = a.lrs[ia] / b.lrs[jb]
            ratios.setdefault(a_name, []).append((n, ratio, bound))
            cmp = "larger" if ratio > 1 else "smaller" if ratio < 1 else "the same"
            cmp = "larger: init_b has no stable LR" if bound else cmp
            lines.append(
                f"- n={n}: {a_name} max stable LR {a.lrs[ia]:.3g} vs init_b "
                f"{b_text or f'{b.lrs[jb]:.3g}'} → ratio {bound}{ratio:.3g} ({cmp})"
                f"{edge}; best LR {a.lrs[best_a]:.3g} vs {b.lrs[best_b]:.3g}; final "
                f"loss at best LR {loss_a:.4f} vs {loss_b:.4f} "
                f"({'Init[A] lower' if loss_a < loss_b else 'init_b lower'})."
            )
    for a_name, rs in ratios.items():
        values = [r for _, r, _ in rs]
        larger = sum(r > 1 or bool(b) for _, r, b in rs)
        note = " (a lower bound: read it as at least this)" if rs[-1][2] else ""
        change = values[-1] / values[0]
        trend = (
            "grows"
            if change > 1.1
            else "shrinks"
            if change < 1 / 1.1
            else "stays about the same"
        )
        lines.append(
            f"- **{a_name} vs init_b**: Init[A]'s largest stable LR is larger at "
            f"{larger} of {len(values)} widths (ratios "
            f"{', '.join(f'{b}{r:.3g}' for _, r, b in rs)} for widths "
            f"{', '.join(str(n) for n, _, _ in rs)}); from the smallest to the largest "
            f"width the ratio {trend} (×{change:.3g}){note}."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ --full mode


def full_sweep(scheme: str, *, lrs, seeds, steps, eval_every, rank, alpha, data):
    """One scheme on MiniLM + Rotten Tomatoes, trained by ``examples/finetune.py``.

    Every LR × seed is one ``finetune.train`` run (AdamW on the factors and the
    head, warm-up + cosine, gradient clipping: ``finetune.TrainConfig``'s
    defaults). Curves are the validation loss at step 0 and every ``eval_every``
    steps; the final loss and accuracy are the last validation measurement.
    """
    from examples import minilm

    n_lr, n_points = len(lrs), steps // eval_every + 1
    curves = np.full((n_lr, seeds, n_points), np.nan)
    final_loss = np.full((n_lr, seeds), np.nan)
    final_acc = np.full((n_lr, seeds), np.nan)
    runs = [(i, lr, s) for i, lr in enumerate(lrs) for s in range(seeds)]
    for i, lr, s in tqdm(runs, desc=f"{scheme} (lr × seed)"):
        model, variables = minilm.init_classifier(data["encoder"], seed=s)
        cfg = finetune.TrainConfig(
            scheme=scheme,
            rank=rank,
            alpha=alpha,
            lr=lr,
            steps=steps,
            eval_every=eval_every,
            seed=s,
            batch_size=data["batch"],
        )
        ga_data = lambda: _classifier_data(model, data, s)  # noqa: B023
        params = jaxlora.init(
            variables,
            jax.random.key(s),
            scheme=scheme,
            rank=rank,
            alpha=alpha,
            targets=list(cfg.targets),
            **scheme_kwargs(scheme, ga_data),
        )
        val = data["tokens"]["validation"]
        start = finetune.evaluate(model, params, val, buckets=cfg.buckets)
        h = finetune.train(model, variables, data["tokens"], cfg, params=params).history
        curves[i, s] = [start["loss"], *h.val_loss]
        final_loss[i, s], final_acc[i, s] = h.val_loss[-1], h.val_accuracy[-1]
    return SweepResult(
        scheme,
        np.asarray(lrs, float),
        np.arange(0, steps + 1, eval_every),
        curves,
        final_loss,
        final_acc,
    )


def _classifier_data(model, data, seed: int, n_batches: int = 4):
    """The cross-entropy ``(variables, batch) -> scalar`` and a few train batches."""
    rng = np.random.default_rng(seed)

    def loss(v, b):
        logits = model.apply(v, b["input_ids"], b["attention_mask"])
        labels = b["labels"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    it = finetune.batches(data["tokens"]["train"], data["batch"], rng=rng)
    return loss, [next(it) for _ in range(n_batches)]


def load_full_data(max_len: int, batch: int, val_size: int) -> dict[str, Any]:
    """MiniLM weights and the tokenized train / validation (first ``val_size``)."""
    from examples import minilm
    from examples import rotten_tomatoes

    _, encoder = minilm.load_minilm()
    splits = rotten_tomatoes.load_splits(seed=0)
    splits = {k: splits[k] for k in ("train", "validation")}
    tokens = finetune.tokenize_splits(splits, max_len)
    tokens["validation"] = finetune.subset(tokens["validation"], val_size)
    return {"encoder": encoder, "tokens": tokens, "batch": batch}


# ---------------------------------------------------------------------- main


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", help="comma-separated (default: all available)")
    p.add_argument("--lrs", type=_floats, help="comma-separated learning rates")
    p.add_argument("--seeds", type=int, help="seeds per learning rate")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--eval-every", type=int, help="steps between curve points")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--width", type=int, default=128, help="synthetic task width n")
    p.add_argument("--threshold", type=float, help="loss threshold for the table")
    p.add_argument(
        "--widths",
        type=_ints,
        default=(64, 256, 1024),
        help="widths of the width experiment (run with the default synthetic task)",
    )
    p.add_argument("--width-lrs", type=_floats, default=log_grid(1e-6, 1.0, 2))
    p.add_argument("--width-steps", type=int, default=100)
    p.add_argument("--width-batch", type=int, default=16)
    p.add_argument(
        "--width-schemes",
        default="he,init_b",
        help="Init[A]-type and Init[B] schemes for the width sweep",
    )
    p.add_argument("--no-width", action="store_true", help="skip the width sweep")
    p.add_argument("--full", action="store_true", help="MiniLM on Rotten Tomatoes")
    p.add_argument("--batch", type=int, default=32, help="--full batch size")
    p.add_argument("--max-len", type=int, default=64, help="--full token length")
    p.add_argument("--out", default="runs/compare_inits")
    args = p.parse_args(argv)
    quick = {
        "lrs": log_grid(1e-4, 1e-1, 2),
        "seeds": 3,
        "steps": 500,
        "eval_every": 25,
        "threshold": 0.02,
    }
    full = {
        "lrs": (1e-4, 3e-4, 1e-3),
        "seeds": 2,
        "steps": 300,
        "eval_every": 25,
        "threshold": 0.5,
    }
    for k, v in (full if args.full else quick).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.eval_every = min(args.eval_every, args.steps)
    args.steps -= args.steps % args.eval_every
    args.width_schemes = tuple(args.width_schemes.split(","))
    args.schemes = tuple(args.schemes.split(",")) if args.schemes else default_schemes()
    for name in args.schemes:
        try:
            finetune.scheme_name(name)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
    return args


def _save_json(path, results, extra=None):
    def as_dict(r):
        d = dataclasses.asdict(r)
        return {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()
        }

    payload = {"sweeps": [as_dict(r) for r in results], **(extra or {})}
    with open(path, "w") as f:
        json.dump(payload, f, allow_nan=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the comparison described by ``args``; writes and returns the outputs."""
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    sweep_kw = dict(
        lrs=args.lrs,
        seeds=args.seeds,
        steps=args.steps,
        eval_every=args.eval_every,
        rank=args.rank,
        alpha=args.alpha,
    )
    if args.full:
        data = load_full_data(args.max_len, args.batch, val_size=512)
        sweep = functools.partial(full_sweep, data=data, **sweep_kw)
        task = (
            f"MiniLM + head on Rotten Tomatoes (batch {args.batch}, max_len "
            f"{args.max_len}; LoRA on every attention and FFN kernel, head trained "
            "in full; examples/finetune.py loop); loss = validation cross-entropy "
            "on the first 512 validation snippets"
        )
        ylabel = "validation loss"
        optimizer = "AdamW (finetune.TrainConfig defaults), warm-up + cosine"
    else:
        cfg = ts.TaskConfig(width=args.width, eval_size=512)
        sweep = functools.partial(synthetic_sweep, cfg=cfg, **sweep_kw)
        task = (
            f"teacher–student MLP, width {cfg.width}, teacher rank "
            f"{cfg.teacher_rank}, batch {cfg.batch}; loss = relative MSE "
            "(1.0 = untrained base)"
        )
        ylabel = "relative MSE (eval)"
        optimizer = "Adam, 10% warm-up + cosine decay"
    results = []
    bar = tqdm(args.schemes, desc="schemes")
    for scheme in bar:
        bar.set_postfix(scheme=scheme)
        results.append(sweep(scheme))
    rows = [summary_row(r, args.threshold) for r in results]
    plot_curves(results, os.path.join(args.out, "curves.png"), ylabel=ylabel)
    report = [
        "# LoRA initialization schemes, each at its own best learning rate",
        "",
        f"Task: {task}. {optimizer}, rank {args.rank}, alpha {args.alpha:g}; "
        f"{args.seeds} seeds × LRs {', '.join(f'{x:.3g}' for x in args.lrs)}; "
        f"{args.steps} steps. Best LR = lowest mean final loss over seeds (an LR "
        "where any seed diverged is never best). Steps to threshold: mean over "
        "the seeds that reached it.",
        "",
        markdown_table(rows),
    ]
    width = {}
    if not args.full and not args.no_width:
        width = width_experiment(
            args.widths,
            schemes=args.width_schemes,
            lrs=args.width_lrs,
            seeds=min(args.seeds, 2),
            steps=args.width_steps,
            batch=args.width_batch,
            rank=args.rank,
            alpha=args.alpha,
        )
        plot_width(width, os.path.join(args.out, "width.png"))
        report += [
            "",
            "## Width experiment (Hayou et al. 2024): Init[A] vs Init[B]",
            "",
            f"Widths {', '.join(map(str, args.widths))}; LRs "
            f"{', '.join(f'{x:.3g}' for x in args.width_lrs)}; "
            f"(plus {3} refining LRs between the largest stable and the next); "
            f"{min(args.seeds, 2)} seeds; {args.width_steps} steps at batch "
            f"{args.width_batch}. Stable = every seed finite and below the starting "
            "loss 1.0 at the end.",
            "",
            markdown_table(width_rows(width)),
            "",
            "Finding (computed from the sweep):",
            "",
            width_finding(width),
        ]
    elapsed = time.perf_counter() - start
    report += ["", f"Wall time: {elapsed:.0f} s."]
    text = "\n".join(report) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    extra = {
        "width": {n: [dataclasses.asdict(r) for r in rs] for n, rs in width.items()}
    }
    extra = json.loads(json.dumps(extra, default=lambda x: x.tolist()))
    _save_json(os.path.join(args.out, "results.json"), results, extra)
    return {
        "results": results,
        "rows": rows,
        "width": width,
        "report": text,
        "seconds": elapsed,
    }


def plot_width(results: dict[int, list[SweepResult]], path: str) -> None:
    """Final loss against learning rate, one panel per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(results), figsize=(5 * len(results), 4), squeeze=False
    )
    for ax, (n, sweeps) in zip(axes[0], results.items(), strict=True):
        for r in sweeps:
            finals = np.where(np.isfinite(r.final_loss), r.final_loss, np.nan)
            ax.plot(r.lrs, np.nanmean(finals, axis=1), "o-", label=r.scheme)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="learning rate",
            ylabel="final relative MSE",
            title=f"width {n}",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    out = run(parse_args(argv))
    print(out["report"])


if __name__ == "__main__":
    main()
