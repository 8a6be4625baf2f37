"""The command line, run as a user would: in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import beyond_top1 as bt


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "beyond_top1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def converted(smollm2):
    """Make sure the model cache exists before subprocesses load it."""
    return smollm2


def test_lens_command_prints_paris_last(converted, tmp_path):
    out_csv = tmp_path / "lens.csv"
    result = run_cli("lens", "The capital of France is", "--k", "3", "--csv", str(out_csv))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == 30
    layer, first_cell = rows[-1].split(maxsplit=1)
    assert layer == "29" and first_cell.startswith("' Paris'")
    frame = pd.read_csv(out_csv, keep_default_na=False)
    assert list(frame.columns) == ["layer", "rank", "token_id", "token", "prob"]
    top = frame[(frame.layer == 29) & (frame["rank"] == 1)]
    assert top.token.tolist() == [" Paris"]


def test_lens_command_follows_targets_and_writes_the_heatmap(converted, tmp_path):
    prompt = "The capital of France is Paris, and the capital of Italy is"
    csv, page = tmp_path / "targets.csv", tmp_path / "heatmap.html"
    args = ("lens", prompt, "--target", " Rome", "--target-id", "42", "--targets-csv", str(csv))
    result = run_cli(*args, "--html", str(page))
    assert result.returncode == 0, result.stderr
    assert "# rank (probability) of each target at position -1" in result.stdout
    frame = pd.read_csv(csv, keep_default_na=False)
    expected = bt.trajectory(converted, prompt, targets=[" Rome", 42]).targets
    assert len(frame) == len(expected)
    np.testing.assert_array_equal(frame["rank"], expected["rank"])
    last = frame[(frame.layer == 29) & (frame.pos == frame.pos.max())]
    assert last.set_index("target_id")["rank"].to_dict()[7268] == 1  # " Rome"
    assert 'class="bt-heat-table"' in page.read_text(encoding="utf-8")
    result = run_cli("lens", prompt, "--target", " Rome and Paris")
    assert result.returncode == 2 and "not one" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("lens", "   "), "The text is empty"),
        (("lens", "hello", "--model", "no-such-model"), "untrained:smollm2-135m"),
        (("lens", "hello", "--k", "0"), "k must be between 1"),
    ],
)
def test_cli_errors_are_clear(converted, args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_over_long_text(converted):
    result = run_cli("lens", "word " * 3000)
    assert result.returncode == 2
    assert "more than the limit of 2048" in result.stderr


def test_scan_and_order_commands(converted, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat and looked at the dog.\nParis is in France.\n")
    common = ["--model", "untrained:gpt2-small", "--texts-file", str(texts), "--max-len", "12"]
    result = run_cli("scan", *common, "--k", "3", "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "mean strict tau" in result.stdout
    frame = pd.read_parquet(tmp_path / "a" / "saturation.parquet")
    # every token but the first of each text (12 and 5 tokens): position 0 is not scored
    assert list(frame.columns[-3:]) == ["s_1", "s_2", "s_3"] and len(frame) == 11 + 4
    again = run_cli("scan", *common, "--k", "3", "--out", str(tmp_path / "a"))
    assert again.returncode == 2 and "--resume" in again.stderr
    order = run_cli("order", str(tmp_path / "a"), "--csv", str(tmp_path / "order.csv"))
    assert order.returncode == 0, order.stderr
    assert "untrained:gpt2-small [logit]" in order.stdout
    assert "mean_tau" in (tmp_path / "order.csv").read_text()
    only_s = run_cli(
        "scan", *common, "--k", "3", "--keep", "saturation", "--out", str(tmp_path / "b")
    )
    assert only_s.returncode == 0, only_s.stderr
    assert not (tmp_path / "b" / "trajectories.safetensors").exists()
    same = (tmp_path / "a" / "saturation.parquet").read_bytes()
    assert (tmp_path / "b" / "saturation.parquet").read_bytes() == same


def test_texts_file_is_read_whole_unless_n_texts_is_given(tmp_path):
    import argparse

    from beyond_top1.cli.args import add_text_args, text_spec_from_args, texts_from_args

    path = tmp_path / "texts.txt"
    path.write_text("one\ntwo\nthree\n")
    parser = argparse.ArgumentParser()
    add_text_args(parser, n_texts=2, split="val")
    args = parser.parse_args(["--texts-file", str(path)])
    assert texts_from_args(args) == ["one", "two", "three"]
    assert text_spec_from_args(args).describe() == f"{path} (all)"
    args = parser.parse_args(["--texts-file", str(path), "--n-texts", "2"])
    assert texts_from_args(args) == ["one", "two"]
    args = parser.parse_args([])
    assert args.n_texts is None and args.default_n_texts == 2
