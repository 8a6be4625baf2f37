"""Refinement gap vs. evidence position (003; docs/definitions.md, "Refinement gap").

A multi-document probe set built offline from the Wikipedia summaries: each prompt holds ``N``
short documents, one of which states a single-token answer, and a question; the relevant
document is moved through positions ``1..N`` while the distractors keep their order (as in
"Lost in the Middle"). For each prompt the model answers correctly, read the last position
through a lens at every layer and record

* ``first_top1``: the first layer where the answer is the lens' top-1,
* ``s_1``: the layer from which the top-1 stays the (final) answer to the end
  (:func:`beyond_top1.saturation.saturation_layers` with ``k = 1``),
* ``gap = s_1 - first_top1`` (``>= 0``).

Two tasks (:func:`make_questions`):

* ``"kv"`` (default): key-value retrieval. Documents ``"The code word for <title> is <word>."``
  with a Wikipedia title as key and a random single-token word from the summaries' vocabulary as
  value; the question ``"The code word for <title> is"``. The answer is in the context only.
* ``"cloze"``: documents are first sentences of Wikipedia summaries; the question repeats the
  start of the relevant one and the answer is its next word. Easier, but the answer can often be
  guessed without the documents (``closed_book_correct`` measures that).
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.data import make_token_batch, split_of, tokenize, wiki_articles
from beyond_top1.fileio import write_signed_file
from beyond_top1.lenses import Lens, LogitLens
from beyond_top1.progress import tqdm
from beyond_top1.saturation import saturation_layers

TASKS = ("kv", "cloze")
KV_DOCUMENT = "The code word for {key} is {value}."
KV_QUESTION = "The code word for {key} is"
DOCUMENT_SEPARATOR = "\n"
QUESTION_SEPARATOR = "\n\n"
_MAX_TRIES = 200
QUESTIONS_FORMAT = "beyond-top1-questions"


@dataclass(frozen=True)
class Question:
    """One prompt: ``documents`` (the relevant one at 1-based ``position``) and a question.

    ``prompt = "\\n".join(documents) + "\\n\\n" + question``; ``answer`` (with its leading
    space) is one token, ``answer_id``, stated in ``documents[position - 1]`` only.
    """

    qid: str
    task: str
    item: int
    n_docs: int
    position: int
    documents: tuple[str, ...]
    question: str
    answer: str
    answer_id: int
    key: str

    @property
    def prompt(self) -> str:
        return DOCUMENT_SEPARATOR.join(self.documents) + QUESTION_SEPARATOR + self.question

    @property
    def relevant_document(self) -> str:
        return self.documents[self.position - 1]

    @property
    def where(self) -> str:
        """``"first"``, ``"middle"`` or ``"last"`` position among the documents."""
        if self.position == 1:
            return "first"
        return "last" if self.position == self.n_docs else "middle"

    def to_json(self) -> dict:
        out = asdict(self)
        out["documents"] = list(self.documents)
        return out

    @classmethod
    def from_json(cls, record: dict) -> Question:
        record = dict(record)
        record["documents"] = tuple(record["documents"])
        return cls(**record)


# ---------------------------------------------------------------------------------------------
# Building blocks from the Wikipedia summaries
# ---------------------------------------------------------------------------------------------


def _single_token(tok, text: str) -> int | None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@functools.lru_cache(maxsize=4)
def _word_counts() -> tuple[tuple[str, int], ...]:
    counts = Counter()
    for _, text in wiki_articles():
        counts.update(re.findall(r"\b[a-z]{4,10}\b", text))
    return tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def value_words(model, *, skip: int = 300, n: int = 1000) -> list[str]:
    """Lowercase words of the summaries that are one token with a leading space.

    Ranked by frequency (ties alphabetical); the ``skip`` most frequent (function-like words)
    are left out and the next ``n`` single-token words kept.
    """
    tok = hooked.tokenizer(model)
    words = [w for w, _ in _word_counts()[skip:] if _single_token(tok, " " + w) is not None]
    return words[:n]


def key_titles(split: str = "val") -> list[str]:
    """Short ASCII article titles (no parentheses, commas or digits) of one split, sorted."""
    titles = {
        title
        for title, _ in wiki_articles()
        if (split == "all" or split_of(title) == split)
        and title.isascii()
        and 3 <= len(title) <= 30
        and not re.search(r"[(),\d\"]", title)
    }
    return sorted(titles)


def first_sentences(split: str = "val", min_chars: int = 50, max_chars: int = 160) -> list[str]:
    """First sentences of the summaries of one split (ASCII, ``min..max`` characters), sorted."""
    sentences = set()
    for title, text in wiki_articles():
        if split != "all" and split_of(title) != split:
            continue
        sentence = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0]
        if sentence.isascii() and min_chars <= len(sentence) <= max_chars:
            sentences.add(sentence)
    return sorted(sentences)


def _positions(n_docs: int, positions) -> list[int]:
    if positions is None or positions == "all":
        return list(range(1, n_docs + 1))
    if isinstance(positions, int):
        if positions < 1:
            raise ValueError(f"positions must be >= 1, got {positions}")
        grid = np.linspace(1, n_docs, min(positions, n_docs))
        return sorted({int(math.floor(p + 0.5)) for p in grid})
    chosen = sorted({int(p) for p in positions if 1 <= int(p) <= n_docs})
    if not chosen:
        raise ValueError(f"no position of {positions} lies in 1..{n_docs}")
    return chosen


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _mentioned(word: str, token_id: int, texts: Sequence[str], tok) -> bool:
    """Whether ``word`` (any case, as a whole word) or ``token_id`` occurs in any of ``texts``."""
    pattern = re.compile(rf"\b{re.escape(word.strip())}\b", re.IGNORECASE)
    return any(pattern.search(t) or token_id in _ids(tok, t) for t in texts)


def _kv_item(rng: random.Random, n_docs: int, titles, values, tok):
    """``(relevant_doc, distractors, question, answer, answer_id, key)`` or ``None``."""
    keys = rng.sample(titles, n_docs)
    words = rng.sample(values, n_docs)
    docs = [KV_DOCUMENT.format(key=k, value=v) for k, v in zip(keys, words, strict=True)]
    question = KV_QUESTION.format(key=keys[0])
    answer = " " + words[0]
    answer_id = _single_token(tok, answer)
    lowered = [k.lower() for k in keys]
    if any(a in b for i, a in enumerate(lowered) for j, b in enumerate(lowered) if i != j):
        return None  # one key inside another: the question would match two documents
    if _mentioned(words[0], answer_id, [*docs[1:], question], tok):
        return None
    return docs[0], docs[1:], question, answer, answer_id, keys[0]


def _cloze_item(rng: random.Random, n_docs: int, sentences, tok):
    docs = rng.sample(sentences, n_docs)
    ids = _ids(tok, docs[0])
    others = {i for d in docs[1:] for i in _ids(tok, d)}
    cuts = []
    for cut in range(5, len(ids) - 1):
        word = tok.decode([ids[cut]])
        if (
            word.startswith(" ")
            and word[1:].isalpha()
            and len(word) >= 5
            and ids[cut] not in ids[:cut]
            and ids[cut] not in ids[cut + 1 :]
            and ids[cut] not in others
        ):
            cuts.append(cut)
    if not cuts:
        return None
    cut = rng.choice(cuts)
    question = tok.decode(ids[:cut])
    answer_id = ids[cut]
    if _ids(tok, question) != ids[:cut] or _mentioned(
        tok.decode([answer_id]), answer_id, [*docs[1:], question], tok
    ):
        return None
    return docs[0], docs[1:], question, tok.decode([answer_id]), answer_id, docs[0][:40]


def make_questions(
    model,
    *,
    n_docs: Sequence[int] = (5, 10, 20),
    n_items: int = 16,
    positions: int | Sequence[int] | str | None = None,
    task: str = "kv",
    split: str = "val",
    seed: int = 0,
) -> list[Question]:
    """A deterministic probe set: ``n_items`` base items per ``N`` in ``n_docs``, each placed at
    every position in ``positions``.

    Args:
        model: any model with the tokenizer the questions are for (answers must be one token).
        positions: ``None``/``"all"``: every position ``1..N``; an int ``m``: ``m`` evenly spaced
            positions including the first and last; a list: those positions.
        task: ``"kv"`` (code-word retrieval) or ``"cloze"`` (see the module docstring).
        split: the Wikipedia split of the titles / sentences (``"val"``, ``"train"``, ``"all"``).
        seed: the only source of randomness; the same arguments give the same questions.

    The distractors keep their order while the relevant document moves, so the prompts of one
    item differ only in where the evidence sits.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    tok = hooked.tokenizer(model)
    if task == "kv":
        titles, values = key_titles(split), value_words(model)
        pool = min(len(titles), len(values))
    else:
        sentences = first_sentences(split)
        pool = len(sentences)
    questions = []
    for n in n_docs:
        if not 1 <= n <= pool:
            raise ValueError(f"n_docs must be in 1..{pool} for task {task!r}, got {n}")
        for item in range(n_items):
            rng = random.Random(f"{seed}:{task}:{split}:{n}:{item}")
            for _ in range(_MAX_TRIES):
                if task == "kv":
                    built = _kv_item(rng, n, titles, values, tok)
                else:
                    built = _cloze_item(rng, n, sentences, tok)
                if built is not None:
                    break
            else:
                raise RuntimeError(f"could not build item {item} for N={n} in {_MAX_TRIES} tries")
            relevant, distractors, question, answer, answer_id, key = built
            for position in _positions(n, positions):
                docs = [*distractors[: position - 1], relevant, *distractors[position - 1 :]]
                questions.append(
                    Question(
                        qid=f"{task}-s{seed}-n{n}-i{item}-p{position}",
                        task=task,
                        item=item,
                        n_docs=n,
                        position=position,
                        documents=tuple(docs),
                        question=question,
                        answer=answer,
                        answer_id=int(answer_id),
                        key=key,
                    )
                )
    return questions


def save_questions(questions: Iterable[Question], path: str | Path) -> Path:
    """Write questions as JSONL (one question per line, prompt included for reading),
    atomically; an existing file is replaced only if this toolkit wrote it."""
    lines = "".join(
        json.dumps({**q.to_json(), "prompt": q.prompt, "format": QUESTIONS_FORMAT}) + "\n"
        for q in questions
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    signature = json.dumps({"format": QUESTIONS_FORMAT})[1:-1].encode()
    return write_signed_file(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"), signature)


def load_questions(path: str | Path) -> list[Question]:
    """Read questions written by :func:`save_questions`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such question file: {path}")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        record.pop("prompt", None)
        record.pop("format", None)
        try:
            questions.append(Question.from_json(record))
        except TypeError as exc:
            raise ValueError(f"{path}:{number}: not a question record ({exc})") from None
    return questions


# ---------------------------------------------------------------------------------------------
# Reading the questions through lenses
# ---------------------------------------------------------------------------------------------


def first_and_final(
    top1: Int[Tensor, "batch layer"], answer_ids: Int[Tensor, " batch"]
) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """``(first_top1, s_1)`` per row: first layer whose top-1 is the answer (``-1`` if none)
    and the saturation layer of the final top-1 (``k = 1``)."""
    hits = top1 == answer_ids[:, None]
    first = torch.where(hits.any(-1), hits.to(torch.int64).argmax(-1), -1)
    s1 = saturation_layers(top1[..., None])[..., 0]
    return first, s1


def _named(lenses) -> dict[str, Lens]:
    if lenses is None:
        return {}
    if isinstance(lenses, Lens):
        return {lenses.kind: lenses}
    if isinstance(lenses, Mapping):
        return dict(lenses)
    named = {}
    for lens in lenses:
        named[lens.kind if lens.kind not in named else f"{lens.kind}{len(named)}"] = lens
    return named


def _check_answers(model, questions: Sequence[Question]) -> None:
    tok = hooked.tokenizer(model)
    for q in questions[:: max(1, len(questions) // 50)]:
        if _single_token(tok, q.answer) != q.answer_id:
            raise ValueError(
                f"question {q.qid}: answer {q.answer!r} is not token {q.answer_id} for this "
                "model's tokenizer; regenerate the questions with make_questions(model, ...)"
            )


def read_questions(
    model,
    questions: Sequence[Question],
    lenses: Mapping[str, Lens] | Sequence[Lens] | Lens | None = None,
    *,
    batch_size: int = 8,
    closed_book: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Answer every question and, for each lens, locate the answer's refinement layers.

    Returns one row per ``(question, lens)``: ``qid, task, item, n_docs, position, where,
    n_tokens, lens, model_answer, correct, answer_prob, first_top1, s_1, gap`` and, with
    ``closed_book``, ``closed_book_correct`` (the model answers the question without documents).
    ``first_top1``/``s_1``/``gap`` are only filled for correct answers (else ``<NA>``). Every
    lens reproduces the model at the last layer, so ``correct`` does not depend on the lens.
    """
    lenses = _named(lenses) or {"logit": LogitLens(model)}
    if not questions:
        raise ValueError("no questions")
    _check_answers(model, questions)
    L = hooked.n_layers(model)
    layers = tuple(range(L))
    device = hooked.model_device(model)
    tok = hooked.tokenizer(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = [tokenize(model, q.prompt) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: len(ids[i]))
    results: dict[str, dict[int, tuple]] = {name: {} for name in lenses}
    bar = tqdm(total=len(questions), unit="prompt", desc="questions", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = make_token_batch([ids[i] for i in chunk], chunk, pad_id=pad, skip_first=False)
        lengths = batch.mask.sum(-1)
        resid = hooked.run_with_residuals(model, batch.tokens.to(device), layers)
        last = resid[torch.arange(len(chunk)), lengths.to(device) - 1]  # [b, layer, d]
        del resid
        answers = torch.tensor([questions[i].answer_id for i in chunk], device=device)
        with torch.inference_mode():
            for name, lens in lenses.items():
                top1 = torch.stack(
                    [lens(last[:, j], l).argmax(-1) for j, l in enumerate(layers)], 1
                )
                final_probs = lens(last[:, -1], L - 1).float().softmax(-1)
                answer_prob = final_probs.gather(-1, answers[:, None])[:, 0]
                first, s1 = first_and_final(top1, answers)
                for row, i in enumerate(chunk):
                    results[name][i] = (
                        int(top1[row, -1]),
                        float(answer_prob[row]),
                        int(first[row]),
                        int(s1[row]),
                    )
        bar.update(len(chunk))
    bar.close()
    closed = _closed_book(model, questions, batch_size=batch_size) if closed_book else None
    records = []
    for name in lenses:
        for i, q in enumerate(questions):
            top, prob, first, s1 = results[name][i]
            correct = top == q.answer_id
            record = {
                "qid": q.qid,
                "task": q.task,
                "item": q.item,
                "n_docs": q.n_docs,
                "position": q.position,
                "where": q.where,
                "n_tokens": len(ids[i]),
                "lens": name,
                "model_answer": tok.decode([top]),
                "correct": correct,
                "answer_prob": prob,
                "first_top1": first if correct else pd.NA,
                "s_1": s1 if correct else pd.NA,
                "gap": s1 - first if correct else pd.NA,
            }
            if closed is not None:
                record["closed_book_correct"] = closed[q.question, q.answer_id]
            records.append(record)
    frame = pd.DataFrame(records)
    for column in ("first_top1", "s_1", "gap"):
        frame[column] = frame[column].astype("Int64")
    frame.attrs["n_layers"] = L
    return frame


def _closed_book(model, questions: Sequence[Question], *, batch_size: int) -> dict:
    """Does the model answer each distinct question alone (no documents)? ``{(q, id): bool}``."""
    tok = hooked.tokenizer(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = hooked.model_device(model)
    unique = sorted({(q.question, q.answer_id) for q in questions})
    out = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        ids = [tokenize(model, question) for question, _ in chunk]
        batch = make_token_batch(ids, list(range(len(chunk))), pad_id=pad, skip_first=False)
        with torch.inference_mode():
            logits = model(batch.tokens.to(device))
        last = logits[torch.arange(len(chunk)), batch.mask.sum(-1).to(device) - 1]
        for key, top in zip(chunk, last.argmax(-1).tolist(), strict=True):
            out[key] = top == key[1]
    return out


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _se(values: pd.Series) -> float:
    values = values.dropna().astype(float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def refinement_table(
    frame: pd.DataFrame, by: Sequence[str] = ("n_docs", "position")
) -> pd.DataFrame:
    """Accuracy and refinement layers per ``lens`` and ``by`` (default: ``N`` × position).

    Columns: ``n_prompts, n_correct, accuracy, first_mean, s1_mean, gap_mean, gap_se,
    gap_median, frac_gap_positive`` (the last five over correct prompts only).
    """
    keys = ["lens", *by]
    rows = []
    for key, group in frame.groupby(keys, sort=True):
        correct = group[group["correct"]]
        gaps = correct["gap"].astype(float)
        row = dict(zip(keys, key, strict=True))
        row.update(
            n_prompts=len(group),
            n_correct=len(correct),
            accuracy=len(correct) / len(group),
            first_mean=float(correct["first_top1"].astype(float).mean()),
            s1_mean=float(correct["s_1"].astype(float).mean()),
            gap_mean=float(gaps.mean()),
            gap_se=_se(gaps),
            gap_median=float(gaps.median()),
            frac_gap_positive=float((gaps > 0).mean()) if len(gaps) else math.nan,
        )
        if "closed_book_correct" in group:
            row["closed_book_accuracy"] = float(group["closed_book_correct"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = [
    "KV_DOCUMENT",
    "KV_QUESTION",
    "TASKS",
    "Question",
    "first_and_final",
    "first_sentences",
    "key_titles",
    "load_questions",
    "make_questions",
    "read_questions",
    "refinement_table",
    "save_questions",
    "value_words",
]
