"""Turn raw rows into tokenized examples for one task.

An example is a dict of Python ints and lists of ints (no tensors: padding and masking happen
in :class:`~kdistill.data.collate.Collator`). Every example carries ``example_id``: the index
of its row in the list given to ``encode``. Error messages number rows the same way, from 0.

| format                  | keys                                                               |
|-------------------------|--------------------------------------------------------------------|
| ClassificationFormat    | input_ids, attention_mask, [token_type_ids], labels: int, [soft_labels] |
| MaskedLMFormat          | input_ids, attention_mask, [token_type_ids], special_tokens_mask    |
| CausalLMFormat          | input_ids, attention_mask, labels (= input_ids; the model shifts)  |

A text that tokenizes to nothing (no token other than special tokens) is dropped; the format's
``num_dropped`` counts them for its last ``encode`` call, and dropping every row is an error.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kdistill.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Example = dict[str, Any]
_CHUNK = 2048  # rows per tokenizer call: fast tokenizers batch, memory stays bounded
_PROB_TOL = 1e-3


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length: must be a positive integer, got {max_length!r}")


def _row_numbers(rows: Sequence[Any], row_numbers: Sequence[int] | None) -> Sequence[int]:
    """The number each row has in its source, counted from 1 (default: its position + 1)."""
    if row_numbers is None:
        return range(1, len(rows) + 1)
    if len(row_numbers) != len(rows):
        raise ValueError(f"{len(row_numbers)} row numbers for {len(rows)} rows")
    return row_numbers


def _column(row: Any, where: str, column: str) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a mapping of columns, got {type(row).__name__}")
    if column not in row:
        cols = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where}: missing column {column!r} (columns: {cols})")
    return row[column]


def _text(row: Any, where: str, column: str) -> str:
    value = _column(row, where, column)
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def _tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    max_length: int,
    *,
    keep: tuple[str, ...],
) -> list[dict[str, list[int]] | None]:
    """Per text, the tokenizer's output restricted to ``keep``, or None if it holds no real token."""
    out: list[dict[str, list[int]] | None] = []
    for start in range(0, len(texts), _CHUNK):
        chunk = list(texts[start : start + _CHUNK])
        pair_chunk = None if pairs is None else list(pairs[start : start + _CHUNK])
        enc = tokenizer(
            chunk,
            pair_chunk,
            truncation=True,
            max_length=max_length,
            return_special_tokens_mask=True,
            return_token_type_ids=None if "token_type_ids" in keep else False,
        )
        for j in range(len(chunk)):
            special = enc["special_tokens_mask"][j]
            if all(special):  # also true when empty
                out.append(None)
                continue
            out.append({k: list(enc[k][j]) for k in keep if k in enc})
    return out


def _finish(
    fmt: Any, encoded: list[dict[str, list[int]] | None], extras: list[Example], source_name: str
) -> list[Example]:
    """Merge token fields with per-row extras, drop empty texts and count them on ``fmt``."""
    examples = [
        {"example_id": i, **enc, **extra}
        for i, (enc, extra) in enumerate(zip(encoded, extras))
        if enc is not None
    ]
    fmt.num_dropped = len(encoded) - len(examples)
    if not examples:
        raise DataError(f"{source_name}: every text tokenized to nothing ({len(encoded)} rows)")
    if fmt.num_dropped:
        logger.warning(
            "%s: dropped %d text(s) that tokenized to nothing", source_name, fmt.num_dropped
        )
    return examples


def _int_like(value: Any) -> int | None:
    """``value`` as a non-negative int if it is one (an int or a string of digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value) if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def infer_labels(
    rows: Sequence[dict[str, Any]], label_column: str = "label", *, source_name: str = "data",
    row_numbers: Sequence[int] | None = None,
) -> list[str]:
    """Sorted distinct values of ``label_column`` as strings (numerically when all are integers)."""
    values: set[str] = set()
    for n, row in zip(_row_numbers(rows, row_numbers), rows):
        value = _column(row, f"{source_name} row {n}", label_column)
        if value is None or isinstance(value, (list, dict, bool)):
            raise DataError(f"{source_name} row {n}: label {value!r} is not a class label")
        values.add(str(value).strip())
    if not values:
        raise DataError(f"{source_name}: no rows to infer labels from")
    if all(v.isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


@dataclass
class ClassificationFormat:
    """Single-text or text-pair classification.

    With ``labels`` (class names), a row's label is a name or its integer index; without, labels
    must be non-negative integers (strings of digits allowed) and ``num_labels`` becomes the
    largest seen plus one (across every ``encode`` call of this instance). When every name in
    ``labels`` looks like an integer, row labels match by name only (so that ``["1", "2"]`` from
    :func:`infer_labels` maps label 1 to class 0). A row whose ``soft_label_column`` holds a list
    of ``num_labels`` probabilities (or its JSON text) gets ``soft_labels``.
    """

    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    max_length: int = 128
    soft_label_column: str | None = "probs"
    num_labels: int | None = field(default=None, init=False)
    num_dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check_max_length(self.max_length)
        if self.labels is not None:
            names = [str(x) for x in self.labels]
            if not names:
                raise ConfigError("labels: the label set is empty")
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ConfigError(f"labels: duplicate label {dupes[0]!r}")
            self.labels = names
            self.num_labels = len(names)
            self._index = {n: k for k, n in enumerate(names)}
            self._numeric_names = any(_int_like(n) is not None for n in names)

    def label_index(self, value: Any, where: str) -> int:
        """The class index of a row's label ``value`` (a name, or an index where names allow); errors name ``where``."""
        if self.labels is None:
            idx = _int_like(value)
            if idx is None:
                raise DataError(
                    f"{where}: label {value!r} is not a non-negative integer "
                    "(give the label names to use names)"
                )
            return idx
        if not isinstance(value, bool) and isinstance(value, (str, numbers.Integral)):
            key = str(value).strip()
            if key in self._index:
                return self._index[key]
            if not self._numeric_names:
                idx = _int_like(value)
                if idx is not None and idx < len(self.labels):
                    return idx
        raise DataError(
            f"{where}: label {value!r} is not in the label set {self.labels}"
        )

    def _soft(self, value: Any, where: str) -> list[float]:
        col = self.soft_label_column
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DataError(f"{where}: column {col!r} is not a JSON list") from None
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(p, numbers.Real) and not isinstance(p, bool) and math.isfinite(p) and p >= 0
            for p in value
        ):
            raise DataError(f"{where}: column {col!r} must be a list of probabilities")
        probs = [float(p) for p in value]
        total = sum(probs)
        if abs(total - 1.0) > _PROB_TOL:
            raise DataError(f"{where}: column {col!r} sums to {total:.6g}, not 1")
        return probs

    def encode(
        self,
        rows: Sequence[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        source_name: str = "data",
        row_numbers: Sequence[int] | None = None,
    ) -> list[Example]:
        """Tokenize ``rows``: one example per row whose text has a real token. Errors name
        ``source_name`` and the row's number there (``row_numbers``, default position + 1)."""
        texts, pairs, extras = [], [] if self.text_pair_column else None, []
        soft_rows: list[tuple[int, str]] = []
        for i, (n, row) in enumerate(zip(_row_numbers(rows, row_numbers), rows)):
            where = f"{source_name} row {n}"
            texts.append(_text(row, where, self.text_column))
            if pairs is not None:
                pairs.append(_text(row, where, self.text_pair_column))
            label = _column(row, where, self.label_column)
            extra: Example = {"labels": self.label_index(label, where)}
            soft = row.get(self.soft_label_column) if self.soft_label_column else None
            if soft is not None:
                extra["soft_labels"] = self._soft(soft, where)
                soft_rows.append((i, where))
            extras.append(extra)
        if self.labels is None and extras:
            seen = max(e["labels"] for e in extras) + 1
            self.num_labels = max(self.num_labels or 0, seen)
        for i, where in soft_rows:
            n = len(extras[i]["soft_labels"])
            if n != self.num_labels:
                raise DataError(
                    f"{where}: column {self.soft_label_column!r} has {n} probabilities, "
                    f"expected {self.num_labels} (one per label)"
                )
        keep = ("input_ids", "attention_mask", "token_type_ids")
        encoded = _tokenize(tokenizer, texts, pairs, self.max_length, keep=keep)
        return _finish(self, encoded, extras, source_name)


@dataclass
class MaskedLMFormat:
    """Raw text for masked-LM distillation; the collator masks dynamically."""

    text_column: str = "text"
    max_length: int = 128
    num_dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check_max_length(self.max_length)

    def encode(
        self,
        rows: Sequence[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        source_name: str = "data",
        row_numbers: Sequence[int] | None = None,
    ) -> list[Example]:
        """Tokenize ``rows`` keeping ``special_tokens_mask`` (never masked by the collator)."""
        texts = [_text(row, f"{source_name} row {n}", self.text_column)
                 for n, row in zip(_row_numbers(rows, row_numbers), rows)]
        keep = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")
        encoded = _tokenize(tokenizer, texts, None, self.max_length, keep=keep)
        return _finish(self, encoded, [{} for _ in texts], source_name)


@dataclass
class CausalLMFormat:
    """Raw text for causal-LM distillation: ``labels`` copy ``input_ids`` (the model shifts)."""

    text_column: str = "text"
    max_length: int = 128
    num_dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check_max_length(self.max_length)

    def encode(
        self,
        rows: Sequence[dict[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        source_name: str = "data",
        row_numbers: Sequence[int] | None = None,
    ) -> list[Example]:
        """Tokenize ``rows``; the collator sets padded label positions to -100."""
        texts = [_text(row, f"{source_name} row {n}", self.text_column)
                 for n, row in zip(_row_numbers(rows, row_numbers), rows)]
        keep = ("input_ids", "attention_mask")
        encoded = _tokenize(tokenizer, texts, None, self.max_length, keep=keep)
        for enc in encoded:
            if enc is not None:
                enc["labels"] = list(enc["input_ids"])
        return _finish(self, encoded, [{} for _ in texts], source_name)
