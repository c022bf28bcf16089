"""Record and replay a black-box teacher's answers in SQLite.

Each request (one prompt) is keyed by the sha256 of (teacher name, prompt, sampling parameters,
n, logprobs), so a recorded run can be replayed offline and reproducibly, and an interrupted or
budget-limited run resumes by asking only for what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

from kdistill.blackbox.backends import BlackBoxError, Completion, SamplingParams, TextTeacher, _check_request
from kdistill.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ReplayMode = Literal["record", "replay", "auto"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,
    prompt TEXT NOT NULL,
    params TEXT NOT NULL,
    n INTEGER NOT NULL,
    logprobs INTEGER,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


_COLUMNS = ["key", "teacher", "prompt", "params", "n", "logprobs", "response", "created"]


def _check_recording(path: Path, *, must_exist: bool) -> None:
    """Refuse, without writing to it, a ``path`` that is not a kdistill recording: a folder, a file
    that is not SQLite, or a database with other tables. A missing or empty file is a new recording
    unless ``must_exist`` (replaying)."""
    if path.is_dir():
        raise DataError(f"replay file {path} is a folder, not a recording")
    if not path.is_file() or path.stat().st_size == 0:
        if must_exist:
            raise DataError(f"replay file {path} {'is empty' if path.is_file() else 'does not exist'}: "
                            "nothing to replay")
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            columns = [row[1] for row in db.execute("PRAGMA table_info(records)")]
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise DataError(f"replay file {path} is not a kdistill recording (not SQLite: {exc})") from None
    if "records" not in tables and (tables or must_exist):
        raise DataError(f"replay file {path} is not a kdistill recording (its tables: {', '.join(tables) or 'none'})")
    if "records" in tables and columns != _COLUMNS:
        raise DataError(f"replay file {path} is not a kdistill recording (its records table has columns "
                        f"{', '.join(columns)})")


def request_key(teacher: str, prompt: str, params: SamplingParams, n: int, logprobs: int | None) -> str:
    """The sha256 hex digest identifying one request."""
    payload = json.dumps([teacher, prompt, params.to_dict(), n, logprobs], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ReplayTeacher:
    """A :class:`TextTeacher` that stores every request and answer of ``inner`` in the SQLite file ``path``.

    Modes: ``"auto"`` answers from the file and asks ``inner`` only for misses; ``"record"`` always
    asks ``inner`` and overwrites the file's answers; ``"replay"`` answers only from the file (a miss
    raises :class:`BlackBoxError`) and needs no ``inner``. Records are keyed by the teacher's
    ``name`` (``inner.name``, or ``name``, or the only teacher recorded in the file).

    When ``inner`` fails with results in ``.partial`` (e.g. :class:`BudgetExhausted`), those are
    stored before the error is re-raised with ``.partial`` covering this call's prompts. Safe to
    use from several threads (one connection behind a lock; concurrent misses of the same request
    may both reach ``inner``, the first stored answer wins and is what both return).
    """

    def __init__(
        self, inner: TextTeacher | None, path: str | Path, mode: ReplayMode = "auto", *, name: str | None = None
    ) -> None:
        if mode not in ("record", "replay", "auto"):
            raise ConfigError(f"replay mode must be 'record', 'replay' or 'auto', not {mode!r}")
        if inner is None and mode != "replay":
            raise ConfigError(f"replay mode {mode!r} needs an inner teacher")
        self.inner, self.mode, self.path = inner, mode, Path(path)
        _check_recording(self.path, must_exist=mode == "replay")  # before anything is written into it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            if mode == "replay":  # read only: a replayed file is never changed
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                           check_same_thread=False, timeout=30)
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(_SCHEMA)
                self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"replay file {self.path} is not a usable SQLite database: {exc}") from exc
        self.name = name or (inner.name if inner is not None else self._only_teacher())
        self.hits = 0
        self.misses = 0

    def _only_teacher(self) -> str:
        names = [row[0] for row in self._db.execute("SELECT DISTINCT teacher FROM records ORDER BY teacher")]
        if len(names) != 1:
            found = ", ".join(repr(n) for n in names) or "none"
            raise ConfigError(f"replay file {self.path} holds teachers {found}: pass name= to choose one")
        return names[0]

    def __repr__(self) -> str:
        return f"ReplayTeacher(name={self.name!r}, path={str(self.path)!r}, mode={self.mode!r})"

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records WHERE teacher = ?", (self.name,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ReplayTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- storage -------------------------------------------------------------------------------

    def _load(self, keys: list[str]) -> dict[str, list[Completion]]:
        found: dict[str, list[Completion]] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite limits the number of parameters
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for key, response in self._db.execute(
                        f"SELECT key, response FROM records WHERE key IN ({marks})", chunk):
                    found[key] = [Completion.from_dict(d) for d in json.loads(response)]
        return found

    def _store(self, rows: list[tuple[str, str, list[Completion]]], params: SamplingParams, n: int,
               logprobs: int | None, replace: bool) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        now = time.time()
        data = [(key, self.name, prompt, json.dumps(params.to_dict()), n, logprobs,
                 json.dumps([c.to_dict() for c in completions]), now) for key, prompt, completions in rows]
        with self._lock:
            with self._db:  # one transaction
                self._db.executemany(f"{verb} INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)", data)

    # ---- TextTeacher ---------------------------------------------------------------------------

    def complete(
        self, prompts: list[str], params: SamplingParams, n: int = 1, logprobs: int | None = None
    ) -> list[list[Completion]]:
        """Per prompt, ``n`` samples: stored ones, and ``inner``'s for the rest (see the class docstring)."""
        _check_request(prompts, n, logprobs, max_logprobs=1 << 30)
        keys = [request_key(self.name, p, params, n, logprobs) for p in prompts]
        stored = {} if self.mode == "record" else self._load(sorted(set(keys)))
        missing: dict[str, str] = {}  # key → prompt, unique, in order
        for key, prompt in zip(keys, prompts):
            if key not in stored:
                missing.setdefault(key, prompt)
        with self._lock:
            self.hits += sum(key in stored for key in keys)
            self.misses += len(missing)
        if missing and self.mode == "replay":
            prompt = next(iter(missing.values()))
            raise BlackBoxError(f"replay miss in {self.path}: no record of teacher {self.name!r} for prompt "
                                f"{prompt[:40]!r} with these sampling parameters ({len(missing)} missing)")
        if missing:
            fresh = self._ask_inner(list(missing.items()), params, n, logprobs, keys, stored)
            stored.update(fresh)
        return [stored[key] for key in keys]

    def _ask_inner(self, missing: list[tuple[str, str]], params: SamplingParams, n: int, logprobs: int | None,
                   keys: list[str], stored: dict[str, list[Completion]]
                   ) -> dict[str, list[Completion]]:
        assert self.inner is not None
        replace = self.mode == "record"
        try:
            answers = self.inner.complete([p for _, p in missing], params, n=n, logprobs=logprobs)
        except BlackBoxError as exc:
            if exc.partial is None:
                raise
            got = [(key, prompt, done) for (key, prompt), done in zip(missing, exc.partial) if done is not None]
            self._store(got, params, n, logprobs, replace)
            logger.info("%s: stored %d partial answers before: %s", self.path, len(got), exc)
            merged = dict(stored)
            merged.update({key: done for key, _, done in got})
            raise type(exc)(str(exc), partial=[merged.get(key) for key in keys]) from exc
        if len(answers) != len(missing) or any(len(a) != n for a in answers):
            raise BlackBoxError(f"teacher {self.name!r} returned {len(answers)} answers for {len(missing)} prompts")
        self._store([(key, prompt, done) for (key, prompt), done in zip(missing, answers)], params, n, logprobs,
                    replace)
        if replace:
            return dict(zip((key for key, _ in missing), answers))
        return self._load([key for key, _ in missing])  # the first stored answer wins under concurrency
