"""Which leaves of a parameter tree get adapters, with which rank, alpha and layout."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._node import Conv
from jaxlora._node import Layout
from jaxlora._node import is_lora
from jaxlora._paths import leaf_name
from jaxlora._paths import path_str

PyTree = Any
Targets = None | str | Sequence[str] | Callable[[str, Any], bool]

_KERNEL_NAMES = ("kernel", "embedding")


def leaves_with_paths(params: PyTree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a tree, `LoraWeight` nodes kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    return [(path_str(p), leaf) for p, leaf in flat]


def is_floating(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _default_target(path: str, leaf: Any) -> bool:
    return leaf_name(path) == "kernel" and is_floating(leaf) and leaf.ndim >= 2


def name_matches(name: str, path: str, *, any_leaf: bool = False) -> bool:
    """PEFT-style suffix match of a module name (or a full leaf path) against a path.

    ``name`` is the path or a ``/``-bounded suffix of it (``"head"`` is not
    ``"prehead"``), or the same of its module path: for a kernel-like leaf only,
    unless ``any_leaf`` (a module's bias and scale too).
    """
    module = path.rsplit("/", 1)[0] if "/" in path else ""
    if path == name or path.endswith("/" + name):
        return True
    return (any_leaf or leaf_name(path) in _KERNEL_NAMES) and (
        module == name or module.endswith("/" + name)
    )


def check_key(rng: Any, name: str) -> None:
    """``rng`` (the argument ``name``) must be one JAX key (new-style, or a legacy
    uint32 pair)."""
    dtype = getattr(rng, "dtype", None)
    shape = tuple(getattr(rng, "shape", (None,)))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    # a raw key is the default implementation's key data (threefry: 2 words)
    raw = jax.random.key_data(jax.random.key(0)).shape
    legacy = dtype == jnp.uint32 and shape == raw
    if not (isinstance(rng, jax.Array) and ((typed and shape == ()) or legacy)):
        got = f"{type(rng).__name__} of dtype {dtype} and shape {shape}"
        if dtype is None:
            got = f"{type(rng).__name__} {rng!r}"[:80]
        hint = "Pass jax.random.key(seed) (one key, not a batch of keys)."
        if dtype == jnp.uint32 and len(shape) == 1:
            hint = (
                f"A raw uint32 key of shape {shape} is not the default PRNG "
                f"implementation's {raw} (jax.random.PRNGKey(seed, impl=...)): pass "
                "jax.random.key(seed, impl=...) or jax.random.wrap_key_data(key, "
                "impl=...), a typed key that carries its implementation."
            )
        raise TypeError(f"{name} must be a single JAX key, got {got}. {hint}")


def check_regex(pattern: Any, what: str, example: str = "'.*query.*'") -> None:
    """``pattern`` must compile as a Python regex (a glob like ``*query*`` does not).

    Raises:
        ValueError: naming ``what`` (the argument), the pattern and the fix.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a regex string, got {pattern!r}.")
    try:
        re.compile(pattern)
    except re.error as e:
        if "*" in pattern or "?" in pattern:  # a glob: its regex
            glob = "".join(
                ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
            )
            fix = f"write {glob!r} for the glob {pattern!r}"
        else:
            fix = f"e.g. {example} for '*query*'"
        raise ValueError(
            f"{what} {pattern!r} is not a valid regular expression ({e}). Patterns "
            f"are Python regexes, not globs: {fix}."
        ) from None


def pattern_matches(pattern: str, path: str) -> bool:
    """A pattern key (rank/alpha/layout patterns) matches a path or its module path.

    Like PEFT's ``re.match(rf"(.*\\.)?({key})$", name)`` with ``/`` as separator.
    """
    module = path.rsplit("/", 1)[0] if "/" in path else path
    regex = rf"(?:.*/)?(?:{pattern})"
    return bool(re.fullmatch(regex, path) or re.fullmatch(regex, module))


def examples(paths: Sequence[str], n: int = 8) -> str:
    """The first ``n`` paths, quoted, and how many more there are."""
    return shown([repr(p) for p in paths], n)


def shown(items: Sequence[str], n: int = 8) -> str:
    """The first ``n`` of ``items`` (already formatted), and how many more."""
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_names(names: Any, arg: str) -> bool:
    """Checks ``names`` is a sequence of strings (module names or paths); True.

    Raises:
        TypeError: for bytes, a mapping, a non-iterable, or a non-string entry,
            naming ``arg`` and the entry.
    """
    if isinstance(names, (bytes, bytearray, Mapping)) or not isinstance(
        names, Iterable
    ):
        raise TypeError(
            f"{arg} takes module names as a list of strings (e.g. {arg}=['head']), a "
            f"regex string or a predicate (path, leaf) -> bool; got "
            f"{type(names).__name__} {names!r}."
        )
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(
            f"{arg} names must be strings (module names or '/'-joined paths), got "
            f"{bad[0]!r} ({type(bad[0]).__name__}) in {list(names)!r}."
        )
    return True


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool; a string, a number or None is refused (``"no"`` is
    truthy: ``overwrite="no"`` would replace a checkpoint)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def check_callable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(
            f"{name} must be a function (such as model.apply), got {fn!r} of type "
            f"{type(fn).__name__}."
        )


def check_unique(paths: list[str], among=None) -> None:
    """Raises if two leaves share a ``/``-joined path (``{"a": {"b": x}, "a/b": y}``,
    keys 0 and '0'): an adapter meant for one would be put on both. ``among``:
    only clashes at these paths count (those an adapter is put on)."""
    seen, clashes = set(), []
    for p in paths:
        if p in seen and p not in clashes and (among is None or p in among):
            clashes.append(p)
        seen.add(p)
    if clashes:
        raise ValueError(
            f"Several parameters share the path {examples(clashes)}: paths are the "
            "'/'-joined keys, so a key containing '/' (or keys 0 and '0') can name "
            "two leaves, and targets, patterns and checkpoints could not tell them "
            "apart. Rename those keys."
        )


def select(params: PyTree, targets: Targets) -> list[str]:
    """The paths of the leaves ``targets`` selects (before validation).

    Args:
        params: the parameter tree.
        targets: ``None`` (every floating ``kernel`` with ndim >= 2), a regex fully
            matched against each ``/``-joined path, a sequence of module names or
            paths (suffix match, as PEFT's ``target_modules``), or a predicate
            ``(path, leaf) -> bool``.

    Raises:
        ValueError: if two leaves share a path, the tree is already adapted, or
            ``targets`` (or one name in it) matches nothing; the message lists
            available paths.
    """
    items = leaves_with_paths(params)
    check_unique([p for p, _ in items])
    adapted = [p for p, leaf in items if is_lora(leaf)]
    if adapted:
        raise ValueError(
            f"params already holds LoRA adapters at {examples(adapted)}. Call "
            "jaxlora.init on jaxlora.base(params) (or jaxlora.merge(params)) instead."
        )
    arrays = [(p, leaf) for p, leaf in items if hasattr(leaf, "shape")]
    available = [p for p, leaf in arrays if leaf.ndim >= 2] or [p for p, _ in arrays]
    if targets is None:
        chosen = [p for p, leaf in arrays if _default_target(p, leaf)]
        what = "the default targets (floating 'kernel' leaves with ndim >= 2)"
    elif isinstance(targets, str):
        check_regex(  # fully matched against whole paths: a bias would match too
            targets, "targets", "'.*query.*/kernel' (or targets=['query'])"
        )
        chosen = [p for p, _ in arrays if re.fullmatch(targets, p)]
        what = f"targets={targets!r} (a regex fully matched against each path)"
    elif callable(targets):
        chosen = [p for p, leaf in arrays if targets(p, leaf)]
        what = f"the targets predicate {getattr(targets, '__name__', targets)!r}"
    elif isinstance(targets, Sequence) and check_names(targets, "targets"):
        unmatched = [
            n for n in targets if not any(name_matches(n, p) for p, _ in arrays)
        ]
        if unmatched:
            raise ValueError(
                f"targets names {unmatched} match no parameter. Names are matched as "
                f"path suffixes (e.g. 'query' or 'Dense_0/kernel'). Available: "
                f"{examples(available)}."
            )
        chosen = [p for p, _ in arrays if any(name_matches(n, p) for n in targets)]
        what = f"targets={list(targets)!r}"
    else:
        raise TypeError(
            "targets must be None, a regex string, a sequence of module names or a "
            f"predicate (path, leaf) -> bool; got {type(targets).__name__}."
        )
    if not chosen:
        skipped = [
            f"{p} ({leaf.dtype})"
            for p, leaf in arrays
            if leaf_name(p) == "kernel" and leaf.ndim >= 2 and not is_floating(leaf)
        ]
        note = (
            f" Kernels that are not floating (quantized) are not adapted: "
            f"{examples(skipped)}; cast them to a floating dtype first."
            if skipped and targets is None
            else ""
        )
        named = isinstance(targets, str) and any(
            name_matches(targets, p) for p, _ in arrays
        )
        if named:
            note += (  # a module name given as a string: a regex of the whole path
                f" {targets!r} is a module name in these paths, and a string is a "
                f"regex fully matched against the whole path: pass targets="
                f"[{targets!r}] (module names) or {'.*' + targets + '.*/kernel'!r}."
            )
        if not arrays:
            raise ValueError(
                f"{what} matched no parameter: params holds no arrays (got "
                f"{type(params).__name__}). Pass the model's parameter tree, e.g. "
                "model.init(rng, x)."
            )
        raise ValueError(
            f"{what} matched no parameter.{note} Available paths: "
            f"{examples(available)}."
        )
    return chosen


def resolve_pattern(
    patterns: Mapping[str, Any] | None, paths: Sequence[str], name: str
) -> dict[str, Any]:
    """Per-path values from a ``{regex: value}`` dict; first matching key wins.

    Raises:
        ValueError: if a key matches none of the target ``paths``.
    """
    if patterns is not None and not isinstance(patterns, Mapping):
        raise TypeError(
            f"{name} must be a dict {{regex: value}} (keys matched against the end "
            f"of a target's path), got {type(patterns).__name__} {patterns!r}."
        )
    if not patterns:
        return {}
    for k in patterns:
        check_regex(k, f"{name} key")
    unused = [k for k in patterns if not any(pattern_matches(k, p) for p in paths)]
    if unused:
        raise ValueError(
            f"{name} keys {unused} match no LoRA target. Keys are regexes matched "
            f"against the end of a target's path or module path. Targets: "
            f"{examples(list(paths))}."
        )
    out, used = {}, set()
    for p in paths:
        for k, v in patterns.items():
            if pattern_matches(k, p):
                out[p] = v
                used.add(k)
                break
    shadowed = [k for k in patterns if k not in used]
    if shadowed:
        raise ValueError(
            f"{name} keys {shadowed} are never used: every target they match is "
            "matched first by an earlier key (the first matching key wins). Put the "
            "more specific key first, or remove it."
        )
    return out


@dataclasses.dataclass(frozen=True)
class Target:
    """Everything `jaxlora.init` needs to adapt one leaf."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    layout: Layout
    rank: int
    alpha: float
    embedding: bool
    conv: Conv | None = None


def _conv_module(path: str, shape: tuple[int, ...]) -> bool:
    module = path.rsplit("/", 2)[-2] if path.count("/") >= 1 else ""
    return len(shape) >= 3 and "conv" in module.lower()


def default_conv(path: str, shape: tuple[int, ...], value: Any = None) -> Conv | None:
    """The `Conv` assumed where inference gives none: a Flax ``Conv`` kernel for the
    ``"conv"`` layout (``value``) or, with no layout given, the default conv layout."""
    if value == "conv" or (value is None and _conv_module(path, shape)):
        return Conv.hwio(len(shape))
    return None


def default_layout(path: str, shape: tuple[int, ...]) -> Layout:
    """The layout used when neither ``layouts`` nor inference gives one.

    Dense ``(in, out)``; Conv ``(*window, in, out)`` when the module name contains
    "conv"; a 3-D kernel of a module named ``out`` (the output projection of Flax's
    attention layers) ``(heads, head_dim, embed)`` with two input axes; any other
    >= 3-D kernel ``(in, *out)`` ("first axis is input").
    """
    module = path.rsplit("/", 2)[-2] if path.count("/") >= 1 else ""
    if _conv_module(path, shape):
        return Layout.conv(len(shape))
    if len(shape) == 3 and module == "out":  # Flax attention: (heads, head_dim, embed)
        return Layout.dense(3, n_in=2)
    return Layout.dense(len(shape))


def as_layout(value: Any, path: str, shape: tuple[int, ...]) -> Layout:
    """A `Layout` from a user's layout value (``Layout``, ``"dense"`` or ``"conv"``)."""
    if isinstance(value, Layout):
        layout = value
    elif value == "dense":
        layout = Layout.dense(len(shape))
    elif value == "conv":
        layout = Layout.conv(len(shape))
    else:
        raise ValueError(
            f"layouts[...] for {path!r} must be a jaxlora.Layout, 'dense' or 'conv'; "
            f"got {value!r}."
        )
    if layout.ndim != len(shape):
        raise ValueError(
            f"Layout {layout} for {path!r} names {layout.ndim} axes but the weight has "
            f"shape {shape}. Pass a Layout with one entry per axis."
        )
    return layout
