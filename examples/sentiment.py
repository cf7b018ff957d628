"""LoRA fine-tuning of MiniLM (+ a classification head) on Rotten Tomatoes.

The README's main example. Everything runs offline on a CPU:

    python -m examples.sentiment                       # the default LoRA run
    python -m examples.sentiment --quick               # a smoke test (~1 minute)
    python -m examples.sentiment --adapter runs/sentiment/adapter   # re-evaluate
    python -m examples.sentiment --full-finetune       # the comparison

Writes to ``--out`` (default ``runs/sentiment``): ``adapter/`` (``jaxlora.save``:
the LoRA factors only), ``classifier.safetensors`` (the head, trained in full),
``metrics.json`` (config, curves, accuracies, timings) and ``curves.png``.

Measured on a 2-core CPU (2 epochs = 640 steps of 32, max_len 48): the default
LoRA run (all six linear layers of every block, rank 8, alpha 16, lr 1e-3, warmup +
cosine; 1.45% of the weights trained) reaches 84.5% test accuracy in 3.8 minutes;
full fine-tuning (lr 5e-5, same steps) 85.7% in 6.6 minutes.
Majority baseline 57.8%, linear probe ~74.5%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

import jaxlora
from examples import finetune
from examples import minilm
from examples import rotten_tomatoes

QUICK = {"train": 640, "validation": 128, "test": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = finetune.TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m examples.sentiment",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--scheme",
        default=d.scheme,
        type=finetune.scheme_name,
        metavar="NAME",
        help="LoRA init scheme, one of jaxlora.SCHEMES or pissa_niter_K (%(default)s)",
    )
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (%(default)s)")
    p.add_argument(
        "--alpha", type=float, default=d.alpha, help="LoRA alpha (%(default)s)"
    )
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    p.add_argument(
        "--targets",
        default=",".join(d.targets),
        help="comma-separated module names to adapt (%(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate ({d.lr:g}; 5e-5 with --full-finetune)",
    )
    p.add_argument(
        "--lora-plus",
        type=float,
        default=None,
        metavar="RATIO",
        help="LoRA+: b learns RATIO times faster than a",
    )
    p.add_argument("--steps", type=int, default=None, help="overrides --epochs")
    p.add_argument(
        "--epochs",
        type=float,
        default=d.epochs,
        help="passes over the training set (%(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(%(default)s)")
    p.add_argument(
        "--max-len", type=int, default=None, help="tokens per snippet (48; 32 quick)"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="validate every N steps (%(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="adapters, head, batch order"
    )
    p.add_argument(
        "--out",
        default=os.path.join("runs", "sentiment"),
        help="output directory (%(default)s)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="PATH",
        help="evaluate a saved adapter instead of training",
    )
    p.add_argument(
        "--head",
        default=None,
        metavar="FILE",
        help="classifier head for --adapter (classifier.safetensors next to PATH)",
    )
    p.add_argument(
        "--full-finetune",
        action="store_true",
        help="train every weight (no LoRA), for comparison",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few dozen steps on a subset (CI smoke test)",
    )
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> finetune.TrainConfig:
    """The :class:`finetune.TrainConfig` the flags describe."""
    lr = args.lr if args.lr is not None else (5e-5 if args.full_finetune else None)
    cfg = finetune.TrainConfig(
        scheme=args.scheme,
        rank=args.rank,
        alpha=args.alpha,
        rslora=args.rslora,
        targets=tuple(t for t in args.targets.split(",") if t),
        lora_plus_ratio=args.lora_plus,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        seed=args.seed,
        full_finetune=args.full_finetune,
    )
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    if args.quick:
        cfg = dataclasses.replace(
            cfg,
            steps=args.steps or 40,
            batch_size=min(cfg.batch_size, 16),
            eval_every=20,
            warmup=0.1,
            buckets=None,  # one shape: fewer compilations in a short run
        )
    return cfg


def load_data(args: argparse.Namespace) -> dict[str, finetune.Batch]:
    """Tokenized splits (subsets with ``--quick``)."""
    splits = rotten_tomatoes.load_splits(seed=0)
    data = finetune.tokenize_splits(splits, args.max_len)
    if args.quick:
        data = {k: finetune.subset(v, QUICK[k]) for k, v in data.items()}
    return data


def save_head(path: str, params: Any) -> None:
    """Writes the ``classifier`` head (trained in full) as safetensors."""
    from safetensors.numpy import save_file

    head = params["params"]["classifier"]
    save_file({k: np.asarray(v) for k, v in head.items()}, path)


def load_head(path: str, params: Any) -> Any:
    """Returns ``params`` with the ``classifier`` head read from ``path``."""
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Classifier head {path!r} not found; pass --head FILE (written by "
            "the training run as classifier.safetensors)."
        )
    head = {k: jax.numpy.asarray(v) for k, v in load_file(path).items()}
    return {"params": {**params["params"], "classifier": head}}


def plot(path: str, history: finetune.History, test_accuracy: float) -> None:
    """Loss (raw and smoothed) and validation accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    loss = np.asarray(history.loss)
    ax1.plot(history.step, loss, alpha=0.3, label="batch loss")
    k = max(1, len(loss) // 25)
    if len(loss) >= k:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax1.plot(history.step[k - 1 :], smooth, label=f"mean of {k}")
    ax1.set(xlabel="step", ylabel="cross-entropy", title="training loss")
    ax1.legend()
    ax2.plot(history.eval_step, history.val_accuracy, "o-", label="validation")
    ax2.axhline(test_accuracy, color="k", ls="--", label=f"test {test_accuracy:.1%}")
    ax2.set(xlabel="step", ylabel="accuracy", title="accuracy")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(total: int, batch_size: int, window: int = 20) -> finetune.Callback:
    """A tqdm bar (loss, examples/s over the last ``window`` steps, val accuracy)."""
    from collections import deque

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
    times = deque(maxlen=window)
    state = {"loss": None, "val": None}

    def callback(step: int, metrics: dict[str, float]) -> None:
        loss = metrics["loss"]
        state["loss"] = (
            loss if state["loss"] is None else 0.9 * state["loss"] + 0.1 * loss
        )
        times.append(batch_size / metrics["examples_per_s"])
        if "val_accuracy" in metrics:
            state["val"] = metrics["val_accuracy"]
            bar.write(
                f"step {step:5d}  loss {state['loss']:.4f}  "
                f"val acc {metrics['val_accuracy']:.2%}  "
                f"val loss {metrics['val_loss']:.4f}"
            )
        rate = len(times) * batch_size / sum(times)
        post = {"loss": f"{state['loss']:.4f}", "ex/s": f"{rate:.1f}"}
        if state["val"] is not None:
            post["val_acc"] = f"{state['val']:.2%}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        if step == total:
            bar.close()

    return callback


def _evaluate_adapter(args, model, variables, data) -> dict[str, Any]:
    start = time.perf_counter()
    head = args.head or os.path.join(
        os.path.dirname(os.path.abspath(args.adapter)), "classifier.safetensors"
    )
    params = jaxlora.load(args.adapter, load_head(head, variables))
    val = finetune.evaluate(model, params, data["validation"])
    test = finetune.evaluate(model, params, data["test"])
    seconds = time.perf_counter() - start
    print(f"validation accuracy {val['accuracy']:.2%}")
    print(
        f"test accuracy {test['accuracy']:.4f} ({test['accuracy']:.2%}) on "
        f"{test['n']} examples; adapter {args.adapter}; {seconds:.1f} s"
    )
    return {"validation": val, "test": test, "seconds": seconds}


def _settings_of_run(args) -> None:
    """``--max-len`` and ``--quick`` of the run that saved ``--adapter`` (its
    ``metrics.json``), where not given: the same data as that run evaluated."""
    path = os.path.join(os.path.dirname(os.path.abspath(args.adapter)), "metrics.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if args.max_len is None and saved.get("max_len") is not None:
        args.max_len = int(saved["max_len"])
    args.quick = args.quick or bool(saved.get("quick"))
    print(f"settings of the saved run: max_len {args.max_len}, quick {args.quick}")


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the command line; returns the metrics it printed."""
    args = parse_args(argv)
    if args.adapter:
        _settings_of_run(args)
    if args.max_len is None:
        args.max_len = 32 if args.quick else 48
    t0 = time.perf_counter()
    _, encoder = minilm.load_minilm()
    cfg = config_from(args)
    model, variables = minilm.init_classifier(encoder, seed=cfg.seed)
    data = load_data(args)
    if args.adapter:
        return _evaluate_adapter(args, model, variables, data)

    n_train = len(data["train"]["labels"])
    total = cfg.total_steps(n_train)
    mode = (
        "full fine-tuning"
        if cfg.full_finetune
        else (
            f"LoRA {cfg.scheme} r={cfg.rank} alpha={cfg.alpha:g}"
            f"{' rsLoRA' if cfg.rslora else ''} on {','.join(cfg.targets)}"
        )
    )
    print(
        f"{mode}; lr {cfg.lr:g}, {total} steps x {cfg.batch_size} "
        f"({total * cfg.batch_size / n_train:.2f} epochs of {n_train}), "
        f"max_len {args.max_len}, seed {cfg.seed}",
        flush=True,
    )
    result = finetune.train(
        model, variables, data, cfg, callback=_progress(total, cfg.batch_size)
    )
    test = finetune.evaluate(model, result.params, data["test"], buckets=cfg.buckets)
    trainable, n_params = finetune.count_params(result.params, cfg)

    os.makedirs(args.out, exist_ok=True)
    files = {}
    if not cfg.full_finetune:
        files["adapter"] = os.path.join(args.out, "adapter")
        jaxlora.save(files["adapter"], result.params, overwrite=True)
        files["head"] = os.path.join(args.out, "classifier.safetensors")
        save_head(files["head"], result.params)
    files["plot"] = os.path.join(args.out, "curves.png")
    plot(files["plot"], result.history, test["accuracy"])
    wall = time.perf_counter() - t0
    metrics = {
        "config": dataclasses.asdict(cfg),
        "max_len": args.max_len,
        "quick": args.quick,
        "history": dataclasses.asdict(result.history),
        "validation_accuracy": result.history.val_accuracy[-1],
        "test": test,
        "trainable_params": trainable,
        "total_params": n_params,
        "train_seconds": result.seconds,
        "examples_per_s": result.examples_per_s,
        "wall_seconds": wall,
    }
    files["metrics"] = os.path.join(args.out, "metrics.json")
    metrics["files"] = files
    with open(files["metrics"], "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)

    print("\n== summary ==")
    print(
        f"test accuracy {test['accuracy']:.4f} ({test['accuracy']:.2%}) on "
        f"{test['n']} examples; validation {metrics['validation_accuracy']:.2%}"
    )
    print(
        f"trainable params {trainable:,} / {n_params:,} "
        f"({100 * trainable / n_params:.2f}%)"
    )
    print(
        f"wall time {_fmt_time(wall)} (training {_fmt_time(result.seconds)}, "
        f"{result.examples_per_s:.1f} examples/s)"
    )
    for name, path in files.items():
        print(f"{name:8s} {path}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
