"""The built-in ``browser`` tool: search -> open -> find -> citations on an FTS5 index built
from a temp folder, on pages served by a local HTTP server, and through a fake SearXNG; the
address guard, limits and malformed calls, with the exact messages the model reads."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from mlx_harmony_core.tools import BuiltinToolOptions, BuiltinTools, ToolCall
from mlx_harmony_core.tools import fetch as fetch_mod

PAGE = """<html><head><title>Capitals</title></head><body>
<h1>Capitals of Europe</h1>
<p>Paris is the capital of France.</p>
<p>Berlin is the capital of Germany. See <a href="/second.html">the second page</a>
or <a href="https://example.org/x">elsewhere</a>.</p>
<script>alert('no')</script>
</body></html>"""
SECOND = "<html><head><title>Second</title></head><body><p>Madrid is in Spain.</p></body></html>"


def make_pdf(lines: list[str]) -> bytes:
    """A minimal one-page PDF showing ``lines`` in Helvetica (written by hand)."""
    content = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({t}) Tj T*" for t in lines) + " ET"
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{off:010d} 00000 n \n".encode() for off in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    seen_hosts: list[str] = []
    seen_paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen_hosts.append(self.headers.get("Host", ""))
        self.seen_paths.append(self.path)
        parts = urlsplit(self.path)
        if parts.path == "/slow":
            time.sleep(2)
        if parts.path == "/search":
            q = parse_qs(parts.query)
            assert q["format"] == ["json"]
            port = self.server.server_address[1]
            body = json.dumps(
                {
                    "query": q["q"][0],
                    "results": [
                        {
                            "url": f"http://127.0.0.1:{port}/page.html",
                            "title": "Capitals",
                            "content": "Paris is the capital of France.",
                        },
                        {"url": "ftp://skipped", "title": "not http"},
                    ],
                }
            ).encode()
            route = (200, {"Content-Type": "application/json"}, body)
        else:
            route = self.routes.get(parts.path, (404, {}, b"not found"))
        status, headers, body = route
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v.replace("PORT", str(self.server.server_address[1])))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the time-limit test hangs up on /slow


@pytest.fixture(scope="module")
def server():
    html = {"Content-Type": "text/html; charset=utf-8"}
    _Handler.routes = {
        "/page.html": (200, html, PAGE.encode()),
        "/second.html": (200, html, SECOND.encode()),
        "/redirect": (302, {"Location": "/page.html"}, b""),
        "/to-private": (302, {"Location": "http://[::1]:PORT/page.html"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big.txt": (200, {"Content-Type": "text/plain"}, b"line\n" * 4000),
        "/image.png": (200, {"Content-Type": "image/png"}, b"\x89PNG"),
        "/slow": (200, html, b"<p>late</p>"),
        "/forbidden-search/search": (403, {}, b"forbidden"),
        "/report.pdf": (200, {"Content-Type": "application/pdf"}, make_pdf(["Revenue grew 40%."])),
        "/broken.pdf": (200, {"Content-Type": "application/pdf"}, b"%PDF-1.4 junk"),
    }
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "mlx.md").write_text(
        "# MLX arrays\n\nMLX is an array framework for machine learning.\n"
        "It uses lazy evaluation and unified memory.\nThe quick brown fox jumps.\n"
    )
    (folder / "sub" / "harmony.html").write_text(
        "<html><head><title>Harmony format</title></head><body><h1>Harmony</h1>"
        "<p>Channels: analysis, commentary and final.</p>"
        '<p>See <a href="../mlx.md">MLX</a>.</p></body></html>'
    )
    (folder / "notes.txt").write_text("plain notes about nothing\n")
    (folder / "ignored.bin").write_bytes(b"\x00lazy")
    return folder


def call(tools: BuiltinTools, recipient: str, args: object, session: str = "s"):
    text = args if isinstance(args, str) else json.dumps(args)
    result = tools.run(ToolCall(recipient, text, session))
    assert result.author == recipient
    return result


def test_local_index_search_open_find_cite(docs, tmp_path):
    opts = BuiltinToolOptions(browser_index=docs, browser_index_db=tmp_path / "index.sqlite")
    with BuiltinTools(["browser"], opts) as t:
        r = call(t, "browser.search", {"query": "lazy evaluation"})
        assert r.status == "completed"
        assert r.text.startswith(
            "[0] lazy evaluation\n**viewing lines [0 - 3] of 3**\n\n"
            "L0: # Search Results\nL1: \nL2: * 【0†MLX arrays†mlx.md】 # MLX arrays MLX is an "
        )
        assert r.details == {
            "action": {"type": "search", "query": "lazy evaluation"},
            "sources": [{"type": "url", "url": "local://mlx.md"}],
        }
        r = call(t, "browser.open", {"id": 0})
        assert r.text == (
            "[1] MLX arrays (local://mlx.md)\n**viewing lines [0 - 4] of 4**\n\n"
            "L0: # MLX arrays\nL1: \nL2: MLX is an array framework for machine learning.\n"
            "L3: It uses lazy evaluation and unified memory.\nL4: The quick brown fox jumps."
        )
        assert r.details["action"] == {"type": "open_page", "url": "local://mlx.md"}
        r = call(t, "browser.find", {"pattern": "FOX"})
        assert r.text == (
            "[2] Find results for text: `FOX` in `MLX arrays` (local://mlx.md/find?pattern=FOX)\n"
            "**viewing lines [0 - 1] of 1**\n\nL0: # 【0†match at L4】\nL1: The quick brown fox jumps."
        )
        assert r.details["action"] == {"type": "find", "pattern": "FOX", "url": "local://mlx.md"}
        r = call(t, "browser.open", {"id": 0})  # the match (from 4 lines before it, if > 4)
        assert r.text.startswith("[3] MLX arrays (local://mlx.md)\n**viewing lines [4 - 4] of 4**")
        r = call(t, "browser.open", {"cursor": 1, "loc": 3, "num_lines": 1})  # scroll
        assert r.text.endswith(
            "**viewing lines [3 - 3] of 4**\n\nL3: It uses lazy evaluation and unified memory."
        )
        # an HTML document: its relative link points at the other document
        call(t, "browser.search", {"query": "commentary"})
        r = call(t, "browser.open", {"id": 0})
        assert r.text.endswith(
            "L2: Channels: analysis, commentary and final.\nL3: \nL4: See 【0†MLX†mlx.md】."
        )
        r = call(t, "browser.open", {"id": 0})
        assert r.text.startswith("[7] MLX arrays (local://mlx.md)")
        text, annotations = t.annotate("s", "MLX is lazy【1†L3】, Harmony has channels【6†L2】.")
        assert text == (
            "MLX is lazy ([mlx.md](local://mlx.md)) , Harmony has channels "
            "([harmony.html](local://sub/harmony.html)) ."
        )
        assert annotations == [
            {
                "type": "url_citation",
                "start_index": 11,
                "end_index": 39,
                "url": "local://mlx.md",
                "title": "MLX arrays",
            },
            {
                "type": "url_citation",
                "start_index": 61,
                "end_index": 105,
                "url": "local://sub/harmony.html",
                "title": "Harmony format",
            },
        ]
        for a in annotations:
            assert text[a["start_index"] : a["end_index"]].startswith(" ([")
        # a search page's cursor, an unknown cursor: the citation stays as written
        assert t.annotate("s", "x【0†L1】 y【99†L1】") == ("x【0†L1】 y【99†L1】", [])
        assert t.annotate("other", "x【1†L1】") == ("x【1†L1】", [])


def test_local_index_follows_file_changes(docs, tmp_path):
    opts = BuiltinToolOptions(browser_index=docs, browser_index_db=tmp_path / "i.sqlite")
    with BuiltinTools(["browser"], opts) as t:
        assert "No results for `okapis`." in call(t, "browser.search", {"query": "okapis"}).text
        (docs / "animals.txt").write_text("okapis are striped\n")
        assert (
            "L2: * 【0†animals.txt†animals.txt】 okapis are striped"
            in call(t, "browser.search", {"query": "okapis"}).text
        )
        (docs / "animals.txt").write_text("horses now\n")
        assert "No results" in call(t, "browser.search", {"query": "okapis"}).text
        (docs / "mlx.md").unlink()
        assert "No results" in call(t, "browser.search", {"query": "lazy"}).text
        r = call(t, "browser.open", {"id": "local://mlx.md"})
        assert (
            r.text
            == "Error fetching URL `local://mlx.md`: no document local://mlx.md in the local index"
        )
        r = call(t, "browser.open", {"id": "local://../../etc/passwd"})
        assert r.status == "failed" and "no document" in r.text
    # a new process reuses the index file
    with BuiltinTools(["browser"], opts) as t:
        assert t._browser.index.refresh() == 0


def test_http_pages_open_click_find_cite(server):
    opts = BuiltinToolOptions(browser_allow_private=True)
    with BuiltinTools(["browser"], opts) as t:
        r = call(t, "browser.open", {"id": f"{server}/redirect"})
        assert r.status == "completed", r.text
        assert r.text == (
            f"[0] Capitals ({server}/page.html)\n**viewing lines [0 - 5] of 5**\n\n"
            "L0: # Capitals of Europe\nL1: \nL2: Paris is the capital of France.\nL3: \n"
            "L4: Berlin is the capital of Germany. See 【0†the second page】 or \n"
            "L5: 【1†elsewhere†example.org】."
        )
        assert r.details["sources"] == [{"type": "url", "url": f"{server}/page.html"}]
        r = call(t, "browser.open", {"id": 0, "cursor": 0})
        assert r.text.startswith(f"[1] Second ({server}/second.html)\n")
        assert "L0: Madrid is in Spain." in r.text
        r = call(t, "browser.find", {"pattern": "capital", "cursor": 0})
        assert r.text == (
            f"[2] Find results for text: `capital` in `Capitals` ({server}/page.html/find?pattern=capital)\n"
            "**viewing lines [0 - 8] of 8**\n\n"
            "L0: # 【0†match at L0】\nL1: # Capitals of Europe\nL2: \n"
            "L3: Paris is the capital of France.\nL4: \nL5: \n"
            "L6: # 【1†match at L4】\nL7: Berlin is the capital of Germany. See the second page or \n"
            "L8: elsewhere."
        )
        text, annotations = t.annotate("s", "Paris【0†L2】; Madrid【1†L0】; both【2†L3】")
        host = server.split("//")[1]
        assert text == (
            f"Paris ([{host}]({server}/page.html)) ; Madrid ([{host}]({server}/second.html)) ; "
            f"both ([{host}]({server}/page.html)) "
        )
        assert [(a["url"], a["title"]) for a in annotations] == [
            (f"{server}/page.html", "Capitals"),
            (f"{server}/second.html", "Second"),
            (f"{server}/page.html", "Capitals"),  # find results cite the page they searched
        ]
        # sizes, types, redirects and time
        r = call(t, "browser.open", {"id": f"{server}/loop"})
        assert r.text == f"Error fetching URL `{server}/loop`: too many redirects (more than 5)"
        r = call(t, "browser.open", {"id": f"{server}/image.png"})
        assert r.text == (
            f"Error fetching URL `{server}/image.png`: unsupported content type image/png "
            "(the browser reads HTML, text and PDF)"
        )
        r = call(t, "browser.open", {"id": f"{server}/missing"})
        assert r.text == f"Error fetching URL `{server}/missing`: HTTP 404 Not Found"
        r = call(t, "browser.open", {"id": f"{server}/sécond page.html?q=a b"})
        assert r.text == f"Error fetching URL `{server}/sécond page.html?q=a b`: HTTP 404 Not Found"
        assert _Handler.seen_paths[-1] == "/s%C3%A9cond%20page.html?q=a%20b"
        r = call(t, "browser.open", {"id": f"{server}/page.html", "view_source": True})
        assert "L0: <html><head><title>Capitals</title></head><body>" in r.text


def test_fetch_limits(server):
    opts = BuiltinToolOptions(browser_allow_private=True, fetch_max_bytes=2048, fetch_timeout_s=0.5)
    with BuiltinTools(["browser"], opts) as t:
        r = call(t, "browser.open", {"id": f"{server}/big.txt", "loc": 400})
        assert r.text.endswith("L409: lin\nL410: \nL411: [... page truncated at 2048 bytes ...]")
        t0 = time.monotonic()
        r = call(t, "browser.open", {"id": f"{server}/slow"})
        assert time.monotonic() - t0 < 1.8
        assert r.status == "incomplete"
        assert (
            r.text
            == f"Error: Error fetching URL `{server}/slow`: fetching {server}/slow timed out after 0.5 s"
        )


def test_private_addresses_are_refused(server, monkeypatch):
    with BuiltinTools(["browser"]) as t:
        r = call(t, "browser.open", {"id": f"{server}/page.html"})
        assert (r.status, r.text) == (
            "failed",
            f"Error fetching URL `{server}/page.html`: refused: 127.0.0.1 resolves to 127.0.0.1, "
            "a private, loopback, link-local or reserved address (the server does not open "
            "those unless started with --browser-allow-private)",
        )
        for url in (
            "http://localhost/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://[::ffff:127.0.0.1]/",
        ):
            r = call(t, "browser.open", {"id": url})
            assert "a private, loopback, link-local or reserved address" in r.text, url
        r = call(t, "browser.open", {"id": "file:///etc/passwd"})
        assert r.text == (
            "Error fetching URL `file:///etc/passwd`: only http:// and https:// URLs can be "
            "opened, not 'file:///etc/passwd'"
        )
        # every redirect is checked again: 127.0.0.1 allowed here, the redirect to ::1 is not
        monkeypatch.setattr(fetch_mod, "is_public", lambda a: str(a) == "127.0.0.1")
        r = call(t, "browser.open", {"id": f"{server}/to-private"})
        assert "refused: ::1 resolves to ::1, a private" in r.text
        # the connection goes to the address that was checked (no second DNS lookup)
        port = int(server.rsplit(":", 1)[1])
        monkeypatch.setattr(fetch_mod, "resolve", lambda host, *a: ["127.0.0.1"])
        _Handler.seen_hosts.clear()
        r = call(t, "browser.open", {"id": f"http://pinned.invalid:{port}/second.html"})
        assert "Madrid is in Spain." in r.text
        assert _Handler.seen_hosts == [f"pinned.invalid:{port}"]


def test_searxng_backend(server, docs, tmp_path):
    opts = BuiltinToolOptions(
        search_url=server,
        browser_allow_private=True,
        browser_index=docs,
        browser_index_db=tmp_path / "x.sqlite",
    )
    with BuiltinTools(["browser"], opts) as t:
        import openai_harmony as oh

        ns = t.system_content(oh.SystemContent.new()).tools["browser"]
        assert ns.description.endswith("sources=local, web (default: local)")
        assert [tool.name for tool in ns.tools] == ["search", "open", "find"]
        r = call(t, "browser.search", {"query": "capital of France", "source": "web"})
        assert r.text == (
            "[0] capital of France\n**viewing lines [0 - 2] of 2**\n\n"
            "L0: # Search Results\nL1: \n"
            "L2: * 【0†Capitals†127.0.0.1:"
            + server.rsplit(":", 1)[1]
            + "】 Paris is the capital of France."
        )
        assert r.details["sources"] == [{"type": "url", "url": f"{server}/page.html"}]
        r = call(t, "browser.open", {"id": 0})
        assert r.text.startswith(f"[1] Capitals ({server}/page.html)")
        r = call(t, "browser.search", {"query": "x", "source": "bing"})
        assert r.text == "Unknown source `bing`; available: local, web."
    with BuiltinTools(
        ["browser"], BuiltinToolOptions(search_url=server + "/forbidden-search")
    ) as t:
        r = call(t, "browser.search", {"query": "x"})
        assert r.text == (
            "Error during search for `x`: the search service refused the JSON API (SearXNG: "
            "enable `json` under search.formats in settings.yml)"
        )


def test_malformed_calls_are_messages(docs, tmp_path):
    opts = BuiltinToolOptions(browser_index=docs, browser_index_db=tmp_path / "m.sqlite")
    with BuiltinTools(["browser"], opts) as t:
        cases = [
            ("browser.open", "{}", "No pages to access!"),
            ("browser.find", {"pattern": "x"}, "No pages to access!"),
            (
                "browser.open",
                "not json",
                'Invalid arguments for browser.open: expected a JSON object, for example {"id": 0, "cursor": 1} or {"id": "https://..."}',
            ),
            (
                "browser.search",
                "[1, 2]",
                'Invalid arguments for browser.search: expected a JSON object, for example {"query": "..."}',
            ),
            ("browser.search", {}, "browser.search needs a non-empty `query` string."),
            (
                "browser.search",
                {"query": "x", "bogus": 1},
                "Unknown argument(s) bogus for browser.search; it takes query, source, top_n, topn.",
            ),
            (
                "browser.click",
                {"id": 1},
                "Unknown browser function `click`: use browser.search, browser.open or browser.find.",
            ),
            ("browser", "{}", "Unknown tool `browser`: the built-in tools enabled are browser."),
        ]
        for recipient, args, message in cases:
            r = call(t, recipient, args)
            assert (r.status, r.text) == ("failed", message), (recipient, args)
        call(t, "browser.search", {"query": "lazy"})
        cases = [
            ("browser.open", {"id": 7}, "Invalid link id `7`."),
            (
                "browser.open",
                {"cursor": 5},
                "Cursor `5` is out of range. Available cursor indices: [0 - 0].",
            ),
            ("browser.open", {"cursor": "x"}, "`cursor` should be an integer, not 'x'"),
            ("browser.open", {"id": [1]}, "`id` should be a link number or a URL string."),
            (
                "browser.find",
                {"pattern": "x"},
                "Cannot run `find` on search results page or find results page",
            ),
            (
                "browser.open",
                {"loc": 99},
                "Invalid location parameter: `99`. Cannot exceed page maximum of 3.",
            ),
        ]
        for recipient, args, message in cases:
            r = call(t, recipient, args)
            assert (r.status, r.text) == ("failed", message), (recipient, args)
        # a failed open did not leave a display behind: the next one is cursor 1
        assert call(t, "browser.open", {"id": "0"}).text.startswith("[1] MLX arrays")


def test_no_backend_and_unknown_tool():
    with BuiltinTools(["browser"]) as t:
        assert t.handles("browser.search") and not t.handles("python")
        r = call(t, "browser.search", {"query": "x"})
        assert r.text == "Search is not available here (no search backend is configured)."
        r = t.run(ToolCall("python", "1", "s"))
        assert r.text == "Unknown tool `python`: the built-in tools enabled are browser."
    with pytest.raises(ValueError, match="did you mean 'browser'"):
        BuiltinTools(["browse"])
    with pytest.raises(ValueError, match="search_url must start with http"):
        BuiltinToolOptions(search_url="localhost:8080")


def test_tls_certificates_are_verified(tmp_path):
    """An https server with a self-signed certificate is refused (verification is on)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    httpd = _Server(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{httpd.server_address[1]}/page.html"
        with BuiltinTools(["browser"], BuiltinToolOptions(browser_allow_private=True)) as t:
            r = call(t, "browser.open", {"id": url})
        assert r.status == "failed"
        assert r.text.startswith(f"Error fetching URL `{url}`: TLS with 127.0.0.1 failed: ")
        assert "CERTIFICATE_VERIFY_FAILED" in r.text
    finally:
        httpd.shutdown()


def test_pdf_documents(docs, tmp_path, server):
    pytest.importorskip("pypdf")
    (docs / "report.pdf").write_bytes(
        make_pdf(["Quarterly report", "Revenue grew by forty percent."])
    )
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    opts = BuiltinToolOptions(
        browser_index=docs, browser_index_db=tmp_path / "p.sqlite", browser_allow_private=True
    )
    with BuiltinTools(["browser"], opts) as t:
        r = call(t, "browser.search", {"query": "revenue"})
        assert (
            "【0†report.pdf†report.pdf】 Quarterly report Revenue grew by forty percent." in r.text
        )
        r = call(t, "browser.open", {"id": 0})
        assert r.text == (
            "[1] report.pdf (local://report.pdf)\n**viewing lines [0 - 1] of 1**\n\n"
            "L0: Quarterly report\nL1: Revenue grew by forty percent."
        )
        r = call(t, "browser.open", {"id": f"{server}/report.pdf"})
        assert r.text.endswith("**viewing lines [0 - 0] of 0**\n\nL0: Revenue grew 40%.")
        r = call(t, "browser.open", {"id": f"{server}/broken.pdf"})
        assert r.status == "failed"
        assert r.text.startswith(f"Error fetching URL `{server}/broken.pdf`: cannot read the PDF: ")
