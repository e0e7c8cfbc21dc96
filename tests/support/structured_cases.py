"""Schemas, regexes and grammars for the structured-output tests and benchmarks.

``BOUNDED`` schemas bound every string, number and array, so even a random-weight model
ends them within a few dozen tokens; ``OPEN`` ones are only checked for validity.
"""

from __future__ import annotations

from typing import Any

_POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
    "required": ["x"],
    "additionalProperties": False,
}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}
SHORT_STR = {"type": "string", "maxLength": 8}

BOUNDED: dict[str, dict[str, Any]] = {
    "object_int": _obj({"a": SMALL_INT}),
    "integer_bounds": {"type": "integer", "minimum": -5, "maximum": 5},
    "number_bounds": {"type": "number", "minimum": 0, "maximum": 1},
    "number_exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "enum": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": [1, "two", None, True]},
    "const": {"const": "fixed"},
    "object_const": _obj({"kind": {"const": "point"}, "x": SMALL_INT}),
    "array_ints": {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 4},
    "array_enum": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 3},
    "array_nested": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        "maxItems": 2,
    },
    "array_objects": {"type": "array", "items": _POINT, "minItems": 1, "maxItems": 3},
    "tuple": {
        "type": "array",
        "prefixItems": [SMALL_INT, {"type": "boolean"}],
        "items": False,
        "minItems": 2,
    },
    "nested_object": _obj({"p": _obj({"x": SMALL_INT, "y": SMALL_INT}), "ok": {"type": "boolean"}}),
    "optional_fields": _obj(
        {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": SMALL_INT}, required=["c"]
    ),
    "all_optional": _obj({"a": {"type": "boolean"}, "b": SHORT_STR}, required=[]),
    "any_of": {"anyOf": [SMALL_INT, {"type": "boolean"}, {"type": "null"}]},
    "type_list": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
    "string_bounds": {"type": "string", "minLength": 2, "maxLength": 6},
    "string_pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "string_in_object": _obj(
        {"name": SHORT_STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}}
    ),
    "format_date": {"type": "string", "format": "date"},
    "format_time": {"type": "string", "format": "time"},
    "format_uuid": {"type": "string", "format": "uuid"},
    "format_ipv4": {"type": "string", "format": "ipv4"},
    "refs": {
        "$defs": {"pt": _POINT},
        **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}),
    },
    "enum_and_flags": _obj(
        {"color": {"enum": ["red", "blue"]}, "on": {"type": "boolean"}, "n": SMALL_INT}
    ),
    "object_of_arrays": _obj(
        {"xs": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}, "tag": SHORT_STR}
    ),
}

OPEN: dict[str, dict[str, Any]] = {
    "any_object": {"type": "object"},
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "format_email": {"type": "string", "format": "email"},
    "format_date_time": {"type": "string", "format": "date-time"},
}

REGEXES: dict[str, str] = {
    "code": r"[A-Z]{3}-[0-9]{2,4}",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "choice": r"(yes|no|maybe)",
    "hex": r"0x[0-9a-f]{1,8}",
    "words": r"[a-z]{1,6}( [a-z]{1,6}){0,3}\.",
    "date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
}

# Nested arithmetic: checked with a small recursive parser in the tests.
ARITHMETIC = """
start: expr
expr: NUMBER | "(" expr OP expr ")"
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,2}/
"""

KEY_VALUES = """
start: pair ("," pair){0,3}
pair: KEY "=" VALUE
KEY: /[a-z]{1,5}/
VALUE: /[0-9]{1,3}/ | "true" | "false"
"""
