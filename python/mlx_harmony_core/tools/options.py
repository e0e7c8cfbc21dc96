"""Limits and defaults of the built-in tools: the one source of truth the CLI flags and the
server's settings are derived from."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BuiltinToolOptions(BaseModel):
    """Every limit and default of the built-in ``python`` and ``browser`` tools."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    python_timeout_s: float = Field(
        30.0, ge=0.1, le=3600.0, description="wall-clock limit of one python call (seconds)"
    )
    python_cpu_s: int = Field(
        60, ge=1, le=86400, description="CPU seconds a python session may use in all"
    )
    python_memory_mb: int = Field(
        512, ge=64, le=1 << 20, description="address-space limit of a python session (MiB)"
    )
    python_output_chars: int = Field(
        20000, ge=100, le=10_000_000, description="characters of output the model reads per call"
    )
    python_file_mb: int = Field(
        64, ge=1, le=1 << 20, description="largest file python code may write (MiB)"
    )
    python_disk_mb: int = Field(
        256,
        ge=1,
        le=1 << 20,
        description="space of a python session's working directory (MiB; in memory on Linux)",
    )
    python_max_procs: int = Field(
        32, ge=1, le=4096, description="processes/threads a python session may run at once"
    )
    python_max_sessions: int = Field(
        8, ge=1, le=1024, description="live python sessions; the least recently used idle goes"
    )
    python_idle_s: float = Field(
        600.0, ge=1.0, le=7 * 86400.0, description="an idle python session ends after (seconds)"
    )
    browser_index: Path | None = Field(
        None,
        description="folder of .txt/.md/.html (.pdf with pypdf) documents to search offline "
        "(SQLite FTS5)",
    )
    browser_index_db: Path | None = Field(
        None,
        description="where the search index is stored (default: a file under "
        "~/.cache/mlx-harmony-core/browser-index/)",
    )
    search_url: str | None = Field(
        None, description="SearXNG base URL for web search (its JSON API, format=json)"
    )
    browser_allow_private: bool = Field(
        False, description="let the browser open private, loopback and link-local addresses"
    )
    fetch_timeout_s: float = Field(
        15.0, ge=0.1, le=600.0, description="time limit of one page fetch or search (seconds)"
    )
    fetch_max_bytes: int = Field(
        5_000_000, ge=1024, le=1 << 30, description="largest page body read (bytes)"
    )
    max_redirects: int = Field(5, ge=0, le=30, description="redirects followed per fetch")
    browser_view_chars: int = Field(
        4000, ge=200, le=1_000_000, description="characters of a page shown per open"
    )
    browser_max_results: int = Field(10, ge=1, le=50, description="search results shown")
    browser_max_pages: int = Field(
        64, ge=1, le=10000, description="pages kept per conversation (older ones dropped)"
    )
    browser_max_sessions: int = Field(
        256, ge=1, le=100000, description="conversations whose pages are kept"
    )

    @field_validator("search_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("search_url must start with http:// or https://")
        return v

    @field_validator("browser_index")
    @classmethod
    def _folder(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"browser_index {v} is not a folder: give a folder of documents")
        return v
