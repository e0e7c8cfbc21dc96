"""Search backends of the browser tool, behind one small interface: a local document index
(SQLite FTS5 over a folder of text, Markdown, HTML and, with pypdf, PDF) and SearXNG's JSON
API."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote, urlencode, urlsplit

from .fetch import FetchError, fetch
from .pages import Page, html_to_page, pdf_available, pdf_to_page, strip_links, text_to_page

logger = logging.getLogger(__name__)

INDEX_EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
SCHEMA_VERSION = "1"


@dataclass
class SearchHit:
    """One search result."""

    url: str
    title: str
    snippet: str


class SearchBackend(Protocol):
    """What the browser needs from a search backend."""

    source: str  # the name the model passes as ``source`` ("local", "web")

    def search(self, query: str, topn: int, timeout_s: float) -> list[SearchHit]:
        """Up to ``topn`` hits, best first; raises FetchError/ValueError with a message."""
        ...


def local_url(rel: str) -> str:
    """The URL of an indexed document (relative path; the server's folders stay private)."""
    return "local://" + quote(rel)


class LocalIndex:
    """A folder of documents in SQLite FTS5, brought up to date (changed files only) before
    each search. ``db``: where the index lives (default: under the user's cache)."""

    source = "local"

    def __init__(self, folder: Path, db: Path | None = None, max_bytes: int = 5_000_000) -> None:
        from .._paths import home

        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"browser index {folder} is not a folder")
        digest = hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]
        self.db_path = Path(db) if db is not None else home() / "browser-index" / f"{digest}.sqlite"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.pdf = pdf_available()
        if not self.pdf:
            logger.info("browser index: PDF files are skipped (install pypdf to index them)")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False)
        self._setup()

    def _setup(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)")
        row = db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            db.executescript("DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS docs;")
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS files(
                id INTEGER PRIMARY KEY, path TEXT UNIQUE, mtime_ns INTEGER, size INTEGER,
                title TEXT);
            CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(
                title, body, tokenize='porter unicode61');
            """
        )
        db.execute("INSERT OR REPLACE INTO meta VALUES('version', ?)", (SCHEMA_VERSION,))
        db.commit()

    def _scan(self) -> dict[str, tuple[int, int]]:
        """Indexable files under the folder: relative path -> (mtime_ns, size). Plain
        ``os.scandir`` (pathlib costs more than the stat calls here); hidden names and
        symlinked folders are skipped."""
        found: dict[str, tuple[int, int]] = {}
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                entries = os.scandir(os.path.join(self.folder, rel_dir))
            except OSError:
                continue
            with entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(rel)
                        elif entry.name.lower().endswith(INDEX_EXTENSIONS) and (
                            self.pdf or not entry.name.lower().endswith(".pdf")
                        ):
                            st = entry.stat()
                            found[rel] = (st.st_mtime_ns, st.st_size)
                    except OSError:
                        continue
        return found

    def refresh(self) -> int:
        """Re-index what changed since the last call; the number of files (re)indexed."""
        with self._lock:
            found = self._scan()
            db = self._db
            known = {
                p: (m, s, i)
                for i, p, m, s in db.execute("SELECT id, path, mtime_ns, size FROM files")
            }
            changed = 0
            for rel, (_, _, fid) in known.items():
                if rel not in found:
                    db.execute("DELETE FROM docs WHERE rowid=?", (fid,))
                    db.execute("DELETE FROM files WHERE id=?", (fid,))
            for rel, (mtime, size) in found.items():
                old = known.get(rel)
                if old is not None and old[:2] == (mtime, size):
                    continue
                page = self._read(rel)
                if old is not None:
                    db.execute("DELETE FROM docs WHERE rowid=?", (old[2],))
                    db.execute("DELETE FROM files WHERE id=?", (old[2],))
                # an unreadable file is remembered too (no text), so it is not re-read until
                # it changes
                cur = db.execute(
                    "INSERT INTO files(path, mtime_ns, size, title) VALUES(?,?,?,?)",
                    (rel, mtime, size, page.title if page is not None else None),
                )
                if page is not None:
                    db.execute(
                        "INSERT INTO docs(rowid, title, body) VALUES(?,?,?)",
                        (cur.lastrowid, page.title, strip_links(page.text)),
                    )
                changed += 1
            db.commit()
        if changed:
            logger.info("browser index %s: %d file(s) (re)indexed", self.folder, changed)
        return changed

    def _read(self, rel: str) -> Page | None:
        """An indexed file as a page (None if unreadable)."""
        path = self.folder / rel
        try:
            with open(path, "rb") as f:
                data = f.read(self.max_bytes)
        except OSError as exc:
            logger.warning("browser index: cannot read %s: %s", path, exc)
            return None
        url = local_url(rel)
        if rel.lower().endswith((".html", ".htm")):
            return html_to_page(data, url)
        if rel.lower().endswith(".pdf"):
            try:
                return pdf_to_page(data, url)
            except ValueError as exc:
                logger.warning("browser index: %s: %s", path, exc)
                return None
        return text_to_page(data.decode("utf-8", "replace"), url)

    def search(self, query: str, topn: int, timeout_s: float) -> list[SearchHit]:
        """Documents matching any word of ``query``, ranked by BM25 (titles weigh more)."""
        self.refresh()
        words = re.findall(r"\w+", query.lower())
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', "") + '"' for w in words)
        with self._lock:
            rows = self._db.execute(
                "SELECT files.path, files.title, snippet(docs, 1, '', '', '…', 24) "
                "FROM docs JOIN files ON files.id = docs.rowid WHERE docs MATCH ? "
                "ORDER BY bm25(docs, 5.0, 1.0) LIMIT ?",
                (match, topn),
            ).fetchall()
        return [SearchHit(local_url(p), t, " ".join(s.split())) for p, t, s in rows]

    def open(self, url: str) -> Page:
        """An indexed document by its ``local://`` URL (only indexed files can be opened)."""
        rel = unquote(urlsplit(url).netloc + urlsplit(url).path)
        self.refresh()
        with self._lock:
            row = self._db.execute("SELECT 1 FROM files WHERE path=?", (rel,)).fetchone()
        page = self._read(rel) if row else None
        if page is None:
            raise FetchError(f"no document {url} in the local index")
        return page

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


class SearxngSearch:
    """SearXNG's JSON API (``/search?q=...&format=json``; JSON must be enabled in its
    ``settings.yml`` under ``search.formats``). The operator configures its URL, so it may
    be on a private address."""

    source = "web"

    def __init__(self, url: str, max_bytes: int = 5_000_000) -> None:
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/search") else base + "/search"
        self.max_bytes = max_bytes

    def search(self, query: str, topn: int, timeout_s: float) -> list[SearchHit]:
        """The first ``topn`` results (title, URL, content)."""
        url = f"{self.endpoint}?{urlencode({'q': query, 'format': 'json'})}"
        t0 = time.monotonic()
        try:
            resp = fetch(
                url,
                allow_private=True,
                timeout_s=timeout_s,
                max_bytes=self.max_bytes,
                max_redirects=2,
                accept="application/json",
            )
        except FetchError as exc:
            if "HTTP 403" in str(exc):
                raise FetchError(
                    "the search service refused the JSON API (SearXNG: enable `json` under "
                    "search.formats in settings.yml)"
                ) from exc
            raise
        try:
            data = json.loads(resp.body.decode(resp.charset or "utf-8", "replace"))
            results = data["results"]
            hits = [
                SearchHit(
                    str(r["url"]), str(r.get("title") or r["url"]), str(r.get("content") or "")
                )
                for r in results
                if isinstance(r, dict) and str(r.get("url", "")).startswith(("http://", "https://"))
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"the search service sent an unexpected answer: {exc}") from exc
        logger.debug("searxng %r: %d results in %.3fs", query, len(hits), time.monotonic() - t0)
        return hits[:topn]
