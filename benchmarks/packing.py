"""Sentences packed into LM rows, shared by the benchmarks that read SST-2 as running text."""

from __future__ import annotations


def pack_sentences(tokenizer, sentences: list[str], max_length: int, n_rows: int) -> list[str]:
    """Up to ``n_rows`` texts, each consecutive sentences joined by spaces while their tokens
    (counted one sentence at a time, without special tokens) fit in ``max_length − 1``, leaving
    room for ``<bos>``; a sentence is never split, and an unfinished last text is dropped."""
    rows: list[str] = []
    current: list[str] = []
    used = 0
    for sentence in sentences:
        n = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        if current and used + n > max_length - 1:
            rows.append(" ".join(current))
            current, used = [], 0
            if len(rows) == n_rows:
                break
        current.append(sentence)
        used += n
    return rows
