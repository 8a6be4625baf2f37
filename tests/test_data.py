"""Corpus split, text files, tokenization and batching without padding leaks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import beyond_top1 as bt
from beyond_top1 import data
from beyond_top1.activations import stream_residuals
from beyond_top1.prompt import prompt_residuals


def test_split_is_a_stable_function_of_the_title():
    # The split hashes the title with SHA-256: check against an independent computation.
    reference = int(hashlib.sha256(b"Paris").hexdigest()[:16], 16) / 2**64
    assert data._unit_hash("Paris") == reference
    titles = [t for t, _ in data.wiki_articles()]
    val = {t for t in titles if data.split_of(t) == "val"}
    assert 0.08 < len(val) / len(titles) < 0.12


def test_split_does_not_depend_on_python_hash_seed():
    script = "import beyond_top1 as bt, hashlib; " + (
        "print(hashlib.sha256('|'.join(bt.wiki_texts(50, split='val')).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_wiki_splits_are_disjoint_and_deterministic():
    train = set(bt.wiki_texts(split="train"))
    val = bt.wiki_texts(split="val")
    assert not train & set(val)
    assert len(train) + len(val) == len(bt.wiki_texts(split="all"))
    assert bt.wiki_texts(25, split="val") == val[:25] == bt.wiki_texts(25, split="val")
    assert bt.wiki_texts(25, split="val", seed=1) != val[:25]
    assert set(bt.wiki_texts(split="val", seed=1)) == set(val)


def test_wiki_texts_errors():
    with pytest.raises(ValueError, match="split must be one of"):
        bt.wiki_texts(3, split="test")
    with pytest.raises(ValueError, match="split has"):
        bt.wiki_texts(10**6)


def test_load_texts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("first text\n\n  \nsecond text\n", encoding="utf-8")
    assert bt.load_texts(txt) == ["first text", "second text"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert bt.load_texts(jsonl) == ["a", "b"]


def test_load_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        bt.load_texts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        bt.load_texts(bad)
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="Unsupported"):
        bt.load_texts(csv)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no texts"):
        bt.load_texts(empty)


def test_tokenize_errors_and_truncation(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        bt.tokenize(tiny_model, "")
    with pytest.raises(ValueError, match="more than the limit of 64"):
        bt.tokenize(tiny_model, "word " * 100)
    assert len(bt.tokenize(tiny_model, "word " * 100, truncate=True)) == 64
    with pytest.raises(ValueError, match="exceeds the model's context"):
        bt.tokenize(tiny_model, "hello", max_len=65)


def test_token_batch_masks_padding_and_position_0():
    batch = data.make_token_batch([[5, 6, 7], [8]], [10, 11], pad_id=0, skip_first=True)
    assert batch.tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.scored.tolist() == [[False, True, True], [False, False, False]]
    assert batch.next_tokens.tolist() == [[6, 7, -1], [-1, -1, -1]]
    assert batch.text_ids.tolist() == [10, 11]
    every = data.make_token_batch([[5, 6, 7], [8]], [10, 11], pad_id=0, skip_first=False)
    assert every.scored.tolist() == [[True, True, True], [True, False, False]]


def test_position_0_is_scored_only_on_request(tiny_model):
    """Without BOS (the tiny models, SmolLM2) the first token is the attention sink: left out
    unless score_first=True."""
    texts = ["one two three", "four"]
    default = list(data.iter_token_batches(tiny_model, texts))[0]
    first = list(data.iter_token_batches(tiny_model, texts, score_first=True))[0]
    assert not default.scored[:, 0].any() and first.scored[:, 0].all()
    assert torch.equal(default.scored[:, 1:], first.scored[:, 1:])
    assert bt.activations.count_scored_tokens(tiny_model, texts) == int(first.mask.sum()) - 2


def test_streamed_residuals_equal_unbatched_runs(tiny_model):
    """Batching with padding changes nothing: each text's residuals equal a solo run's."""
    texts = ["A short one.", "A much longer text that needs several more tokens than that.", "Mid"]
    got = list(stream_residuals(tiny_model, texts, batch_size=3, max_len=64, progress=False))
    assert len(got) == 1
    batch = got[0]
    for text_id, text in enumerate(texts):
        ids, solo = prompt_residuals(tiny_model, text)
        rows = batch.text_ids == text_id
        assert batch.positions[rows].tolist() == list(range(1, len(ids)))  # 0: the sink
        assert batch.token_ids[rows].tolist() == ids[1:]
        assert batch.next_token_ids[rows].tolist() == (ids[1:] + [-1])[1:]
        torch.testing.assert_close(batch.resid[rows], solo[1:], rtol=1e-4, atol=1e-5)
    assert len(batch) == bt.activations.count_scored_tokens(tiny_model, texts, max_len=64)


def test_stream_chooses_layers_and_skips_batches(tiny_model):
    texts = ["one two three", "four five", "six", "seven eight nine ten"]
    full = list(stream_residuals(tiny_model, texts, layers=[-1, 2], batch_size=2, progress=False))
    assert [b.batch_index for b in full] == [0, 1]
    assert full[0].resid.shape[1:] == (2, tiny_model.cfg.d_model)
    assert full[1].text_ids.unique().tolist() == [3]  # "six" is one token: nothing to score
    resumed = list(
        stream_residuals(
            tiny_model, texts, layers=[-1, 2], batch_size=2, skip_batches=1, progress=False
        )
    )
    assert len(resumed) == 1 and torch.equal(resumed[0].at(2), full[1].at(2))
    with pytest.raises(KeyError, match="not streamed"):
        full[0].at(1)
    with pytest.raises(ValueError, match="layer must be"):
        next(stream_residuals(tiny_model, texts, layers=[7], progress=False))


def test_stream_reports_the_empty_text_by_index(tiny_model):
    with pytest.raises(ValueError, match="text 1: The text is empty"):
        list(stream_residuals(tiny_model, ["fine", " "], progress=False))
