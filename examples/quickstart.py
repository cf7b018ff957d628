"""jaxlora in one screen: adapt a small Flax model to a new task with LoRA.

A "pretrained" MLP is fitted to task A; task B is task A with a low-rank change of
every layer, the setting LoRA is made for. We add rank-4 adapters (scheme "he"),
freeze the base weights and train only the factors. Runs in well under a minute on a
CPU.

    python examples/quickstart.py [--scheme he] [--rank 4] [--steps 500]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

import jaxlora


class MLP(nn.Module):
    width: int = 128

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.gelu(nn.Dense(self.width, name=f"hidden_{i}")(x))
        return nn.Dense(8, name="out")(x)


def make_tasks(key, model, n=2048, d_in=32):
    """Task A: a random network's outputs; task B: the same with low-rank changes."""
    k_x, k_a, k_b = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (n, d_in))
    teacher = model.init(k_a, x)

    def low_rank_shift(path, w):
        if path[-1].key != "kernel":
            return w
        ku, kv = jax.random.split(jax.random.fold_in(k_b, w.size))
        u = jax.random.normal(ku, (w.shape[0], 2)) / jnp.sqrt(w.shape[0])
        return w + u @ jax.random.normal(kv, (2, w.shape[1]))

    teacher_b = jax.tree_util.tree_map_with_path(low_rank_shift, teacher)
    return x, model.apply(teacher, x), model.apply(teacher_b, x)


def fit(loss_fn, params, tx, steps, desc):
    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = tx.init(params)
    bar = tqdm(range(steps), desc=desc, ncols=88)
    for i in bar:
        params, state, loss = step(params, state)
        if i % 20 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return params, float(loss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # data-aware schemes (lora_ga, eva, corda) need batches this toy does not pass
    data_aware = ("lora_ga", "eva", "corda", "corda_ipm", "corda_kpm")
    schemes = [s for s in jaxlora.SCHEMES if s not in data_aware]
    parser.add_argument("--scheme", default="he", choices=schemes)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = MLP()
    x, y_a, y_b = make_tasks(jax.random.key(args.seed), model)
    mse = lambda apply, y: lambda p: jnp.mean((apply(p, x) - y) ** 2)  # noqa: E731

    # 1. "pretrain" on task A (all weights trained)
    params = model.init(jax.random.key(args.seed + 1), x)
    params, _ = fit(mse(model.apply, y_a), params, optax.adam(3e-3), 1500, "pretrain A")
    print(
        f"pretrained model on task B: loss {float(mse(model.apply, y_b)(params)):.4f}"
    )

    # 2. LoRA fine-tune on task B: add factors, freeze the base, train the factors
    lora = jaxlora.init(
        params, jax.random.key(args.seed + 2), scheme=args.scheme, rank=args.rank
    )
    apply = jaxlora.lora_apply(model.apply)
    tx = jaxlora.freeze_base(optax.adam(3e-3))
    lora, loss = fit(mse(apply, y_b), lora, tx, args.steps, f"LoRA ({args.scheme})")

    n_train = sum(x.size for x in jax.tree.leaves(jaxlora.adapters(lora)))
    n_total = sum(x.size for x in jax.tree.leaves(params))
    merged_loss = float(mse(model.apply, y_b)(jaxlora.merge(lora)))
    print(
        f"LoRA on task B: loss {loss:.4f} (merged model: {merged_loss:.4f}); "
        f"trained {n_train:,} of {n_total:,} parameters "
        f"({100 * n_train / n_total:.1f}%)"
    )
    return loss


if __name__ == "__main__":
    main()
