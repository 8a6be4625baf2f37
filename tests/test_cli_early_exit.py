"""``beyond-top1 early-exit``: argument parsing (fast) and both modes end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from beyond_top1.cli import build_parser


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "beyond_top1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_early_exit_arguments_parse():
    args = build_parser().parse_args(
        ["early-exit", "generate", "--out", "x", "--criterion", "probe_conf", "--theta", "0.8"]
    )
    assert args.mode == "generate" and args.criterion == "probe_conf" and args.theta == 0.8
    args = build_parser().parse_args(["early-exit", "simulate", "--out", "x"])
    assert args.precision == "fp32" and args.m is None and args.linear_lens is None


def test_a_simulation_with_nothing_to_score_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from conftest import make_tiny_model

    from beyond_top1.cli import main

    model = make_tiny_model(n_layers=4, d_model=16, seed=0)
    monkeypatch.setattr("beyond_top1.models.load_model", lambda *args, **kwargs: model)
    texts = tmp_path / "one.txt"
    texts.write_text("Hi\n")  # one token: no scored position with a next token
    code = main(
        ["early-exit", "simulate", "--texts-file", str(texts), "--out", str(tmp_path / "o")]
    )
    last = capsys.readouterr().err.split("\r")[-1]  # after the progress bar
    assert code == 2 and last.startswith("beyond-top1 early-exit: error: early exit:")
    assert "Traceback" not in last and len(last.strip().splitlines()) == 1


@pytest.mark.slow
def test_early_exit_simulate_and_generate_end_to_end(tmp_path):
    out = tmp_path / "sim"
    result = run_cli(
        "early-exit", "simulate", "--out", str(out), "--n-texts", "2", "--max-len", "12"
    )
    assert result.returncode == 0, result.stderr
    curves = pd.read_csv(out / "curves.csv")
    assert curves.loc[curves.method == "oracle", "precision_at_1"].tolist() == [1.0]
    assert {"saved_at_95", "saved_at_99"} <= set(pd.read_csv(out / "layers_saved.csv").columns)
    assert "z" in json.loads((out / "better_lm.json").read_text())
    assert (out / "figures" / "early_exit.png").is_file()
    gen = tmp_path / "gen"
    result = run_cli(
        "early-exit", "generate", "--out", str(gen), "--n-texts", "1", "--new-tokens", "3",
        "--criterion", "margin", "--theta", "2.0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(gen / "generation.csv")
    assert summary.agreement.tolist() == [1.0]  # θ = 2 never fires: full decoding
