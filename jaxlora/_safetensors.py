"""The safetensors file format, written and read strictly (no dependency).

An 8-byte little-endian header size, a JSON header (per tensor: dtype, shape and
byte offsets into the data; ``__metadata__``), padded with spaces to 8 bytes, then
the tensors' bytes, which tile the data exactly.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import jax.numpy as jnp
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
}
_CODES = {v: k for k, v in _DTYPES.items()}


def encode(tensors: dict[str, np.ndarray], metadata: dict) -> bytes:
    """The safetensors encoding: an 8-byte little-endian header size, a JSON header
    (dtype, shape, byte offsets per tensor; padded to 8 bytes), then the data."""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name in sorted(tensors):
        x = tensors[name]
        if x.dtype not in _CODES:
            raise ValueError(
                f"{name}: factors of dtype {x.dtype} have no PEFT encoding here "
                f"(one of {sorted(map(str, _CODES))}); cast the adapter first."
            )
        data = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": _CODES[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read(file: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file; a malformed file is named, never guessed."""

    def bad(why):
        return ValueError(f"{file!r} is not a valid safetensors file: {why}.")

    with open(file, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise bad(f"{len(blob)} bytes, shorter than the header size field")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise bad(f"the header claims {n} bytes but the file has {len(blob) - 8}")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) < len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise bad(f"the header names {dup} more than once")
        return dict(pairs)

    try:
        header = json.loads(blob[8 : 8 + n], object_pairs_hook=unique)
    except ValueError as e:
        if str(e).startswith(f"{file!r}"):
            raise
        raise bad(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data, out, spans = memoryview(blob)[8 + n :], {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(code, str) and code not in _DTYPES:
            raise ValueError(
                f"{file!r}: tensor {name!r} has dtype {code}, which jaxlora does not "
                f"read (LoRA factors are {', '.join(_DTYPES)}). Save the adapter "
                "without it, or cast it to a floating dtype."
            )
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has the entry {info!r}") from None
        if not 0 <= lo <= hi <= len(data) or hi - lo != math.prod(shape) * (
            dtype.itemsize
        ):
            raise bad(
                f"tensor {name!r} ({info['dtype']} {list(shape)}) has bytes "
                f"[{lo}, {hi}) of {len(data)}"
            )
        out[name] = np.frombuffer(data[lo:hi], dtype.newbyteorder("<")).reshape(shape)
        spans.append((lo, hi, name))
    end = 0  # the tensors tile the data exactly: no overlap, gap or trailing bytes
    for lo, hi, name in sorted(spans):
        if lo != end:
            raise bad(f"tensor {name!r} starts at byte {lo}, not {end}")
        end = hi
    if end != len(data):
        raise bad(f"{len(data) - end} bytes after the last tensor")
    return out
