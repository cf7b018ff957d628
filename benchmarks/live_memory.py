"""Live peak versus temp allocation of the `flops_ratio` steps, from XLA's own dumps.

``memory_analysis().temp_size_in_bytes`` is the size of the buffer XLA's heap
simulator packed every temporary into, fragmentation included. This script compiles
each step once more with ``xla_dump_to`` set, reads XLA's buffer assignment (offset and
size of every value in that buffer) and its live ranges (first and last step of the
schedule each value is alive), and reports the largest number of bytes actually in
use at one step: the live peak. The gap between the two is packing, not data.

Run: ``python benchmarks/live_memory.py`` (``--small`` for the test-sized model).
The dump format is XLA's debug output for the pinned jax version, not an API.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import flops_ratio as fr  # noqa: E402

_VALUE = re.compile(r"value: <\d+ (\S+?)(?:\{\})? @\d+> \(size=(\d+),offset=(\d+)\)")
_RANGE = re.compile(r"^\s+(\S+?)(?:\{\})?:(\d+)-(\d+)$", re.M)


def _temp_values(text: str) -> dict[str, tuple[int, int]]:
    """``name -> (offset, size)`` of the values in the preallocated temp buffer."""
    block = re.search(r"preallocated-temp:\n(.*?)(?:\nallocation |\Z)", text, re.S)
    return {m[1]: (int(m[3]), int(m[2])) for m in _VALUE.finditer(block.group(1))}


def _used_bytes(intervals) -> int:
    total, end = 0, -1
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def live_peak(fn, *args) -> tuple[int, int]:
    """``(live_peak_bytes, temp_bytes)`` of ``jax.jit(fn)`` compiled for ``args``."""
    with tempfile.TemporaryDirectory() as d:
        compiled = (
            jax.jit(fn)
            .lower(*args)
            .compile({"xla_dump_to": d, "xla_dump_hlo_pass_re": "NONE"})
        )
        stem = max(pathlib.Path(d).glob("*-live-range.txt")).name
        stem = stem.removesuffix("-live-range.txt")
        values = _temp_values(
            (pathlib.Path(d) / f"{stem}-buffer-assignment.txt").read_text()
        )
        ranges = {
            m[1]: (int(m[2]), int(m[3]))
            for m in _RANGE.finditer(
                (pathlib.Path(d) / f"{stem}-live-range.txt").read_text()
            )
        }
    unranged = sorted(set(values) - set(ranges))
    if unranged:
        raise RuntimeError(
            f"XLA's dump gives no live range for temp values {unranged[:5]}; "
            "the dump format changed: check the pinned jax version."
        )
    live = [(ranges[n], off, size) for n, (off, size) in values.items()]
    starts = {lo for (lo, _), _, _ in live}  # the bytes in use only grow at a start
    peak = max(
        _used_bytes((off, off + size) for (lo, hi), off, size in live if lo <= t <= hi)
        for t in starts
    )
    return peak, int(compiled.memory_analysis().temp_size_in_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the test-sized model")
    parser.add_argument("--variants", default="linen,scan,nnx")
    args = parser.parse_args()
    s = fr.SMALL if args.small else fr.FULL
    print(f"model: {s}")
    print("| variant | step | live peak MiB | temp allocation MiB |")
    print("|---|---|---|---|")
    for v in args.variants.split(","):
        apply_fn, params, lp, ids, tx, ltx, _ = fr.setup(v, s)
        steps = {
            "full": (fr.full_step_fn(apply_fn, tx), params, tx.init(params)),
            "LoRA": (fr.lora_step_fn(apply_fn, ltx), lp, ltx.init(lp)),
        }
        for name, (step, p, opt) in steps.items():
            peak, temp = live_peak(step, p, opt, ids)
            print(f"| {v} | {name} | {peak / 2**20:.1f} | {temp / 2**20:.1f} |")


if __name__ == "__main__":
    main()
