"""examples/finetune.py: batching, schedules and parameter counts (no model needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import finetune


def _data(n=100, max_len=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_len + 1, n)
    mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (np.arange(n)[:, None] + 1) * mask,  # row id in every token
        "attention_mask": mask,
        "labels": (np.arange(n) % 2).astype(np.int32),
    }


def _rows(batch):
    return batch["input_ids"][:, 0] - 1


def test_epoch_covers_full_batches_once_and_is_seeded():
    data = _data()
    epoch = list(finetune.batches(data, 16, rng=np.random.default_rng(3)))
    assert len(epoch) == 6 and all(b["labels"].shape == (16,) for b in epoch)
    rows = np.concatenate([_rows(b) for b in epoch])
    assert len(set(rows.tolist())) == 96  # 100 // 16 full batches, no repeats
    again = list(finetune.batches(data, 16, rng=np.random.default_rng(3)))
    np.testing.assert_array_equal(rows, np.concatenate([_rows(b) for b in again]))
    other = list(finetune.batches(data, 16, rng=np.random.default_rng(4)))
    assert not np.array_equal(rows, np.concatenate([_rows(b) for b in other]))
    ordered = list(finetune.batches(data, 16))
    np.testing.assert_array_equal(_rows(ordered[0]), np.arange(16))


def test_buckets_trim_padding_without_cutting_tokens():
    data = _data()
    epoch = list(
        finetune.batches(data, 8, rng=np.random.default_rng(0), buckets=(4, 8))
    )
    widths = {b["input_ids"].shape[1] for b in epoch}
    assert widths <= {4, 8, 12} and len(widths) > 1
    for b in epoch:
        full = data["attention_mask"][_rows(b)].sum(1)
        np.testing.assert_array_equal(b["attention_mask"].sum(1), full)


def test_batch_larger_than_data():
    with pytest.raises(ValueError, match="batch_size=200 is larger than the 100"):
        next(finetune.batches(_data(), 200))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    cfg = finetune.TrainConfig(lr=1e-3, warmup=0.1, schedule=kind)
    s = finetune.make_schedule(cfg, 100)
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(5)) == pytest.approx(5e-4)
    end = float(s(100))
    assert end == (pytest.approx(1e-3) if kind == "constant" else pytest.approx(0.0))
    with pytest.raises(ValueError, match="schedule must be 'cosine'"):
        finetune.make_schedule(finetune.TrainConfig(schedule="step"), 10)


def test_total_steps():
    assert finetune.TrainConfig(epochs=2, batch_size=32).total_steps(10246) == 640
    assert finetune.TrainConfig(steps=7).total_steps(10246) == 7


def test_count_params_lora_and_full():
    params = {
        "params": {
            "encoder": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)},
            "classifier": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)},
        }
    }
    cfg = finetune.TrainConfig(rank=2, targets=("encoder",))
    adapted = finetune.adapt(params, cfg)
    trainable, total = finetune.count_params(adapted, cfg)
    assert trainable == 2 * 8 + 2 * 8 + 8 * 2 + 2  # a, b, head kernel and bias
    assert total == 64 + 8 + 16 + 2 + 32
    full = finetune.TrainConfig(full_finetune=True)
    assert finetune.adapt(params, full) is params
    n = sum(x.size for x in jax.tree.leaves(params))
    assert finetune.count_params(params, full) == (n, n)


def test_input_reading_schemes_get_the_models_forward_on_training_batches():
    import flax.linen as nn

    import jaxlora

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, ids, mask):
            h = nn.Embed(128, 8)(ids) * mask[..., None]
            return nn.Dense(2, name="classifier")(nn.Dense(8, name="encoder")(h))

    model = Tiny()
    data = _data()
    variables = model.init(
        jax.random.key(0), data["input_ids"][:2], data["attention_mask"][:2]
    )
    for scheme in ("eva", "corda", "corda_kpm"):
        cfg = finetune.TrainConfig(
            scheme=scheme, rank=2, targets=("encoder",), batch_size=16
        )
        with pytest.raises(ValueError, match="needs data: pass model="):
            finetune.adapt(variables, cfg)
        adapted = finetune.adapt(variables, cfg, model=model, train_data=data)
        node = adapted["params"]["encoder"]["kernel"]
        assert node.spec.scheme == scheme
        x = (data["input_ids"][:4], data["attention_mask"][:4])
        np.testing.assert_allclose(
            jaxlora.lora_apply(model.apply)(adapted, *x),
            model.apply(variables, *x),
            atol=1e-5,
        )
