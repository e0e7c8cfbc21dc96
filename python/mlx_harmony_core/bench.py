"""End-to-end comparison with mlx-lm: same weights, prompt tokens and sampling, alternating runs.

Used by ``mlx-harmony-core bench`` and ``benchmarks/bench_e2e.py``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from . import _core
from .cpu import quant
from .engine import Engine
from .errors import InvalidRequestError
from .params import SamplingParams
from .stopping import Detokenizer


@dataclass
class Run:
    """One generation's measurements."""

    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_bytes: int
    tokens: int


@dataclass
class Report:
    """Runs per engine, plus what the model itself costs."""

    runs: dict[str, list[Run]] = field(default_factory=dict)
    forward_tps: float = 0.0  # the model's decode forward pass alone (no sampling, no Python loop)
    weight_bytes_per_token: int = 0
    copy_gbps: float = 0.0
    # The same forward pass on MLX's own quantized kernels (quantized models on the CPU only).
    forward_tps_mlx_kernels: float = 0.0


def synthetic_prompt(
    n: int, vocab_size: int, seed: int = 0, avoid: Sequence[int] = ()
) -> list[int]:
    """Deterministic prompt ids drawn from the model's own vocabulary (``avoid``: its stop
    ids, so nothing in the prompt looks like the end of a reply)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=n + len(avoid) + 8)
    skip = set(avoid)
    return [int(t) for t in ids if int(t) not in skip][:n]


def run_ours(engine: Engine, prompt: list[int], gen: int, params: SamplingParams) -> Run:
    engine.reset_cache()  # every run prefills the whole prompt
    c = engine.generate(prompt, params, max_tokens=gen, ignore_eos=True)
    t = c.timings
    return Run(
        t.prefill_tokens_per_s,
        t.decode_tokens_per_s,
        t.ttft_s,
        t.peak_memory_bytes,
        c.usage.completion_tokens,
    )


class _Detok:
    """mlx-lm's StreamingDetokenizer interface over our C++ detokenizer."""

    def __init__(self, detok: Detokenizer) -> None:
        self._d = detok
        self.reset()

    def reset(self) -> None:
        self._d.reset()
        self.text, self.last_segment, self.tokens = "", "", []

    def add_token(self, token: int) -> None:
        self.last_segment = self._d.push(token)
        self.text += self.last_segment

    def finalize(self) -> None:
        self.last_segment = self._d.flush()
        self.text += self.last_segment


def _mlx_lm_tokenizer(detok: Detokenizer) -> Any:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    class BenchTokenizer(TokenizerWrapper):  # GPT-OSS dirs carry no HF tokenizer
        def __init__(self) -> None:  # noqa: D107 - deliberately skips the HF setup
            self._detok = _Detok(detok)

        @property
        def detokenizer(self) -> _Detok:
            self._detok.reset()
            return self._detok

        eos_token_ids: set[int] = set()  # like ignore_eos: exactly max_tokens
        bos_token = None

    return BenchTokenizer()


def run_mlx_lm(engine: Engine, prompt: list[int], gen: int, params: SamplingParams) -> Run:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    p = params
    sampler = make_sampler(
        temp=p.temperature,
        top_p=p.top_p if p.top_p < 1 else 0.0,
        min_p=p.min_p,
        min_tokens_to_keep=p.min_tokens_to_keep,
        top_k=p.top_k,
        xtc_probability=p.xtc_probability,
        xtc_threshold=p.xtc_threshold,
    )
    procs = make_logits_processors(
        p.logit_bias,
        p.repetition_penalty if p.repetition_penalty != 1 else None,
        p.repetition_context_size,
        p.presence_penalty or None,
        p.repetition_context_size,
        p.frequency_penalty or None,
        p.repetition_context_size,
    )
    tokenizer = _mlx_lm_tokenizer(engine.chat_format.detokenizer())  # outside the timing
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    first, n = 0.0, 0
    # mlx-lm as its users run it: MLX's own quantized kernels, not ours.
    with quant.kernels(False):
        for _ in stream_generate(
            engine.model,
            tokenizer,
            mx.array(prompt),
            max_tokens=gen,
            sampler=sampler,
            logits_processors=procs,
        ):
            n += 1
            if n == 1:
                first = time.perf_counter()
    end = time.perf_counter()
    ttft = first - t0
    return Run(
        len(prompt) / ttft,
        (n - 1) / (end - first) if n > 1 else 0.0,
        ttft,
        int(mx.get_peak_memory()),
        n,
    )


def llama_cpp_runner(
    path: str, threads: int | None = None
) -> Callable[[list[int], int], Run] | None:
    """A runner for llama.cpp (``llama-cpp-python``) on the same GGUF file, greedy, or
    ``None`` when it is not installed. Threads default to this machine's cores."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    threads = threads or os.cpu_count() or 1
    llm = Llama(
        model_path=str(path),
        n_ctx=4096,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    import llama_cpp

    vocab = llm.n_vocab()

    def greedy() -> int:  # the last token's logits, straight from the context
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(vocab,))))

    def run(prompt: list[int], gen: int) -> Run:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = greedy()
        first = time.perf_counter()
        for _ in range(gen - 1):
            llm.eval([token])
            token = greedy()
        end = time.perf_counter()
        ttft = first - t0
        return Run(len(prompt) / ttft, (gen - 1) / (end - first), ttft, 0, gen)

    return run


def forward_tokens_per_s(model: Any, prompt: list[int], steps: int = 16) -> float:
    """Decode forward passes alone (cache after the prompt), evaluated one by one."""
    from .kv_cache import make_cache

    cache = make_cache(model)
    mx.eval(model(mx.array(prompt)[None], cache=cache))
    y = mx.array([[prompt[-1]]])
    mx.eval(model(y, cache=cache))
    t0 = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(y, cache=cache))
    return steps / (time.perf_counter() - t0)


def weight_bytes_per_token(model: Any, config: dict[str, Any]) -> int:
    """Bytes of weights one decode token reads: dense weights (the embedding table only when it
    is tied to the output layer), plus the active share of the experts."""
    from mlx.utils import tree_flatten

    dense = experts = 0
    for name, a in tree_flatten(model.parameters()):
        if "embed_tokens" in name and not config.get("tie_word_embeddings"):
            continue  # a lookup reads one row; a tied table is also the output layer
        if ".experts." in name:
            experts += a.nbytes
        else:
            dense += a.nbytes
    n_exp = config.get("num_local_experts") or 1
    return int(dense + experts * (config.get("num_experts_per_tok") or n_exp) / n_exp)


def copy_bandwidth_gbps(megabytes: int = 256, threads: int | None = None) -> float:
    """This machine's memory copy bandwidth (read + write), numpy, with ``threads`` threads
    each copying its own slice (default: as many as the quantized kernels use), so the floor
    a multi-threaded kernel is measured against is the one those threads can reach."""
    threads = threads or int(_core.quant_threads())
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidRequestError(f"threads must be a positive integer, got {threads!r}")
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    parts = list(zip(np.array_split(dst, threads), np.array_split(src, threads), strict=True))
    barrier = threading.Barrier(threads + 1)

    def work(d: np.ndarray, s: np.ndarray) -> None:
        np.copyto(d, s)  # warm the pages
        barrier.wait()
        for _ in range(3):
            np.copyto(d, s)  # numpy drops the GIL for a plain copy
        barrier.wait()

    pool = [threading.Thread(target=work, args=part, daemon=True) for part in parts]
    for t in pool:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    barrier.wait()
    seconds = time.perf_counter() - t0
    for t in pool:
        t.join()
    return 3 * 2 * src.nbytes / seconds / 1e9


def compare(
    engine: Engine,
    *,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    runs: int = 3,
    params: SamplingParams | None = None,
    mlx_lm: bool = True,
    llama_cpp: Callable[[list[int], int], Run] | None = None,
) -> Report:
    """Alternate our engine and mlx-lm's ``stream_generate`` on the same model and prompt
    (and llama.cpp on the same GGUF file, greedy, when ``llama_cpp`` runs it)."""
    for name, value in (
        ("prompt_tokens", prompt_tokens),
        ("gen_tokens", gen_tokens),
        ("runs", runs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
    params = params or SamplingParams(temperature=0.0)
    prompt = synthetic_prompt(prompt_tokens, engine.vocab_size, avoid=engine.chat_format.stop_ids())
    report = Report()
    run_ours(engine, prompt[:16], 4, params)  # warm up both paths
    if mlx_lm:
        run_mlx_lm(engine, prompt[:16], 4, params)
    if llama_cpp is not None:
        llama_cpp(prompt[:16], 4)
    for _ in range(runs):
        report.runs.setdefault("ours", []).append(run_ours(engine, prompt, gen_tokens, params))
        if mlx_lm:
            report.runs.setdefault("mlx-lm", []).append(
                run_mlx_lm(engine, prompt, gen_tokens, params)
            )
        if llama_cpp is not None:
            report.runs.setdefault("llama.cpp", []).append(llama_cpp(prompt, gen_tokens))
    report.forward_tps = forward_tokens_per_s(engine.model, prompt)
    if quant.switched_layers(engine.model):
        with quant.kernels(False):
            report.forward_tps_mlx_kernels = forward_tokens_per_s(engine.model, prompt, steps=4)
    report.weight_bytes_per_token = weight_bytes_per_token(engine.model, engine.config)
    report.copy_gbps = copy_bandwidth_gbps()
    return report


def _mmm(values: list[float]) -> str:
    return f"{min(values):8.2f} {statistics.median(values):8.2f} {max(values):8.2f}"


def format_report(report: Report) -> str:
    """A plain-text table: per engine min/median/max, ratios, bandwidth and overhead."""
    lines = [f"{'metric':22s} {'engine':8s} {'min':>8s} {'median':>8s} {'max':>8s}"]
    metrics = [
        ("prefill tok/s", "prefill_tps", 1),
        ("decode tok/s", "decode_tps", 1),
        ("TTFT s", "ttft_s", 1),
        ("peak memory MiB", "peak_memory_bytes", 2**-20),
    ]
    for label, attr, scale in metrics:
        for name, runs in report.runs.items():
            lines.append(f"{label:22s} {name:8s} {_mmm([getattr(r, attr) * scale for r in runs])}")
    ours = report.runs.get("ours")
    for other, theirs in report.runs.items():
        if other == "ours" or not ours:
            continue
        lines.append("")
        for label, attr, higher in [
            ("prefill", "prefill_tps", True),
            ("decode", "decode_tps", True),
            ("TTFT", "ttft_s", False),
        ]:
            ratios = [
                (getattr(a, attr) / getattr(b, attr))
                if higher
                else (getattr(b, attr) / getattr(a, attr))
                for a, b in zip(ours, theirs, strict=True)
            ]
            lines.append(f"{'speed-up ' + label:22s} {'ours/' + other:8s} {_mmm(ratios)}")
    lines.append("")
    gbps = report.weight_bytes_per_token * report.forward_tps / 1e9
    lines.append(
        f"forward pass alone: {report.forward_tps:.2f} tok/s, reads {report.weight_bytes_per_token / 1e6:.1f} MB "
        f"of weights per token = {gbps:.2f} GB/s (machine copy bandwidth {report.copy_gbps:.1f} GB/s)"
    )
    if report.forward_tps_mlx_kernels:
        lines.append(
            f"forward pass on MLX's quantized kernels: {report.forward_tps_mlx_kernels:.2f} tok/s "
            f"(ours {report.forward_tps / report.forward_tps_mlx_kernels:.1f}x)"
        )
    for name, runs in report.runs.items():
        step = 1 / statistics.median(r.decode_tps for r in runs)
        forward = report.forward_tps
        if name == "mlx-lm" and report.forward_tps_mlx_kernels:
            forward = report.forward_tps_mlx_kernels
        overhead = max(0.0, 1 - (1 / forward) / step)
        lines.append(
            f"{name}: decode step {step * 1e3:.2f} ms, outside the forward pass {overhead * 100:.1f}%"
        )
    return "\n".join(lines)
