"""The retrieval index on disk and in memory: chunks, their embeddings, FAISS and BM25.

This module is torch-free on purpose: the exported runtime imports it and brings its own
(ONNX) embedder. Anything that embeds text is passed in as an `encode(list[str]) -> ndarray`.

    index/
      index.json        settings, embedder, FAISS kind, threshold, document hashes
      chunks.jsonl      one chunk per line (id, doc_id, title, source, span, text, section)
      embeddings.npy    float32, L2-normalised, one row per chunk (kept so updates never re-embed)
      faiss.index       inner-product index over the embeddings
      bm25/             bm25s sparse index over the chunks' text
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vertical.errors import VerticalError
from vertical.index.chunking import Chunk

EMBEDDER = "embedder"  # index/embedder/: the sentence embedder as one ONNX graph

log = logging.getLogger(__name__)

Encoder = Callable[[list[str]], np.ndarray]

# Above this many chunks an exact scan gets slow enough that HNSW pays for its build time
# (benchmarks/retrieval.py: flat 384-dim search is ~1 ms at 10k chunks and ~12 ms at 100k on 2 cores).
HNSW_THRESHOLD = 50_000
RRF_K = 60  # reciprocal-rank fusion constant, as in Cormack et al. (2009)
CANDIDATES = 50  # how deep each retriever looks before fusion


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the fused (or single-retriever) score used for ranking
    dense: float | None  # cosine similarity to the query, when dense search ran
    rank: int

    def as_json(self) -> dict[str, Any]:
        """The hit as `vertical search --json` and the server's /v1/search give it."""
        return {"rank": self.rank + 1, "score": round(self.score, 4),
                "similarity": None if self.dense is None else round(self.dense, 4), "doc_id": self.chunk.doc_id,
                "chunk_id": self.chunk.id, "title": self.chunk.title, "source": self.chunk.source,
                "span": [self.chunk.start, self.chunk.end], "text": self.chunk.text}


def _tokenize_bm25(texts: list[str]) -> list[list[str]]:
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class RetrievalIndex:
    def __init__(self, chunks: list[Chunk], embeddings: np.ndarray, meta: dict[str, Any]):
        if len(chunks) != len(embeddings):
            raise ValueError(f"{len(chunks)} chunks but {len(embeddings)} embeddings")
        self.chunks = chunks
        self.embeddings = embeddings.astype(np.float32, copy=False)
        self.meta = meta
        self._faiss = self._build_faiss()
        self._bm25 = self._build_bm25()

    # ------------------------------------------------------------ building

    def _build_faiss(self):
        import faiss

        dim = self.embeddings.shape[1] if self.embeddings.ndim == 2 and len(self.embeddings) else int(self.meta.get("dim", 384))
        if len(self.chunks) >= HNSW_THRESHOLD:
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 96
            self.meta["faiss"] = "hnsw"
        else:
            index = faiss.IndexFlatIP(dim)
            self.meta["faiss"] = "flat"
        if len(self.embeddings):
            index.add(self.embeddings)
        return index

    def _build_bm25(self):
        import bm25s

        if not self.chunks:
            return None
        tokens = _tokenize_bm25([c.embedding_text() for c in self.chunks])
        # a sorted vocabulary: bm25s numbers tokens in set order, which changes with the hash seed,
        # and the same documents must give byte-identical index files in every process
        vocab = {token: i for i, token in enumerate(sorted({t for doc in tokens for t in doc}))}
        retriever = bm25s.BM25()
        retriever.index(([[vocab[t] for t in doc] for doc in tokens], vocab), show_progress=False)
        return retriever

    # ------------------------------------------------------------ search

    def _dense(self, query_vec: np.ndarray, depth: int) -> list[tuple[int, float]]:
        scores, ids = self._faiss.search(query_vec.reshape(1, -1).astype(np.float32), depth)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _keyword(self, query: str, depth: int) -> list[tuple[int, float]]:
        if self._bm25 is None:
            return []
        tokens = [t for t in _tokenize_bm25([query])[0] if t in self._bm25.vocab_dict]
        if not tokens:
            return []
        scores = self._bm25.get_scores(tokens)
        depth = min(depth, len(scores))
        top = np.argpartition(-scores, depth - 1)[:depth]
        top = top[np.argsort(-scores[top])]
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]

    def search(self, query: str, encode: Encoder | None, k: int = 5, mode: str | None = None) -> list[Hit]:
        """Top-k chunks for the query. `mode` is dense, bm25 or hybrid (default: the index's)."""
        mode = mode or self.meta.get("mode", "hybrid")
        if not self.chunks:
            return []
        depth = min(max(CANDIDATES, k), len(self.chunks))
        dense: list[tuple[int, float]] = []
        if mode in ("dense", "hybrid"):
            if encode is None:
                raise ValueError("dense search needs an encoder")
            dense = self._dense(encode([query])[0], depth)
        keyword = self._keyword(query, depth) if mode in ("bm25", "hybrid") else []
        cosine = dict(dense)
        if mode == "dense":
            ranked = dense
        elif mode == "bm25":
            ranked = keyword
        else:
            fused: dict[int, float] = {}
            for results in (dense, keyword):
                for rank, (i, _) in enumerate(results):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
            ranked = sorted(fused.items(), key=lambda item: -item[1])
        return [Hit(self.chunks[i], score, cosine.get(i), rank) for rank, (i, score) in enumerate(ranked[:k])]

    def best_similarity(self, query: str, encode: Encoder) -> float:
        """Cosine similarity of the closest chunk: the signal for "the documents do not cover this"."""
        found = self._dense(encode([query])[0], 1)
        return found[0][1] if found else -1.0

    # ------------------------------------------------------------ persistence

    def doc_ids(self) -> list[str]:
        return list(dict.fromkeys(c.doc_id for c in self.chunks))

    def save(self, folder: Path) -> None:
        """Write every file of the index into `folder` (the caller makes the folder atomic)."""
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "chunks.jsonl", "w", encoding="utf-8") as handle:
            for chunk in self.chunks:
                handle.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
        np.save(folder / "embeddings.npy", self.embeddings)
        faiss.write_index(self._faiss, str(folder / "faiss.index"))
        if self._bm25 is not None:
            self._bm25.save(str(folder / "bm25"), show_progress=False)
        self.meta["chunks"] = len(self.chunks)
        self.meta["documents"] = len(self.doc_ids())
        (folder / "index.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "RetrievalIndex":
        """Load a saved index without re-embedding anything."""
        import faiss

        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        with open(folder / "chunks.jsonl", encoding="utf-8") as handle:
            chunks = [Chunk(**json.loads(line)) for line in handle if line.strip()]
        embeddings = np.load(folder / "embeddings.npy")
        index = cls.__new__(cls)
        index.chunks, index.embeddings, index.meta = chunks, embeddings, meta
        index._faiss = faiss.read_index(str(folder / "faiss.index"))
        if (folder / "bm25").is_dir():
            import bm25s

            index._bm25 = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        else:
            index._bm25 = None
        if index._faiss.ntotal != len(chunks):
            raise ValueError(f"{folder}: faiss.index has {index._faiss.ntotal} vectors for {len(chunks)} chunks")
        return index


def open_embedder(folder: Path):
    """The index's ONNX sentence embedder (index/embedder/), as the bundle runs it."""
    from vertical.export.runtime import OnnxEmbedder

    return OnnxEmbedder(folder / EMBEDDER)


def open_index(build_dir: Path):
    """Load a build's index and its embedder (for search and answers); nothing is re-embedded."""
    folder = Path(build_dir) / "index"
    if not (folder / "index.json").is_file() or not (folder / EMBEDDER / "model.onnx").is_file():
        raise VerticalError(f"{build_dir} has no retrieval index of this version; run "
                            "`vertical build PACK --steps index` first")
    return RetrievalIndex.load(folder), open_embedder(folder)
