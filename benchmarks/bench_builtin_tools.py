"""What the built-in tools cost: a python call's overhead and a local search's latency.

    python -m pytest benchmarks/bench_builtin_tools.py

Side by side (the conftest prints the ratios):
- python session start (sandboxed process + first cell) vs starting a plain ``python -c 1``;
- python round trip in a warm session (``1``) vs ``exec`` of the same cell in-process;
- local search over 300 generated documents (SQLite FTS5, the change scan included) vs
  reading every file and counting the query words in Python.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest

from mlx_harmony_core.tools import BuiltinToolOptions, BuiltinTools, ToolCall

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the python tool needs fork")
WORDS = [
    "model",
    "answer",
    "question",
    "physics",
    "history",
    "music",
    "code",
    "care",
    "array",
    "memory",
    "cache",
    "index",
]


@pytest.fixture(scope="module")
def python_tools():
    with BuiltinTools(["python"]) as t:
        yield t


@pytest.mark.parametrize("engine", ["ours", "plain_subprocess"])
def test_python_session_start(benchmark, python_tools, engine):
    benchmark.group = "python: session start + first cell"
    benchmark.extra_info["engine"] = engine
    n = iter(range(10**9))

    def ours():
        key = f"start-{next(n)}"
        r = python_tools.run(ToolCall("python", "1", key))
        assert r.text == "1", r.text
        python_tools.end_session(key)

    def plain():
        subprocess.run([sys.executable, "-I", "-c", "1"], check=True)

    benchmark.pedantic(ours if engine == "ours" else plain, rounds=8, iterations=1)


@pytest.mark.parametrize("engine", ["ours", "in_process_exec"])
def test_python_round_trip(benchmark, python_tools, engine):
    benchmark.group = "python: round trip in a warm session"
    benchmark.extra_info["engine"] = engine
    python_tools.run(ToolCall("python", "x = 0", "warm"))
    ns: dict = {}

    def ours():
        assert python_tools.run(ToolCall("python", "x += 1\nx", "warm")).status == "completed"

    def baseline():
        exec(compile("x = ns.get('x', 0) + 1", "<cell>", "exec"), {"ns": ns})

    benchmark(ours if engine == "ours" else baseline)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(300):
        words = " ".join(rng.choice(WORDS) for _ in range(400))
        (folder / f"doc{i:03d}.md").write_text(f"# Document {i}\n\n{words}\n")
    return folder


@pytest.mark.parametrize("engine", ["ours", "python_scan"])
def test_local_search(benchmark, corpus, tmp_path, engine):
    benchmark.group = "browser: local search, 300 documents"
    benchmark.extra_info["engine"] = engine
    opts = BuiltinToolOptions(browser_index=corpus, browser_index_db=tmp_path / "bench.sqlite")
    query = "physics memory"
    with BuiltinTools(["browser"], opts) as t:
        t.run(ToolCall("browser.search", '{"query": "warm"}', "b"))  # builds the index once

        def ours():
            r = t.run(ToolCall("browser.search", f'{{"query": "{query}"}}', "b"))
            assert r.status == "completed" and "【0†" in r.text

        def scan():
            terms = query.split()
            scores = []
            for path in sorted(corpus.iterdir()):
                words = re.findall(r"\w+", path.read_text().lower())
                scores.append((sum(words.count(w) for w in terms), path.name))
            return sorted(scores, reverse=True)[:10]

        benchmark(ours if engine == "ours" else scan)
