"""Where a GPT-OSS decode token goes: milliseconds (wall and CPU) and bytes per part, per token.

    MHC_BENCH_OSS_PROFILE=/work/big/gpt-oss-20b-shapes.gguf flock /tmp/mhc-bigmem.lock \
        python -m pytest benchmarks/bench_gpt_oss_profile.py -s

A GGUF file (``$MHC_BENCH_OSS_PROFILE``; without it a tiny demo-shaped file, once, as a test) is
loaded as ``mlx_harmony_core.load`` does on the CPU (block-kernel layers over the mapped file,
fused norms/RoPE/attention), a prompt is prefilled (``$MHC_BENCH_PROMPT`` tokens, default 128),
then ``$MHC_BENCH_TOKENS`` decode tokens (4) run two ways: whole (one ``mx.eval`` per token:
the real step) and part by part, mlx-lm's GPT-OSS layer
replayed on the model's own modules with an ``mx.eval`` after each part. The parts' sum exceeds
the whole step by the barriers' cost (~0.1 ms each); CPU seconds (all threads) next to wall
seconds show how much of a token the machine's other load took. Bytes are the weights a part
reads (experts: the k chosen of E), so GB/s per part compares with the copy bandwidth.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

PATH = os.environ.get("MHC_BENCH_OSS_PROFILE")


def _nbytes(module: Any, names: tuple[str, ...] = ("weight", "scales", "biases")) -> int:
    return sum(module[n].nbytes for n in names if n in module)


class Parts:
    """Per-part wall / CPU seconds and weight bytes, summed over tokens."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.bytes: dict[str, int] = {}

    def run(self, name: str, f: Callable[[], Any], nbytes: int = 0) -> Any:
        w0, c0 = time.perf_counter(), time.process_time()
        out = f()
        mx.eval(out)
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
        self.bytes[name] = self.bytes.get(name, 0) + nbytes
        return out

    def table(self, tokens: int) -> str:
        lines = [f"  {'part':16s} {'wall ms':>9s} {'cpu ms':>9s} {'MB':>8s} {'GB/s cpu':>9s}"]
        for name in sorted(self.wall, key=lambda n: -self.cpu[n]):
            wall, cpu = 1e3 * self.wall[name] / tokens, 1e3 * self.cpu[name] / tokens
            mb = self.bytes[name] / tokens / 1e6
            rate = f"{mb / cpu:9.2f}" if mb and cpu else " " * 9
            lines.append(f"  {name:16s} {wall:9.2f} {cpu:9.2f} {mb:8.1f} {rate}")
        wall, cpu = (1e3 * sum(d.values()) / tokens for d in (self.wall, self.cpu))
        mb = sum(self.bytes.values()) / tokens / 1e6
        lines.append(f"  {'sum of parts':16s} {wall:9.2f} {cpu:9.2f} {mb:8.1f}")
        return "\n".join(lines)


def _layer(parts: Parts, inner: Any, layer: Any, c: Any, kind: str, x: mx.array) -> mx.array:
    """One GPT-OSS layer (mlx-lm's ``TransformerBlock``) on ``x``, part by part."""
    from mlx_lm.models import gpt_oss
    from mlx_lm.models.base import create_attention_mask

    a, mlp = layer.self_attn, layer.mlp
    h = parts.run("norms", lambda: layer.input_layernorm(x))
    b, n, _ = x.shape
    projs = (a.q_proj, a.k_proj, a.v_proj)
    q, k, v = parts.run(
        "attn q/k/v proj",
        lambda: [p(h).reshape(b, n, -1, a.head_dim).swapaxes(1, 2) for p in projs],
        sum(_nbytes(p) for p in projs),
    )
    q, k = parts.run("rope", lambda: [a.rope(t, offset=c.offset) for t in (q, k)])
    k, v = parts.run("kv cache", lambda: c.update_and_fetch(k, v))
    window = inner.window_size if kind == "sliding_attention" else None
    mask = create_attention_mask(h, c, window_size=window) if window else None
    o = parts.run(  # the module's attention function: ours, fused, where loading switched it
        "attention",
        lambda: gpt_oss.scaled_dot_product_attention(
            q, k, v, c, a.sm_scale, mask=mask, sinks=a.sinks
        ),
    )
    o = parts.run(
        "attn o proj", lambda: a.o_proj(o.swapaxes(1, 2).reshape(b, n, -1)), _nbytes(a.o_proj)
    )
    x = parts.run("residual adds", lambda: x + o)
    h = parts.run("norms", lambda: layer.post_attention_layernorm(x))
    g = parts.run("router proj", lambda: mlp.router(h), _nbytes(mlp.router))
    top = mlp.num_experts_per_tok

    def route() -> tuple[mx.array, mx.array]:
        values, idx = gpt_oss.mlx_topk(g, k=top, axis=-1)
        return mx.softmax(values, axis=-1, precise=True), idx

    weights, idx = parts.run("router top-k", route)
    e = mlp.experts
    share = top / e.up_proj["weight"].shape[0]  # the chosen experts' weights are read
    xe = mx.expand_dims(h, (-2, -3))
    up = parts.run("experts gate/up", lambda: e.up_proj(xe, idx), int(share * _nbytes(e.up_proj)))
    gate = parts.run(
        "experts gate/up", lambda: e.gate_proj(xe, idx), int(share * _nbytes(e.gate_proj))
    )
    act = parts.run("experts swiglu", lambda: e.activation(up, gate))
    down = parts.run(
        "experts down",
        lambda: e.down_proj(act, idx).squeeze(-2),
        int(share * _nbytes(e.down_proj)),
    )
    y = parts.run("experts combine", lambda: (down * weights[..., None]).sum(axis=-2))
    return parts.run("residual adds", lambda: x + y)


def decode_parts(model: Any, cache: list[Any], token: mx.array, parts: Parts) -> mx.array:
    """One decode token through ``model`` (mlx-lm's GPT-OSS), part by part (``cache``
    advances as in the real step); returns the logits."""
    inner = model.model
    x = parts.run("embed", lambda: inner.embed_tokens(token))
    for layer, c, kind in zip(inner.layers, cache, inner.layer_types, strict=True):
        x = _layer(parts, inner, layer, c, kind, x)
    h = parts.run("norms", lambda: inner.norm(x))
    return parts.run("head", lambda: model.lm_head(h), _nbytes(model.lm_head))


def profile(path: str, tokens: int = 4, prompt: int = 128) -> str:
    """The report for the GGUF file at ``path``: whole steps, then part by part."""
    import mlx_harmony_core as mhc

    model = mhc.load(path).runner.model
    cache = model.make_cache()
    mx.eval(model(mx.array([list(range(1000, 1000 + prompt))]), cache))
    token = mx.array([[1234]])
    mx.eval(model(token, cache))  # warm: the mapped weights paged in
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(tokens):
        mx.eval(model(token, cache))
    wall, cpu = (time.perf_counter() - w0) / tokens, (time.process_time() - c0) / tokens
    parts = Parts()
    for _ in range(tokens):
        decode_parts(model, cache, token, parts)
    load = os.getloadavg()
    return (
        f"\n{Path(path).name}: decode, {tokens} tokens after {prompt}, load average "
        f"{load[0]:.1f}\n  whole step: wall {1e3 * wall:.1f} ms, cpu {1e3 * cpu:.1f} ms "
        f"({1 / wall:.2f} tok/s)\n{parts.table(tokens)}"
    )


def test_gpt_oss_decode_profile(tmp_path: Path) -> None:
    path = PATH
    if path is None:  # CI: a tiny demo-shaped file, once
        from mlx_harmony_core.models.gguf_builder import make_test_gguf

        path = str(make_test_gguf(tmp_path / "demo.gguf", preset="demo"))
    elif not Path(path).exists():
        pytest.skip(f"{path} is missing")
    tokens = int(os.environ.get("MHC_BENCH_TOKENS", "4"))
    report = profile(path, tokens=tokens, prompt=int(os.environ.get("MHC_BENCH_PROMPT", "128")))
    print(report)
    assert "head" in report
