"""The README's self-contained code blocks run as written (the NNX recipe has its
own test in test_training.py, on a stacked model)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora

README = open("README.md", encoding="utf-8").read()


def _block(after: str) -> str:
    """The first ``python`` code block after the text ``after``."""
    start = README.index(after)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


def test_quick_start_trains_and_merges():
    """The quick start defines a step; run a few of it: the loss falls, the base
    weights stay as they were, and the merged tree gives the adapted outputs."""
    scope = {}
    exec(_block("## Quickstart"), scope)
    lora, state, step, x = scope["lora"], scope["state"], scope["step"], scope["x"]
    model, params = scope["model"], scope["params"]
    y = jnp.sin(x[:, :8])
    losses = []
    for _ in range(20):
        lora, state, loss = step(lora, state, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    merged = jaxlora.merge(lora)
    np.testing.assert_allclose(
        model.apply(merged, x), scope["apply"](lora, x), rtol=1e-5, atol=1e-6
    )
    for got, want in zip(
        jax.tree.leaves(jaxlora.base(lora)), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_data_aware_schemes_block_runs():
    """The LoRA-GA and CorDA block, on the quick start's model: both keep the
    model's output at init (their base is the residual)."""
    model = nn.Sequential([nn.Dense(64), nn.gelu, nn.Dense(8)])
    scope = {"jax": jax, "jnp": jnp, "jaxlora": jaxlora, "model": model}
    exec(_block("The data-aware schemes take their data in `init`"), scope)
    x = scope["batches"][0]
    want = model.apply(scope["params"], x)
    for name in ("ga", "kpm"):
        got = jaxlora.lora_apply(model.apply)(scope[name], x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        nodes = jax.tree.leaves(scope[name], is_leaf=jaxlora.is_lora)
        assert all(n.spec.residual for n in nodes if jaxlora.is_lora(n))


def test_optimizer_wrapper_idioms_keep_the_base():
    """The README's optimizer idioms (clip inside freeze_base; with lora_plus, a
    freeze_base(clip) stage first; MultiSteps inside): base bit-identical, factors
    trained."""
    plain = {"d": {"kernel": jnp.ones((8, 6)), "bias": jnp.ones(6)}}
    lp = jaxlora.init(plain, jax.random.key(0), rank=2, scheme="both_random")
    apply = jaxlora.lora_apply(lambda p, x: x @ p["d"]["kernel"] + p["d"]["bias"][None])
    loss = lambda p: jnp.sum(apply(p, jnp.ones((3, 8))) ** 2)  # noqa: E731
    clip = optax.clip_by_global_norm(1.0)
    for tx in (
        jaxlora.freeze_base(optax.chain(clip, optax.adamw(1e-3))),
        optax.chain(jaxlora.freeze_base(clip), jaxlora.lora_plus(optax.adamw, 1e-3)),
        jaxlora.freeze_base(optax.MultiSteps(optax.adamw(1e-3), 2)),
    ):
        p, state = lp, tx.init(lp)
        for _ in range(2):
            u, state = tx.update(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, u)
        np.testing.assert_array_equal(p["d"]["kernel"].w, lp["d"]["kernel"].w)
        np.testing.assert_array_equal(p["d"]["bias"], lp["d"]["bias"])
        assert not np.array_equal(p["d"]["kernel"].b, lp["d"]["kernel"].b)
