"""Fetching a URL for the browser tool without turning the server into a proxy.

http(s) only; the host is resolved once, every address checked (private, loopback,
link-local, reserved, multicast... are refused unless allowed) and the connection made to
the checked address (so DNS rebinding cannot swap it); TLS still verifies the host name.
Each redirect is checked again; body size and total time are bounded.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from email.message import Message
from urllib.parse import quote, urljoin, urlsplit

logger = logging.getLogger(__name__)

USER_AGENT = "mlx-harmony-core-browser/0.1"
URL_SAFE = "/%:@!$&'()*+,;=-._~"
_resolver = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="browser-dns")


class FetchError(Exception):
    """A fetch failed; the message is written for the model."""


class FetchTimeout(FetchError):
    """A fetch ran past its time limit."""


@dataclass
class Fetched:
    """A response body (possibly cut at the size limit) and what describes it."""

    url: str  # after redirects
    status: int
    content_type: str  # e.g. "text/html"
    charset: str | None
    body: bytes
    truncated: bool


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses (IPv4-mapped IPv6 checked as IPv4)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def resolve(host: str, port: int, deadline: float, allow_private: bool) -> list[str]:
    """Every address of ``host``; FetchError if any is not public (unless allowed)."""
    try:
        infos = _resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM).result(
            timeout=max(0.01, deadline - time.monotonic())
        )
    except concurrent.futures.TimeoutError as exc:
        raise FetchTimeout(f"resolving {host} timed out") from exc
    except OSError as exc:
        raise FetchError(f"cannot resolve {host}: {exc}") from exc
    addrs = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private:
        for a in addrs:
            if not is_public(ipaddress.ip_address(a.split("%", 1)[0])):
                raise FetchError(
                    f"refused: {host} resolves to {a}, a private, loopback, link-local or "
                    "reserved address (the server does not open those unless started with "
                    "--browser-allow-private)"
                )
    if not addrs:
        raise FetchError(f"cannot resolve {host}")
    return addrs


def _connect(host: str, port: int, addrs: list[str], https: bool, deadline: float) -> socket.socket:
    """A connection to one of the checked addresses (TLS verified against ``host``)."""
    last: OSError | None = None
    for addr in addrs:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchTimeout(f"connecting to {host} timed out")
        try:
            sock = socket.create_connection((addr, port), timeout=left)
        except OSError as exc:
            last = exc
            continue
        if https:
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise FetchError(f"TLS with {host} failed: {exc}") from exc
        return sock
    raise FetchError(f"cannot connect to {host}: {last}")


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection over a socket we opened (to a checked address) and close ourselves:
    http.client would close it on ``Connection: close`` before the body is read, and we
    need it to set the remaining time on each read."""

    def close(self) -> None:
        self.sock = None


def fetch(
    url: str,
    *,
    allow_private: bool,
    timeout_s: float,
    max_bytes: int,
    max_redirects: int,
    accept: str = "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5",
) -> Fetched:
    """GET ``url`` under the rules above; raises FetchError with a message for the model."""
    deadline = time.monotonic() + timeout_s
    for _hop in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchError(f"only http:// and https:// URLs can be opened, not {url!r}")
        host = parts.hostname
        if not host:
            raise FetchError(f"the URL {url!r} has no host")
        try:  # an internationalized name goes out (DNS, Host header, TLS) in its ASCII form
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise FetchError(f"bad host name in {url!r}") from exc
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchError(f"bad port in {url!r}") from exc
        addrs = resolve(host, port, deadline, allow_private)
        sock = _connect(host, port, addrs, parts.scheme == "https", deadline)
        conn = _Pinned(host, port)
        conn.sock = sock  # already connected (and TLS-wrapped) to the checked address
        try:
            # spaces and non-ASCII characters percent-encoded; what is encoded stays
            path = quote(parts.path or "/", safe=URL_SAFE)
            if parts.query:
                path += "?" + quote(parts.query, safe=URL_SAFE + "?")
            conn.request(
                "GET",
                path,
                headers={"User-Agent": USER_AGENT, "Accept": accept, "Accept-Encoding": "identity"},
            )
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location", ""))
                logger.debug("browser fetch: redirect to %s", url)
                continue
            if resp.status >= 400:
                raise FetchError(f"HTTP {resp.status} {resp.reason}")
            body, truncated = _read(resp, sock, max_bytes, deadline)
            msg = Message()
            msg["content-type"] = resp.getheader("Content-Type", "application/octet-stream")
            return Fetched(
                url=url,
                status=resp.status,
                content_type=msg.get_content_type(),
                charset=msg.get_param("charset"),  # type: ignore[arg-type]
                body=body,
                truncated=truncated,
            )
        except TimeoutError as exc:
            raise FetchTimeout(f"fetching {url} timed out after {timeout_s:g} s") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:  # InvalidURL: ValueError
            raise FetchError(f"fetching {url} failed: {exc}") from exc
        finally:
            sock.close()
    raise FetchError(f"too many redirects (more than {max_redirects})")


def _read(
    resp: http.client.HTTPResponse, sock: socket.socket, max_bytes: int, deadline: float
) -> tuple[bytes, bool]:
    """Up to ``max_bytes`` of the body, within the deadline; (body, truncated)."""
    chunks: list[bytes] = []
    n = 0
    while n <= max_bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = resp.read(min(65536, max_bytes + 1 - n))
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)[:max_bytes], True
