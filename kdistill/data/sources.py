"""Load raw rows (``list[dict]``) from local files or Hugging Face ``datasets``.

Local formats, inferred from the extension unless ``format`` is given:

| format    | layout                                                                 |
|-----------|------------------------------------------------------------------------|
| ``jsonl`` | one JSON object a line (blank lines skipped)                           |
| ``json``  | a list of JSON objects                                                 |
| ``csv``   | header row, comma-separated, standard CSV quoting                      |
| ``tsv``   | header row, tab-separated, **no** quoting (quotes are literal text)     |
| ``parquet`` | read through ``pyarrow``                                             |
| ``txt``   | one row a line as ``{text_column: line}`` (blank lines skipped)        |

Any other ``source`` is a ``datasets`` name (``"glue"``, ``"stanfordnlp/sst2"``) or a local folder of
data files, loaded with ``datasets.load_dataset(source, config_name, split=split)``. CSV/TSV values are strings.
Errors are :class:`~kdistill.errors.DataError` with the file and line at fault. Once loaded, rows are
named by their number in the source, counted from 1 ("row 3" of a JSONL file without blank lines is
its line 3; of a CSV/TSV file, the third row under the header).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kdistill.errors import ConfigError, DataError

FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "tsv", "parquet", "txt")
_EXTENSIONS: dict[str, str] = {f".{f}": f for f in FORMATS}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_path(source: str) -> bool:
    """A known extension, an explicit path (``/x``, ``./x``, ``~/x``) or more than one separator.

    A single ``/`` alone is not enough: Hub names are ``org/name``.
    """
    if Path(source).suffix.lower() in _EXTENSIONS:
        return True
    if os.path.isabs(source) or source.startswith((".", "~")):
        return True
    if os.sep != "/" and os.sep in source:  # Windows: Hub names never hold a backslash
        return True
    return source.count("/") >= 2


def load_rows(
    source: str,
    *,
    format: str | None = None,  # noqa: A002  (mirrors the CLI option)
    split: str | None = None,
    config_name: str | None = None,
    text_column: str = "text",
) -> list[dict[str, Any]]:
    """Rows of a local file or a ``datasets`` dataset, as a list of dicts.

    ``format`` overrides the extension (one of :data:`FORMATS`). ``split`` and ``config_name``
    apply to ``datasets`` names only; with ``split=None`` a dataset with a single split gives it.
    ``text_column`` names the column of ``.txt`` rows.
    """
    if format is not None:
        fmt = format.lower().lstrip(".")
        if fmt not in FORMATS:
            raise ConfigError(f"format: unknown format {format!r} (choose from {', '.join(FORMATS)})")
        return _load_file(source, fmt, text_column)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in _EXTENSIONS:
        return _load_file(source, _EXTENSIONS[suffix], text_column)
    if path.is_file():
        raise DataError(
            f"{source}: cannot infer the format from extension {suffix or '(none)'!r}; "
            f"pass format= (one of {', '.join(FORMATS)})"
        )
    if _looks_like_path(source) and not path.is_dir():
        raise DataError(f"file not found: {source}")
    return _load_hf(source, split=split, config_name=config_name)


def _load_file(source: str, fmt: str, text_column: str) -> list[dict[str, Any]]:
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"file not found: {source}")
    loader = {
        "jsonl": _load_jsonl,
        "json": _load_json,
        "csv": lambda p, name: _load_delimited(p, name, ","),
        "tsv": lambda p, name: _load_delimited(p, name, "\t"),
        "parquet": _load_parquet,
        "txt": lambda p, name: _load_txt(p, name, text_column),
    }[fmt]
    try:
        rows = loader(path, source)
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def iter_jsonl(lines: Iterable[str], name: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of each non-blank JSONL line; bad JSON is a
    :class:`DataError` naming ``name`` and the line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def _load_jsonl(path: Path, name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, obj in iter_jsonl(f, name):
            if not isinstance(obj, dict):
                raise DataError(f"{name} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def _load_json(path: Path, name: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name} line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a list of JSON objects, got {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{name} item {i}: expected a JSON object, got {type(obj).__name__}")
    return data


def _load_delimited(path: Path, name: str, delimiter: str) -> list[dict[str, Any]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header: list[str] | None = None
            for fields in reader:
                if not fields:  # blank line
                    continue
                if header is None:
                    header = [h.strip() for h in fields]
                    dupes = sorted({h for h in header if header.count(h) > 1})
                    if dupes:
                        raise DataError(f"{name} line {reader.line_num}: duplicate column {dupes[0]!r} in header")
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        f"{name} line {reader.line_num}: expected {len(header)} fields, got {len(fields)}"
                    )
                rows.append(dict(zip(header, fields)))
        except csv.Error as exc:
            raise DataError(f"{name} line {reader.line_num}: {exc}") from None
    return rows


def _load_parquet(path: Path, name: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own hierarchy (ArrowInvalid, OSError, ...)
        raise DataError(f"{name}: invalid parquet file: {_first_line(exc)}") from None


def _load_txt(path: Path, name: str, text_column: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        return [{text_column: line.rstrip("\r\n")} for line in f if line.strip()]


def _load_hf(source: str, *, split: str | None, config_name: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is not a local file and loading Hugging Face datasets needs `datasets` "
            "(pip install datasets)"
        ) from None
    local = Path(source).expanduser().is_dir()
    quiet = local and not datasets.are_progress_bars_disabled()  # a local folder loads in a moment: no bars
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(source, config_name, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        if local:  # a local folder: the network is not the reason
            raise DataError(f"{source}: a directory that `datasets` cannot load ({_first_line(exc)}); "
                            f"name a data file in it ({', '.join(FORMATS)})") from None
        raise DataError(
            f"dataset {source!r} could not be loaded "
            f"(not cached and HF_HUB_OFFLINE=1 / no network?): {_first_line(exc)}"
        ) from None
    finally:
        if quiet:
            datasets.enable_progress_bars()
    if isinstance(ds, dict):  # DatasetDict: split=None
        if len(ds) != 1:
            if local:
                raise ConfigError(f"{source}: a folder of {len(ds)} splits ({', '.join(sorted(ds))}); name the "
                                  "data file of one")
            raise ConfigError(f"split: dataset {source!r} has splits {sorted(ds)}; choose one (a recipe's "
                              "data.train.split / data.validation.split)")
        ds = next(iter(ds.values()))
    rows = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def split_rows(
    rows: Sequence[dict[str, Any]], *, validation_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Carve a validation split: ``(train, validation)``, deterministic in ``seed``.

    ``round(n * validation_fraction)`` rows (at least 1, leaving at least 1 for training) are
    drawn by a seeded shuffle; both parts keep the input order.
    """
    train_idx, val_idx = split_positions(len(rows), validation_fraction=validation_fraction, seed=seed)
    return [rows[i] for i in train_idx], [rows[i] for i in val_idx]


def split_positions(n: int, *, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The positions (0-based, ascending) of :func:`split_rows`' training and validation rows among ``n``."""
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction: must be in (0, 1), got {validation_fraction}")
    if n < 2:
        raise DataError(f"cannot split {n} row(s) into training and validation")
    n_val = min(max(round(n * validation_fraction), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    return [i for i in range(n) if i not in held_out], sorted(held_out)
