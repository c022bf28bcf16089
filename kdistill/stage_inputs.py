"""What each stage of ``kdistill run`` read, so that a later run notices an edited input.

``<run>/stage_inputs.json`` maps each stage that ``kdistill run`` finished to the sha256 of every
local file it read: the seed tasks and evaluation sets of ``generate``; the data files
(``data.train``, ``data.validation``) of ``augment``, ``cache``, ``distill`` and ``evaluate``.
A stage whose record disagrees with the files now is stale: it and every stage after it run again.
A finished stage with no record (run by its own command, or by an older kdistill) is recorded as
it is when ``kdistill run`` first skips it. Hub datasets and models are not fingerprinted (the
cache's manifest checks the teacher itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdistill.hashing import sha256_file
from kdistill.recipe import Recipe

RECORD = "stage_inputs.json"


def input_files(recipe: Recipe, stage: str) -> list[Path]:
    """The local files ``stage`` reads (those that exist; a Hub dataset name is not a file)."""
    if stage == "generate":
        spec = recipe.generate
        sources = ([spec.seeds] if spec.seeds else []) + list(spec.eval_sets)
    else:
        data = recipe.data
        sources = [data.train.source] + ([data.validation.source] if data.validation is not None else [])
    return [path for path in (Path(s).expanduser() for s in sources) if path.is_file()]


def fingerprint(recipe: Recipe, stage: str) -> dict[str, str]:
    """``{file: sha256}`` of the files ``stage`` reads."""
    return {str(path): sha256_file(path) for path in input_files(recipe, stage)}


def changed_input(recipe: Recipe, stage: str) -> str | None:
    """How the first input of ``stage`` that differs from what its last run read differs
    (``"<file> changed"``, ``"<file> was removed"``), or None when they agree or the stage has no record."""
    old = _records(recipe).get(stage)
    if old is None:
        return None
    new = fingerprint(recipe, stage)
    path = next((path for path in sorted(old.keys() | new.keys()) if old.get(path) != new.get(path)), None)
    if path is None:
        return None
    return f"{path} was removed" if path not in new else f"{path} changed"


def has_record(recipe: Recipe, stage: str) -> bool:
    return stage in _records(recipe)


def record(recipe: Recipe, stage: str) -> None:
    """Write what ``stage`` read now into the run's record (atomically)."""
    records = _records(recipe)
    records[stage] = fingerprint(recipe, stage)
    path = recipe.run_dir / RECORD
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)


def _records(recipe: Recipe) -> dict[str, dict[str, str]]:
    path = recipe.run_dir / RECORD
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError:
        records = None
    if not isinstance(records, dict):
        return {}  # a damaged record is rewritten: the finished stages count as unrecorded
    return {stage: files for stage, files in records.items() if isinstance(files, dict)}
