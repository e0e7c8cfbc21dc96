"""The built-in ``browser`` tool: ``search``, ``open`` and ``find`` as in OpenAI's gpt-oss
reference (``simple_browser``): every display gets a cursor, pages are line-numbered, links
are ``【id†text】`` and the model cites ``【cursor†Lstart-Lend】``. Pages are kept per
conversation (bounded)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from .fetch import FetchError, FetchTimeout, fetch
from .options import BuiltinToolOptions
from .pages import (
    Page,
    domain_of,
    html_to_page,
    pdf_available,
    pdf_to_page,
    strip_links,
    text_to_page,
)
from .results import ToolCall, ToolResult
from .search import LocalIndex, SearchBackend, SearchHit, SearxngSearch

logger = logging.getLogger(__name__)

CITATION_PATTERN = re.compile(r"【(?P<cursor>\d+)†(?P<content>[^†】]+)(?:†[^†】]+)?】")
FIND_LINK_FORMAT = "# 【{idx}†{title}】"
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript")
PARAMS = {
    "search": {"query", "topn", "top_n", "source"},
    "open": {"id", "cursor", "loc", "num_lines", "view_source", "source"},
    "find": {"pattern", "cursor"},
}


class UsageError(Exception):
    """A call the tool cannot carry out; the message is for the model."""


@dataclass
class _State:
    """One conversation's browsing: the displays by cursor, and fetched pages by URL."""

    stack: list[Page | None] = field(default_factory=list)  # None: dropped (too old)
    # cursor -> (URL, title) a citation of that display points at (URL None: nothing)
    cite: list[tuple[str | None, str]] = field(default_factory=list)
    cache: OrderedDict[str, Page] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, page: Page, max_pages: int) -> int:
        self.stack.append(page)
        self.cite.append((page.cite_url, page.cite_title or page.title))
        live = [i for i, p in enumerate(self.stack) if p is not None]
        for i in live[: max(0, len(live) - max_pages)]:
            self.stack[i] = None
        return len(self.stack) - 1

    def page(self, cursor: int) -> Page:
        if not self.stack:
            raise UsageError("No pages to access!")
        if cursor == -1:
            cursor = len(self.stack) - 1
        if not 0 <= cursor < len(self.stack):
            raise UsageError(
                f"Cursor `{cursor}` is out of range. "
                f"Available cursor indices: [0 - {len(self.stack) - 1}]."
            )
        page = self.stack[cursor]
        if page is None:
            raise UsageError(f"Page at cursor `{cursor}` is no longer kept; open it again by URL.")
        return page


def _int(args: dict[str, Any], name: str, default: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"`{name}` should be an integer, not `{type(value).__name__}`")
    try:
        number = float(value)
    except ValueError as exc:
        raise UsageError(f"`{name}` should be an integer, not {value!r}") from exc
    if number != int(number):
        raise UsageError(f"`{name}` should be an integer, not {value!r}")
    return int(number)


class Browser:
    """The browser tool of one engine or server: backends from the options, state per
    conversation (thread-safe)."""

    def __init__(self, options: BuiltinToolOptions) -> None:
        self.opts = options
        self.backends: list[SearchBackend] = []
        self.index: LocalIndex | None = None
        if options.browser_index is not None:
            self.index = LocalIndex(
                options.browser_index, options.browser_index_db, options.fetch_max_bytes
            )
            self.index.refresh()  # built (or brought up to date) at startup, not on a call
            self.backends.append(self.index)
        if options.search_url is not None:
            self.backends.append(SearxngSearch(options.search_url, options.fetch_max_bytes))
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._lock = threading.Lock()

    # -- declaration --------------------------------------------------------------------------
    def namespace(self) -> Any:
        """Harmony's ``browser`` namespace with the reference's descriptions; ``sources=``
        lists this server's search backends."""
        from openai_harmony import ToolNamespaceConfig

        config = ToolNamespaceConfig.browser()
        sources = [b.source for b in self.backends] or ["web"]
        config.description = (
            "Tool for browsing.\n"
            "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
            "Cite information from the tool using the following format:\n"
            "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
            "Do not quote more than 10 words directly from the tool output.\n"
            f"sources={', '.join(sources)} (default: {sources[0]})"
        )
        return config

    # -- calls --------------------------------------------------------------------------------
    def _state(self, session: str) -> _State:
        with self._lock:
            state = self._states.pop(session, None) or _State()
            self._states[session] = state  # most recently used last
            while len(self._states) > self.opts.browser_max_sessions:
                self._states.popitem(last=False)
            return state

    def run(self, call: ToolCall, timeout: float | None = None) -> ToolResult:
        """One ``browser.*`` call; errors become the tool's message to the model."""
        t0 = time.monotonic()
        action = call.recipient.split(".", 1)[1] if "." in call.recipient else ""
        timeout_s = (
            self.opts.fetch_timeout_s
            if timeout is None
            else min(timeout, self.opts.fetch_timeout_s)
        )
        details: dict[str, Any] = {"action": {"type": action}, "sources": []}
        status = "completed"
        try:
            if action not in PARAMS:
                raise UsageError(
                    f"Unknown browser function `{action}`: use browser.search, browser.open "
                    "or browser.find."
                )
            args = self._arguments(call.arguments, action)
            state = self._state(call.session)
            with state.lock:
                if action == "search":
                    text = self._search(state, args, details, timeout_s)
                elif action == "open":
                    text = self._open(state, args, details, timeout_s)
                else:
                    text = self._find(state, args, details)
        except FetchTimeout as exc:
            text, status = f"Error: {exc}", "incomplete"
        except (UsageError, FetchError) as exc:
            text, status = str(exc), "failed"
        return ToolResult(call.recipient, text, status, time.monotonic() - t0, details)

    def _arguments(self, raw: str, action: str) -> dict[str, Any]:
        if not raw.strip():
            args: Any = {}
        else:
            try:
                args = json.loads(raw)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise UsageError(
                f"Invalid arguments for browser.{action}: expected a JSON object, for example "
                + {
                    "search": '{"query": "..."}',
                    "open": '{"id": 0, "cursor": 1} or {"id": "https://..."}',
                    "find": '{"pattern": "..."}',
                }[action]
            )
        unknown = set(args) - PARAMS[action]
        if unknown:
            raise UsageError(
                f"Unknown argument(s) {', '.join(sorted(map(str, unknown)))} for browser.{action}; "
                f"it takes {', '.join(sorted(PARAMS[action]))}."
            )
        return args

    def _search(
        self, state: _State, args: dict[str, Any], details: dict[str, Any], timeout_s: float
    ) -> str:
        query = args.get("query")
        if not isinstance(query, str) or not query.strip():
            raise UsageError("browser.search needs a non-empty `query` string.")
        details["action"]["query"] = query
        if not self.backends:
            raise UsageError("Search is not available here (no search backend is configured).")
        source = args.get("source")
        backend = self.backends[0]
        if source:
            named = [b for b in self.backends if b.source == source]
            if not named:
                have = ", ".join(b.source for b in self.backends)
                raise UsageError(f"Unknown source `{source}`; available: {have}.")
            backend = named[0]
        topn = _int(args, "topn", _int(args, "top_n", self.opts.browser_max_results))
        topn = max(1, min(topn, self.opts.browser_max_results))
        try:
            hits = backend.search(query, topn, timeout_s)
        except FetchTimeout:
            raise
        except FetchError as exc:
            raise FetchError(f"Error during search for `{query}`: {exc}") from exc
        details["sources"] = [{"type": "url", "url": h.url} for h in hits]
        page = self._results_page(query, hits)
        return self._show(state, page, state.add(page, self.opts.browser_max_pages), 0, -1)

    @staticmethod
    def _results_page(query: str, hits: list[SearchHit]) -> Page:
        lines = ["# Search Results", ""]
        for i, h in enumerate(hits):
            title = (
                " ".join(h.title.split()).replace("†", "‡").replace("【", "〖").replace("】", "〗")
            )
            snippet = " ".join(h.snippet.split()).replace("【", "〖").replace("】", "〗")
            lines.append(f"* 【{i}†{title or h.url}†{domain_of(h.url)}】 {snippet}".rstrip())
        if not hits:
            lines.append(f"No results for `{query}`.")
        return Page(
            url="",
            title=query,
            text="\n".join(lines),
            urls={str(i): h.url for i, h in enumerate(hits)},
            snippets={str(i): None for i in range(len(hits))},
        )

    def _open(
        self, state: _State, args: dict[str, Any], details: dict[str, Any], timeout_s: float
    ) -> str:
        target = args.get("id", -1)
        cursor = _int(args, "cursor", -1)
        loc = _int(args, "loc", -1)
        num_lines = _int(args, "num_lines", -1)
        view_source = bool(args.get("view_source", False))
        if isinstance(target, str) and target.strip().lstrip("-").isdigit():
            target = int(target)  # "3" is a link id, not a URL
        if isinstance(target, float) and target == int(target):
            target = int(target)
        line: int | None = None
        refresh = False
        if isinstance(target, str):  # a URL: fetched again (the reference's refresh)
            url, page, refresh = target.strip(), None, True
        elif isinstance(target, int) and not isinstance(target, bool):
            current = state.page(cursor)
            if target >= 0:  # follow a link
                url = current.urls.get(str(target), "")
                if not url:
                    raise UsageError(f"Invalid link id `{target}`.")
                line = (current.snippets or {}).get(str(target))
                page = None
            else:  # scroll the page at `cursor`
                url, page = current.url, current
        else:
            raise UsageError("`id` should be a link number or a URL string.")
        details["action"] = {"type": "open_page", "url": url}
        if page is None or view_source:
            page = self._fetch(state, url, view_source, timeout_s, refresh)
        if page.cite_url:
            details["sources"] = [{"type": "url", "url": page.cite_url}]
        if loc < 0:
            loc = max(0, line - 4) if line is not None and line > 4 else (line or 0)
        return self._show(state, page, state.add(page, self.opts.browser_max_pages), loc, num_lines)

    def _fetch(
        self, state: _State, url: str, view_source: bool, timeout_s: float, refresh: bool
    ) -> Page:
        """The page at ``url``: from this conversation's cache unless ``refresh``."""
        key = ("view-source:" if view_source else "") + url
        if key in state.cache and not refresh:
            state.cache.move_to_end(key)
            return state.cache[key]
        t0 = time.monotonic()
        if url.startswith("local://"):
            if self.index is None:
                raise FetchError(f"Error fetching URL `{url}`: there is no local index here")
            try:
                page = self.index.open(url)
            except FetchError as exc:
                raise FetchError(f"Error fetching URL `{url[:1024]}`: {exc}") from exc
        else:
            try:
                got = fetch(
                    url,
                    allow_private=self.opts.browser_allow_private,
                    timeout_s=timeout_s,
                    max_bytes=self.opts.fetch_max_bytes,
                    max_redirects=self.opts.max_redirects,
                )
            except FetchError as exc:
                raise type(exc)(f"Error fetching URL `{url[:1024]}`: {exc}") from exc
            ctype = got.content_type
            if view_source or (ctype.startswith(TEXT_TYPES) and "html" not in ctype):
                text = got.body.decode(got.charset or "utf-8", "replace")
                page = text_to_page(text, got.url, title=None if not view_source else got.url)
            elif "html" in ctype:
                page = html_to_page(got.body, got.url, got.charset)
            elif ctype == "application/pdf":
                page = self._pdf(got.body, got.url, got.truncated, url)
            else:
                raise FetchError(
                    f"Error fetching URL `{url[:1024]}`: unsupported content type {ctype} "
                    "(the browser reads HTML, text and PDF)"
                )
            if got.truncated:
                page.text += f"\n\n[... page truncated at {self.opts.fetch_max_bytes} bytes ...]"
            logger.info(
                "browser fetched %s (%d bytes) in %.3fs",
                got.url,
                len(got.body),
                time.monotonic() - t0,
            )
        state.cache[key] = page
        while len(state.cache) > self.opts.browser_max_pages:
            state.cache.popitem(last=False)
        return page

    def _pdf(self, body: bytes, final_url: str, truncated: bool, url: str) -> Page:
        if not pdf_available():
            raise FetchError(
                f"Error fetching URL `{url[:1024]}`: this server cannot read PDFs (the "
                "optional pypdf package is not installed)"
            )
        if truncated:
            raise FetchError(
                f"Error fetching URL `{url[:1024]}`: the PDF is larger than "
                f"{self.opts.fetch_max_bytes} bytes"
            )
        try:
            return pdf_to_page(body, final_url)
        except ValueError as exc:
            raise FetchError(f"Error fetching URL `{url[:1024]}`: {exc}") from exc

    def _find(self, state: _State, args: dict[str, Any], details: dict[str, Any]) -> str:
        pattern = args.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise UsageError("browser.find needs a non-empty `pattern` string.")
        page = state.page(_int(args, "cursor", -1))
        details["action"] = {"type": "find", "pattern": pattern, "url": page.cite_url or page.url}
        if page.snippets is not None:
            raise UsageError("Cannot run `find` on search results page or find results page")
        needle = pattern.lower()
        lines = strip_links("\n".join(page.lines)).split("\n")
        chunks: list[str] = []
        urls: dict[str, str] = {}
        snippets: dict[str, int | None] = {}
        i = 0
        while i < len(lines) and len(chunks) < 50:
            if needle not in lines[i].lower():
                i += 1
                continue
            n = len(chunks)
            title = FIND_LINK_FORMAT.format(idx=n, title=f"match at L{i}")
            chunks.append(title + "\n" + "\n".join(lines[i : i + 4]))
            urls[str(n)], snippets[str(n)] = page.url, i
            i += 4
        text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
        result = Page(
            url=f"{page.url}/find?pattern={quote(pattern)}",
            title=f"Find results for text: `{pattern}` in `{page.title}`",
            text=text,
            urls=urls,
            snippets=snippets,
            cite_url=page.cite_url,
            cite_title=page.title,
        )
        if page.cite_url:
            details["sources"] = [{"type": "url", "url": page.cite_url}]
        if page.url not in state.cache and page.url:
            state.cache[page.url] = page  # find results link back to it
        return self._show(state, result, state.add(result, self.opts.browser_max_pages), 0, -1)

    def _show(self, state: _State, page: Page, cursor: int, loc: int, num_lines: int) -> str:
        """The reference's display: ``[cursor] title (url)``, the scrollbar, numbered lines."""
        lines = page.lines
        total = len(lines)
        if loc >= total:
            state.stack.pop()
            state.cite.pop()
            raise UsageError(
                f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {total - 1}."
            )
        if num_lines <= 0:
            end, used = loc, 0
            while end < total and (
                end == loc or used + len(lines[end]) + 8 <= self.opts.browser_view_chars
            ):
                used += len(lines[end]) + 8
                end += 1
        else:
            end = min(total, loc + num_lines)
        body = "\n".join(f"L{i}: {lines[i]}" for i in range(loc, end))
        header = page.title
        if page.url:
            shown = unquote(page.url)
            header += f" ({shown[:1021] + '...' if len(shown) > 1024 else shown})"
        return (
            f"[{cursor}] {header}\n**viewing lines [{loc} - {end - 1}] of {total - 1}**\n\n{body}"
        )

    # -- citations ----------------------------------------------------------------------------
    def annotate(self, session: str, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Replace ``【cursor†...】`` citations by `` ([domain](url)) `` and return the
        ``url_citation`` annotations (indices into the new text), as the reference does."""
        with self._lock:
            state = self._states.get(session)
        if state is None:
            return text, []
        out: list[str] = []
        annotations: list[dict[str, Any]] = []
        last = n = 0
        for m in CITATION_PATTERN.finditer(text):
            out.append(text[last : m.start()])
            n += m.start() - last
            cursor = int(m.group("cursor"))
            url, title = state.cite[cursor] if cursor < len(state.cite) else (None, "")
            if url:
                domain = domain_of(url)
                replacement = f" ([{domain}]({url})) "
                annotations.append(
                    {
                        "type": "url_citation",
                        "start_index": n,
                        "end_index": n + len(replacement),
                        "url": url,
                        "title": title or domain,
                    }
                )
            else:
                replacement = m.group(0)
            out.append(replacement)
            n += len(replacement)
            last = m.end()
        out.append(text[last:])
        return "".join(out), annotations

    def end_session(self, session: str) -> None:
        """Forget a conversation's pages."""
        with self._lock:
            self._states.pop(session, None)

    def close(self) -> None:
        """Drop every conversation and close the index."""
        with self._lock:
            self._states.clear()
        if self.index is not None:
            self.index.close()


__all__ = ["Browser"]
