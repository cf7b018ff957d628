"""`jaxlora.init`: add LoRA factors to the targeted weights of a parameter tree."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import numbers
import warnings
import zlib
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _capture
from jaxlora import _corda
from jaxlora import _eva_init
from jaxlora import _residual
from jaxlora import _schemes
from jaxlora import _targets
from jaxlora._boxes import factored_boxes
from jaxlora._nnx import through_state
from jaxlora._node import Conv
from jaxlora._node import Layout
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._node import accumulator
from jaxlora._node import is_lora
from jaxlora._node import layout_hidden
from jaxlora._node import placed_like_weight
from jaxlora._paths import leaf_name
from jaxlora._paths import path_str

PyTree = Any


def _hash31(path: str) -> int:
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def path_keys(rng: jax.Array, paths: list[str]) -> dict[str, jax.Array]:
    """Each target's key: ``rng`` folded with a stable 31-bit hash of its path
    (what every checkpoint so far was made with). Targets whose hashes collide
    (2^-31 per pair: about one colliding pair among 65,000 targets, which a large
    mixture of experts can have)
    would draw equal factors, so each of those also folds in a 128-bit hash of
    its path, one 32-bit word at a time."""
    counts: dict[int, int] = {}
    for p in paths:
        counts[_hash31(p)] = counts.get(_hash31(p), 0) + 1
    keys = {}
    for p in paths:
        key = jax.random.fold_in(rng, _hash31(p))
        if counts[_hash31(p)] > 1:
            digest = hashlib.blake2b(p.encode(), digest_size=16).digest()
            for word in np.frombuffer(digest, dtype="<u4"):
                key = jax.random.fold_in(key, np.uint32(word))
        keys[p] = key
    return keys


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _draw(key, scheme, n_stack, fan_in, fan_out, rank, dtype):
    """``n_stack`` independent draws of flat factors ``(fan_in, r), (r, fan_out)``."""
    if n_stack == 0:
        return scheme.factors(key, fan_in, fan_out, rank, dtype)
    keys = jax.random.split(key, n_stack)
    return jax.vmap(lambda k: scheme.factors(k, fan_in, fan_out, rank, dtype))(keys)


class _ById:
    """A scheme whose initializers cannot be hashed (a plain dataclass instance, a
    lambda over a list), made a static jit argument by identity."""

    def __init__(self, scheme):
        self.factors = scheme.factors


_BY_ID: dict[int, tuple[Any, _ById]] = {}

# schemes that run ``apply_fn(params, batch)`` on ``batches`` to read each target's
# inputs (their layouts can come from the first batch)
_CAPTURING = ("eva", "corda", "corda_kpm")


def _static(scheme):
    """``scheme`` as a static jit argument: itself, or one `_ById` wrapper per
    unhashable scheme object (so its draws compile once, not once per target)."""
    try:
        hash(scheme)
    except TypeError:
        held, wrapper = _BY_ID.get(id(scheme), (None, None))
        if held is not scheme:
            wrapper = _ById(scheme)
            _BY_ID[id(scheme)] = (scheme, wrapper)
        return wrapper
    return scheme


def _factors(key, scheme, target, dtype):
    """``(a, b)`` of one target: ``(*stack, *in, r)`` and ``(*stack, r, *out)``."""
    stack, _, _ = target.layout.split_shape(target.shape)
    fan_in, fan_out = target.layout.fans(target.shape)
    n_stack = math.prod(stack) if stack else 0
    a, b = _draw(key, _static(scheme), n_stack, fan_in, fan_out, target.rank, dtype)
    a_shape, b_shape = target.layout.factor_shapes(target.shape, target.rank)
    return a.reshape(a_shape), b.reshape(b_shape)


def _compensated(node: LoraWeight) -> LoraWeight:
    """Subtracts the initial update from the base so the output starts unchanged."""
    acc = accumulator(node.w.dtype)
    w_res = (node.w.astype(acc) - node.delta(acc)).astype(node.w.dtype)
    spec = node.spec
    return node.replace(w=w_res, spec=LoraSpec(**{**vars(spec), "residual": True}))


def _stacked_bias(leaves: dict, path: str) -> bool:
    """Whether the module of kernel ``path`` has a bias with a leading axis (a
    stack of layers: ``nn.scan``, ``nnx.vmap``), where a conv's bias is 1-D."""
    bias = leaves.get(path.rsplit("/", 1)[0] + "/bias") if "/" in path else None
    return getattr(bias, "ndim", 1) >= 2


def _plan(
    params,
    *,
    targets,
    rank,
    alpha,
    rank_pattern,
    alpha_pattern,
    layouts,
    inferred,
    scheme,
    convs=None,
    tables=frozenset(),
):
    """Validates everything up front and returns one `Target` per adapted leaf
    (``tables``: paths the model looks up, embedding tables whatever their name)."""
    paths = _targets.select(params, targets)
    leaves = dict(_targets.leaves_with_paths(params))
    ranks = _targets.resolve_pattern(rank_pattern, paths, "rank_pattern")
    alphas = _targets.resolve_pattern(alpha_pattern, paths, "alpha_pattern")
    user_layouts = _targets.resolve_pattern(layouts, paths, "layouts")
    base_alpha = rank if alpha is None else alpha
    plan, problems, uninferred, guessed, windows = [], [], [], [], []
    for p in paths:
        leaf = leaves[p]
        shape = tuple(getattr(leaf, "shape", ()))
        if not _targets.is_floating(leaf) or len(shape) < 2:
            kind = getattr(leaf, "dtype", type(leaf).__name__)
            problems.append(
                f"{p!r}: expected a floating kernel with ndim >= 2, got shape {shape} "
                f"of {kind}"
            )
            continue
        conv = (convs or {}).get(p)
        if p in user_layouts:
            layout = _targets.as_layout(user_layouts[p], p, shape)
            if conv is None:
                conv = _targets.default_conv(p, shape, user_layouts[p])
            elif conv.axes is not None and set(conv.axes) != set(layout.in_axes):
                conv = Conv(None)  # convolved otherwise than the layout says
        elif p in (inferred or {}):
            layout = inferred[p]
        else:
            layout = _targets.default_layout(p, shape)
            conv = _targets.default_conv(p, shape)
            if inferred is not None:
                uninferred.append(f"{p!r} {shape}: {layout}")
            elif len(shape) >= 3 and layout == Layout.dense(len(shape)):
                if shape[0] < min(shape[1:]):  # a small first axis as the input side
                    guessed.append(f"{p!r} {shape}: {layout}")
            elif conv is not None and _stacked_bias(leaves, p):
                windows.append(f"{p!r} {shape}: window {shape[:-2]}")
        r = ranks.get(p, rank)
        if not _is_int(r):
            problems.append(
                f"{p!r}: rank_pattern gives rank {r!r} of type {type(r).__name__}; "
                "a rank is an integer"
            )
            continue
        r = int(r)
        fan_in, fan_out = layout.fans(shape)
        if r < 1 or r > min(fan_in, fan_out):
            defaulted = p not in user_layouts and p not in (inferred or {})
            problems.append(
                f"{p!r}: rank {r} is outside [1, min(fan_in, fan_out)] = "
                f"[1, {min(fan_in, fan_out)}] for shape {shape} (fan_in={fan_in}, "
                f"fan_out={fan_out})"
                + (
                    f" under the default layout {layout}: if an axis stacks layers "
                    "(nn.scan, nnx.vmap) or experts, pass apply_fn= and "
                    "example_args= to infer the layout, or layouts=..."
                    if defaulted and len(shape) >= 3
                    else ""
                )
            )
            continue
        if (msg := scheme.check_rank(r)) is not None:
            problems.append(f"{p!r}: {msg}")
            continue
        if getattr(scheme, "kind", None) == "lora_ga" and 2 * r > min(fan_in, fan_out):
            problems.append(  # checked before any pass over the data
                f"{p!r}: LoRA-GA uses the top 2·rank = {2 * r} singular vectors of the "
                f"gradient, more than min(fan_in, fan_out) = {min(fan_in, fan_out)} "
                f"for shape {shape}; use a rank of at most {min(fan_in, fan_out) // 2}"
            )
            continue
        # a table by its name, or by the model's lookup where that gave the layout
        looked_up = p in tables and p not in user_layouts
        embedding = leaf_name(p) == "embedding" or looked_up
        if p in alphas and (msg := _alpha_problem(alphas[p])) is not None:
            problems.append(f"{p!r}: alpha_pattern gives an alpha that {msg}")
            continue
        a_ = float(alphas.get(p, base_alpha))
        target = _targets.Target(p, shape, leaf.dtype, layout, r, a_, embedding, conv)
        plan.append(target)
    if problems:
        raise ValueError(
            "Cannot add LoRA to these parameters:\n  - "
            + "\n  - ".join(problems)
            + "\nFix the rank (rank=, rank_pattern=), the alpha (alpha_pattern=), "
            "the scheme, or exclude them with targets=..."
        )
    if guessed:
        warnings.warn(
            "jaxlora.init: these kernels get the default layout, which takes their "
            "small first axis as the input side (one a row per entry, a b as large "
            "as the rest of the kernel):\n  - " + "\n  - ".join(guessed) + "\nIf "
            "that axis stacks layers (nn.scan, nnx.vmap), experts or heads, pass "
            "apply_fn= and "
            "example_args= to infer each layout from the model, or layouts={pattern: "
            "jaxlora.Layout(...)}.",
            stacklevel=3,
        )
    if windows:
        warnings.warn(
            "jaxlora.init: these kernels of modules named *conv* get the default "
            "convolution layout (*window, in, out), every leading axis a window "
            "axis:\n  - " + "\n  - ".join(windows) + "\nIf the first axis stacks "
            "layers (nn.scan, nnx.vmap), the layers would share one b and the "
            "fan-in would count them: pass apply_fn= and example_args= to infer "
            "each layout from the model, or layouts={pattern: jaxlora.Layout(...)}.",
            stacklevel=3,
        )
    if uninferred:
        warnings.warn(
            "jaxlora.init: the model does not contract these targets in a way "
            "layout inference recognizes (unused, or used only elementwise or "
            "through an operation it does not follow), so they get the default "
            "layouts:\n  - " + "\n  - ".join(uninferred) + "\nPass layouts="
            "{pattern: jaxlora.Layout(...)} to set them, or leave them out of "
            "targets.",
            stacklevel=3,
        )
    return plan


@through_state()
def init(
    params: PyTree,
    rng: jax.Array,
    *,
    scheme: str | _schemes.Scheme = "normal",
    rank: int = 8,
    alpha: float | None = None,
    rslora: bool = False,
    targets: _targets.Targets = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layouts: Mapping[str, Any] | None = None,
    embedding: str = "scheme",
    compensate: bool = False,
    dtype: Any = jnp.float32,
    apply_fn: Callable | None = None,
    example_args: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    niter: int | None = None,
    loss_fn: Callable | None = None,
    batches: Iterable | None = None,
    input_mask: Callable | None = None,
    grad_memory: int | None = None,
    eva_config: _eva_init.EvaConfig | None = None,
) -> PyTree:
    """Adds LoRA factors to the targeted weights of ``params``.

    Each targeted leaf ``W`` becomes a `LoraWeight` holding ``w = W`` (frozen), ``a``
    of shape ``(*in_axes, r)`` and ``b`` of shape ``(r, *out_axes)``; the adapted
    weight is ``w + scale · a @ b`` with ``scale = alpha / r`` (``alpha / √r`` with
    ``rslora``). Pure: ``params`` is not modified.

    Args:
        params: a Linen variables dict or its ``"params"`` subtree, an NNX state or
            its pure dict, or any pytree of arrays.
        rng: a JAX key, the only source of randomness. Each target's factors come
            from ``rng`` folded with its path: same key, same factors; two targets of
            the same shape get different factors.
        scheme: a name from ``jaxlora.SCHEMES`` or a `jaxlora.Scheme`.
        rank: the rank ``r`` of every target (see ``rank_pattern``).
        alpha: the LoRA alpha; ``None`` means ``alpha = rank`` (the global rank).
        rslora: use ``alpha / √r`` (rank-stabilized LoRA) instead of ``alpha / r``.
        targets: ``None`` (every floating ``kernel`` with ndim >= 2: all Dense,
            DenseGeneral, Einsum and Conv kernels; embedding tables only when asked),
            a regex fully matched against the ``/``-joined path, a sequence of module
            names (PEFT ``target_modules`` suffix match, e.g. ``["query", "value"]``),
            or a predicate ``(path, leaf) -> bool``.
        rank_pattern: ``{regex: rank}`` per target (matched like PEFT's patterns).
        alpha_pattern: ``{regex: alpha}`` per target.
        layouts: ``{regex: Layout | "dense" | "conv"}`` per target. Defaults: Dense
            ``(in, out)``; Conv (module named ``*conv*``) ``(*window, in, out)``;
            embedding ``(vocab, dim)`` with vocab as input; other >= 3-D kernels
            "first axis is input".
        embedding: ``"scheme"`` (the scheme applies to tables like to kernels, with
            the vocab axis as input side) or ``"peft"`` (PEFT's rule: ``a = 0``,
            ``b ~ N(0, 1)``, whatever the scheme). A table is a leaf named
            ``embedding`` (as ``nn.Embed`` and ``nnx.Embed`` name it) or, with
            ``apply_fn``, any weight the model looks up by id (``self.param("wte")``
            used as ``wte[ids]``); `jaxlora.save_peft` writes tables as PEFT
            embedding adapters.
        compensate: subtract the initial update from the base weight so the output
            is unchanged at start (for schemes where ``a @ b != 0``, e.g.
            ``both_random``). The base then holds a residual (``spec.residual``).
        dtype: dtype of the factors (float32 by default, also for bf16 models).
        apply_fn, example_args, example_kwargs: when given, the model is traced
            abstractly once and each target's layout (input, output and stacked
            axes) is inferred from how it is contracted.
        niter: power iterations of the randomized SVD: ``scheme="pissa"`` with
            ``niter=K`` is fast PiSSA (same as ``"pissa_niter_K"``); LoRA-GA's
            default is 4.
        loss_fn, batches: the data of ``scheme="lora_ga"``: ``loss_fn(params,
            batch) -> scalar`` on the plain (un-adapted) tree, averaged over
            ``batches``. ``scheme="eva"``, ``"corda"`` and ``"corda_kpm"`` take
            ``apply_fn(params, batch)`` and ``batches`` instead and read the inputs
            each target meets (the layouts then come from the first batch); CorDA
            counts each batch as one sample (PEFT: one sequence per forward call).
        input_mask: for EVA and CorDA, ``input_mask(batch)`` (nonzero: counts;
            e.g. ``lambda b: b["attention_mask"]``) marks the positions of a batch
            whose rows count; padded positions are then left out of the PCA or the
            covariance (and of CorDA's ``max X``). It applies at each use of a
            target whose positions (the input's axes other than the contracted
            ones) have the mask's shape, e.g. ``(batch, seq)``, at every use and
            every layer of a stack; a target with other positions is refused.
            None: every row counts (PEFT's CorDA).
        grad_memory: LoRA-GA holds the float32 gradients of at most this many
            bytes of targets at once (None: 1 GiB): targets are processed in
            groups, one pass over ``batches`` per group, so a large model never
            holds every layer's full gradient at the same time.
        eva_config: EVA's options (`jaxlora.EvaConfig`: ``rho``, ``tau``,
            ``whiten``, ``adjust_scaling_factors``); None: PEFT's defaults.

    Returns:
        A new tree in which every target is a `LoraWeight`.

    Raises:
        ValueError: unknown scheme; rank < 1 or > min(fan_in, fan_out); a
            non-integer rank or a non-numeric, non-finite or zero alpha (also in
            the patterns); targets or a pattern matching nothing; a non-floating or
            1-D target; odd rank with ``orthogonal``; an already adapted tree; a
            non-floating ``dtype``; an option the scheme does not use (``niter``,
            ``loss_fn``, ``batches``, ``grad_memory``, ``eva_config``,
            ``compensate`` where ``a @ b`` starts at 0, ``embedding="peft"`` with
            no table targeted), or ``apply_fn`` without example inputs (or
            the reverse); ``input_mask`` with another scheme, or a mask whose shape
            is not that of a target's positions; EVA or CorDA inside ``jax.jit``
            or ``jax.vmap`` (traced params or batches: they decide on the values
            they capture).
        TypeError: ``rng`` is not one JAX key.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
        >>> model = nn.Dense(16)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 32)))
        >>> adapted = jaxlora.init(variables, jax.random.key(1), scheme="he", rank=4)
        >>> adapted["params"]["kernel"].a.shape, adapted["params"]["kernel"].b.shape
        ((32, 4), (4, 16))
    """
    scheme = _schemes.resolve(scheme, niter=niter)
    rank, alpha = _plain_number(rank), _plain_number(alpha)
    if embedding not in ("scheme", "peft"):
        raise ValueError(f"embedding must be 'scheme' or 'peft', got {embedding!r}.")
    if not _is_rank(rank):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}.")
    rank = int(rank)
    if alpha is not None and (msg := _alpha_problem(alpha)) is not None:
        raise ValueError(f"alpha {msg}.")
    _targets.check_key(rng, "rng")
    rslora = _targets.check_flag("rslora", rslora)
    compensate = _targets.check_flag("compensate", compensate)
    if dtype is None:
        raise ValueError(
            "dtype is the dtype of the LoRA factors, got None. Pass e.g. "
            "dtype=jnp.float32 (the default) or jnp.bfloat16."
        )
    try:
        jnp.dtype(dtype)
    except TypeError:
        raise ValueError(
            f"dtype is the dtype of the LoRA factors, got {dtype!r}, which is not a "
            "dtype. Pass e.g. dtype=jnp.float32 (the default) or jnp.bfloat16."
        ) from None
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(
            f"dtype is the dtype of the LoRA factors and must be floating, got "
            f"{jnp.dtype(dtype).name}. Pass e.g. dtype=jnp.float32 (the default)."
        )
    if jax.dtypes.canonicalize_dtype(dtype) != jnp.dtype(dtype):
        raise ValueError(
            f"dtype={jnp.dtype(dtype).name} for the LoRA factors, but 64-bit types are "
            "off in JAX (its arrays would be float32). Pass dtype=jnp.float32, or "
            "enable them first: jax.config.update('jax_enable_x64', True)."
        )
    _check_data(scheme, loss_fn=loss_fn, batches=batches, apply_fn=apply_fn)
    if input_mask is not None and getattr(scheme, "kind", None) not in _CAPTURING:
        raise ValueError(
            f"input_mask is only used by the schemes that read each target's inputs "
            f"('eva', 'corda', 'corda_kpm'), not {scheme.name!r}; remove it."
        )
    if input_mask is not None and not callable(input_mask):
        raise TypeError(
            f"input_mask must be a function batch -> mask (e.g. lambda b: "
            f"b['attention_mask']), got {type(input_mask).__name__}."
        )
    _check_tracing(scheme, apply_fn, example_args, example_kwargs)
    if batches is not None and isinstance(
        batches, (jax.Array, np.ndarray, Mapping, str, bytes)
    ):
        raise TypeError(
            "batches must be a list (or another iterable) of batches, got one "
            f"{type(batches).__name__}, which would be read item by item: pass "
            "batches=[batch] for a single batch."
        )
    if compensate and isinstance(scheme, _residual.WeightAware):
        why = (
            "EVA starts with b = 0, so the output is unchanged already"
            if scheme.kind == "eva"
            else "weight-aware schemes already replace the base by the residual "
            "W - s*a@b"
        )
        raise ValueError(
            f"compensate=True has no effect with {scheme.name!r}: {why}. Remove "
            "compensate."
        )
    if compensate and (why := scheme.zero_start()) is not None:
        raise ValueError(
            f"compensate=True has no effect with {scheme.name!r}: {why}, so the "
            "output is unchanged already. Remove compensate (it would only mark "
            "the base as a residual)."
        )
    if grad_memory is not None and getattr(scheme, "kind", None) != "lora_ga":
        raise ValueError(
            f"grad_memory is only used by scheme 'lora_ga', not {scheme.name!r}; "
            "remove it."
        )
    if grad_memory is not None and (
        isinstance(grad_memory, bool)
        or not isinstance(grad_memory, numbers.Real)
        or not math.isfinite(grad_memory)
        or grad_memory < 1
    ):
        raise ValueError(
            f"grad_memory is a number of bytes (>= 1, e.g. 1 << 30 or 2e9), got "
            f"{grad_memory!r}."
        )
    kind = getattr(scheme, "kind", None)
    if eva_config is not None and kind != "eva":
        raise ValueError(
            f"eva_config is only used by scheme 'eva', not {scheme.name!r}; remove it."
        )
    if eva_config is not None and not isinstance(eva_config, _eva_init.EvaConfig):
        raise TypeError(
            "eva_config must be a jaxlora.EvaConfig (e.g. "
            f"jaxlora.EvaConfig(rho=1.5)), got {type(eva_config).__name__}: "
            f"{eva_config!r}."
        )
    if kind in _CAPTURING:
        _capture.check_concrete(params, scheme.name)
    if kind in _CAPTURING and not example_args:
        # the layouts come from the first batch, which is then read as usual
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            raise ValueError(
                f"scheme {scheme.name!r} got no batches: pass batches=[batch, ...]."
            )
        batches = itertools.chain([first], batches)
        example_args = (first,)
    inferred = convs = None  # no model to infer from: default layouts, silently
    tables = set()
    if apply_fn is not None and (example_args or example_kwargs):
        from jaxlora import _layout  # the layout tracer is only needed here

        inferred, convs, tables = _layout.infer(
            apply_fn, params, tuple(example_args), dict(example_kwargs or {})
        )
    plan = _plan(
        params,
        targets=targets,
        rank=rank,
        alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layouts=layouts,
        inferred=inferred,
        scheme=scheme,
        convs=convs,
        tables=tables,
    )
    if embedding == "peft" and not any(t.embedding for t in plan):
        raise ValueError(
            "embedding='peft' sets how embedding tables start, and no target is one "
            "(a table is a leaf named 'embedding', as nn.Embed and nnx.Embed name "
            "it, or a weight the model looks up by id, with apply_fn=; targets: "
            f"{_targets.examples([t.path for t in plan])}). Add the table to targets "
            "(its module's name, e.g. targets=['embed', 'query', 'value']), pass "
            "apply_fn= and example_args= for a table named otherwise, or remove "
            "embedding='peft'."
        )
    dtype = jnp.dtype(dtype)
    leaves = dict(_targets.leaves_with_paths(params))
    _warn_hidden_layouts([t.path for t in plan if layout_hidden(leaves[t.path])])
    if kind in _CAPTURING:  # each batch's inputs of the targets, read lazily
        captured = _capture.captured(
            params,
            plan,
            leaves,
            apply_fn=apply_fn,
            batches=batches,
            scheme=scheme.name,
            input_mask=input_mask,
        )
    if kind == "eva":
        nodes = _eva_init.eva_nodes(
            plan,
            leaves,
            captured,
            rslora=rslora,
            dtype=dtype,
            config=eva_config or _eva_init.EvaConfig(),
        )
        return _attach(params, nodes)
    covs = {}
    if kind in ("corda", "corda_kpm"):
        covs = _corda.covariances(plan, captured, scheme=scheme.name)
    groups = [plan]
    if kind == "lora_ga":
        batches = list(batches)  # read once per group of targets
        groups = _residual.gradient_groups(plan, int(grad_memory or 1 << 30))
    nodes, keys = {}, path_keys(rng, [t.path for t in plan])
    for group in groups:
        grads = {}
        if kind == "lora_ga":
            paths = [t.path for t in group]
            grads = _residual.average_gradients(loss_fn, params, batches, paths)
        for t in group:
            s = (
                _schemes.PEFT_EMBEDDING
                if (t.embedding and embedding == "peft")
                else scheme
            )
            spec = LoraSpec(
                t.layout, t.rank, t.alpha, rslora, s.name, False, t.embedding, t.conv
            )
            key = keys[t.path]
            if isinstance(s, _residual.WeightAware):
                nodes[t.path] = _residual.adapt(
                    s,
                    key,
                    leaves[t.path],
                    spec,
                    dtype,
                    grads.get(t.path),
                    cov=covs.pop(t.path, None),
                    path=t.path,
                )
                continue
            a, b = _factors(key, s, t, dtype)
            node = LoraWeight(leaves[t.path], a, b, spec)
            nodes[t.path] = _compensated(node) if compensate else node
        del grads  # LoRA-GA: this group's gradients are no longer needed
    return _attach(params, nodes)


def _warn_hidden_layouts(paths: list[str]) -> None:
    """One warning for the targets whose mesh layout `init` cannot see."""
    if not paths:
        return
    shown = paths[:5] + ([f"... and {len(paths) - 5} more"] if len(paths) > 5 else [])
    warnings.warn(
        "jaxlora.init runs under a trace (jax.jit) and these weights are on a device "
        "mesh with automatic (AxisType.Auto) axes, whose layouts are not part of "
        "their types, so their factors (and a PiSSA/OLoRA/MiLoRA residual) are laid "
        "out by XLA, usually replicated:\n  - " + "\n  - ".join(shown) + "\nCall "
        "jaxlora.init outside jax.jit (it then lays the factors out like each "
        "weight), use AxisType.Explicit mesh axes, or give jax.jit out_shardings.",
        stacklevel=3,
    )


def _attach(params: PyTree, nodes: dict[str, LoraWeight]) -> PyTree:
    """``params`` with the leaves at the paths of ``nodes`` replaced, their factors
    sharded like the weights they adapt."""

    def attach(keypath, leaf):
        node = nodes.get(path_str(keypath))
        return leaf if node is None else placed_like_weight(node, leaf)

    out = jax.tree_util.tree_map_with_path(attach, params, is_leaf=is_lora)
    return factored_boxes(out)


def _is_int(r: Any) -> bool:
    return isinstance(r, numbers.Integral) and not isinstance(r, bool)


def _plain_number(x: Any) -> Any:
    """A concrete JAX scalar (``jnp.int32(8)``) as the Python number it holds;
    anything else as it is (NumPy scalars are numbers already)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        if x.shape == () and jnp.issubdtype(x.dtype, jnp.number):
            if not jnp.issubdtype(x.dtype, jnp.bool_):
                return x.item()
    return x


def _is_rank(r: Any) -> bool:
    return _is_int(r) and r >= 1


def _alpha_problem(alpha: Any) -> str | None:
    """Why ``alpha`` is not a usable LoRA alpha, or None."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        return f"must be a number, got {alpha!r} of type {type(alpha).__name__}"
    try:
        finite = math.isfinite(alpha)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        return f"must be finite, got {alpha!r}"
    if alpha == 0:
        return (
            "must not be 0: the scale alpha/r would be 0, the adapter would have "
            "no effect and get zero gradients"
        )
    if alpha < 0:
        return (
            f"must be > 0, got {alpha!r} (a negative alpha flips the sign of every "
            "update; a scheme with a negated initializer does that explicitly)"
        )
    return None


def _check_tracing(scheme, apply_fn, example_args, example_kwargs) -> None:
    """``apply_fn`` and the example inputs go together (EVA and CorDA read their
    batches instead)."""
    kind = getattr(scheme, "kind", None)
    if not isinstance(example_args, (tuple, list)):
        raise TypeError(
            "example_args must be a tuple of apply_fn's positional inputs after the "
            f"params, got {type(example_args).__name__}: pass example_args=(x,)."
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(
            "example_kwargs must be a dict of apply_fn's keyword inputs, got "
            f"{type(example_kwargs).__name__}: pass example_kwargs={{'train': False}}."
        )
    if apply_fn is not None:
        _targets.check_callable("apply_fn", apply_fn)
    if apply_fn is None and (example_args or example_kwargs):
        raise ValueError(
            "example_args/example_kwargs are only used with apply_fn= (to infer the "
            "layouts by tracing the model); pass apply_fn=model.apply or remove them."
        )
    if (
        apply_fn is not None
        and kind not in _CAPTURING
        and not (example_args or example_kwargs)
    ):
        raise ValueError(
            f"apply_fn is used with scheme {scheme.name!r} only to infer the layouts, "
            "which needs example inputs: pass example_args=(x, ...) (and/or "
            "example_kwargs=), or remove apply_fn."
        )


def _check_data(scheme, *, loss_fn, batches, apply_fn) -> None:
    """Data-aware schemes need their data; other schemes must not silently get it."""
    kind = getattr(scheme, "kind", None)
    if kind == "lora_ga" and (loss_fn is None or batches is None):
        raise ValueError(
            "scheme 'lora_ga' initializes from the gradient of the loss: pass "
            "loss_fn=(params, batch) -> scalar and batches=[batch, ...] "
            f"(got loss_fn={loss_fn!r}, batches={type(batches).__name__})."
        )
    if kind in _CAPTURING and (apply_fn is None or batches is None):
        raise ValueError(
            f"scheme {scheme.name!r} initializes from the inputs of each target: pass "
            "apply_fn=(params, batch) -> output and batches=[batch, ...] "
            f"(got apply_fn={apply_fn!r}, batches={type(batches).__name__})."
        )
    if kind != "lora_ga" and loss_fn is not None:
        raise ValueError(
            f"loss_fn is only used by scheme 'lora_ga', not {scheme.name!r}; remove it."
        )
    if kind not in ("lora_ga", *_CAPTURING) and batches is not None:
        raise ValueError(
            "batches are only used by the data-aware schemes 'lora_ga', 'eva', "
            f"'corda' and 'corda_kpm', not {scheme.name!r}; remove them."
        )
