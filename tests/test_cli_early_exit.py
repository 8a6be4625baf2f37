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
    assert args.precision == "fp32" and args.m == 6 and args.linear_lens is None


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
