"""The model layer: which base models and embedders exist, where they come from, how to load them."""

from vertical.models.registry import (
    BASE_MODELS,
    EMBEDDERS,
    ResolvedModel,
    ensure_local,
    list_models,
    load_causal_lm,
    load_tokenizer,
    save_tokenizer,
    resolve_base_model,
    resolve_embedder,
    selected_logits,
)

__all__ = [
    "BASE_MODELS",
    "EMBEDDERS",
    "ResolvedModel",
    "ensure_local",
    "list_models",
    "load_causal_lm",
    "load_tokenizer",
    "save_tokenizer",
    "resolve_base_model",
    "resolve_embedder",
    "selected_logits",
]
