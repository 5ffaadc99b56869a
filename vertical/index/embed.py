"""Sentence embeddings with sentence-transformers (normalised, batched, with progress)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from vertical.models.registry import quiet_loads, resolve_embedder

log = logging.getLogger(__name__)


class Embedder:
    def __init__(self, spec: str):
        from sentence_transformers import SentenceTransformer

        quiet_loads()
        self.spec = spec
        self.path: Path = resolve_embedder(spec)
        self.model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 64,
               track: Callable[[Iterable, int, str], Iterator] | None = None) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text; batches reported through `track`."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
        iterator = track(batches, len(batches), f"embedding {len(texts)} texts") if track else batches
        parts = [
            self.model.encode(batch, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=False)
            for batch in iterator
        ]
        return np.concatenate(parts).astype(np.float32)

    def encode_query(self, texts: list[str]) -> np.ndarray:
        """Embed queries; a query longer than the embedder's limit is truncated, with a warning."""
        for text in texts:
            n = len(self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
            if n > self.max_tokens:
                log.warning("query of %d tokens truncated to the embedder's limit of %d", n, self.max_tokens)
        return self.encode(texts)
