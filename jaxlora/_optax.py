"""Optax wiring: train the factors, never the base weights; LoRA+ learning rates."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora._node import is_lora
from jaxlora._paths import path_str
from jaxlora._targets import check_names
from jaxlora._targets import check_regex
from jaxlora._targets import examples
from jaxlora._targets import name_matches

PyTree = Any
#: Plain (non-LoRA) leaves to train in full: a regex fully matched against the path,
#: a sequence of module names ('/'-bounded suffix match) or a predicate
#: ``(path, leaf) -> bool``.
Trainable = None | str | Sequence[str] | Callable[[str, Any], bool]


def _rules(trainable: Trainable) -> list[tuple[str, Callable[[str, Any], bool]]]:
    """``(description, matcher)`` per regex, predicate or module name."""
    if trainable is None:
        return []
    if isinstance(trainable, str):
        check_regex(trainable, "trainable", "'.*query.*' (or trainable=['query'])")
        match = lambda p, x: re.fullmatch(trainable, p) is not None  # noqa: E731
        return [(f"regex {trainable!r}", match)]
    if callable(trainable):
        return [(f"predicate {getattr(trainable, '__name__', trainable)!r}", trainable)]
    check_names(trainable, "trainable")
    return [
        (f"name {n!r}", lambda p, x, n=n: name_matches(n, p, any_leaf=True))
        for n in trainable
    ]


def _once(trainable: Trainable) -> Trainable:
    """A one-shot iterable of names (a generator, ``map(...)``) read into a tuple,
    so every later reading (labels at init and at each update) sees all of it."""
    if isinstance(trainable, Iterator):
        return tuple(trainable)
    return trainable


def _full_paths(params: PyTree, trainable: Trainable) -> set[str]:
    """Paths of the plain leaves ``trainable`` selects; each rule must select one.

    Warns where a rule selects adapted weights as well as plain leaves: those
    train through their factors only, which a new head meant to train in full
    should not.

    Raises:
        ValueError: listing every regex, predicate or name that selects no plain
            leaf (a name of an adapted weight is reported as such).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)
    plain = [(path_str(k), x) for k, x in flat if not is_lora(x)]
    adapted = [path_str(k) for k, x in flat if is_lora(x)]
    chosen, problems, partial = set(), [], []
    # a user predicate is only ever called on plain leaves
    by_path = not callable(trainable) or isinstance(trainable, str)
    for what, match in _rules(trainable):
        hits = {p for p, x in plain if match(p, x)}
        chosen |= hits
        lora_hits = [p for p in adapted if by_path and match(p, None)]
        if hits:
            if lora_hits:
                partial.append(f"{what} also selects {examples(lora_hits)}")
            continue
        if lora_hits:
            problems.append(
                f"{what} selects only adapted weights {examples(lora_hits)}, which are "
                "trained through their LoRA factors, never in full"
            )
        else:
            problems.append(f"{what} matches no parameter")
    if problems:
        raise ValueError(
            "These trainable= entries select no plain parameter to train in full:\n  - "
            + "\n  - ".join(problems)
            + f"\nPlain (non-LoRA) parameters: {examples([p for p, _ in plain])}. "
            "Names match a parameter's path or module path, or a '/'-bounded "
            "suffix of it; fix or remove these entries."
        )
    if partial:
        warnings.warn(
            "jaxlora: trainable= entries select adapted weights as well as plain "
            "ones; the plain ones train in full, the adapted ones only through "
            "their rank-r LoRA factors (their base stays frozen):\n  - "
            + "\n  - ".join(partial)
            + "\nTo train such a weight in full (a new head), leave it out of "
            "jaxlora.init's targets; to silence this, name only the plain leaves.",
            stacklevel=3,
        )
    return chosen


def param_labels(params: PyTree, *, trainable: Trainable = None) -> PyTree:
    """Labels every leaf ``"lora_a"``, ``"lora_b"``, ``"full"`` or ``"frozen"``.

    The tree has the structure of ``params`` (a `LoraWeight` gets ``w="frozen"``,
    ``a="lora_a"``, ``b="lora_b"``), ready for ``optax.multi_transform``.

    Args:
        params: an adapted tree.
        trainable: plain leaves to train in full (e.g. a new classification head):
            a regex fully matched against the path, module names (a path or module
            path, or a ``/``-bounded suffix of one: ``"head"`` is not
            ``"prehead"``), or a predicate ``(path, leaf) -> bool``.

    Raises:
        ValueError: if the regex, the predicate or any name selects no plain leaf
            (a typo would otherwise leave the head silently frozen).
    """
    trainable = _once(trainable)
    full = _full_paths(params, trainable)

    def label(keypath, x):
        if is_lora(x):
            return x.replace(w="frozen", a="lora_a", b="lora_b")
        return "full" if path_str(keypath) in full else "frozen"

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=is_lora)


def trainable_mask(params: PyTree, *, trainable: Trainable = None) -> PyTree:
    """True for every leaf that is trained (factors, and ``trainable`` leaves)."""
    trainable = _once(trainable)
    return jax.tree.map(
        lambda s: s != "frozen", param_labels(params, trainable=trainable)
    )


def freeze_base(
    tx: optax.GradientTransformation, *, trainable: Trainable = None
) -> optax.GradientTransformation:
    """Applies ``tx`` to the factors only; base weights get zero updates, no state.

    Args:
        tx: any optax transformation (``optax.adamw(1e-3)``).
        trainable: plain leaves to train in full with ``tx`` as well.

    Raises:
        ValueError: if ``tx`` holds a line search (``optax.lbfgs``): put it outside,
            ``optax.chain(freeze_base(optax.scale_by_lbfgs()), optax.scale(-1.0),
            optax.scale_by_zoom_linesearch(...))``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> p = jaxlora.init({"kernel": jnp.ones((4, 3))}, jax.random.key(0), rank=2)
        >>> tx = jaxlora.freeze_base(optax.adamw(1e-1, weight_decay=0.5))
        >>> grads = jax.tree.map(jnp.ones_like, p)
        >>> u = tx.update(grads, tx.init(p), p)[0]["kernel"]  # decay: base kept
        >>> bool((u.w == 0).all()), bool((u.a != 0).all())
        (True, True)
    """
    trainable = _once(trainable)
    _rules(trainable)  # a bad regex or name list is named here, not at tx.init
    check_transformation(tx, "freeze_base wraps", "optax.adamw(1e-3)")
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda s: "frozen" if s == "frozen" else "train",
        _trained_labels(params, trainable, "freeze_base"),
    )
    _refuse_line_search(tx, "freeze_base")
    return _partition({"train": tx, "frozen": _unchanged()}, labels, "freeze_base")


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``optax.apply_updates`` that never touches a `LoraWeight`'s base ``w``.

    ``freeze_base`` / ``lora_plus`` give ``w`` a ``-0.0`` update, which
    ``optax.apply_updates`` adds (XLA drops the add under ``jit``; the result is
    ``w`` bit for bit). Here ``w`` is returned as it is, so a base kept in host
    memory (``memory_kind="pinned_host"``, streamed to the device by the model)
    trains: adding a device-memory update to it is an error in ``jit``. Every
    other leaf gets ``optax.apply_updates``' ``p + u`` in ``p``'s dtype.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> p = jaxlora.init({"kernel": jnp.ones((4, 3))}, jax.random.key(0), rank=2)
        >>> tx = jaxlora.freeze_base(optax.sgd(0.1))
        >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
        >>> new = jaxlora.apply_updates(p, u)["kernel"]
        >>> new.w is p["kernel"].w, round(float(new.b[0, 0]), 6)
        (True, -0.1)
    """

    def step(p, u):
        if p is None:
            return None
        if is_lora(p):
            if not is_lora(u):
                raise ValueError(
                    "apply_updates: an update for an adapted weight is not a "
                    f"LoraWeight ({_kind(u)}): pass the updates of freeze_base or "
                    "lora_plus for the adapted tree."
                )
            return p.replace(a=_added(p.a, u.a), b=_added(p.b, u.b))
        return _added(p, u)

    return jax.tree.map(
        step, params, updates, is_leaf=lambda x: is_lora(x) or x is None
    )


def _added(p, u):
    """``optax.apply_updates`` for one leaf."""
    if u is None:
        return p
    return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def schedule_free_eval_params(state: Any, params: PyTree) -> PyTree:
    """The parameters to evaluate under schedule-free training placed inside
    `freeze_base` or `lora_plus` (``freeze_base(optax.contrib.schedule_free_adamw(
    1e-3))``): ``optax.contrib.schedule_free_eval_params`` for each trained leaf,
    the frozen leaves as they are (optax's own function cannot read the
    partitioned, masked state).

    Args:
        state: the optimizer state of ``freeze_base``/``lora_plus``.
        params: the adapted tree being trained.

    With NNX, pass ``NnxOptimizer``'s ``opt_state`` and ``nnx.state(model,
    nnx.Param)``: the result is that state with the evaluation values, for
    ``nnx.update(model, ...)``.

    Raises:
        ValueError: if ``state`` holds no schedule-free state.
    """
    from flax import nnx

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if any(is_var(x) for x in jax.tree.leaves((state, params), is_leaf=is_var)):
        pure = schedule_free_eval_params(nnx.as_pure(state), nnx.as_pure(params))
        return jax.tree.map(
            lambda var, value: var.replace(value) if is_var(var) else value,
            params,
            pure,
            is_leaf=is_var,
        )
    kind = optax.contrib.ScheduleFreeState
    states = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, kind))
        if isinstance(s, kind)
    ]
    if not states:
        raise ValueError(
            "schedule_free_eval_params: the optimizer state holds no schedule-free "
            "state; make the optimizer with optax.contrib.schedule_free (or "
            "schedule_free_adamw / schedule_free_sgd) inside freeze_base or lora_plus."
        )
    masked = lambda z: isinstance(z, optax.MaskedNode)  # noqa: E731
    out = params
    for sf in states:  # one per group of leaves (lora_plus: a, b, full)

        def eval_leaf(y, z, b1=sf.b1):
            return y if masked(z) else ((y - (1.0 - b1) * z) / b1).astype(y.dtype)

        out = jax.tree.map(eval_leaf, out, sf.z, is_leaf=masked)
    return out


def _positive_real(x) -> bool:
    """A finite real > 0: a Python or NumPy number or a scalar array (not a bool,
    a string or complex); a traced one (under ``optax.inject_hyperparams``) passes."""
    if isinstance(x, jax.core.Tracer):
        return True
    if isinstance(x, (bool, np.bool_, str, bytes)) or np.shape(x) != ():
        return False
    try:
        return 0 < float(x) < float("inf")
    except (TypeError, ValueError):  # complex, or no number at all
        return False


def _no_move(u, p=None):
    """``-0.0`` for a float leaf; 0 for integers and bools (no negative zero). A
    ``float0`` gradient (``jax.grad(..., allow_int=True)`` of an integer leaf)
    gets a zero of the parameter's dtype, which `optax.apply_updates` can add."""
    if u is None:
        return None
    if getattr(u, "dtype", None) == jax.dtypes.float0 and hasattr(p, "dtype"):
        u = jnp.zeros(p.shape, p.dtype)
    zero = jnp.zeros_like(u)
    return -zero if jnp.issubdtype(zero.dtype, jnp.inexact) else zero


def _unchanged() -> optax.GradientTransformation:
    """Updates that leave every frozen leaf bitwise as it was: ``-0.0``, the one
    value with ``p + u == p`` for every float ``p`` (``optax.set_to_zero``'s
    ``+0.0`` turns a ``-0.0`` weight into ``+0.0`` outside ``jit``)."""

    def update(updates, state, params=None):
        none = lambda x: x is None  # noqa: E731
        same = params is not None and jax.tree.structure(
            updates, is_leaf=none
        ) == jax.tree.structure(params, is_leaf=none)
        if not same:  # e.g. LoraWeight(w=None) gradients: no parameter to read
            return jax.tree.map(_no_move, updates), state
        return jax.tree.map(_no_move, updates, params, is_leaf=none), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _refuse_line_search(tx: optax.GradientTransformation, caller: str) -> None:
    """Refuses a ``tx`` holding a line search (``optax.lbfgs``): its value_fn and
    grad are about the whole parameter tree, while inside ``caller`` it sees only
    the trained leaves. Read off the state ``tx`` makes for a one-leaf tree."""
    searches = (
        optax.ScaleByZoomLinesearchState,
        optax.ScaleByBacktrackingLinesearchState,
    )
    is_search = lambda x: isinstance(x, searches)  # noqa: E731
    try:  # abstractly: building an optimizer must not start the JAX backend
        state = jax.eval_shape(tx.init, {"x": jax.ShapeDtypeStruct((1,), "float32")})
    except Exception:
        try:  # a factory under inject_hyperparams may branch on its values
            state = tx.init({"x": jnp.zeros((1,), jnp.float32)})
        except Exception:  # a transformation that needs its real tree: nothing to read
            return
    if any(is_search(x) for x in jax.tree.leaves(state, is_leaf=is_search)):
        raise ValueError(
            f"{caller}: the wrapped optimizer holds a line search (as optax.lbfgs "
            "does), whose value_fn and grad are about the whole parameter tree "
            f"while inside {caller} it sees only the trained leaves. Put the line "
            "search outside: optax.chain(jaxlora.freeze_base("
            "optax.scale_by_lbfgs()), optax.scale(-1.0), "
            "optax.scale_by_zoom_linesearch(...))."
        )


def check_transformation(tx: Any, who: str, example: str) -> None:
    """Refuses what is not an optax transformation (a factory such as
    ``optax.adam``, not yet called, most often)."""
    if not (
        callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))
    ):
        raise TypeError(
            f"{who} an optax transformation such as {example}, got {tx!r}. Call the "
            "optimizer factory first."
        )


def _partition(
    transforms: dict[str, optax.GradientTransformation],
    label_fn: Callable[[PyTree], PyTree],
    caller: str,
) -> optax.GradientTransformationExtraArgs:
    """``optax.multi_transform(transforms, label_fn)``, labelled from ``params`` at
    every update (optax labels the updates: a predicate ``trainable=`` would see
    gradient leaves, and gradients of another tree got an error about params),
    with updates of another structure than ``params`` named."""

    def init(params):
        return optax.multi_transform(transforms, label_fn(params)).init(params)

    def update(updates, state, params=None, **extra_args):
        if params is None:  # optax allows it: label the updates, as optax does
            labels = label_fn(updates)
        else:
            _check_updates(updates, params, caller)
            labels = label_fn(params)
        tx = optax.multi_transform(transforms, labels)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)


def _check_updates(updates: PyTree, params: PyTree, caller: str) -> None:
    """Raises, naming the paths, where ``updates`` do not have the structure of
    ``params``: an adapted weight's gradient that is not a `LoraWeight` (taken of
    ``merge(params)`` or of a plain tree), a leaf missing or ``None``."""
    is_node = lambda x: x is None or is_lora(x)  # noqa: E731
    grads = {
        path_str(k): u
        for k, u in jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_node)[0]
    }
    problems, seen = [], set()
    for k, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
        p = path_str(k)
        seen.add(p)
        if x is None:
            continue
        u = grads.get(p, _MISSING)
        if u is _MISSING:
            problems.append(f"{p!r}: no update")
        elif u is None:
            problems.append(f"{p!r}: None where params hold {_kind(x)}")
        elif is_lora(x) != is_lora(u):
            problems.append(f"{p!r}: {_kind(u)} where params hold {_kind(x)}")
    extra = [p for p in grads if p not in seen]
    if extra:
        problems.append(f"updates hold paths params lack: {examples(extra)}")
    if problems:
        raise ValueError(
            f"{caller}: the updates do not have the structure of params:\n  - "
            + "\n  - ".join(problems[:8])
            + (f"\n  (and {len(problems) - 8} more)" if len(problems) > 8 else "")
            + "\nTake gradients of the adapted tree itself (jax.grad(loss)(params) "
            "with jaxlora.lora_apply(model.apply)), not of merge(params) or of a plain "
            "tree, and give every leaf an update (zeros for frozen ones)."
        )


_MISSING = object()


def _kind(x) -> str:
    if is_lora(x):
        return "a LoraWeight"
    shape = getattr(x, "shape", None)
    return (
        f"{getattr(x, 'dtype', type(x).__name__)}{list(shape)}"
        if shape is not None
        else type(x).__name__
    )


def _trained_labels(params: PyTree, trainable: Trainable, caller: str) -> PyTree:
    """`param_labels`, refusing a tree in which nothing would be trained."""
    labels = param_labels(params, trainable=trainable)
    if all(s == "frozen" for s in jax.tree.leaves(labels)):
        raise ValueError(
            f"{caller}: params hold no LoRA adapters (no LoraWeight) and trainable= "
            "selects nothing, so every update would be zero. Pass the tree returned "
            "by jaxlora.init (not jaxlora.merge or base of it) to tx.init."
        )
    return labels


def lora_plus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    *,
    ratio: float = 16.0,
    trainable: Trainable = None,
    **optimizer_kwargs,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): ``b`` learns ``ratio`` times faster than ``a``.

    Args:
        optimizer: an optax optimizer factory, e.g. ``optax.adamw``.
        learning_rate: the learning rate of ``a`` (and of ``trainable`` leaves); a
            float or an optax schedule.
        ratio: ``η_b / η_a`` (the paper's λ; 16 is typical).
        trainable: plain leaves trained in full at ``learning_rate``.
        **optimizer_kwargs: passed to ``optimizer`` (e.g. ``weight_decay``).

    Under ``optax.inject_hyperparams`` (to change ``learning_rate`` or ``ratio``
    during training), mark the callables static:
    ``optax.inject_hyperparams(jaxlora.lora_plus, static_args=("optimizer",))(
    optax.adamw, 1e-3, ratio=16, weight_decay=0.01)`` (add ``"trainable"`` where it
    is a predicate); ``optimizer_kwargs`` are then fixed, not injected.

    Raises:
        ValueError: if ``ratio`` is not a finite number > 0 (0 would freeze ``b``),
            or ``learning_rate`` is neither a finite number > 0 nor a schedule.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> p = jaxlora.init({"kernel": jnp.ones((4, 3))}, jax.random.key(0), rank=2)
        >>> tx = jaxlora.lora_plus(optax.sgd, 1e-2, ratio=16)
        >>> grads = jax.tree.map(jnp.ones_like, p)
        >>> u = tx.update(grads, tx.init(p), p)[0]["kernel"]
        >>> float(u.b[0, 0] / u.a[0, 0]), float(abs(u.w).max())
        (16.0, 0.0)
    """
    trainable = _once(trainable)
    _rules(trainable)  # a bad regex or name list is named here, not at tx.init
    # optax.inject_hyperparams binds **optimizer_kwargs by its name and passes the
    # dict back as one keyword
    nested = optimizer_kwargs.pop("optimizer_kwargs", {})
    if not isinstance(nested, dict):
        raise TypeError(
            f"lora_plus: optimizer_kwargs= must be a dict of the optimizer's keyword "
            f"arguments, got {nested!r}. Pass them as keywords: weight_decay=0.01."
        )
    optimizer_kwargs = {**nested, **optimizer_kwargs}
    if isinstance(optimizer, optax.GradientTransformation) or not callable(optimizer):
        raise TypeError(
            f"lora_plus needs an optimizer factory such as optax.adamw (it makes one "
            f"optimizer per learning rate), got {optimizer!r}. Pass optax.adamw, not "
            "optax.adamw(1e-3); under optax.inject_hyperparams, pass "
            "static_args=('optimizer',) so that it is not called as a schedule."
        )
    if not _positive_real(ratio):
        raise ValueError(
            f"ratio is eta_b / eta_a and must be a finite number > 0, got {ratio!r}"
            " (LoRA+ uses about 16; ratio=1 is plain LoRA)."
        )
    if not callable(learning_rate) and not _positive_real(learning_rate):
        raise ValueError(
            f"learning_rate is the learning rate of a (b's is ratio times it) and must "
            f"be a finite number > 0 or an optax schedule, got {learning_rate!r}."
        )
    if callable(learning_rate):
        lr_b = lambda step: ratio * learning_rate(step)  # noqa: E731
    else:
        lr_b = ratio * learning_rate
    make = lambda lr: optimizer(learning_rate=lr, **optimizer_kwargs)  # noqa: E731
    _refuse_line_search(make(learning_rate), "lora_plus")
    return _partition(
        {
            "lora_a": make(learning_rate),
            "lora_b": make(lr_b),
            "full": make(learning_rate),
            "frozen": _unchanged(),
        },
        lambda params: _trained_labels(params, trainable, "lora_plus"),
        "lora_plus",
    )
