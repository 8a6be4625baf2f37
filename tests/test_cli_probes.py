"""``beyond-top1 probe`` and ``beyond-top1 intervene``: in-process on a tiny model (fast), and as a
user runs them, in a subprocess on an untrained model (slow)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import make_tiny_model

from beyond_top1.cli import main

ARGS = ["--n-texts", "10", "--max-len", "32", "--batch-size", "5", "--precision", "fp32"]


@pytest.fixture
def tiny_cli(monkeypatch):
    model = make_tiny_model(n_layers=6, d_model=32, seed=0)
    monkeypatch.setattr("beyond_top1.models.load_model", lambda *args, **kwargs: model)
    return model


def test_probe_then_intervene_in_process(tiny_cli, tmp_path, capsys):
    probe_dir = tmp_path / "probe"
    code = main(
        ["probe", *ARGS, "--k", "2", "--scan-k", "3", "--folds", "2", "--out", str(probe_dir)]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "balanced accuracy" in printed and "shuffled labels" in printed
    for name in ("probe.safetensors", "cv_folds.csv", "cv_per_layer.csv", "cv.json"):
        assert (probe_dir / name).is_file()
    assert (probe_dir / "scan" / "summary.json").is_file()
    assert (probe_dir / "figures" / "probe_per_layer.png").is_file()
    cv = json.loads((probe_dir / "cv.json").read_text())
    assert cv["cv"]["k"] == 2 and cv["cv"]["n_splits"] == 2
    # the probe's own texts are refused as targets: its evidence there would be in-sample
    iv = ["--delta", "2", "--a", "1", "--max-pairs", "6"]
    probe_file = str(probe_dir / "probe.safetensors")
    code = main(
        ["intervene", *ARGS, "--scan", str(probe_dir / "scan"), "--probe", probe_file, *iv,
         "--out", str(tmp_path / "in-sample")]
    )  # fmt: skip
    assert code == 2 and "in-sample" in capsys.readouterr().err
    # a probe fitted on train texts is held out from the validation targets
    train_dir = tmp_path / "probe-train"
    code = main(
        ["probe", *ARGS, "--split", "train", "--k", "2", "--scan-k", "3", "--folds", "2",
         "--out", str(train_dir)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "iv"
    code = main(
        ["intervene", *ARGS, "--scan", str(probe_dir / "scan"), "--probe",
         str(train_dir / "probe.safetensors"), *iv, "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    by_offset = pd.read_csv(out / "by_offset.csv")
    assert by_offset["d"].tolist() == [-1, 0, 1]
    assert "probe_moved_1_to_2" in by_offset.columns
    assert (out / "figures" / "intervention_success.svg").is_file()
    assert "d >= 0" in capsys.readouterr().out
    # a scan keeps its texts: the text arguments are not needed with --scan
    code = main(
        ["intervene", "--seed", "3", "--scan", str(probe_dir / "scan"), *iv, "--out",
         str(tmp_path / "other")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert pd.read_csv(tmp_path / "other" / "by_offset.csv")["d"].tolist() == [-1, 0, 1]
    # the scan left in --out is reused only with the arguments it was made with
    args = ["--k", "2", "--folds", "2", "--out", str(probe_dir)]
    code = main(["probe", *ARGS, "--scan-k", "4", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert "(k differ)" in err and "a new folder" in err
    assert main(["probe", *ARGS, "--scan-k", "3", *args]) == 0, capsys.readouterr().err


def test_probe_without_the_shuffled_baseline_and_with_a_held_out_half(tiny_cli, tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["--n-tasks", "2", "--scan-k", "3", "--folds", "2", "--no-shuffled", "--held-out"]
    code = main(["probe", *ARGS, *args, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "balanced accuracy" in printed and "shuffled" not in printed
    cv = json.loads((out / "cv.json").read_text())
    assert cv["cv"]["k"] == 2
    assert not any("shuffled" in key for key in cv["cv"])
    folds = pd.read_csv(out / "cv_folds.csv")
    assert len(folds) == 2 and not any("shuffled" in c for c in folds.columns)
    assert (out / "probe_heldout.safetensors").is_file()


@pytest.mark.slow
def test_probe_and_intervene_commands_in_a_subprocess(tmp_path):
    from test_cli import run_cli

    common = ["--model", "untrained:gpt2-small", "--n-texts", "24", "--max-len", "48"]
    result = run_cli(
        "probe", *common, "--split", "train", "--k", "3", "--folds", "3", "--out",
        str(tmp_path / "p"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "balanced accuracy" in result.stdout
    result = run_cli(
        "intervene", *common, "--probe", str(tmp_path / "p" / "probe.safetensors"),
        "--max-pairs", "20", "--out", str(tmp_path / "iv"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "iv" / "by_offset.csv").is_file()
