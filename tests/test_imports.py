"""The import graph: no cycles, each module imports alone, importing writes no file."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import mlx_harmony_core as mhc

PACKAGE = Path(mhc.__file__).parent


# -- imports ------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    """``server/app.py`` -> ``server.app``; ``server/__init__.py`` -> ``server``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """The package's modules by dotted name (sub-packages' too), the package itself left out."""
    paths = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    return {_module_name(p): p for p in paths if p != PACKAGE / "__init__.py"}


def _relative_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (functions too), by dotted name
    (``from .x import y`` counts ``x`` and ``x.y``), outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    here = _module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package the module is in
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1 and id(node) not in skip:
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                out.add(".".join(target))
            out |= {".".join([*target, a.name]) for a in node.names}
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {
        m: {d for d in _relative_imports(p) if d in modules and d != m} for m, p in modules.items()
    }
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, m, d]))
            if d not in state:
                visit(d, [*trail, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_each_module_imports_alone(tmp_path):
    names = sorted(m for m in _modules() if not m.endswith("__main__"))  # those run
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module('mlx_harmony_core.' + n)\n"
    for name in names:  # each in a fresh interpreter: no order can hide a cycle
        r = subprocess.run(
            [sys.executable, "-c", code, name], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, (name, r.stderr[-2000:])


def test_import_writes_no_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env["MLX_HARMONY_CORE_HOME"] = str(tmp_path / "home")
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    code = "import mlx_harmony_core as m; print(m.__version__)"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    from importlib.metadata import version

    assert r.stdout.strip() == version("mlx-harmony-core") == mhc.__version__
    assert not (tmp_path / "home").exists() and not any((tmp_path / "tmp").iterdir())
    code = "import mlx_harmony_core as m; print(len(m.load_encoding().encode('hi')))"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and (tmp_path / "home" / "vocab").exists()  # unpacked on first use


def test_no_module_imports_another_modules_private_names():
    """``from .x import _name`` only where ``_name`` is a module (``from . import _core``),
    never a private name of another module."""
    modules = _modules()
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module):
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            source = ".".join([*base, *node.module.split(".")])
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                assert not private or f"{source}.{alias.name}" in modules, (name, alias.name)
