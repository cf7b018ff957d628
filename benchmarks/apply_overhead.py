"""Wall time of the factored engine against full fine-tuning and the naive merge.

In one run, on the transformer of `flops_ratio` (Linen loop variant), side by side:

* training steps: LoRA (factored), full fine-tuning, LoRA formed the naive way
  (merge ``w + s·a@b`` then differentiate through it);
* forwards: LoRA (factored), merged weights, base weights (adapter dropped).

Prints a markdown table of medians and ratios with the machine it ran on.
Run: ``python benchmarks/apply_overhead.py [--small] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jaxlora  # noqa: E402
from benchmarks import flops_ratio as fr  # noqa: E402


def median_time(fn, *args, repeats: int) -> float:
    """Median wall seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(size: fr.Size, repeats: int):
    apply_fn, params, lp, ids, tx, ltx, _ = fr.setup("linen", size)
    merged, base = jaxlora.merge(lp), jaxlora.base(lp)
    steps = {
        "LoRA step (factored)": (jax.jit(fr.lora_step_fn(apply_fn, ltx)), lp, ltx),
        "full fine-tuning step": (jax.jit(fr.full_step_fn(apply_fn, tx)), params, tx),
        "LoRA step (naive merge)": (jax.jit(fr.naive_step_fn(apply_fn, ltx)), lp, ltx),
    }
    rows = []
    for name, (fn, p, opt) in steps.items():
        rows.append((name, median_time(fn, p, opt.init(p), ids, repeats=repeats)))
    fwd_lora = jax.jit(jaxlora.lora_apply(apply_fn))
    fwd = jax.jit(apply_fn)
    rows.append(
        ("LoRA forward (factored)", median_time(fwd_lora, lp, ids, repeats=repeats))
    )
    rows.append(("merged forward", median_time(fwd, merged, ids, repeats=repeats)))
    rows.append(("base forward", median_time(fwd, base, ids, repeats=repeats)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    size = fr.SMALL if args.small else fr.FULL
    dev = jax.devices()[0]
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, device {dev.platform}/{dev.device_kind}"
    )
    print(f"model: {size}, median of {args.repeats}\n")
    rows = run(size, args.repeats)
    ref = {"step": rows[1][1], "forward": rows[4][1]}
    print("| measurement | median ms | ratio |")
    print("|---|---|---|")
    for name, t in rows:
        denom = ref["step"] if "step" in name else ref["forward"]
        against = "full step" if "step" in name else "merged forward"
        print(f"| {name} | {t * 1e3:.1f} | {t / denom:.2f} × {against} |")


if __name__ == "__main__":
    main()
