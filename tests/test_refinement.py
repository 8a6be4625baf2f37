"""Refinement gap (003): the question generator, the layer bookkeeping and the readout."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from beyond_top1 import hooked
from beyond_top1.lenses import LinearShortcutLens, LogitLens
from beyond_top1.prompt import prompt_residuals
from beyond_top1.refinement import (
    _positions,
    first_and_final,
    load_questions,
    make_questions,
    read_questions,
    refinement_table,
    save_questions,
)


@pytest.fixture(scope="module")
def kv_questions(tiny_model):
    return make_questions(tiny_model, n_docs=(3, 5), n_items=3, seed=7)


def _word_in(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word.strip())}\b", text, re.IGNORECASE) is not None


def test_generator_is_deterministic(tiny_model, kv_questions):
    again = make_questions(tiny_model, n_docs=(3, 5), n_items=3, seed=7)
    assert again == kv_questions
    other = make_questions(tiny_model, n_docs=(3, 5), n_items=3, seed=8)
    assert [q.prompt for q in other] != [q.prompt for q in kv_questions]
    assert len(kv_questions) == 3 * 3 + 3 * 5  # every position 1..N of every item


@pytest.mark.parametrize("task", ["kv", "cloze"])
def test_answer_is_stated_in_the_relevant_document_only(tiny_model, task):
    questions = make_questions(tiny_model, n_docs=(2, 4), n_items=4, task=task, seed=3)
    tok = hooked.tokenizer(tiny_model)
    for q in questions:
        assert tok(q.answer, add_special_tokens=False)["input_ids"] == [q.answer_id]
        assert q.documents[q.position - 1] == q.relevant_document
        assert _word_in(q.answer, q.relevant_document)
        others = [d for i, d in enumerate(q.documents) if i != q.position - 1]
        assert not any(_word_in(q.answer, d) for d in [*others, q.question]), q.qid
        ids = tok(q.prompt, add_special_tokens=False)["input_ids"]
        assert ids.count(q.answer_id) == 1, q.qid  # once in the whole prompt: the evidence
        assert not q.prompt.endswith(q.answer)
        if task == "kv":
            assert q.key in q.relevant_document and q.key in q.question
            assert not any(q.key in d for d in others)


def test_items_keep_distractor_order_across_positions(kv_questions):
    by_item: dict[tuple, list] = {}
    for q in kv_questions:
        by_item.setdefault((q.n_docs, q.item), []).append(q)
    for group in by_item.values():
        assert sorted(q.position for q in group) == list(range(1, group[0].n_docs + 1))
        distractors = {
            tuple(d for i, d in enumerate(q.documents) if i != q.position - 1) for q in group
        }
        assert len(distractors) == 1
        assert len({(q.relevant_document, q.answer, q.question) for q in group}) == 1


def test_positions_grid():
    assert _positions(10, 5) == [1, 3, 6, 8, 10]
    assert _positions(3, 5) == [1, 2, 3]
    assert _positions(4, None) == [1, 2, 3, 4]
    assert _positions(20, [1, 10, 25]) == [1, 10]


def test_questions_round_trip(tmp_path, kv_questions):
    path = save_questions(kv_questions, tmp_path / "q.jsonl")
    assert load_questions(path) == kv_questions


def test_first_and_final_matches_definition():
    generator = torch.Generator().manual_seed(0)
    top1 = torch.randint(0, 3, (500, 7), generator=generator)
    answers = torch.randint(0, 3, (500,), generator=generator)
    first, s1 = first_and_final(top1, answers)
    for row in range(500):
        seq, answer = top1[row].tolist(), int(answers[row])
        expected_first = seq.index(answer) if answer in seq else -1
        expected_s1 = min(l for l in range(7) if all(t == seq[-1] for t in seq[l:]))
        assert int(first[row]) == expected_first
        assert int(s1[row]) == expected_s1


def test_read_questions_matches_per_prompt_reference(tiny_model, kv_questions):
    """Batched, padded readout == one prompt at a time; answers set to the model's own top-1 so
    that the gap columns are filled."""
    model = tiny_model
    tok = hooked.tokenizer(model)
    linear = LinearShortcutLens(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        linear.weight.add_(0.3 * torch.randn(linear.weight.shape, generator=generator))
    lenses = {"logit": LogitLens(model), "linear": linear}
    L = model.cfg.n_layers
    questions, reference = [], {}
    for q in [q for q in kv_questions if q.n_docs == 3]:  # short enough for n_ctx = 64
        _, resid = prompt_residuals(model, q.prompt)
        with torch.no_grad():
            tops = {
                name: [int(lens(resid[-1, l], l).argmax()) for l in range(L)]
                for name, lens in lenses.items()
            }
        final = tops["logit"][-1]
        answer = tok.decode([final])
        if tok(answer, add_special_tokens=False)["input_ids"] == [final] and len(questions) < 4:
            q = dataclasses.replace(q, answer=answer, answer_id=final)
        questions.append(q)
        reference[q.qid] = (q.answer_id, tops)
    frame = read_questions(model, questions, lenses, batch_size=3, progress=False)
    assert len(frame) == 2 * len(questions)
    assert frame["correct"].sum() >= 4
    for row in frame.itertuples():
        answer, tops = reference[row.qid]
        seq = tops[row.lens]
        assert row.correct == (seq[-1] == answer)
        if row.correct:
            assert row.first_top1 == seq.index(answer)
            assert row.s_1 == min(l for l in range(L) if all(t == answer for t in seq[l:]))
            assert row.gap == row.s_1 - row.first_top1
        else:
            assert row.first_top1 is pd_na()
    table = refinement_table(frame)
    assert table["n_prompts"].sum() == len(frame)
    assert table["n_correct"].sum() == int(frame["correct"].sum())


def pd_na():
    import pandas as pd

    return pd.NA


def test_default_probe_set_is_pinned(tiny_model):
    """The saved runs in experiments/README.md used these prompts (seed 0): changing the
    generator must be deliberate (update this test and rerun the experiment)."""
    q = make_questions(tiny_model, n_docs=(5,), n_items=1, positions=[1])[0]
    assert q.documents == (
        "The code word for Jeddah is cell.",
        "The code word for Willow is materials.",
        "The code word for Insurgency is former.",
        "The code word for Millet is height.",
        "The code word for Apple Inc. is female.",
    )
    assert (q.question, q.answer, q.answer_id) == ("The code word for Jeddah is", " cell", 1297)
