"""Stored responses (``store: true``): an embedded SQLite database, so that
``previous_response_id`` continues a conversation after a restart.

One row per response: the response object, this request's input items and the whole
conversation that led to it (earlier items, this input), so a continuation rebuilds its
history from one row even when older responses were deleted. Each response is written in
one transaction; the database runs in WAL mode (readers never wait on the writer, a crash
mid-write leaves the last committed state). The file carries an application id and a
schema version: a foreign or corrupt file is a :class:`StoreError` at startup, never
overwritten.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

APP_ID = "mlx-harmony-core.responses"
VERSION = 1
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    context TEXT NOT NULL,
    tokens TEXT
);
"""


class StoreError(ValueError):
    """The database file cannot be used (foreign, corrupt, newer schema)."""


class ResponseStore:
    """Responses kept in the SQLite file at ``path`` (made on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._open()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path} is not a usable responses database ({exc}); move it away or "
                "choose another --responses-db"
            ) from None

    def _open(self) -> None:
        db = self.db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO meta VALUES ('app_id', ?), ('version', ?)", (APP_ID, VERSION)
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        else:
            meta: dict[str, str] = {}
            if "meta" in tables:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("app_id") != APP_ID:
                raise StoreError(
                    f"{self.path} is an SQLite database of something else (no "
                    f"{APP_ID!r} marker); it is left as it is: choose another --responses-db"
                )
            if int(meta.get("version", 0)) != VERSION:
                raise StoreError(
                    f"{self.path} has responses schema version {meta.get('version')}; this "
                    f"server reads version {VERSION}"
                )
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")

    def put(
        self,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        context: list[dict[str, Any]],
        tokens: dict[str, list[int]] | None = None,
    ) -> None:
        """Keep ``response`` (one transaction); ``tokens``: the prompt and reply token ids,
        which a continuation extends (None: re-render)."""
        row = (
            response["id"],
            int(response["created_at"]),
            json.dumps(response, ensure_ascii=False),
            json.dumps(input_items, ensure_ascii=False),
            json.dumps(context, ensure_ascii=False),
            None if tokens is None else json.dumps(tokens),
        )
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _row(self, response_id: str, columns: str) -> tuple[Any, ...] | None:
        with self._lock:
            cur = self.db.execute(f"SELECT {columns} FROM responses WHERE id = ?", (response_id,))
            return cur.fetchone()

    def get(self, response_id: str) -> dict[str, Any] | None:
        """The stored response, or None."""
        row = self._row(response_id, "response")
        return json.loads(row[0]) if row else None

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        """The input items of a stored response, or None."""
        row = self._row(response_id, "input_items")
        return json.loads(row[0]) if row else None

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every item of the conversation up to and including the response's output (what
        a continuation starts from), or None."""
        row = self._row(response_id, "context, response")
        if row is None:
            return None
        return [*json.loads(row[0]), *json.loads(row[1])["output"]]

    def tokens(self, response_id: str) -> dict[str, list[int]] | None:
        """The prompt and reply token ids of a stored response, or None."""
        row = self._row(response_id, "tokens")
        return json.loads(row[0]) if row and row[0] else None

    def delete(self, response_id: str) -> bool:
        """Remove a response; False if there was none."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = self.db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return cur.rowcount > 0

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self.db.close()
