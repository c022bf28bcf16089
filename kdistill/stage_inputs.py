"""What each stage of ``kdistill run`` read, so that a later run notices an edited input.

``<run>/stage_inputs.json`` maps each stage that ``kdistill run`` started to the sha256 of every
local file it read (``files``: the seed tasks and evaluation sets of ``generate``; the data files,
``data.train`` and ``data.validation``, of ``augment``, ``cache``, ``distill`` and ``evaluate``)
and whether that run finished (``finished``). A stage whose files differ from its record is stale:
it and every stage after it run again. So does a stage whose outputs are complete but whose last
run, on these files, did not finish (the outputs are an earlier run's, on other files). A finished
stage with no record (run by its own command) is recorded as it is when ``kdistill run`` first
skips it. Hub datasets and models are not fingerprinted (the cache's manifest checks the teacher).
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


def changed_input(recipe: Recipe, stage: str, new: dict[str, str]) -> str | None:
    """How the first input of ``stage`` that differs between its last run and ``new`` (its
    :func:`fingerprint` now) differs (``"<file> changed"``, ``"<file> was removed"``), or None when
    they agree or the stage has no record."""
    entry = _records(recipe).get(stage)
    if entry is None:
        return None
    old = entry["files"]
    path = next((path for path in sorted(old.keys() | new.keys()) if old.get(path) != new.get(path)), None)
    if path is None:
        return None
    return f"{path} was removed" if path not in new else f"{path} changed"


def last_run_finished(recipe: Recipe, stage: str) -> bool | None:
    """Whether the stage's last recorded run finished; None when it has no record."""
    entry = _records(recipe).get(stage)
    return None if entry is None else entry["finished"]


def record(recipe: Recipe, stage: str, files: dict[str, str], *, finished: bool) -> None:
    """Write what ``stage`` read (``files``, its :func:`fingerprint` when it started) and whether
    that run finished into the run's record (atomically)."""
    records = _records(recipe)
    records[stage] = {"files": files, "finished": finished}
    path = recipe.run_dir / RECORD
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)


def _records(recipe: Recipe) -> dict[str, dict]:
    path = recipe.run_dir / RECORD
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError:
        records = None
    if not isinstance(records, dict):
        return {}  # a damaged record is rewritten: the finished stages count as unrecorded
    return {stage: entry for stage, entry in records.items()
            if isinstance(entry, dict) and isinstance(entry.get("files"), dict)
            and isinstance(entry.get("finished"), bool)}
