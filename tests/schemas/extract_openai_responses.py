"""Re-extract ``openai_responses.json`` from OpenAI's OpenAPI spec (openai/openai-openapi,
``openapi.json``): the schemas the Responses tests validate against, with every schema they
reference, descriptions and examples stripped.

Usage: ``python tests/schemas/extract_openai_responses.py SPEC.json COMMIT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = [
    "Response",
    "ResponseItemList",
    "Error",
    "ResponseCreatedEvent",
    "ResponseInProgressEvent",
    "ResponseCompletedEvent",
    "ResponseIncompleteEvent",
    "ResponseFailedEvent",
    "ResponseErrorEvent",
    "ResponseOutputItemAddedEvent",
    "ResponseOutputItemDoneEvent",
    "ResponseContentPartAddedEvent",
    "ResponseContentPartDoneEvent",
    "ResponseTextDeltaEvent",
    "ResponseTextDoneEvent",
    "ResponseReasoningTextDeltaEvent",
    "ResponseReasoningTextDoneEvent",
    "ResponseFunctionCallArgumentsDeltaEvent",
    "ResponseFunctionCallArgumentsDoneEvent",
    "ResponseCustomToolCallInputDeltaEvent",
    "ResponseCustomToolCallInputDoneEvent",
    "ResponseCodeInterpreterCallInProgressEvent",
    "ResponseCodeInterpreterCallCodeDeltaEvent",
    "ResponseCodeInterpreterCallCodeDoneEvent",
    "ResponseCodeInterpreterCallInterpretingEvent",
    "ResponseCodeInterpreterCallCompletedEvent",
    "ResponseWebSearchCallInProgressEvent",
    "ResponseWebSearchCallSearchingEvent",
    "ResponseWebSearchCallCompletedEvent",
    "ResponseOutputTextAnnotationAddedEvent",
]
DROP = ("description", "x-oaiMeta", "example", "examples", "title")


def strip(node: Any) -> Any:
    """``node`` without documentation keys."""
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k not in DROP}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def closure(schemas: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    """``roots`` and every schema they reference."""
    seen: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = strip(schemas[name])

        def refs(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "$ref" and isinstance(v, str):
                        todo.append(v.rsplit("/", 1)[-1])
                    else:
                        refs(v)
            elif isinstance(node, list):
                for v in node:
                    refs(v)

        refs(schemas[name])
    return dict(sorted(seen.items()))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = {
        "source": "https://github.com/openai/openai-openapi/blob/"
        f"{sys.argv[2]}/openapi.json (components.schemas, subset)",
        "commit": sys.argv[2],
        "spec_version": spec["info"]["version"],
        "components": {"schemas": closure(spec["components"]["schemas"], ROOTS)},
    }
    path = Path(__file__).with_name("openai_responses.json")
    path.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    main()
