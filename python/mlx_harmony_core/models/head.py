"""Where a model's forward pass ends in its output head, so callers can run the head alone.

The batch scheduler runs the head (the widest matrix: 201088 rows on gpt-oss) only at the
positions it draws from, and a distributed group finds its vocabulary-split head here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["split_head"]

# Model classes whose __call__ is exactly ``head(self.model(inputs, cache))``.
_SPLIT_HEAD = {"mlx_lm.models.llama", "mlx_lm.models.gpt_oss", "mlx_lm.models.qwen2"}


def split_head(model: Any) -> Any:
    """The output head of ``model`` as a function of hidden states, or None when the model
    is not known to end in it (then the whole forward pass runs)."""
    if type(model).__module__ not in _SPLIT_HEAD or not hasattr(model, "model"):
        return None
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear
    return getattr(model, "lm_head", None)
