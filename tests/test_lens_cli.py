"""fit-lens / eval-lens end to end on a tiny model (in process, model loading stubbed)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import beyond_top1 as bt
from beyond_top1 import cli


@pytest.fixture
def tiny_cli(tiny_model, monkeypatch):
    monkeypatch.setattr("beyond_top1.models.load_model", lambda *args, **kwargs: tiny_model)
    return tiny_model


def test_fit_and_eval_lens_commands(tiny_cli, tmp_path, capsys):
    text = ["--n-texts", "10", "--max-len", "16", "--batch-size", "4"]
    linear, tuned, out = tmp_path / "linear", tmp_path / "tuned", tmp_path / "eval"
    assert cli.main(["fit-lens", "--kind", "linear", "--out", str(linear), *text]) == 0
    tuned_args = ["--max-steps", "2", "--time-limit", "600", "--clock", "cpu", *text]
    assert cli.main(["fit-lens", "--kind", "tuned", "--out", str(tuned), *tuned_args]) == 0
    settings = bt.load_lens(tuned, tiny_cli).training_settings
    assert settings["steps"] == 2 and settings["clock"] == "cpu"
    assert (tuned / "training_history.csv").is_file()
    args = ["--lens", str(linear), "--lens", str(tuned), "--quality-of-fit", "--fit-texts", "4"]
    val = ["--n-texts", "4", "--max-len", "16", "--batch-size", "4"]
    assert cli.main(["eval-lens", "--out", str(out), *args, *val]) == 0
    frame = pd.read_csv(out / "lens_metrics.csv")
    L = tiny_cli.cfg.n_layers
    assert sorted(frame.lens.unique()) == ["linear", "logit", "tuned"]
    assert len(frame) == 3 * L
    last = frame[frame.layer == L - 1]
    assert last.kl.abs().max() < 1e-4 and (last.precision_at_1 == 1).all()
    assert len(json.loads((out / "lens_metrics.json").read_text())) == 3 * L
    assert (out / "figures" / "kl.png").is_file() and (out / "quality_of_fit.csv").is_file()
    assert "wrote" in capsys.readouterr().out
