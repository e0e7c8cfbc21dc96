"""``mlx-harmony-core bench``: prefill and decode speed, ours vs mlx-lm's (and llama.cpp's
on a GGUF file)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_sampling_flags, positive, sampling_from


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``bench`` subcommand."""
    b = sub.add_parser(
        "bench", parents=parents, help="prefill/decode speed, ours vs mlx-lm's stream_generate"
    )
    b.add_argument("--model", "-m", default="demo", help="model directory, .gguf file or 'demo'")
    b.add_argument(
        "--dequantize", action="store_true", help="a quantized GGUF model as float32 weights"
    )
    b.add_argument(
        "--llama-cpp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a .gguf model: also run llama.cpp (llama-cpp-python) on the file, greedy",
    )
    b.add_argument("--prompt-tokens", type=positive, default=512, help="prompt length")
    b.add_argument("--gen-tokens", type=positive, default=128, help="tokens to generate")
    b.add_argument("--runs", type=positive, default=3, help="alternating runs per engine")
    b.add_argument(
        "--compare",
        choices=["mlx-lm", "none"],
        default="mlx-lm",
        help="run mlx-lm's stream_generate side by side (default) or not",
    )
    add_sampling_flags(b)
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print the report."""
    import mlx_harmony_core as mhc
    from mlx_harmony_core.bench import compare, format_report

    params = sampling_from(args)
    if args.temperature is None:
        params = params.model_copy(update={"temperature": 0.0})
    engine = mhc.load(args.model, dequantize=args.dequantize)
    runner = None
    if mhc.is_gguf(args.model) and args.llama_cpp:
        from mlx_harmony_core.bench import llama_cpp_runner

        runner = llama_cpp_runner(args.model)
        if runner is None:
            print("llama-cpp-python is not installed: llama.cpp is left out", file=sys.stderr)
    print(
        f"model {args.model}: {args.prompt_tokens} prompt tokens, {args.gen_tokens} generated, "
        f"{args.runs} alternating runs, sampling {params.model_dump(exclude_defaults=True) or 'greedy'}"
    )
    report = compare(
        engine,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        runs=args.runs,
        params=params,
        mlx_lm=args.compare == "mlx-lm",
        llama_cpp=runner,
    )
    print(format_report(report))
    return 0
