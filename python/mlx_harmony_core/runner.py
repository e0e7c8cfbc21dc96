"""The model runner: what a decode loop needs of a model, and nothing of the engine.

The scheduler (every request's decode path) sees a :class:`ModelRunner`: forward passes over
caches on the generation stream, fresh caches, the prefix cache of earlier requests, the
prefill chunk size and, in a distributed group, the group. Front ends never see it; they
talk to the :class:`~.engine.Engine`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .kv_cache import make_cache
from .models.head import split_head
from .prefix_cache import PrefixCache

if TYPE_CHECKING:
    from .distributed import Group
    from .prompt_store import PromptStore


class ModelRunner:
    """Runs ``model`` (mlx-lm's calling convention ``model(tokens, cache=...)``).

    ``prefix_cache`` keeps finished requests' caches for reuse (``reuse_cache=False``: none);
    ``group`` is the distributed group the model is sharded over (``None``: one process);
    ``prompt_store`` (set by :func:`.prompt_store.attach`) keeps long prefixes on disk.
    """

    def __init__(
        self,
        model: Any,
        *,
        vocab_size: int,
        cache_options: dict[str, Any] | None = None,
        prefill_step_size: int = 512,
        reuse_cache: bool = True,
        prefix_cache: PrefixCache | None = None,
        group: Group | None = None,
    ) -> None:
        if prefill_step_size < 1:
            raise ValueError("prefill_step_size must be >= 1")
        self.model = model
        self.vocab_size = vocab_size
        self.cache_options = dict(cache_options or {})
        self.prefill_step_size = prefill_step_size
        self.reuse_cache = reuse_cache
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        self.group = group
        # KV caches of long prefixes on disk (prompt_store.attach sets it; None: none).
        self.prompt_store: PromptStore | None = None
        # MLX streams belong to the thread that made them: one per generating thread.
        self._local = threading.local()

    def stream(self) -> Any:
        """This thread's generation stream (as in mlx-lm: measurably faster first tokens)."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = mx.new_stream(mx.default_device())
        return stream

    def new_cache(self) -> list[Any]:
        """Fresh per-layer caches for one sequence."""
        return make_cache(self.model, **self.cache_options)

    def take(self, prompt: Sequence[int]) -> tuple[list[Any], int]:
        """A cache holding the longest reusable prefix of ``prompt``, and its length (a fresh
        cache and 0 when nothing can be reused)."""
        prompt = list(prompt)
        store = self.prompt_store
        if store is not None and store.serves(self.model):
            # A longer prefix on disk than in memory: load it (None if its file is unusable).
            entry, n = store.find(prompt, longer_than=self.prefix_cache.longest(prompt))
            loaded = store.load(entry, n) if entry is not None else None
            if loaded is not None and len(loaded) == len(self.new_cache()):
                return loaded, n
        cache, common = self.prefix_cache.take(prompt)
        if cache is None:
            return self.new_cache(), 0
        return cache, common

    def keep(self, tokens: Sequence[int], cache: list[Any], clears: int | None = None) -> None:
        """Offer a finished request's cache (holding exactly ``tokens``) for reuse;
        ``clears``: the prefix cache's clear count when the request ended (a cache that
        ended before a later :meth:`~.prefix_cache.PrefixCache.clear` is dropped)."""
        if clears is not None and clears != self.prefix_cache.clears:
            return
        if self.reuse_cache and tokens:
            store = self.prompt_store
            if store is not None and store.serves(self.model):
                store.offer(tokens, cache)  # copied to host now, before anyone reuses it
            self.prefix_cache.put(list(tokens), cache)

    def forward(self, inputs: mx.array, cache: Any) -> mx.array:
        """Logits (lazy) of ``inputs`` (B, T) at every position: (B, T, V)."""
        with mx.stream(self.stream()):
            return self.model(inputs, cache=cache)

    def forward_at(self, inputs: mx.array, cache: Any, where: Sequence[int]) -> mx.array:
        """Logits (lazy) of ``inputs`` (B, T) at the flat positions ``where`` (b * T + t):
        (len(where), V). The output head (the widest matrix: 201088 rows on gpt-oss) runs
        only at those positions where the model's head is known to be its last op."""
        idx = mx.array(list(where), dtype=mx.int32)
        b, t = inputs.shape
        with mx.stream(self.stream()):
            head = split_head(self.model)
            if head is None:
                logits = self.model(inputs, cache=cache)
                return mx.take(logits.reshape(b * t, -1), idx, axis=0)
            hidden = self.model.model(inputs, cache)
            return head(mx.take(hidden.reshape(b * t, -1), idx, axis=0))

    def follow(self, message: dict[str, Any]) -> None:
        """A follower rank: apply rank 0's step ``message`` to this rank's copy of the batch
        (see :class:`~.distributed.Follower`)."""
        from .distributed import Follower

        follower = getattr(self, "_follower", None)
        if follower is None:
            follower = self._follower = Follower(self)
        follower.apply(message)
