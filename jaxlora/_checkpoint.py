"""`jaxlora.save` / `jaxlora.load`: adapter-only checkpoints (factors + metadata).

A checkpoint is a directory holding

- ``jaxlora.json``: the format version and, per adapted weight, its path, scheme,
  rank, alpha, rsLoRA flag, residual and embedding flags, axis layout, how a
  convolution reads the kernel (``conv``; a checkpoint of a jaxlora version that did
  not record it gets the adapted tree's record or `init`'s default on load), the base
  weight's shape and dtype, the factors' shapes and dtypes, and (for a residual
  base) a float64 fingerprint of that base;
- ``arrays/``: the factors ``a`` and ``b``, written by orbax-checkpoint
  (tensorstore/OCDBT; no pickle anywhere).

The base weights are never written: a checkpoint is a few MB for a model of any
size, and `load` puts it back on the base tree of the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlora import _hosts
from jaxlora._boxes import factored_boxes
from jaxlora._merge import refuse_baseless
from jaxlora._nnx import through_state
from jaxlora._node import Conv
from jaxlora._node import Layout
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._node import factor_shardings
from jaxlora._node import is_lora
from jaxlora._paths import path_str
from jaxlora._targets import check_flag
from jaxlora._targets import check_unique
from jaxlora._targets import default_conv
from jaxlora._targets import default_layout
from jaxlora._targets import examples
from jaxlora._targets import shown

PyTree = Any

FORMAT = "jaxlora.adapters"
VERSION = 1
METADATA = "jaxlora.json"
ARRAYS = "arrays"
_SPEC_FIELDS = ("scheme", "rank", "alpha", "rslora", "residual", "embedding")
# every field `_entry` writes and `load` reads ("conv" may be absent: older saves)
_ENTRY_FIELDS = (
    "path",
    "key",
    *_SPEC_FIELDS,
    "layout",
    "base_shape",
    "base_dtype",
    "a_shape",
    "a_dtype",
    "b_shape",
    "b_dtype",
    "residual_fingerprint",
)


def _fingerprint(w: Any) -> list[float]:
    """Float64 checksums of a weight: sum, sum of squares, position-weighted sum."""
    return [float(v) for v in _hosts.checksums(w, period=1009)]


def _same_fingerprint(got: list[float], want: list[float]) -> bool:
    pairs = zip(got, want, strict=True)
    return all(abs(g - w) <= 1e-9 * max(1.0, abs(w)) for g, w in pairs)


def _entry(path: str, node: LoraWeight, key: str) -> dict[str, Any]:
    spec = node.spec
    return {
        "path": path,
        "key": key,
        **{f: getattr(spec, f) for f in _SPEC_FIELDS},
        "layout": {
            "in_axes": list(spec.layout.in_axes),
            "out_axes": list(spec.layout.out_axes),
            "stack_axes": list(spec.layout.stack_axes),
        },
        "conv": None if spec.conv is None else dataclasses.asdict(spec.conv),
        "base_shape": list(node.w.shape),
        "base_dtype": jnp.dtype(node.w.dtype).name,
        "a_shape": list(node.a.shape),
        "a_dtype": jnp.dtype(node.a.dtype).name,
        "b_shape": list(node.b.shape),
        "b_dtype": jnp.dtype(node.b.dtype).name,
        "residual_fingerprint": _fingerprint(node.w) if spec.residual else None,
    }


@through_state(1, returns_tree=False)
def save(path: str | os.PathLike, params: PyTree, *, overwrite: bool = False) -> str:
    """Writes the adapters of ``params`` (factors and metadata, not the base).

    The checkpoint is built in a temporary directory next to ``path`` and renamed
    into place, so an interrupted save never leaves a half-written checkpoint
    where a good one was.

    Args:
        path: the checkpoint directory to create.
        params: an adapted tree (from `jaxlora.init` and training).
        overwrite: replace an existing checkpoint at ``path`` (only a directory
            written by `save`, or an empty one: never anything else).

    Returns:
        The absolute path of the checkpoint.

    Raises:
        ValueError: if ``params`` holds no adapters (or adapters without their base
            weights, from `jaxlora.adapters`), or ``path`` exists and
            ``overwrite`` is False or it is not a jaxlora checkpoint.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora, tempfile, os
        >>> p = jaxlora.init({"kernel": jnp.ones((4, 3))}, jax.random.key(0), rank=2)
        >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> _ = jaxlora.save(d, p)
        >>> restored = jaxlora.load(d, {"kernel": jnp.ones((4, 3))})
        >>> bool((restored["kernel"].a == p["kernel"].a).all())
        True
    """
    overwrite = check_flag("overwrite", overwrite)
    path = os.path.abspath(os.fsdecode(path))
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    nodes = [(path_str(k), x) for k, x in flat if is_lora(x)]
    if not nodes:
        raise ValueError(
            "params holds no LoRA adapters (no LoraWeight nodes): nothing to save. "
            "Pass the adapted tree returned by jaxlora.init (and training)."
        )
    baseless = [p for p, x in nodes if not hasattr(x.w, "shape")]
    if baseless:
        raise ValueError(
            f"{examples(baseless)} hold adapters without a base weight (w={None!r}, as "
            "returned by jaxlora.adapters); a checkpoint records the base shapes and "
            "dtypes. Save the adapted tree, e.g. jaxlora.combine(base, adapters)."
        )
    replaceable = functools.partial(_check_replaceable, overwrite=overwrite)
    replaceable(path)
    local = [
        p
        for p, x in nodes
        if _hosts.several()
        and any(getattr(f, "is_fully_addressable", True) for f in (x.a, x.b))
    ]
    if local:
        raise ValueError(
            f"{examples(local)}: with {jax.process_count()} JAX processes, "
            "jaxlora.save writes each factor as one array spread over them (orbax), "
            "and these factors are held by each process on its own devices. Put them "
            "on a mesh of every process's devices first (jax.device_put(x, "
            "NamedSharding(mesh, PartitionSpec())), or init on weights laid out "
            "so), or write a PEFT adapter with jaxlora.save_peft."
        )
    entries = [_entry(p, node, f"t{i}") for i, (p, node) in enumerate(nodes)]
    problems = _entry_problems(entries)
    if problems:  # checked before the disk is touched: `load` would refuse it
        raise ValueError(
            "Cannot save: these LoraWeights' factors do not fit their base weight's "
            "shape, layout and rank:\n  - " + "\n  - ".join(problems) + "\nA tree "
            "batched by jax.vmap (e.g. jaxlora.init over several keys) holds one "
            "adapter per batch entry: save each, e.g. jax.tree.map(lambda x: x[i], "
            "tree)."
        )
    with staged(path, replaceable) as tmp:
        arrays = {
            e["key"]: {"a": jnp.asarray(node.a), "b": jnp.asarray(node.b)}
            for e, (_, node) in zip(entries, nodes, strict=True)
        }
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, ARRAYS), arrays)
        checkpointer.wait_until_finished()
        checkpointer.close()
        meta = {"format": FORMAT, "version": VERSION, "targets": entries}
        if _hosts.primary():
            text = json.dumps(meta, indent=1).encode()
            write_synced(os.path.join(tmp, METADATA), text)
    return path


def _check_replaceable(path: str, *, overwrite: bool) -> None:
    """Raises unless `save` may write ``path``: it does not exist, or it is a
    checkpoint `save` wrote and ``overwrite`` is set."""
    if os.path.lexists(path) and not overwrite:
        raise ValueError(
            f"Checkpoint {path!r} already exists. Pass overwrite=True to replace "
            "it, or choose another path."
        )
    if os.path.lexists(path) and (foreign := _foreign_entries(path)) is not None:
        raise ValueError(
            f"Cannot overwrite {path!r}: it is not a jaxlora checkpoint (it holds "
            f"{shown(foreign)}), and overwrite=True only replaces a directory written "
            "by jaxlora.save. Choose another path, or move its contents away first."
        )


@contextlib.contextmanager
def staged(path: str, replaceable: Callable[[str], None]):
    """A temporary directory next to ``path``, renamed to ``path`` when the block
    succeeds (an existing ``path`` is replaced only then) and removed otherwise, so
    an interrupted save never leaves a half-written directory where a good one was.
    ``replaceable(path)`` is checked again right before the rename (it raises where
    ``path`` may not be written): what appeared there during the save is kept.

    With several JAX processes (multi-host) every process gets the same directory
    (the primary one creates, renames and removes it; ``path`` must be on a file
    system they share, as orbax requires), files only one process writes are
    written by `_hosts.primary`, and every process returns once ``path`` is
    complete, or raises if any process failed in the block."""
    staging, failed = _hosts.on_primary(lambda: _make_staging(path))
    if failed:
        raise OSError(f"Could not create a directory next to {path!r}: {failed}")
    tmp, made = staging or ("", None)
    tmp = _hosts.agreed(tmp)
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        try:
            all_ok = _hosts.everywhere(ok)
            if all_ok:
                _, failed = _hosts.on_primary(lambda: _replace(tmp, path, replaceable))
        finally:
            if _hosts.primary():
                shutil.rmtree(tmp, ignore_errors=True)
                if not os.path.lexists(path):  # failed: no directories made for it
                    _remove_made(path, made)
        if ok and not all_ok:  # this process's part went well
            raise RuntimeError(
                f"Saving {path!r} failed on another JAX process (see its error); "
                "nothing was written there."
            )
        if failed:
            raise OSError(f"Could not move the saved files to {path!r}: {failed}")


def _short(path: str) -> str:
    """The start of ``path``'s name (at most 64 bytes) for a hidden sibling's name:
    a long name plus a suffix would pass the file system's 255-byte limit."""
    return os.path.basename(path).encode()[:64].decode(errors="ignore")


def _remove_made(path: str, made: str | None) -> None:
    """Removes the directories above ``path`` up to ``made``, the topmost one
    `_make_staging` created for it, as far up as they are empty."""
    parent = os.path.dirname(path)
    while made is not None:
        try:
            os.rmdir(parent)
        except OSError:  # not empty (something else was put there), or gone
            return
        if parent == made:
            return
        parent = os.path.dirname(parent)


def _make_staging(path: str) -> tuple[str, str | None]:
    """A new hidden directory next to ``path``, and the topmost directory made to
    hold it (None if ``path``'s parent existed)."""
    parent = os.path.dirname(path)
    above = parent
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NotADirectoryError(
            f"Cannot save to {path!r}: {above!r} is a file, not a directory. Save "
            "under a directory (or move that file away)."
        )
    made = None
    if not os.path.exists(parent):
        made = parent
        while not os.path.exists(os.path.dirname(made)):
            made = os.path.dirname(made)
        os.makedirs(parent)
    tmp = tempfile.mkdtemp(prefix=f".{_short(path)}.tmp-", dir=parent)
    # mkdtemp's 0o700 would hide the result from other users: the mode of the
    # directory it replaces, else what the umask gives a new directory
    if os.path.isdir(path):
        mode = os.stat(path).st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o777 & ~umask
    os.chmod(tmp, mode)
    return tmp, made


def write_synced(file: str, data: bytes) -> None:
    """Writes ``data`` to ``file`` and flushes it to disk."""
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _foreign_entries(path: str) -> list[str] | None:
    """None if ``path`` may be replaced (a directory holding a metadata file written
    by `save`, or an empty one); else what it holds that `save` did not write."""
    if os.path.islink(path) or not os.path.isdir(path):
        return ["a file" if os.path.isfile(path) else "not a directory"]
    held = set(os.listdir(path))
    foreign = [repr(name) for name in sorted(held - {METADATA, ARRAYS})]
    if not foreign and held:  # save writes both at once: the metadata must be ours
        try:
            with open(os.path.join(path, METADATA), encoding="utf-8") as f:
                is_ours = json.load(f).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            is_ours = False
        if not is_ours:
            foreign = [f"{sorted(held)} without a {METADATA} written by jaxlora.save"]
    return foreign or None


def _replace(src: str, dst: str, replaceable: Callable[[str], None]) -> None:
    """Renames ``src`` to ``dst``, moving an existing ``dst`` aside until done."""
    replaceable(dst)
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    old = os.path.join(os.path.dirname(dst), f".{_short(dst)}.old-{uuid.uuid4().hex}")
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def _read_metadata(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        what = (
            "a file, not a directory" if os.path.exists(path) else "no such directory"
        )
        raise FileNotFoundError(f"No jaxlora checkpoint at {path!r}: {what}.")
    meta_file = os.path.join(path, METADATA)
    if not os.path.isfile(meta_file):
        raise ValueError(
            f"{path!r} is not a complete jaxlora checkpoint: {METADATA} is missing "
            "(truncated copy, or not written by jaxlora.save)."
        )
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Corrupted jaxlora checkpoint {meta_file!r}: {e}.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file!r} is not jaxlora adapter metadata.")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{path!r} has jaxlora checkpoint format version {meta.get('version')!r}; "
            f"this jaxlora reads version {VERSION}. Upgrade jaxlora."
        )
    return meta


def _unrecorded_conv(path: str, leaf: Any, layout: Layout) -> Conv | None:
    """The conv record of a target whose checkpoint has none: the adapted tree's
    own (when it is loaded onto one, with the same layout), else what `init` assumes
    without inference (a Flax ``Conv`` kernel of a module named ``*conv*``)."""
    if is_lora(leaf) and leaf.spec.layout == layout:
        return leaf.spec.conv
    shape = tuple((leaf.w if is_lora(leaf) else leaf).shape)
    if layout == default_layout(path, shape):
        return default_conv(path, shape)
    return None


def _entry_problems(entries: list[dict[str, Any]]) -> list[str]:
    """Where an entry lacks a field, names no dtype, or its rank, layout and base
    shape do not give its factor shapes."""
    if not isinstance(entries, list):
        return [f"'targets' is a {type(entries).__name__}, not a list of entries"]
    problems = []
    fields = set(_ENTRY_FIELDS)
    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            problems.append(f"entry {k} is a {type(e).__name__}, not a record")
            continue
        if lacking := sorted(fields - e.keys()):
            problems.append(f"{e.get('path', f'entry {k}')!r}: no {lacking}")
            continue
        try:
            for f in ("base_dtype", "a_dtype", "b_dtype"):
                jnp.dtype(e[f])
            layout = Layout(**{k: tuple(v) for k, v in e["layout"].items()})
            want = layout.factor_shapes(tuple(e["base_shape"]), e["rank"])
            got = (tuple(e["a_shape"]), tuple(e["b_shape"]))
            conv = e.get("conv")
            axes = None if conv is None else Conv(**conv).axes
            if axes is not None and set(axes) != set(layout.in_axes):
                raise ValueError(f"conv axes {conv['axes']} are not the input axes")
        except (KeyError, TypeError, ValueError, IndexError) as err:
            problems.append(f"{e.get('path')!r}: {type(err).__name__}: {err}")
            continue
        if want != got:
            problems.append(
                f"{e['path']!r}: rank {e['rank']} and base shape {e['base_shape']} "
                f"need factors {want}, got {got}"
            )
    return problems


def _check_entries(path: str, entries: list[dict[str, Any]]) -> None:
    """The metadata must agree with itself: rank, layout and factor shapes."""
    problems = _entry_problems(entries)
    if problems:
        raise ValueError(
            f"Corrupted jaxlora checkpoint {path!r}: {METADATA} is incomplete or "
            "contradicts itself:\n  - " + "\n  - ".join(problems) + "\nSave it again."
        )


def _restore_arrays(
    path: str, entries: list[dict[str, Any]], targets: dict[str, tuple]
) -> dict[str, Any]:
    """The factors of ``entries``, each read straight into its sharding in
    ``targets`` (key -> (a, b) shardings), else read to the host and placed as
    `init` places them: on the default device, uncommitted, so a step jitted
    before `load` does not compile again for arrays pinned to a device."""

    def spec(shape, dtype, sharding):
        if sharding is None:  # orbax reads a numpy target into host memory
            return np.empty(tuple(shape), jnp.dtype(dtype))
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)

    abstract = {}
    for e in entries:
        sa, sb = targets.get(e["key"]) or (None, None)
        abstract[e["key"]] = {
            "a": spec(e["a_shape"], e["a_dtype"], sa),
            "b": spec(e["b_shape"], e["b_dtype"], sb),
        }
    arrays_dir = os.path.join(path, ARRAYS)
    if not os.path.isdir(arrays_dir):
        raise ValueError(
            f"{path!r} is not a complete jaxlora checkpoint: the {ARRAYS}/ directory "
            "with the factors is missing (truncated copy?)."
        )
    checkpointer = ocp.StandardCheckpointer()
    try:
        try:
            stored = checkpointer.metadata(arrays_dir).item_metadata.tree
            restored = None
            if not (problems := _stored_problems(entries, stored)):
                restored = checkpointer.restore(arrays_dir, abstract)
        except Exception as e:  # orbax/tensorstore raise many types for broken files
            raise ValueError(
                f"Could not read the factors of jaxlora checkpoint {path!r} (truncated "
                f"or corrupted {ARRAYS}/): {type(e).__name__}: {e}"
            ) from e
    finally:
        checkpointer.close()
    if not problems:  # what orbax handed back (a numpy target takes what is stored)
        problems = _stored_problems(entries, restored)
    if problems:
        raise ValueError(
            f"Corrupted jaxlora checkpoint {path!r}: its {ARRAYS}/ do not hold the "
            f"factors {METADATA} records (mixed-up copy of another checkpoint?):\n  - "
            + "\n  - ".join(problems)
            + "\nRestore the whole checkpoint directory from one save."
        )
    on_host = lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x  # noqa: E731
    return jax.tree.map(on_host, restored)


def _stored_problems(entries, stored) -> list[str]:
    """Factors in ``stored`` (key -> {'a', 'b'}: arrays or orbax's array metadata)
    whose shape or dtype is not what ``entries`` record, or that are missing."""
    problems = []
    for e in entries:
        for side in ("a", "b"):
            want = (tuple(e[f"{side}_shape"]), jnp.dtype(e[f"{side}_dtype"]))
            x = (stored or {}).get(e["key"], {}).get(side)
            if x is None:
                problems.append(f"{e['path']!r}: no factor {side}")
                continue
            got = (tuple(x.shape), jnp.dtype(x.dtype))
            if got != want:
                problems.append(
                    f"{e['path']!r}: {side} is stored as {got[1].name}{list(got[0])} "
                    f"where {METADATA} records {want[1].name}{list(want[0])}"
                )
    return problems


def _check(entries, leaves) -> list[str]:
    """Every problem of fitting ``entries`` onto the base ``leaves`` (path -> leaf)."""
    problems = []
    for e in entries:
        p, leaf = e["path"], leaves.get(e["path"])
        if leaf is None:
            continue
        w = leaf.w if is_lora(leaf) else leaf
        shape, dtype = tuple(getattr(w, "shape", ())), getattr(w, "dtype", None)
        want_shape, want_dtype = tuple(e["base_shape"]), jnp.dtype(e["base_dtype"])
        if shape != want_shape or dtype != want_dtype:
            problems.append(
                f"{p!r}: the checkpoint was trained on a base weight of shape "
                f"{want_shape} and dtype {want_dtype.name}, got shape {shape} and "
                f"dtype {getattr(dtype, 'name', dtype)}"
            )
        elif e["residual"] and not _same_fingerprint(
            _fingerprint(w), e["residual_fingerprint"]
        ):
            problems.append(
                f"{p!r}: the adapter (scheme {e['scheme']!r}) was trained on a "
                "residual base (the original weight minus its initial low-rank part), "
                "and this base weight is not that residual. Load it onto the residual "
                "tree: re-create it with jaxlora.init(...) using the same scheme, "
                "rank, targets and key on the original model (LoRA-GA and CorDA: "
                "and the same batches)"
            )
        elif not e["residual"] and is_lora(leaf) and leaf.spec.residual:
            problems.append(
                f"{p!r}: the adapter (scheme {e['scheme']!r}) was trained on the "
                "original weight, and this base weight is a residual (scheme "
                f"{leaf.spec.scheme!r}: the original minus its initial low-rank part). "
                "Load it onto the original model's params (or an adapted tree of a "
                "scheme that keeps the weight, such as 'normal')"
            )
    return problems


@through_state(1)
def load(path: str | os.PathLike, params: PyTree) -> PyTree:
    """Restores a `save`d adapter onto ``params`` and returns the adapted tree.

    Args:
        path: a checkpoint directory written by `jaxlora.save`.
        params: the base tree of the same model: a plain tree (each target
            becomes a `LoraWeight`) or an adapted tree (its factors and specs at
            the checkpoint's paths are replaced; its base weights are kept).

    Returns:
        A new tree with a `LoraWeight` at every path of the checkpoint.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a truncated or corrupted checkpoint; a checkpoint path
            missing from ``params`` (all of them: another model); a base weight of
            another shape or dtype; a residual adapter whose base is not its
            residual, or a plain adapter onto a residual base; adapters in
            ``params`` at paths the checkpoint lacks.
    """
    path = os.path.abspath(os.fsdecode(path))
    meta = _read_metadata(path)
    entries = meta.get("targets")
    _check_entries(path, entries)
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    check_unique([path_str(k) for k, _ in flat], among={e["path"] for e in entries})
    refuse_baseless(params, "jaxlora.load")
    leaves = {path_str(k): x for k, x in flat}
    wanted = [e["path"] for e in entries]
    missing = [p for p in wanted if p not in leaves]
    if len(missing) == len(wanted):
        raise ValueError(
            f"None of the {len(wanted)} adapter paths of {path!r} (e.g. "
            f"{wanted[:3]}) exist in params (which has e.g. {list(leaves)[:3]}). "
            "Was this checkpoint saved for another model?"
        )
    problems = [f"{p!r}: not in params" for p in missing]
    problems += _check(entries, leaves)
    extra = sorted(p for p, x in leaves.items() if is_lora(x) and p not in wanted)
    if extra:
        problems.append(
            "params already holds adapters the checkpoint lacks: "
            f"{examples(extra)}; pass jaxlora.base(params) to load onto the base "
            "weights only"
        )
    if problems:
        raise ValueError(
            f"Cannot load jaxlora checkpoint {path!r} onto these params:\n  - "
            + "\n  - ".join(problems)
            + "\nLoad it onto the model it was trained for."
        )
    base = lambda leaf: leaf.w if is_lora(leaf) else leaf  # noqa: E731
    layout = lambda e: Layout(**{k: tuple(v) for k, v in e["layout"].items()})  # noqa: E731
    # factors of a weight laid out on a mesh are read straight into their shards
    # (each process reads its own: no detour through one device)
    targets = {
        e["key"]: factor_shardings(layout(e), base(leaves[e["path"]])) for e in entries
    }
    arrays = _restore_arrays(path, entries, targets)
    nodes = {e["path"]: (e, arrays[e["key"]]) for e in entries}

    def attach(keypath, leaf):
        found = nodes.get(path_str(keypath))
        if found is None:
            return leaf
        e, f = found
        conv = Conv(**e["conv"]) if e.get("conv") else None
        if "conv" not in e:  # written before jaxlora recorded convolutions
            conv = _unrecorded_conv(e["path"], leaf, layout(e))
        spec = LoraSpec(layout(e), **{k: e[k] for k in _SPEC_FIELDS}, conv=conv)
        return LoraWeight(base(leaf), f["a"], f["b"], spec)

    return factored_boxes(
        jax.tree_util.tree_map_with_path(attach, params, is_leaf=is_lora)
    )
