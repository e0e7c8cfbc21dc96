"""``python tests/support/scripted_chat.py SCRIPT.json chat ...``: the CLI, with every
request of the (demo) model following the replies in SCRIPT.json (Harmony text, one per
reply; see :class:`support.tool_script.ScriptProcessor`), so that a real terminal session
can show built-in tool calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_harmony_core as mhc  # noqa: E402
from mlx_harmony_core.cli import main  # noqa: E402
from support.tool_script import ScriptProcessor, toks  # noqa: E402

replies = [toks(r) for r in json.loads(Path(sys.argv[1]).read_text())]
script = ScriptProcessor(replies)
_request = mhc.Engine.request


def request(self, messages, params=None, options=None, **kw):  # type: ignore[no-untyped-def]
    if options is None:
        kw.setdefault("logits_processors", [script])
    return _request(self, messages, mhc.SamplingParams(temperature=0), options, **kw)


mhc.Engine.request = request  # type: ignore[method-assign]
sys.exit(main(sys.argv[2:]))
