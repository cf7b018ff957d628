"""What each initialization scheme costs, side by side in one run.

Times `jaxlora.init` end to end (factor draws, SVD/QR, residuals, LoRA-GA gradients,
EVA's and CorDA's input statistics) for every scheme in `jaxlora.SCHEMES`:

1. on one 4096×4096 float32 kernel at r = 16 (`--n`, `--rank`);
2. on the whole all-MiniLM-L6-v2 encoder (every Dense kernel, 36 targets), with
   LoRA-GA, EVA and CorDA fed 4 batches of 32 real Rotten Tomatoes snippets.

"cold" is the first call (tracing and compilation included: what a user waits for);
"warm" a second call with another key, timed only where the cold call took under
`--warm-below` seconds (a second full SVD of a 4096² matrix adds minutes and no news).

    python benchmarks/init_cost.py                 # the full table (several minutes)
    python benchmarks/init_cost.py --n 1024        # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jaxlora  # noqa: E402

ALIASES = {"kaiming_normal", "reversed", "corda_ipm"}


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn()))
    return time.perf_counter() - start


def data_kwargs(scheme, loss_fn, apply_fn, batches):
    """The extra arguments a data-aware scheme needs (in one place)."""
    if scheme == "lora_ga":
        return {"loss_fn": loss_fn, "batches": batches}
    if scheme in ("eva", "corda", "corda_kpm"):
        return {"apply_fn": apply_fn, "batches": batches}
    return {}


def measure(name, params, loss_fn, apply_fn, batches, rank, warm_below):
    rows = []
    schemes = [s for s in jaxlora.SCHEMES if s not in ALIASES]
    schemes.insert(schemes.index("pissa") + 1, "pissa_niter_4")
    for scheme in schemes:
        kw = data_kwargs(scheme, loss_fn, apply_fn, batches)

        def run(key, s=scheme, kw=kw):
            return jaxlora.init(params, jax.random.key(key), scheme=s, rank=rank, **kw)

        cold = timed(lambda: run(0))
        warm = timed(lambda: run(1)) if cold < warm_below else None
        rows.append((scheme, cold, warm))
        shown = "-" if warm is None else f"{warm:.3f}"
        print(
            f"  [{name}] {scheme:<16} cold {cold:8.3f} s   warm {shown} s", flush=True
        )
    return rows


def kernel_case(n, rank):
    k = jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n**0.5
    params = {"dense": {"kernel": k}}
    x = jax.random.normal(jax.random.key(1), (4, 64, n))

    def apply_fn(p, x):
        return x @ p["dense"]["kernel"]

    def loss_fn(p, x):
        return jnp.mean(apply_fn(p, x) ** 2)

    return params, loss_fn, apply_fn, [x[i] for i in range(4)]


def minilm_case():
    from examples import minilm
    from examples import rotten_tomatoes

    model, variables = minilm.load_minilm()
    split = rotten_tomatoes.load_splits(seed=0)["train"]
    tok = minilm.MiniLMTokenizer(max_len=48)
    batches = []
    for i in range(4):
        enc = tok(list(split.texts[32 * i : 32 * (i + 1)]))
        batches.append((enc["input_ids"], enc["attention_mask"]))

    def apply_fn(p, batch):
        return model.apply(p, *batch)

    def loss_fn(p, batch):
        pooled = minilm.mean_pool(apply_fn(p, batch), batch[1])
        return jnp.mean((pooled - 0.1) ** 2)

    return variables, loss_fn, apply_fn, batches


def table(title, rows):
    exact = {s: c for s, c, _ in rows}.get("pissa")
    print(f"\n### {title}\n")
    print("| scheme | cold (s) | warm (s) | exact PiSSA / this (cold) |")
    print("|---|---:|---:|---:|")
    for scheme, cold, warm in rows:
        w = "-" if warm is None else f"{warm:.3f}"
        ratio = f"{exact / cold:.1f}" if exact else "-"
        print(f"| {scheme} | {cold:.3f} | {w} | {ratio} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warm-below", type=float, default=20.0)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, devices {jax.devices()}"
    )
    case = kernel_case(args.n, args.rank)
    rows = measure("kernel", *case, args.rank, args.warm_below)
    table(f"one {args.n}×{args.n} float32 kernel, r = {args.rank}", rows)
    if not args.skip_minilm:
        rows = measure("minilm", *minilm_case(), args.rank, args.warm_below)
        table(f"all-MiniLM-L6-v2, 36 Dense kernels, r = {args.rank}", rows)


if __name__ == "__main__":
    main()
