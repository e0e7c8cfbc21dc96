"""Request bodies every server test that sends bad input shares: (body, a word the 400's
message must hold)."""

MSG = [{"role": "user", "content": "hi"}]

BAD_BODIES = [
    ({"messages": MSG, "logit_bias": {"2147483648": 1}}, "logit_bias"),
    ({"messages": MSG, "top_k": 2**40}, "top_k must be an integer"),
    ({"messages": MSG, "stop": ["a\ud800"]}, "surrogate"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "max_tokens": "2"}, "max_tokens"),
    ({"messages": MSG, "seed": True}, "seed"),
    ({"messages": MSG, "xtc_probability": False}, "xtc_probability"),
    ({"messages": MSG, "logit_bias": {"5": 1000}}, "logit_bias"),
    (
        {
            "messages": MSG,
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "nonsense"}},
                }
            ],
        },
        "not a valid JSON Schema",
    ),
    (
        {
            "messages": MSG,
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"$ref": "#/$defs/x"}},
                }
            ],
        },
        "points at nothing",
    ),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "surrogate"),
    # Values that fit the schema but not this model: refused before the request runs.
    ({"messages": MSG, "logit_bias": {"201088": 5}}, "outside the vocabulary"),
    ({"messages": MSG, "top_k": 201089}, "top_k"),
    ({"messages": MSG, "response_format": {"type": "json_schema"}}, "json_schema"),
    ({"messages": MSG, "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool"),
]
