"""Hugging Face PEFT's adapter format: share adapters with PyTorch users, and back.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. For a torch module named ``n`` (its name in the
base model) the file holds ``base_model.model.<n>.lora_A.weight`` ``(r, in)`` and
``….lora_B.weight`` ``(out, r)``, or for an embedding ``….lora_embedding_A``
``(r, vocab)`` and ``….lora_embedding_B`` ``(dim, r)``, or for a convolution
``lora_A`` ``(r, in, *window)`` (a conv over the base window) and ``lora_B``
``(out, r, 1, ...)`` (a 1×1 conv), from ``spec.conv`` (`jaxlora.Conv`); the update is
``scaling · B @ A`` with ``scaling = alpha / r`` (``alpha / √r`` with
``use_rslora``), ``r`` and ``alpha`` per module through ``rank_pattern`` and
``alpha_pattern``.

jaxlora's factors are the transposes: ``A = aᵀ`` and ``B = bᵀ``. A weight with
several input or output axes (``DenseGeneral``'s ``(embed, heads, head_dim)``) is a
torch ``Linear`` whose columns are its input axes flattened in the weight's own
axis order and whose rows are its output axes flattened likewise (the weight is
``kernel.reshape(in, out).T``, as in every Hugging Face port). Stacked layers
(``nn.scan``) are one torch module per layer. The torch names come from the
caller's ``module_names(path, layer)``: the model's naming is not in the weights.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _hosts
from jaxlora import _peft_config
from jaxlora import _safetensors
from jaxlora._boxes import factored_boxes
from jaxlora._checkpoint import staged
from jaxlora._checkpoint import write_synced
from jaxlora._merge import refuse_baseless
from jaxlora._nnx import through_state
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._node import is_lora
from jaxlora._node import placed_like_weight
from jaxlora._paths import path_str
from jaxlora._peft_config import CONFIG
from jaxlora._targets import check_flag
from jaxlora._targets import check_unique
from jaxlora._targets import examples
from jaxlora._targets import shown

PyTree = Any
Names = Callable[[str, tuple], str] | Mapping[str, Any]

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# -- names and orientation ------------------------------------------------------------


def _name_of(module_names: Names, path: str, layer: tuple, stack: tuple) -> str:
    """The torch module name of one layer (``layer`` indexes ``stack``) of ``path``."""
    if isinstance(module_names, Mapping):
        if path not in module_names:
            raise ValueError(
                f"{path!r}: not in module_names, which names {list(module_names)[:4]}"
                "...; give every adapted path its torch module name."
            )
        name = module_names[path]
        if layer:
            if isinstance(name, str) or len(name) != math.prod(stack):
                raise ValueError(
                    f"{path!r} holds {math.prod(stack)} stacked layers {stack}: "
                    f"module_names must give one name per layer (a list), got "
                    f"{name!r}; or pass a function (path, layer) -> name."
                )
            name = name[int(np.ravel_multi_index(layer, stack))]
    else:
        name = module_names(path, layer)
    if not isinstance(name, str) or not all(name.split(".")):
        raise ValueError(  # '.'-joined parts, none empty (torch's own rule)
            f"module_names gave {name!r} for {path!r} layer {layer}: expected a "
            "torch module name such as 'encoder.layer.0.attention.self.query' "
            "('.'-joined, no part empty)."
        )
    return name


def _to_torch(a, b, spec: LoraSpec) -> tuple[np.ndarray, np.ndarray]:
    """One layer's ``(A, B)`` in PEFT's orientation from ``a (*in, r)``, ``b (r,
    *out)``: input and output axes flattened in the weight's axis order, or for a
    convolution ``A (r, in, *window)`` and ``B (out, r, 1, ...)`` (`_conv_order`)."""
    lay, order = spec.layout, lambda axes: list(np.argsort(axes))  # noqa: E731
    b = np.transpose(b, [0, *(1 + i for i in order(lay.out_axes))])
    B = b.reshape(b.shape[0], -1).T
    if spec.conv is not None:
        A = np.moveaxis(np.transpose(a, [*_conv_order(spec), a.ndim - 1]), -1, 0)
        return A, B.reshape(*B.shape, *(1,) * (len(spec.conv.axes) - 1))
    a = np.transpose(a, [*order(lay.in_axes), a.ndim - 1])
    return a.reshape(-1, a.shape[-1]).T, B


def _from_torch(A, B, spec: LoraSpec, in_shape, out_shape):
    """Inverse of `_to_torch` for one layer: ``a`` and ``b`` in the layout's order."""
    lay = spec.layout
    outs = [out_shape[i] for i in np.argsort(lay.out_axes)]
    b = B.reshape(B.shape[0], -1).T.reshape(-1, *outs)
    b = np.transpose(b, [0, *(1 + i for i in np.argsort(np.argsort(lay.out_axes)))])
    if spec.conv is not None:  # A (r, in, *window): back to the layout's order
        a = np.moveaxis(A, 0, -1)
        return np.transpose(a, [*np.argsort(_conv_order(spec)), a.ndim - 1]), b
    ins = [in_shape[i] for i in np.argsort(lay.in_axes)]
    a = A.T.reshape(*ins, A.shape[0])
    a = np.transpose(a, [*np.argsort(np.argsort(lay.in_axes)), a.ndim - 1])
    return a, b


def _conv_order(spec: LoraSpec) -> list[int]:
    """Where each of a convolution's ``(in, *window)`` kernel axes is among ``a``'s
    input axes (which follow the layout's ``in_axes``)."""
    return [spec.layout.in_axes.index(ax) for ax in spec.conv.axes]


def _conv_problem(path: str, conv) -> str | None:
    """Why PEFT would not compute what jaxlora does for this convolution, if so."""
    if conv.axes is None:
        return (
            f"{path!r} is read by a convolution in a way one PEFT conv adapter "
            "cannot hold (a flipped, scaled or reshaped kernel, a transposed "
            "convolution, or a kernel other operations use too)"
        )
    if conv.groups is None or conv.dilation is None:
        return (
            f"{path!r} is a convolution kernel whose groups and dilation are not "
            "known (its layout was not inferred), and PEFT computes grouped or "
            "dilated convolutions otherwise: pass apply_fn= and example_args= to "
            "jaxlora.init so they are read off the model"
        )
    if conv.groups != 1:
        return (
            f"{path!r} is a grouped convolution ({conv.groups} groups, or an "
            "ensemble that vmap folds into groups): PEFT's "
            "lora_A for it convolves every input channel and its lora_B is grouped, "
            "while jaxlora's update keeps the kernel's own groups (another update)"
        )
    if any(d != 1 for d in conv.dilation):
        return (
            f"{path!r} is a dilated convolution (kernel dilation {conv.dilation}): "
            "PEFT's lora_A runs undilated, so its output is not jaxlora's (nor its "
            "own merged model's)"
        )
    return None


def _table_turned(A, B, layout, embedding: bool):
    """PEFT's ``(A, B)`` for an embedding whose layout reads the table's feature
    axis as the input (a table only read out through, ``x @ tableᵀ``): a torch
    embedding's update ``(B @ A)ᵀ`` is laid out like the table itself, not like a
    transposed kernel, so ``A`` holds ``b`` and ``B`` holds ``a``. Its own inverse;
    other weights pass through."""
    if embedding and min(layout.in_axes) > min(layout.out_axes):
        return B.T, A.T
    return A, B


def _keys(name: str, embedding: bool) -> tuple[str, str]:
    if embedding:
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _check_module_names(module_names) -> None:
    if not (callable(module_names) or isinstance(module_names, Mapping)):
        raise TypeError(
            "module_names must be a function (path, layer) -> torch module name or a "
            f"mapping path -> name (a list of names per layer), got {module_names!r}"
            " of type " + type(module_names).__name__ + "."
        )


def _check_unused_names(module_names, nodes, caller: str) -> None:
    """A mapping's paths that no adapted weight has are an error (a typo, or a
    target left out), not ignored."""
    if not isinstance(module_names, Mapping):
        return
    extra = sorted(set(module_names) - {p for p, _ in nodes})
    if extra:
        raise ValueError(
            f"{caller}: module_names names {examples(extra)}, which params does not "
            f"adapt (adapted: {examples([p for p, _ in nodes])}). Fix the paths or "
            "remove those entries."
        )


def _is_table(keys: tuple[str, str]) -> bool:
    """Whether `_keys` gave these keys to an embedding (PEFT's kind of module)."""
    return keys[0].endswith(".lora_embedding_A")


def _stack_first(x, stack_axes, inverse: bool = False) -> np.ndarray:
    """A factor with its stacked axes (leading, in layout order) in ascending weight
    order, so layer indices read as the weight's own (``inverse``: back)."""
    order = np.argsort(stack_axes)
    order = np.argsort(order) if inverse else order
    return np.transpose(x, [*order, *range(len(stack_axes), x.ndim)])


def _adapted(params: PyTree) -> list[tuple[str, LoraWeight]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    return [(path_str(k), x) for k, x in flat if is_lora(x)]


def _layers(node: LoraWeight):
    """The stack shape (ascending weight axes) and ``(layer index, a, b)`` for each
    layer of ``node`` (one, ``()``, if unstacked)."""
    lay, n = node.spec.layout, len(node.spec.layout.stack_axes)
    a = _stack_first(_hosts.on_host(node.a), lay.stack_axes)
    b = _stack_first(_hosts.on_host(node.b), lay.stack_axes)
    stack = a.shape[:n]
    return stack, [(i, a[i], b[i]) for i in np.ndindex(*stack)]


# -- save ------------------------------------------------------------------------------


@through_state(1, returns_tree=False)
def save_peft(
    path: str | os.PathLike,
    params: PyTree,
    module_names: Names,
    *,
    overwrite: bool = False,
) -> str:
    """Writes the adapters of ``params`` as a Hugging Face PEFT LoRA adapter.

    ``peft.PeftModel.from_pretrained(torch_model, path)`` then computes what
    ``jaxlora.lora_apply`` computes, on the torch model whose weights the base
    weights are. Only the factors are written (never the base), in their own dtype.

    Args:
        path: the adapter directory to create.
        params: an adapted tree (from `jaxlora.init` and training).
        module_names: the torch module name of each target, as the torch model
            names it (``"encoder.layer.0.attention.self.query"``): a function
            ``(path, layer) -> name``, where ``layer`` is the index tuple of a
            stacked layer (``()`` for an unstacked weight), or a mapping ``path ->
            name`` (a list of names, layer by layer, for a stacked weight).
        overwrite: replace an existing PEFT adapter directory at ``path`` (never
            anything else).

    Returns:
        The absolute path of the adapter.

    Raises:
        ValueError: if ``params`` holds no adapters; a target is residual (PiSSA,
            OLoRA, MiLoRA, LoRA-GA, CorDA, ``compensate=True``: its base is not the
            original weight, see `jaxlora.to_plain_lora`); a target is a grouped or
            dilated convolution (PEFT computes those otherwise); two layers get
            the same name; or ``path`` exists and is not a PEFT adapter directory.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora, tempfile, os
        >>> w = {"fc": {"kernel": jnp.ones((4, 3))}}
        >>> p = jaxlora.init(w, jax.random.key(0), rank=2)
        >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> _ = jaxlora.save_peft(d, p, {"fc/kernel": "fc"})
        >>> sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    overwrite = check_flag("overwrite", overwrite)
    _check_module_names(module_names)
    path = os.path.abspath(os.fsdecode(path))
    nodes = _adapted(params)
    if not nodes:
        raise ValueError(
            "params holds no LoRA adapters (no LoraWeight nodes): nothing to save. "
            "Pass the adapted tree returned by jaxlora.init (and training)."
        )
    _check_unused_names(module_names, nodes, "save_peft")
    residual = [f"{p!r} ({x.spec.scheme})" for p, x in nodes if x.spec.residual]
    if residual:
        raise ValueError(
            f"{shown(residual)}: residual adapters apply to a modified base "
            "weight, and a PEFT adapter applies to the original model's weights. "
            "Convert first: jaxlora.to_plain_lora(params, original_params)."
        )
    refused = [
        m for p, x in nodes if x.spec.conv and (m := _conv_problem(p, x.spec.conv))
    ]
    if refused:
        raise ValueError(
            "PEFT cannot hold these adapters as jaxlora computes them:\n  - "
            + "\n  - ".join(refused)
            + "\nLeave them out of the adapter (targets= in jaxlora.init), or share "
            "the merged weights (jaxlora.merge) instead."
        )
    _check_target(path, overwrite=overwrite)
    tensors, modules, owner = {}, {}, {}
    for p, node in nodes:
        spec = node.spec
        stack, layers = _layers(node)
        for layer, a, b in layers:
            name = _name_of(module_names, p, layer, stack)
            if name in owner:
                raise ValueError(
                    f"module_names gave {name!r} to both {owner[name]} and "
                    f"{(p, layer)}: every layer needs its own torch module."
                )
            owner[name] = (p, layer)
            ka, kb = _keys(name, spec.embedding)
            A, B = _to_torch(a, b, spec)
            tensors[ka], tensors[kb] = _table_turned(A, B, spec.layout, spec.embedding)
            modules[name] = spec
    _warn_tables([n for n, spec in modules.items() if spec.embedding], "save_peft")
    config = _peft_config.write(modules)
    with staged(path, functools.partial(_check_target, overwrite=overwrite)) as tmp:
        if _hosts.primary():  # every process holds all of it: one writes
            card = os.path.join(path, "README.md")  # PEFT's model card: kept
            if os.path.isfile(card):
                shutil.copy2(card, os.path.join(tmp, "README.md"))
            blob = _safetensors.encode(tensors, {"format": "pt"})
            write_synced(os.path.join(tmp, WEIGHTS), blob)
            text = json.dumps(config, indent=2).encode()  # pattern order matters
            write_synced(os.path.join(tmp, CONFIG), text)
    return path


def _warn_tables(names: list[str], fn: str) -> None:
    """PEFT's ``lora_embedding_*`` change lookups only; jaxlora's change the table,
    so a read-out through it (``attend``, tied embeddings) changes too."""
    if names:
        warnings.warn(
            f"jaxlora.{fn}: {sorted(names)[:4]} are embedding tables. In PEFT their "
            "adapter changes lookups only; in jaxlora it changes the table, so a "
            "model that also reads out through it (Embed.attend, tied embeddings) "
            "computes differently unless PEFT ties the head to it "
            "(ensure_weight_tying=True with the head targeted).",
            stacklevel=3,
        )


def _check_target(path: str, *, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise ValueError(
            f"{path!r} already exists. Pass overwrite=True to replace it (a PEFT "
            "adapter directory only), or choose another path."
        )
    if os.path.islink(path) or not os.path.isdir(path):
        raise ValueError(f"Cannot overwrite {path!r}: it is not a directory.")
    foreign = sorted(set(os.listdir(path)) - {CONFIG, WEIGHTS, "README.md"})
    if foreign:
        raise ValueError(
            f"Cannot overwrite {path!r}: it holds {examples(foreign)}, which a PEFT "
            "adapter does not. Choose another path, or move its contents away first."
        )


# -- load ------------------------------------------------------------------------------


@through_state(1)
def load_peft(path: str | os.PathLike, params: PyTree, module_names: Names) -> PyTree:
    """Reads a Hugging Face PEFT LoRA adapter onto an adapted tree.

    ``params`` says where adapters go and how each weight is laid out (from
    `jaxlora.init` with the same targets, any scheme and rank, e.g. with layouts
    inferred from the model); the adapter gives the factors, ranks and scales.
    Base weights are kept, and each factor keeps ``params``' factor dtype.

    Args:
        path: a PEFT adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors``).
        params: an adapted tree of the model the adapter was trained for.
        module_names: as for `save_peft`.

    Returns:
        ``params`` with every target's factors and spec read from the adapter.

    Raises:
        FileNotFoundError: if ``path`` is not a PEFT adapter directory.
        ValueError: for a malformed file; a config jaxlora cannot represent (DoRA,
            biases, ``modules_to_save``); a target whose module is missing from the
            adapter, or of another shape or kind; a residual base in ``params``;
            modules in the adapter that no target names.
    """
    _check_module_names(module_names)
    path = os.path.abspath(os.fsdecode(path))
    config = _peft_config.read(path)
    if not os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(
        os.path.join(path, "adapter_model.bin")
    ):
        raise ValueError(
            f"{path!r} holds adapter_model.bin (PEFT's pickled format, from "
            "save_pretrained(..., safe_serialization=False)), which jaxlora does not "
            "read: unpickling can run arbitrary code. Save the adapter again in PEFT "
            f"with save_pretrained(..., safe_serialization=True) to get {WEIGHTS}."
        )
    tensors = _safetensors.read(os.path.join(path, WEIGHTS))
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    adapted = {path_str(k) for k, x in flat if is_lora(x)}
    check_unique([path_str(k) for k, _ in flat], among=adapted)
    refuse_baseless(params, "jaxlora.load_peft")
    nodes = _adapted(params)
    if not nodes:
        raise ValueError(
            "params holds no LoRA adapters: pass jaxlora.init(params, rng, "
            "targets=..., apply_fn=..., example_args=...) for the adapter's "
            "targets; it gives each weight's layout."
        )
    _check_unused_names(module_names, nodes, "load_peft")
    problems, used, new, owners = [], set(), {}, {}
    for p, node in nodes:
        if node.spec.residual:
            problems.append(f"{p!r}: its base is a residual ({node.spec.scheme})")
            continue
        try:
            new[p] = _read_target(p, node, config, tensors, module_names, owners)
        except ValueError as e:
            problems.append(str(e))
    for _, _, keys in owners.values():
        used.update(keys)
    tied = _check_extras(config, tensors, owners, used, problems)
    tables = [n for n, (_, _, keys) in owners.items() if _is_table(keys)]
    _warn_tables([n for n in tables if n not in tied], "load_peft")
    unused = sorted(k for k in tensors if k not in used)
    if unused:
        problems.append(
            f"the adapter holds tensors no target reads: {unused[:6]}"
            f"{' ...' if len(unused) > 6 else ''} (missing from the targets, or "
            "module_names names them otherwise)"
        )
    if problems:
        raise ValueError(
            f"Cannot load PEFT adapter {path!r} onto these params:\n  - "
            + "\n  - ".join(problems)
        )

    def attach(keypath, leaf):
        return new.get(path_str(keypath), leaf)

    return factored_boxes(
        jax.tree_util.tree_map_with_path(attach, params, is_leaf=is_lora)
    )


_BASE = ".base_layer.weight"


def _torch_base(node: LoraWeight, layer: tuple, table: bool) -> np.ndarray:
    """One layer's base weight as torch holds it: ``(vocab, dim)`` for a table,
    ``(out, in)`` for a linear layer (axes flattened in the weight's order),
    ``(out, in, *window)`` for a convolution."""
    lay, w = node.spec.layout, _hosts.on_host(node.w)
    stack = sorted(lay.stack_axes)
    rest = [i for i in range(w.ndim) if i not in stack]
    w = np.transpose(w, [*stack, *rest])[layer]  # this layer, axes as `rest`
    if node.spec.conv is not None and node.spec.conv.axes is not None:
        return np.transpose(
            w, [rest.index(i) for i in (*lay.out_axes, *node.spec.conv.axes)]
        )
    order = [rest.index(i) for i in (*sorted(lay.in_axes), *sorted(lay.out_axes))]
    flat = np.transpose(w, order).reshape(
        math.prod(node.shape[i] for i in lay.in_axes), -1
    )
    return flat if table else flat.T


def _same_base(got: np.ndarray, want: np.ndarray) -> str | None:
    """None if the stored base is this one (compared in the coarser of the two
    dtypes: a bf16 port of the fp32 weights matches); else how they differ."""
    if got.shape != want.shape:
        return f"shape {list(got.shape)} where params has {list(want.shape)}"
    coarse = max(got.dtype, want.dtype, key=lambda d: jnp.finfo(d).eps)
    if np.array_equal(got.astype(coarse), want.astype(coarse)):
        return None
    gap = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
    return (
        f"the same shape but other values (max |diff| {gap:.3g}; {got.dtype} in "
        f"the adapter, {want.dtype} in params)"
    )


def _check_extras(config, tensors, owners, used, problems) -> set[str]:
    """Reads what PEFT stores besides the factors: a head tied to an adapted
    embedding (``ensure_weight_tying``), whose factors and scale must be the
    embedding's (jaxlora's ``attend`` uses the adapted table), and base weights
    of targeted modules and tied heads (``save_embedding_layers``), accepted only
    if they are the base weights here. Marks what it accepts (or reports) as
    ``used``, appends to ``problems``; returns the tables a head is tied to."""
    bases = {name: (nd, layer, _is_table(k)) for name, (nd, layer, k) in owners.items()}
    tied = set()
    if config.get("ensure_weight_tying"):
        tables = [(n, k) for n, (_, _, k) in owners.items() if _is_table(k)]
        for key in tensors:
            if key in used or not key.endswith(".lora_A.weight"):
                continue
            key_b = key[: -len("lora_A.weight")] + "lora_B.weight"
            head = key[len(PREFIX) : -len(".lora_A.weight")]
            A, B = tensors[key], tensors.get(key_b)
            for table, (ka, kb) in tables:
                EA, EB = tensors[ka], tensors[kb]
                if B is None or A.shape != EB.T.shape or B.shape != EA.T.shape:
                    continue
                if not (np.array_equal(A, EB.T) and np.array_equal(B, EA.T)):
                    continue
                used.update((key, key_b))
                tied.add(table)
                r = A.shape[0]
                mine, its = (
                    _peft_config.scale_of(config, table, r),
                    _peft_config.scale_of(config, head, r),
                )
                if mine != its:
                    problems.append(
                        f"{head!r} is tied to {table!r} but PEFT scales it by {its:g}, "
                        f"the table by {mine:g}: jaxlora's read-out (attend) uses the "
                        "table's adapter, with one scale"
                    )
                bases[head] = bases[table]  # its stored base is the table
    for key in tensors:
        if not (key.startswith(PREFIX) and key.endswith(_BASE)):
            continue
        name = key[len(PREFIX) : -len(_BASE)]
        if name not in bases:
            continue  # left unread: reported with the rest
        used.add(key)
        why = _same_base(tensors[key], _torch_base(*bases[name]))
        if why is not None:
            problems.append(
                f"{key!r}: the adapter stores a base weight for {name!r} with {why}: "
                "it was trained on other weights (a resized vocabulary?)"
            )
    return tied


def _misfit(p, node, A, B) -> str | None:
    """Why PEFT's ``A`` and ``B`` do not fit one layer of ``node``, if they do not:
    ``(r, in)`` and ``(out, r)``, or ``(r, in, *window)`` and ``(out, r, 1, ...)``
    for a convolution (`jaxlora.Conv`)."""
    spec, lay = node.spec, node.spec.layout
    _, in_shape, out_shape = lay.split_shape(node.shape)
    want_out = math.prod(out_shape)
    if spec.conv is not None:
        if (why := _conv_problem(p, spec.conv)) is not None:
            return why
        torch_in = tuple(node.shape[ax] for ax in spec.conv.axes)
        ones = (1,) * (len(torch_in) - 1)
        if A.shape[1:] == torch_in and B.shape[:1] + B.shape[2:] == (want_out, *ones):
            return None
        return (
            f"A {list(A.shape)} and B {list(B.shape)} do not fit a convolution "
            f"kernel with (in, *window) {list(torch_in)} and {want_out} outputs "
            f"(A (r, {', '.join(map(str, torch_in))}), B ({want_out}, r"
            f"{', 1' * len(ones)}))"
        )
    want_in = math.prod(in_shape)
    if A.ndim == B.ndim == 2 and (A.shape[1], B.shape[0]) == (want_in, want_out):
        return None
    hint = (
        ": they are a convolution's, and this target has no convolution record "
        "(infer its layout with jaxlora.init(..., apply_fn=, example_args=))"
        if A.ndim > 2 and A.ndim == B.ndim
        else ""
    )
    return (
        f"A {list(A.shape)} and B {list(B.shape)} do not fit a weight with "
        f"{want_in} inputs {in_shape} and {want_out} outputs {out_shape} (A (r, in), "
        f"B (out, r)){hint}"
    )


def _read_target(p, node, config, tensors, module_names, owners) -> LoraWeight:
    spec, lay = node.spec, node.spec.layout
    stack_shape = tuple(node.shape[i] for i in sorted(lay.stack_axes))
    _, in_shape, out_shape = lay.split_shape(node.shape)
    factors, scales, layers = [], set(), set()
    rslora = bool(config.get("use_rslora", False))
    embedding = spec.embedding  # the torch module's kind, as the adapter says
    for layer in np.ndindex(*stack_shape):
        name = _name_of(module_names, p, layer, stack_shape)
        ka, kb = _keys(name, embedding)
        other = _keys(name, not embedding)
        first = layer == (0,) * len(stack_shape)
        if first and ka not in tensors and other[0] in tensors and spec.conv is None:
            embedding, (ka, kb), other = not embedding, other, (ka, kb)  # the file's
        if name in owners:
            raise ValueError(
                f"{p!r} layer {layer}: module_names gives {name!r}, which is "
                "already another target's: every layer needs its own torch module"
            )
        owners[name] = (node, layer, (ka, kb))
        if not _peft_config.targeted(config, name):
            raise ValueError(
                f"{p!r} layer {layer}: the adapter's config does not target "
                f"{name!r} (target_modules={config.get('target_modules')!r}, "
                f"exclude_modules={config.get('exclude_modules')!r}): PEFT leaves "
                "it unadapted"
            )
        if ka not in tensors or kb not in tensors:
            kind = "an embedding" if embedding else "a linear layer"
            hint = (
                f"; it holds {other[0]!r} instead (the target is {kind} here)"
                if other[0] in tensors
                else ""
            )
            raise ValueError(f"{p!r} layer {layer}: {ka!r} is not in the adapter{hint}")
        A, B = _table_turned(tensors[ka], tensors[kb], lay, embedding)
        if (why := _misfit(p, node, A, B)) is not None:
            raise ValueError(f"{p!r} layer {layer} ({name}): {why}")
        r = A.shape[0]
        if B.shape[1] != r:
            raise ValueError(f"{p!r} ({name}): A has rank {r} but B {B.shape[1]}")
        want_r = _peft_config.pattern_value(
            config.get("rank_pattern") or {}, name, config["r"]
        )
        if want_r != r:
            raise ValueError(
                f"{p!r} ({name}): the config gives rank {want_r}, the tensors {r}"
            )
        alpha = _peft_config.pattern_value(
            config.get("alpha_pattern") or {}, name, config["lora_alpha"]
        )
        layers.add((r, alpha))
        scales.add(alpha / (math.sqrt(r) if rslora else r))
        factors.append(_from_torch(A, B, spec, in_shape, out_shape))
    if len(scales) > 1:
        raise ValueError(
            f"{p!r}: its layers have different scales {sorted(scales)}; a stacked "
            "weight has one scale (load the layers as separate weights)"
        )
    rank = max(a.shape[-1] for a, _ in factors)
    pad_a = lambda a: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])])  # noqa: E731
    pad_b = lambda b: np.pad(b, [(0, rank - b.shape[0])] + [(0, 0)] * (b.ndim - 1))  # noqa: E731
    a = np.stack([pad_a(a) for a, _ in factors]).reshape(
        stack_shape + factors[0][0].shape[:-1] + (rank,)
    )
    b = np.stack([pad_b(b) for _, b in factors]).reshape(
        stack_shape + (rank,) + factors[0][1].shape[1:]
    )
    if len(layers) == 1:  # one rank: the adapter's own alpha
        ((_, alpha),) = layers
    else:  # smaller ranks zero-padded: the alpha that keeps the scale at this rank
        alpha = next(iter(scales)) * (math.sqrt(rank) if rslora else rank)
    new_spec = LoraSpec(
        lay,
        rank,
        alpha,
        rslora=rslora,
        scheme="peft",
        embedding=embedding,
        conv=spec.conv,
    )
    out = LoraWeight(
        node.w,
        jnp.asarray(_stack_first(a, lay.stack_axes, inverse=True), node.a.dtype),
        jnp.asarray(_stack_first(b, lay.stack_axes, inverse=True), node.b.dtype),
        new_spec,
    )
    return placed_like_weight(out, node.w)
