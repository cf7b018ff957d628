"""Parameter paths as users read them: ``'params/layer_0/query/kernel'``."""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any

# Wrapper nodes whose single child is the value itself (Flax NNX ``Variable``); their
# key is dropped so an NNX state and its pure dict give the same path names.
_TRANSPARENT_ATTRS = ("value", "raw_value")


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath) -> str:
    """The ``/``-joined name of a JAX key path (NNX ``.value`` wrappers omitted).

    Example:
        >>> from jax.tree_util import DictKey
        >>> path_str((DictKey("params"), DictKey("Dense_0"), DictKey("kernel")))
        'params/Dense_0/kernel'
    """
    names = [_key_name(k) for k in keypath]
    if (
        names
        and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
        and names[-1] in _TRANSPARENT_ATTRS
    ):
        names = names[:-1]
    return "/".join(names)


def leaf_name(path: str) -> str:
    """The last component of a ``/``-joined path."""
    return path.rsplit("/", 1)[-1]
