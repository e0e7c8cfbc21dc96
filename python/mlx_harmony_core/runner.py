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

    def keep(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Offer a finished request's cache (holding exactly ``tokens``) for reuse."""
        if self.reuse_cache and tokens:
            store = self.prompt_store
            if store is not None and store.serves(self.model):
                store.offer(tokens, cache)  # copied to host now, before anyone reuses it
            self.prefix_cache.put(list(tokens), cache)

    def forward(self, inputs: mx.array, cache: Any) -> mx.array:
        """Logits (lazy) of ``inputs`` (B, T) at every position: (B, T, V)."""
        with mx.stream(self.stream()):
            return self.model(inputs, cache=cache)

    def prefill(self, prompt: mx.array, cache: list[Any]) -> mx.array:
        """Run all but the last token of ``prompt`` (T,) in chunks (evaluated); returns the
        rest. A follower rank's prefill: the same chunks rank 0's scheduler runs alone."""
        done = 0
        while prompt.size - done > 1:
            n = min(self.prefill_step_size, prompt.size - done - 1)
            self.forward(prompt[None, done : done + n], cache)
            mx.eval([c.state for c in cache])
            done += n
            if self.group is not None:
                self.group.progress()
        return prompt[done:]

    def follow(self, message: dict[str, Any]) -> None:
        """A follower rank: run rank 0's request ``message`` (its prompt ids and token
        budget) through the same forward passes, feeding the tokens rank 0 broadcasts.

        Rank 0's scheduler runs a request of a group alone, one token a step: the forward
        pass of token k is queued before it is read, and then rank 0 either draws and
        broadcasts token k+1 or broadcasts "stop" (see :meth:`.Group.share`)."""
        from .distributed import is_peer_error

        group = self.group
        assert group is not None and not group.leader
        n = int(message["max_tokens"])
        self.prefill_step_size = int(message.get("prefill_step", self.prefill_step_size))
        try:
            with group.running(), mx.stream(self.stream()):
                cache = self.new_cache()
                rest = self.prefill(mx.array(message["prompt"], dtype=mx.int32), cache)
                logits = self.model(rest[None], cache=cache)
                for k in range(n):
                    shared = group.share(None)  # rank 0's token for this step, and "go on"
                    mx.async_eval(logits)
                    mx.async_eval(shared)
                    if k + 1 < n:  # built while waiting; run only if rank 0 goes on
                        nxt = self.model(shared[None, :1], cache=cache)
                    if not shared[1].item() or k + 1 >= n:
                        break
                    group.progress()
                    logits = nxt
        except RuntimeError as exc:
            if is_peer_error(exc):
                raise group.lost(exc) from exc
            raise
