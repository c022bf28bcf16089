"""Loading rows from local files and (offline) Hugging Face dataset names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kdistill.data.sources import load_rows, split_rows
from kdistill.errors import ConfigError, DataError

SST2_TRAIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2" / "train.tsv"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------ jsonl / json


def test_jsonl(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n')
    assert load_rows(p) == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]


def test_jsonl_bad_line_is_named(tmp_path: Path) -> None:
    lines = ['{"text": "ok"}'] * 6 + ['{"text": oops}'] + ['{"text": "ok"}']
    p = write(tmp_path / "file.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"file\.jsonl line 7: invalid JSON: "):
        load_rows(p)


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: expected a JSON object, got list"):
        load_rows(p)


def test_json_list(tmp_path: Path) -> None:
    p = write(tmp_path / "d.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_rows(p) == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"text": "a"}', r"d\.json: expected a list of JSON objects, got dict"),
        ('[{"text": "a"}, 3]', r"d\.json item 1: expected a JSON object, got int"),
        ('[\n{"text": "a"},\n{"text": }\n]', r"d\.json line 3: invalid JSON"),
    ],
)
def test_json_errors(tmp_path: Path, content: str, pattern: str) -> None:
    p = write(tmp_path / "d.json", content)
    with pytest.raises(DataError, match=pattern):
        load_rows(p)


# ------------------------------------------------------------------------------ csv / tsv


def test_csv_with_quoted_fields(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", 'text,label\n"hello, world",1\nplain,0\n')
    assert load_rows(p) == [{"text": "hello, world", "label": "1"}, {"text": "plain", "label": "0"}]


def test_csv_wrong_field_count_names_line(tmp_path: Path) -> None:
    p = write(tmp_path / "d.csv", "text,label\na,1\nb,0\nc,1,extra\n")
    with pytest.raises(DataError, match=r"d\.csv line 4: expected 2 fields, got 3"):
        load_rows(p)


def test_tsv_keeps_quotes_inside_text(tmp_path: Path) -> None:
    text = 'sentence\tlabel\nthe "best" film \t1\n"quoted start and a lone " here\t0\nit\'s fine\t1\n'
    rows = load_rows(write(tmp_path / "train.tsv", text))
    assert [r["sentence"] for r in rows] == [
        'the "best" film ',
        '"quoted start and a lone " here',
        "it's fine",
    ]
    assert [r["label"] for r in rows] == ["1", "0", "1"]


def test_tsv_wrong_field_count_names_line(tmp_path: Path) -> None:
    p = write(tmp_path / "t.tsv", "sentence\tlabel\na\t1\nno label here\n")
    with pytest.raises(DataError, match=r"t\.tsv line 3: expected 2 fields, got 1"):
        load_rows(p)


def test_format_overrides_extension(tmp_path: Path) -> None:
    p = write(tmp_path / "data.dat", "a\tb\n1\t2\n")
    assert load_rows(p, format="tsv") == [{"a": "1", "b": "2"}]
    with pytest.raises(DataError, match="cannot infer the format"):
        load_rows(p)
    with pytest.raises(ConfigError, match="format: unknown format 'xml'"):
        load_rows(p, format="xml")


# ------------------------------------------------------------------------------ parquet / txt


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    assert load_rows(str(path)) == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="install pyarrow"):
        load_rows(str(path))


def test_txt(tmp_path: Path) -> None:
    p = write(tmp_path / "d.txt", "first line\n\n   \nsecond line\r\n")
    assert load_rows(p) == [{"text": "first line"}, {"text": "second line"}]
    assert load_rows(p, text_column="sentence")[0] == {"sentence": "first line"}


# ------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path) -> None:
    for name in ("nope.jsonl", "sub/dir/nope"):
        with pytest.raises(DataError, match="file not found: "):
            load_rows(str(tmp_path / name))


def test_empty_file(tmp_path: Path) -> None:
    p = write(tmp_path / "e.jsonl", "\n\n")
    with pytest.raises(DataError, match=r"e\.jsonl: no rows"):
        load_rows(p)
    with pytest.raises(DataError, match="no rows"):
        load_rows(write(tmp_path / "h.csv", "text,label\n"))


def test_unknown_hf_dataset_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    for name in ("kdistill-no-such-dataset", "kdistill-org/no-such-dataset"):
        with pytest.raises(DataError, match=rf"dataset '{name}' could not be loaded \(not cached"):
            load_rows(name, split="train")


def test_local_directory_loads_through_datasets_or_is_named(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path, capfd) -> None:
    """A folder is read by ``datasets`` (a folder of data files is a dataset); one it cannot read is
    named as a directory, without the network hint that fits Hub names."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "rows"
    folder.mkdir()
    write(folder / "part.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    capfd.readouterr()
    assert load_rows(str(folder), split="train") == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert "Generating" not in capfd.readouterr().err  # no progress bars for a folder that loads in a moment
    import datasets

    assert not datasets.are_progress_bars_disabled()  # and the user's setting is back
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        load_rows(str(empty))
    message = str(info.value)
    assert message.startswith(f"{empty}: a directory that `datasets` cannot load")
    assert "network" not in message and "\n" not in message
    two = tmp_path / "two-splits"
    two.mkdir()
    write(two / "train.jsonl", '{"text": "a", "label": 0}\n')
    write(two / "validation.jsonl", '{"text": "b", "label": 1}\n')
    with pytest.raises(ConfigError, match=rf"^{two}: a folder of 2 splits \(train, validation\); name the data file"):
        load_rows(str(two))


def test_datasets_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs `datasets`"):
        load_rows("glue", config_name="sst2", split="train")


# ------------------------------------------------------------------------------ split


def test_split_rows_deterministic_and_disjoint() -> None:
    rows = [{"i": i} for i in range(100)]
    train, val = split_rows(rows, validation_fraction=0.1, seed=3)
    assert (len(train), len(val)) == (90, 10)
    assert sorted(r["i"] for r in train + val) == list(range(100))
    assert split_rows(rows, validation_fraction=0.1, seed=3) == (train, val)
    assert split_rows(rows, validation_fraction=0.1, seed=4)[1] != val
    assert [r["i"] for r in val] == sorted(r["i"] for r in val)  # input order kept


def test_split_rows_bounds() -> None:
    train, val = split_rows([{"i": 0}, {"i": 1}], validation_fraction=0.01, seed=0)
    assert (len(train), len(val)) == (1, 1)
    with pytest.raises(ConfigError, match="validation_fraction"):
        split_rows([{"i": 0}] * 4, validation_fraction=1.0, seed=0)
    with pytest.raises(DataError, match="cannot split 1 row"):
        split_rows([{"i": 0}], validation_fraction=0.5, seed=0)


# ------------------------------------------------------------------------------ real data


def test_sst2_train_tsv() -> None:
    if not SST2_TRAIN.is_file():
        pytest.skip(f"{SST2_TRAIN} not present")
    rows = load_rows(str(SST2_TRAIN))
    assert len(rows) == 67_349
    assert set(rows[0]) == {"sentence", "label"}
    assert {r["label"] for r in rows} == {"0", "1"}
