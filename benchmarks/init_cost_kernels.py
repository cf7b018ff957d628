"""Cost of the weight-aware inits on one square float32 kernel, side by side.

Exact PiSSA (full ``jnp.linalg.svd``), fast PiSSA (`svd_lowrank`, q = r, niter = 4),
OLoRA (reduced QR) and MiLoRA (full SVD). Every init is compiled ahead of time
(``jax.jit(...).lower(...).compile()``, so no timed call includes compilation), then
timed as the median of ``--repeats`` calls with ``block_until_ready``, the first of
which is an untimed warm-up. The two full-SVD inits take minutes on a small CPU at
4096², so they get ``--slow-repeats`` timed calls and no warm-up call.

    python benchmarks/init_cost_kernels.py            # 4096 x 4096, r = 16
    python benchmarks/init_cost_kernels.py --n 1024 --repeats 5 --slow-repeats 3
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout
from jaxlora._weight_aware import milora  # noqa: E402
from jaxlora._weight_aware import olora  # noqa: E402
from jaxlora._weight_aware import pissa  # noqa: E402


def median_seconds(fn, *args, repeats: int, warm_up: bool) -> float:
    fn = jax.jit(fn).lower(*args).compile()
    if warm_up:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="kernel is n x n")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--slow-repeats", type=int, default=1, help="timed calls of the full SVDs"
    )
    args = parser.parse_args()

    n, r, scale = args.n, args.rank, 2.0
    kernel = jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n**0.5
    key = jax.random.key(1)
    inits = {
        "exact PiSSA": functools.partial(pissa, rank=r, scale=scale),
        "fast PiSSA (niter=4)": functools.partial(pissa, rank=r, scale=scale, niter=4),
        "OLoRA": functools.partial(olora, rank=r, scale=scale),
        "MiLoRA": functools.partial(milora, rank=r, scale=scale),
    }
    slow = {"exact PiSSA", "MiLoRA"}
    print(
        f"{n}x{n} float32 kernel, r={r}, backend={jax.default_backend()}, "
        f"{jax.devices()}; median of {args.repeats} runs after a warm-up "
        f"({args.slow_repeats} run, no warm-up, for {sorted(slow)})"
    )
    seconds = {}
    for name, init in inits.items():
        is_slow = name in slow
        repeats = args.slow_repeats if is_slow else args.repeats
        seconds[name] = median_seconds(
            init, key, kernel, repeats=repeats, warm_up=not is_slow
        )
        print(f"  measured {name}: {seconds[name]:.4f} s", flush=True)
    exact = seconds["exact PiSSA"]
    print(f"{'init':<24}{'seconds':>12}{'exact / this':>16}")
    for name, s in seconds.items():
        print(f"{name:<24}{s:>12.4f}{exact / s:>16.1f}")
    fast = seconds["fast PiSSA (niter=4)"]
    print(f"exact / fast PiSSA = {exact / fast:.1f}x")


if __name__ == "__main__":
    main()
