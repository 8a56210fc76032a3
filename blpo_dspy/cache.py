"""Persistent LM-result stores (SQLite, WAL mode, safe for threads and for concurrent processes).

- ``VerbalizationCache``: key = SHA-256 of the image bytes, the I2T instruction, the model id, the decoding
  parameters and the task's text fields. No image is verbalized twice under one instruction within a compile, or
  across compiles that share the file one after the other. Compiles running at the same time share what either
  has stored, but both may verbalize a pair that neither has stored yet (the first write wins; nothing is lost).
- ``CallJournal``: every finished judge and proposer result of a compile, keyed by the full content of the call.
  A killed compile re-runs deterministically and finds every finished call here, so resuming repeats none.

Values are JSON; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dspy

from blpo_dspy.images import image_sha256

SQLITE_TIMEOUT_S = 60.0
_DECODING_KEYS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "top_k", "seed", "n", "rollout_id")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""


def content_key(*parts: Any) -> str:
    """A stable SHA-256 key over JSON-serialisable parts; a ``dspy.Image`` counts by the SHA-256 of its bytes."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=_key_part)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _key_part(value: Any) -> Any:
    if isinstance(value, dspy.Image):
        return {"image_sha256": image_sha256(value)}  # a LazyImage answers without reading its file
    return str(value)


def lm_identity(lm: dspy.LM | None) -> dict[str, Any]:
    """Model id and decoding parameters of an LM (never credentials or endpoints)."""
    if lm is None:
        return {"model": None}
    kwargs = getattr(lm, "kwargs", {}) or {}
    decoding = {k: kwargs[k] for k in _DECODING_KEYS if k in kwargs and kwargs[k] is not None}
    return {"model": getattr(lm, "model", type(lm).__name__), "decoding": decoding}


def _retry_locked(statement: Callable[[], Any], path: Path) -> None:
    """Run a statement that SQLite may refuse at once with "database is locked" while other processes open the file.

    Switching a new file to WAL mode needs an exclusive lock and SQLite does not wait for it (its busy handler is not
    called), so several processes opening one new file at the same time fail without this retry (jittered, up to
    ``SQLITE_TIMEOUT_S``).
    """
    deadline = time.monotonic() + SQLITE_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            statement()
            return
        except sqlite3.DatabaseError as exc:
            if not (isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)) or time.monotonic() > deadline:
                raise type(exc)(f"{path.name}: {exc}") from exc
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.5)


class SQLiteStore:
    """A namespaced key -> JSON value store in one SQLite file (WAL mode, a pool of connections shared by threads).

    Connections are pooled rather than kept per thread: the parallel batches of a compile run on short-lived
    threads, and opening a connection (with its pragmas) for each of them would cost more than the query.

    Args:
        path: The database file (created with its parent directory).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._idle.put(self._open())  # create the schema eagerly so errors surface here

    def __deepcopy__(self, memo: dict[int, Any]) -> SQLiteStore:
        return self

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("stores are not picklable; pass the path instead")

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=SQLITE_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"), self.path)
            conn.execute("PRAGMA synchronous=NORMAL")
            _retry_locked(lambda: conn.executescript(_SCHEMA), self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._open()
        try:
            yield conn
        finally:
            self._idle.put(conn)

    def get(self, namespace: str, key: str) -> Any | None:
        """The stored value, or ``None``."""
        with self._connection() as conn:
            row = conn.execute("SELECT value FROM entries WHERE namespace = ? AND key = ?", (namespace, key)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, namespace: str, key: str, value: Any) -> None:
        """Store a value (first writer wins: an existing entry is kept)."""
        with self._connection() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO entries(namespace, key, value, created) VALUES (?, ?, ?, ?)",
                (namespace, key, json.dumps(value, ensure_ascii=False), time.time()),
            )

    def count(self, namespace: str) -> int:
        """Number of entries in a namespace."""
        with self._connection() as conn:
            return conn.execute("SELECT COUNT(*) FROM entries WHERE namespace = ?", (namespace,)).fetchone()[0]

    def close(self) -> None:
        """Close the idle connections (a later call opens new ones)."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class VerbalizationCache:
    """Verbalizations keyed by (image SHA-256, instruction, model id, decoding parameters, text fields).

    Args:
        path: SQLite file; share one file between compiles to share verbalizations.
    """

    namespace = "verbalization"

    def __init__(self, path: str | Path) -> None:
        self.store = SQLiteStore(path)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> VerbalizationCache:
        return self

    @staticmethod
    def key(
        *, image_sha256: str, instruction: str, lm: dspy.LM | None, text_fields: Mapping[str, str] | None = None
    ) -> str:
        """The cache key of one verbalization."""
        return content_key("v1", image_sha256, instruction, lm_identity(lm), dict(text_fields or {}))

    def get(self, key: str) -> str | None:
        """A cached description, counting hits and misses."""
        value = self.store.get(self.namespace, key)
        with self._lock:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        return None if value is None else value["description"]

    def put(self, key: str, description: str, *, image_sha256: str, instruction: str, model: str | None) -> None:
        """Store a description with its provenance."""
        self.store.put(
            self.namespace,
            key,
            {"description": description, "image_sha256": image_sha256, "instruction": instruction, "model": model},
        )

    def close(self) -> None:
        """Close the idle connections (a later call opens new ones)."""
        self.store.close()

    def get_or_compute(
        self,
        *,
        image: dspy.Image,
        instruction: str,
        lm: dspy.LM | None,
        text_fields: Mapping[str, str],
        compute: Callable[[], str],
    ) -> dspy.Prediction:
        """Return the cached description or compute, store and return it."""
        digest = image_sha256(image)
        key = self.key(image_sha256=digest, instruction=instruction, lm=lm, text_fields=text_fields)
        cached = self.get(key)
        if cached is not None:
            return dspy.Prediction(description=cached, cached=True)
        description = compute()
        self.put(key, description, image_sha256=digest, instruction=instruction, model=lm_identity(lm)["model"])
        stored = self.store.get(self.namespace, key)  # first writer wins: return what every caller will read
        return dspy.Prediction(description=stored["description"] if stored else description, cached=False)

    def __len__(self) -> int:
        return self.store.count(self.namespace)


class CallJournal:
    """Finished judge/proposer results of one compile, keyed by call content (for resume without repeats).

    Args:
        path: SQLite file in the run directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.store = SQLiteStore(path)

    def __deepcopy__(self, memo: dict[int, Any]) -> CallJournal:
        return self

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """A finished result or ``None``."""
        return self.store.get(kind, key)

    def put(self, kind: str, key: str, value: Mapping[str, Any]) -> None:
        """Record a finished result (before it is used)."""
        self.store.put(kind, key, dict(value))

    def close(self) -> None:
        """Close the idle connections (a later call opens new ones)."""
        self.store.close()
