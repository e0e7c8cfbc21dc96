"""What a server holding several models serves: :class:`ModelSpec` (one entry: a name, a
model path or a base entry plus LoRA adapters, per-model options), read from ``serve -m
NAME=PATH`` flags or a models file (JSON or TOML), and checked before anything loads.

A models file lists entries under ``models`` (a JSON list at the top level works too)::

    [[models]]
    name = "smol"
    path = "SmolLM2-135M-Instruct.Q4_1.gguf"   # relative to the file
    max_batch = 4
    [[models]]
    name = "demo"
    path = "demo"
    [[models]]
    name = "demo-tuned"
    base = "demo"                              # shares demo's weights in memory
    adapter_path = "adapters/"

Every problem (an unknown key, a missing path, a duplicate name, a base that is not an
entry) is a ``ValueError`` naming the entry, raised at startup.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import ServerOptions

# ServerOptions fields a models file may set per model (keys: their flags' spellings,
# ``kv_budget_mb``; bounds and units from the same Flag, one source of truth).
PER_MODEL_FIELDS = (
    "max_batch",
    "max_queue",
    "kv_budget_bytes",
    "prefill_chunk",
    "prefix_cache_entries",
    "prefix_cache_bytes",
    "default_max_tokens",
    "max_tokens_limit",
    "max_reasoning_tokens",
)
# Loading options (as generate's and serve's flags): key -> accepted types / values.
LOAD_KEYS: dict[str, tuple[type, ...]] = {
    "dequantize": (bool,),
    "kv_bits": (int,),
    "kv_group_size": (int,),
    "kv_history": (int, str),
}
ENTRY_KEYS = ("name", "path", "adapter_path", "base")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[^\s/]+(/[^\s/]+)*$")
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")


def _flags() -> dict[str, tuple[str, Any]]:
    """Per-model key -> (ServerOptions field, its Flag)."""
    out = {}
    for f in dataclasses.fields(ServerOptions):
        if f.name in PER_MODEL_FIELDS:
            flag = f.metadata["flag"]
            out[flag.dest(f.name)] = (f.name, flag)
    return out


@dataclass(frozen=True)
class ModelSpec:
    """One model a server holds.

    ``path``: a model directory, a ``.gguf`` file, ``"demo"`` or a Hugging Face repo id;
    with ``adapter_path`` the adapters are applied to a fresh copy of it. ``base``: the
    name of another entry whose weights this one shares in memory, with ``adapter_path``'s
    LoRA adapters on top. ``options``: :class:`ServerOptions` fields for this model
    (``max_batch``, ``kv_budget_bytes``, ...); ``load``: loading options
    (``dequantize``, ``kv_bits``, ``kv_group_size``, ``kv_history``).
    """

    name: str
    path: str | None = None
    adapter_path: str | None = None
    base: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)

    def server_options(self, defaults: ServerOptions) -> ServerOptions:
        """The server's options as this model is served (its name, its overrides)."""
        return dataclasses.replace(defaults, model_name=self.name, **self.options)


def parse_model_flag(text: str) -> ModelSpec:
    """``serve -m``: ``PATH`` (named after its directory or file, as today) or
    ``NAME=PATH``."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).expanduser().exists() or "/" in name:
        path = text
        name = Path(text.rstrip("/")).name or text
    if not name or not path:
        raise ValueError(f"-m {text!r}: give a model path, or NAME=PATH")
    return ModelSpec(name=name, path=path)


def read_models_file(path: str | Path) -> list[ModelSpec]:
    """The entries of a models file (``.json`` or ``.toml``); paths in it are relative to
    the file. Raises ``ValueError`` naming the problem (and the entry)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the models file {file}: {exc.strerror or exc}") from None
    try:
        if file.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ValueError(
                    f"{file}: a TOML models file needs Python 3.11; use JSON"
                ) from None
            data: Any = tomllib.loads(text)
        elif file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"the models file {file} must end in .json or .toml")
    except (json.JSONDecodeError, ValueError) as exc:
        if str(exc).startswith("the models file"):
            raise
        raise ValueError(f"the models file {file} is not valid {file.suffix[1:]}: {exc}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"models"})
        if unknown:
            raise ValueError(
                f"{file}: unknown top-level key(s) {unknown}; list entries under 'models'"
            )
        data = data.get("models")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{file}: no models (a non-empty list of entries under 'models')")
    return [_entry(item, i, file.parent) for i, item in enumerate(data)]


def _entry(item: Any, index: int, root: Path) -> ModelSpec:
    """One file entry as a spec (paths resolved against ``root``)."""
    where = f"models file entry {index + 1}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an entry is a table / object with name and path")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' (a non-empty string) is required")
    where = f"models file entry {name!r}"
    flags = _flags()
    unknown = sorted(set(item) - set(ENTRY_KEYS) - set(flags) - set(LOAD_KEYS))
    if unknown:
        known = ", ".join([*ENTRY_KEYS, *flags, *LOAD_KEYS])
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {known}")
    for key in ("path", "adapter_path", "base"):
        if key in item and (not isinstance(item[key], str) or not item[key]):
            raise ValueError(f"{where}: {key!r} must be a non-empty string")
    options: dict[str, Any] = {}
    for key, (fname, flag) in flags.items():
        if key in item:
            options[fname] = _option(where, key, item[key], flag)
    load: dict[str, Any] = {}
    for key, types in LOAD_KEYS.items():
        if key in item:
            value = item[key]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                names = " or ".join(t.__name__ for t in types)
                raise ValueError(f"{where}: {key!r} must be {names}, got {value!r}")
            load[key] = value
    path = item.get("path")
    if path is not None and path != "demo" and not Path(path).expanduser().is_absolute():
        local = root / path
        if local.exists() or not _HF_ID.match(path):
            path = str(local)
    adapter = item.get("adapter_path")
    if adapter is not None:
        adapter = str(root / Path(adapter).expanduser())
    return ModelSpec(name, path, adapter, item.get("base"), options, load)


def _option(where: str, key: str, value: Any, flag: Any) -> Any:
    """A per-model option's value in the field's unit, within the flag's bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
    if flag.scale == 1 and not isinstance(value, int):
        raise ValueError(f"{where}: {key!r} must be a whole number, got {value!r}")
    if (flag.ge is not None and value < flag.ge) or (flag.gt is not None and value <= flag.gt):
        bound = f">= {flag.ge:g}" if flag.ge is not None else f"> {flag.gt:g}"
        raise ValueError(f"{where}: {key!r} must be {bound}, got {value!r}")
    return flag.value(value, None)


def check_specs(specs: Sequence[ModelSpec]) -> None:
    """Raise ``ValueError`` (naming the entry) for a duplicate name, a missing model path
    or adapter directory, or a ``base`` that is not a model entry of its own."""
    if not specs:
        raise ValueError("no models to serve")
    by_name: dict[str, ModelSpec] = {}
    for s in specs:
        if not _NAME.match(s.name):
            raise ValueError(f"model {s.name!r}: a name has no spaces (and no empty / parts)")
        if s.name in by_name:
            raise ValueError(f"model {s.name!r} is listed twice; give each entry its own name")
        by_name[s.name] = s
    for s in specs:
        where = f"model {s.name!r}"
        if (s.path is None) == (s.base is None):
            raise ValueError(f"{where}: give either 'path' (a model) or 'base' (another entry)")
        if s.base is not None:
            base = by_name.get(s.base)
            if base is None:
                raise ValueError(
                    f"{where}: base {s.base!r} is not an entry; the entries are {_names(specs)}"
                )
            if base.base is not None or base.adapter_path is not None:
                raise ValueError(f"{where}: base {s.base!r} must be a plain model entry")
            if s.adapter_path is None:
                raise ValueError(f"{where}: an entry with 'base' needs 'adapter_path'")
            if _is_gguf(base.path or ""):
                raise ValueError(
                    f"{where}: LoRA adapters apply to model directories, and {s.base!r} is a "
                    "GGUF file; convert it first (mlx-harmony-core convert FILE.gguf DIR)"
                )
        else:
            _check_path(where, s.path or "")
            if s.adapter_path is not None and _is_gguf(s.path or ""):
                raise ValueError(
                    f"{where}: LoRA adapters apply to model directories; convert the GGUF "
                    "file first (mlx-harmony-core convert FILE.gguf DIR)"
                )
        if s.adapter_path is not None:
            directory = Path(s.adapter_path)
            missing = [f for f in ADAPTER_FILES if not (directory / f).is_file()]
            if missing:
                raise ValueError(
                    f"{where}: adapter_path {str(directory)!r} has no {' or '.join(missing)} "
                    "(mlx-lm's adapter format)"
                )


def _check_path(where: str, path: str) -> None:
    """A model path that can load: an existing file or directory, 'demo', or a repo id."""
    if path == "demo" or Path(path).expanduser().exists():
        return
    if _HF_ID.match(path) and not path.startswith((".", "/", "~")):
        return  # a Hugging Face repo id: fetched when first loaded
    raise ValueError(
        f"{where}: {path!r} does not exist (give a model directory, a .gguf file, 'demo' "
        "or a Hugging Face repo id)"
    )


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def _names(specs: Iterable[ModelSpec]) -> str:
    return ", ".join(repr(s.name) for s in specs)
