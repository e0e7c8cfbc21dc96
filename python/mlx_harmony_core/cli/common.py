"""What the subcommands share: argument types, flag builders (sampling flags from
:class:`SamplingParams`, option flags from a schema such as ``ServerOptions``), and loading
the engine from the flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..params import SamplingParams


def logit_bias(text: str) -> dict[int, float]:
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


def port(text: str) -> int:
    """A TCP port number (0..65535)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port in 0..65535")
    return value


def whole(text: str, least: int) -> int:
    """A whole number >= ``least``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def positive(text: str) -> int:
    """A whole number >= 1."""
    return whole(text, 1)


def non_negative(text: str) -> int:
    """A whole number >= 0."""
    return whole(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def flag(name: str) -> str:
    """A field's flag: ``top_k`` -> ``--top-k``."""
    return "--" + name.replace("_", "-")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`SamplingParams` field: its name, type and help come from there."""
    from ..params import SamplingParams, field_type

    g = p.add_argument_group("sampling (applied in this order; see SamplingParams)")
    for name, f in SamplingParams.model_fields.items():
        kind = field_type(name)
        parse = logit_bias if kind is dict else kind
        g.add_argument(
            flag(name),
            *_FLAG_ALIASES.get(name, []),
            dest=name,
            type=parse,
            default=None,
            help=f.description,
        )


def sampling_values(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given, validated (``--temperature must be ...``)."""
    from ..params import FIELDS, sampling_params

    values = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    sampling_params(values, display=flag)
    return values


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags given, as :class:`SamplingParams`."""
    from ..params import sampling_params

    return sampling_params(sampling_values(args), display=flag)


def add_prompt_flags(p: argparse.ArgumentParser, *, chat: bool = False) -> None:
    """Model, prompt-config and reply flags of ``generate`` and ``chat``."""
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
    from ..options import MAX_TOKENS

    g.add_argument(
        "--max-tokens", type=int, default=None, help=f"reply length limit ({MAX_TOKENS})"
    )
    g.add_argument(
        "--max-reasoning-tokens",
        type=non_negative,
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
        "--context-length", type=positive, default=None, help="override the model's window"
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
    add_kv_flags(g)


def add_kv_flags(g: argparse.ArgumentParser) -> None:
    """KV cache, loading, distributed and speculative flags (``generate``, ``chat``, ``serve``)."""
    from ..distributed import TIMEOUT_S

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
        "--adapter-path",
        default=None,
        metavar="DIR",
        help="LoRA adapters in mlx-lm's format (adapter_config.json + adapters.safetensors)",
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
    add_spec_flags(g)


def add_spec_flags(g: argparse.ArgumentParser) -> None:
    """``--speculative``, ``--draft-model``, ``--num-draft``."""
    from ..speculative import DRAFTERS, MAX_DRAFT, NGRAM_DRAFT, NUM_DRAFT

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
        type=positive,
        default=None,
        help=(
            f"tokens drafted per step, at most (default {NGRAM_DRAFT} for ngram, {NUM_DRAFT} "
            f"for a draft model; up to {MAX_DRAFT}; adapted)"
        ),
    )


def spec_options(args: argparse.Namespace) -> dict[str, Any]:
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


def cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """The KV cache flags as the loader's ``cache_options``."""
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


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags name (unset flags are left out so lower layers show through)."""
    out = {k: getattr(args, k) for k in _PROMPT_FLAGS if getattr(args, k, None) is not None}
    return {**out, **sampling_values(args)}


def model_and_config(args: argparse.Namespace, chat_model: str | None = None):
    """Model name and prompt config from --profile / --prompt-config (flags win)."""
    from ..config import PromptConfig, load_profile, load_prompt_config

    model, config = None, PromptConfig()
    if args.profile:
        model, config = load_profile(args.profile, args.profiles)
    if args.prompt_config:
        config = load_prompt_config(args.prompt_config)
    return args.model or chat_model or model or "demo", config


def load_engine(model: str, args: argparse.Namespace, **options: Any) -> Any:
    """The engine for ``model``; in a distributed group, ranks other than 0 follow rank 0
    here until it exits (they never return)."""
    import mlx_harmony_core as mhc

    group = args.group
    engine = mhc.load(
        model,
        cache_options=cache_options(args),
        dequantize=args.dequantize,
        group=group,
        adapter_path=getattr(args, "adapter_path", None),
        **options,
    )
    if group is not None and not group.leader:
        from ..distributed import follow

        raise SystemExit(follow(engine))
    return engine


def release_group(group: Any) -> None:
    """Rank 0, leaving: the other ranks stop following and exit too (once)."""
    if group is not None and group.leader and group.size > 1 and not group.broken:
        if group.released:
            return
        group.released = True
        try:
            group.send(None)
        except Exception:  # a rank already gone: nothing left to tell
            logging.getLogger(__name__).debug("could not release the group", exc_info=True)


def _option_type(kind: Any, spec: Any) -> Any:
    """The argparse ``type`` for a schema field of type ``kind`` with flag ``spec``."""
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
    if spec.parse == "port":
        return port
    if spec.scale != 1 or kind is float:
        return positive_float if spec.gt == 0 else float
    if kind is int:
        return int if spec.ge is None else (lambda text: whole(text, int(spec.ge)))
    return None


def add_option_flags(p: argparse.ArgumentParser, schema: type) -> None:
    """One flag per field of the dataclass ``schema`` whose metadata has a ``"flag"``
    (see :class:`~mlx_harmony_core.server.options.Flag`): its spelling, type, bounds,
    default and help all come from the schema."""
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        spec = field.metadata.get("flag")
        if spec is None:
            continue
        name, default = spec.flag(field.name), spec.default(field.default)
        if spec.negate:
            p.add_argument(name, action="store_true", help=spec.help)
        elif typing.get_origin(hints[field.name]) is tuple:
            p.add_argument(name, nargs="*", default=default, help=spec.help)
        elif typing.get_origin(hints[field.name]) is typing.Literal:
            choices = typing.get_args(hints[field.name])
            p.add_argument(name, choices=choices, default=default, help=spec.help)
        else:
            kind = _option_type(hints[field.name], spec)
            p.add_argument(name, type=kind, default=default, help=spec.help)


def option_values(args: argparse.Namespace, schema: type) -> dict[str, Any]:
    """The values of ``schema``'s flags, in the fields' units (``--max-body-mb`` 4 ->
    ``max_body_bytes`` 4194304)."""
    return {
        f.name: f.metadata["flag"].value(getattr(args, f.metadata["flag"].dest(f.name)), f.default)
        for f in dataclasses.fields(schema)
        if "flag" in f.metadata
    }
