"""Pages as the browser tool shows them: text with ``【id†text†domain】`` link markers, wrapped
to 80 columns and line-numbered, as in OpenAI's gpt-oss reference (``simple_browser``).
HTML becomes text with BeautifulSoup (``html.parser``: no compiled dependency)."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

LINK_PATTERN = re.compile(r"【\d+†(?P<content>[^†】]+)(?:†[^†】]+)?】")
PARTIAL_INITIAL_LINK_PATTERN = re.compile(r"^[^【】]*】")
PARTIAL_FINAL_LINK_PATTERN = re.compile(r"【\d*(?:†(?P<content>[^†】]*)(?:†[^†】]*)?)?$")
_WS = re.compile(r"[ \t\r\n\f\v]+")
_PRE = "\x01"  # marks lines inside <pre> whose indentation is kept
_GAP = "\n\x02\n"  # a paragraph break (an empty line); other block breaks are single newlines

SKIP_TAGS = {
    "script", "style", "noscript", "template", "svg", "head", "iframe", "object", "canvas",
    "math", "button", "select", "input", "textarea",
}  # fmt: skip
BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "header", "hr", "li", "main", "nav", "ol", "p",
    "pre", "section", "table", "tbody", "thead", "tfoot", "tr", "ul", "h1", "h2", "h3", "h4",
    "h5", "h6", "caption", "details", "summary",
}  # fmt: skip
PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "ul", "ol"}


@dataclass
class Page:
    """One browsing display: a fetched page, a search result list or find results."""

    url: str  # "" for search results; "<page>/find?pattern=..." for find results
    title: str
    text: str
    urls: dict[str, str] = field(default_factory=dict)  # link id -> URL
    # search / find results: link id -> line to open at (None: the page's top)
    snippets: dict[str, int | None] | None = None
    cite_url: str | None = None  # what a citation of this page points at (None: nothing)
    cite_title: str | None = None  # the cited page's title when not this one's (find results)
    _lines: list[str] | None = field(default=None, repr=False)

    @property
    def lines(self) -> list[str]:
        """The text wrapped to 80 columns (the line numbers the model sees and cites)."""
        if self._lines is None:
            self._lines = wrap_lines(self.text)
        return self._lines


def wrap_lines(text: str, width: int = 80) -> list[str]:
    """Wrap each line to ``width``; empty lines are kept (the reference's ``wrap_lines``)."""
    out: list[str] = []
    for line in text.split("\n"):
        if not line:
            out.append("")
            continue
        out += textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False)
    return out


def strip_links(text: str) -> str:
    """``【3†Title†domain】`` -> ``Title`` (partial markers at the edges too)."""
    text = PARTIAL_INITIAL_LINK_PATTERN.sub("", text)
    text = PARTIAL_FINAL_LINK_PATTERN.sub(lambda m: m.group("content") or "", text)
    return LINK_PATTERN.sub(lambda m: m.group("content"), text)


def domain_of(url: str) -> str:
    """``https://a.example/x`` -> ``a.example``; a local document -> its file name."""
    parts = urlsplit(url)
    if parts.scheme == "local":
        return unquote(parts.path.rsplit("/", 1)[-1] or parts.netloc)
    return parts.netloc


def _clean(text: str) -> str:
    """Page text may not fake link or citation markers."""
    return text.replace("【", "〖").replace("】", "〗").replace("\u200b", "")


def join_url(base: str, link: str) -> str:
    """``urljoin`` that also resolves relative links between local documents."""
    if base.startswith("local://") and "://" not in link:
        import posixpath

        link = link.split("#", 1)[0]
        if not link:
            return base
        rel = base[len("local://") :]
        path = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link)).lstrip("/")
        return "local://" + path
    return urljoin(base, link)


def html_to_page(html: str | bytes, url: str, encoding: str | None = None) -> Page:
    """Convert HTML to a :class:`Page`: links become ``【id†text(†domain)】`` (the domain
    only for other sites), images ``[Image n: alt]``, headings ``#``, list items ``*``."""
    from bs4 import BeautifulSoup, Comment, Declaration, Doctype, NavigableString, Tag
    from bs4.dammit import UnicodeDammit
    from bs4.element import ProcessingInstruction

    if isinstance(html, bytes):
        html = UnicodeDammit(html, [encoding] if encoding else [], is_html=True).unicode_markup
    soup = BeautifulSoup(_clean(html or ""), "html.parser")
    title_tag = soup.find("title")
    title = _WS.sub(" ", title_tag.get_text()).strip() if title_tag else ""
    for tag in soup.find_all(SKIP_TAGS):
        tag.decompose()

    urls: dict[str, str] = {}
    ids: dict[str, str] = {}
    here = domain_of(url)
    for a in soup.find_all("a", href=True):
        href = str(a["href"]).strip()
        text = _clean(_WS.sub(" ", a.get_text(" ")).strip()).replace("†", "‡")
        if href.startswith(("mailto:", "javascript:", "tel:", "data:")) or not text:
            continue
        if href.startswith("#"):
            a.replace_with(text)
            continue
        link = join_url(url, href)
        domain = domain_of(link)
        if urlsplit(link).scheme not in ("http", "https", "local") or not domain:
            a.replace_with(text)
            continue
        if link not in ids:
            ids[link] = str(len(urls))
            urls[ids[link]] = link
        marker = f"【{ids[link]}†{text}】" if domain == here else f"【{ids[link]}†{text}†{domain}】"
        a.replace_with(marker)
    for n, img in enumerate(soup.find_all("img")):
        alt = img.get("alt") or img.get("title")
        img.replace_with(f"[Image {n}: {_clean(str(alt))}]" if alt else f"[Image {n}]")
    for tag in soup.find_all(["sup", "sub"]):
        text = tag.get_text().strip()
        tag.replace_with(f"^{{{text}}}" if tag.name == "sup" else f"_{{{text}}}")

    out: list[str] = []
    skip_strings = (Comment, Declaration, Doctype, ProcessingInstruction)
    # iterative walk (deeply nested HTML would overflow a recursive one)
    stack: list[tuple[object, bool, bool]] = [(soup, False, False)]
    while stack:
        node, pre, closing = stack.pop()
        if closing:
            assert isinstance(node, Tag)
            out.append(_GAP if node.name in PARAGRAPH_TAGS else "\n")
            continue
        if isinstance(node, NavigableString):
            if isinstance(node, skip_strings):
                continue
            text = str(node)
            if pre:
                at_line_start = not out or out[-1].endswith("\n")
                text = (_PRE if at_line_start else "") + text.replace("\n", "\n" + _PRE)
            out.append(text if pre else _WS.sub(" ", text))
            continue
        if not isinstance(node, Tag):
            continue
        name = node.name
        if name == "br":
            out.append("\n")
            continue
        block = name in BLOCK_TAGS or name == "td" or name == "th"
        if name in ("td", "th"):
            out.append(" ")
        elif block:
            out.append(_GAP if name in PARAGRAPH_TAGS else "\n")
        if len(name) == 2 and name[0] == "h" and name[1].isdigit():
            out.append("#" * int(name[1]) + " ")
        elif name == "li":
            out.append("* ")
        inner = pre or name == "pre"
        if block and name not in ("td", "th"):
            stack.append((node, inner, True))
        stack.extend((child, inner, False) for child in reversed(node.contents))
    return Page(url=url, title=title or here, text=_tidy("".join(out)), urls=urls, cite_url=url)


def _tidy(text: str) -> str:
    """Strip lines (not the indentation inside <pre>); empty lines only at paragraph breaks,
    at most one in a row."""
    lines: list[str] = []
    for line in text.split("\n"):
        if line.startswith(_PRE):
            line = line[1:].rstrip()
        elif line.strip() == "\x02":
            line = ""
            if lines and lines[-1]:
                lines.append("")
            continue
        else:
            line = line.strip()
            if not line:
                continue
        lines.append(line)
    return "\n".join(lines).strip("\n")


def pdf_available() -> bool:
    """Whether PDFs can be read (the optional ``pypdf`` package: ``mlx-harmony-core[pdf]``)."""
    import importlib.util

    return importlib.util.find_spec("pypdf") is not None


def pdf_to_page(data: bytes, url: str) -> Page:
    """A PDF's text (pages separated by an empty line) as a page; ValueError if unreadable."""
    import io

    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        texts = [(page.extract_text() or "").strip() for page in reader.pages]
        meta = reader.metadata
        title = str(meta.title).strip() if meta is not None and meta.title else None
    except Exception as exc:  # noqa: BLE001 - pypdf raises many kinds on a bad file
        raise ValueError(f"cannot read the PDF: {exc}") from exc
    return text_to_page("\n\n".join(t for t in texts if t), url, title=title)


def text_to_page(text: str, url: str, title: str | None = None) -> Page:
    """A plain-text (or Markdown) document as a page; the title is its first ``#`` heading,
    else the last part of the URL."""
    text = _clean(text.replace("\r\n", "\n")).rstrip()
    if title is None:
        m = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
        title = m.group(1).strip() if m else domain_of(url) or url
    return Page(url=url, title=title, text=text, cite_url=url)
