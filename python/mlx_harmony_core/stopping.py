"""Streaming detokenization and stop matching (Python face of the C++ automata)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from . import _core
from .errors import InvalidRequestError, RequestTypeError
from .messages import check_text

Detokenizer = _core.Detokenizer
TokenStops = _core.TokenStops


class StopStrings:
    """Stop strings over streamed text, exact across token boundaries.

    ``push(text)`` returns ``(safe_text, matched)``: the text that can no longer be part of a
    match, and the stop string that just completed (``None`` while none has). The matcher
    holds back exactly the longest suffix that could still grow into a stop string, so a
    stream never shows a character that later turns out to belong to one. On a match the
    text before it is returned (plus the stop string with ``include_stop=True``) and the
    matcher starts afresh. ``flush()`` releases the held text when generation ends otherwise.
    """

    def __init__(self, strings: str | Iterable[str], *, include_stop: bool = False) -> None:
        items = [strings] if isinstance(strings, str) else list(strings)
        for i, s in enumerate(items):
            if not isinstance(s, str):
                raise RequestTypeError(f"stop string {i} must be str, got {type(s).__name__}")
            if not s:
                raise InvalidRequestError(f"stop string {i} is empty")
            check_text(s, f"stop string {i}")
        self.strings = items
        self._matcher = _core.StopStrings(items, include_stop)

    def push(self, text: str) -> tuple[str, str | None]:
        out, index = self._matcher.push(text)
        return out, (None if index is None else self.strings[index])

    def flush(self) -> str:
        return self._matcher.flush()

    @property
    def held(self) -> str:
        """Text currently held back."""
        return self._matcher.held


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable character -> byte map (byte-level BPE vocabularies)."""
    # GPT-2's reversible byte <-> printable-character map used by byte-level BPE vocabularies.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def tokenizer_bytes(tokenizer: Any) -> list[bytes]:
    """Token id -> bytes for an mlx-lm / Hugging Face tokenizer (byte-level BPE or SentencePiece)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab: dict[str, int] = hf.get_vocab()
    size = max(vocab.values()) + 1
    pieces: list[str | None] = [None] * size
    for piece, i in vocab.items():
        pieces[i] = piece
    special = set(getattr(hf, "all_special_tokens", []) or [])
    byte_map = byte_level_alphabet()
    byte_level = any(p and "Ġ" in p for p in pieces[:5000])
    table: list[bytes] = []
    for piece in pieces:
        if piece is None:
            table.append(b"")
        elif piece in special:
            table.append(piece.encode("utf-8"))
        elif byte_level and all(ch in byte_map for ch in piece):
            table.append(bytes(byte_map[ch] for ch in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))  # SentencePiece byte fallback
        else:
            table.append(piece.replace("▁", " ").encode("utf-8"))
    return table


def token_sequences(sequences: Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Normalize stop ids / id sequences to a list of sequences."""
    out: list[list[int]] = []
    for s in sequences:
        out.append([int(s)] if isinstance(s, int) else [int(t) for t in s])
    return out
