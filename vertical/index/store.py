"""The retrieval index on disk and in memory: chunks, their embeddings, FAISS and BM25.

This module is torch-free on purpose: the exported runtime imports it and brings its own
(ONNX) embedder. Anything that embeds text is passed in as an `encode(list[str]) -> ndarray`.

    index/
      index.json        settings, embedder, FAISS kind, threshold, document hashes
      chunks.jsonl      one chunk per line (id, doc_id, title, source, span, text, section)
      embeddings.npy    float32, L2-normalised, one row per chunk (kept so updates never re-embed)
      faiss.index       inner-product index over the embeddings (backend: faiss)
      bm25/             bm25s sparse index over the chunks' text

Dense search runs on one of two vector stores, named by index.json's "backend": FAISS in the
process (the default), or Qdrant through qdrant-client, embedded in the process (filled from
embeddings.npy when the index is opened) or on a Qdrant server or cluster (`qdrant_url`; the
collection is named by the embeddings' hash, so a changed index is a new collection and replicas
still serving the old one are not disturbed). BM25 and the fusion are the same on both.
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


BACKENDS = ("faiss", "qdrant")


class FaissVectors:
    """Exact inner product in FAISS; HNSW from HNSW_THRESHOLD vectors."""

    def __init__(self, index):
        self.index = index

    @classmethod
    def build(cls, embeddings: np.ndarray, meta: dict[str, Any]) -> "FaissVectors":
        import faiss

        dim = embeddings.shape[1] if embeddings.ndim == 2 and len(embeddings) else int(meta.get("dim", 384))
        if len(embeddings) >= HNSW_THRESHOLD:
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 96
            meta["faiss"] = "hnsw"
        else:
            index = faiss.IndexFlatIP(dim)
            meta["faiss"] = "flat"
        if len(embeddings):
            index.add(embeddings)
        return cls(index)

    @classmethod
    def load(cls, folder: Path, count: int) -> "FaissVectors":
        import faiss

        index = faiss.read_index(str(folder / "faiss.index"))
        if index.ntotal != count:
            raise ValueError(f"{folder}: faiss.index has {index.ntotal} vectors for {count} chunks")
        return cls(index)

    def search(self, vector: np.ndarray, depth: int) -> list[tuple[int, float]]:
        scores, ids = self.index.search(vector.reshape(1, -1).astype(np.float32), depth)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def save(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(folder / "faiss.index"))


class QdrantVectors:
    """Cosine search in Qdrant (the embeddings are L2-normalised, so it ranks as FAISS's inner
    product does). Point ids are the chunks' row numbers in chunks.jsonl."""

    def __init__(self, client, collection: str):
        self.client, self.collection = client, collection

    @staticmethod
    def _client(meta: dict[str, Any]):
        import os

        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise VerticalError("this index searches with Qdrant: install qdrant-client (pip install qdrant-client)") from None

        url = meta.get("qdrant_url")
        if not url:
            return QdrantClient(":memory:")  # embedded: lives as long as the index object
        return QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None, timeout=30)

    @classmethod
    def build(cls, embeddings: np.ndarray, meta: dict[str, Any]) -> "QdrantVectors":
        import hashlib

        from qdrant_client import models

        meta["qdrant_collection"] = "vertical-" + hashlib.sha256(embeddings.tobytes()).hexdigest()[:20]
        client = cls._client(meta)
        store = cls(client, meta["qdrant_collection"])
        try:
            if not (meta.get("qdrant_url") and store.count() == len(embeddings)):
                dim = embeddings.shape[1] if embeddings.ndim == 2 and len(embeddings) else int(meta.get("dim", 384))
                if client.collection_exists(store.collection):
                    client.delete_collection(store.collection)
                client.create_collection(store.collection, vectors_config=models.VectorParams(
                    size=dim, distance=models.Distance.COSINE))
                if len(embeddings):
                    client.upload_collection(store.collection, vectors=embeddings, ids=list(range(len(embeddings))),
                                             batch_size=256, wait=True)
        except Exception as exc:  # connection refused, bad URL, authentication: say which server
            raise VerticalError(f"Qdrant at {meta.get('qdrant_url')}: {exc}") from None
        return store

    @classmethod
    def load(cls, embeddings: np.ndarray, meta: dict[str, Any]) -> "QdrantVectors":
        if not meta.get("qdrant_url"):
            return cls.build(embeddings, meta)
        store = cls(cls._client(meta), meta["qdrant_collection"])
        found = store.count()
        if found != len(embeddings):
            raise VerticalError(f"Qdrant at {meta['qdrant_url']}: collection {store.collection} holds {found} vectors for "
                                f"{len(embeddings)} chunks; run `vertical index migrate BUILD --to qdrant --url URL` again")
        return store

    def count(self) -> int:
        try:
            if not self.client.collection_exists(self.collection):
                return -1
            return self.client.count(self.collection, exact=True).count
        except Exception as exc:  # noqa: BLE001
            raise VerticalError(f"Qdrant: {exc}") from None

    def search(self, vector: np.ndarray, depth: int) -> list[tuple[int, float]]:
        found = self.client.query_points(self.collection, query=vector.astype(np.float32).tolist(), limit=depth)
        return [(int(p.id), float(p.score)) for p in found.points]

    def save(self, folder: Path) -> None:
        """Nothing to write: embeddings.npy refills an embedded store, a server keeps its collection."""


class RetrievalIndex:
    def __init__(self, chunks: list[Chunk], embeddings: np.ndarray, meta: dict[str, Any]):
        if len(chunks) != len(embeddings):
            raise ValueError(f"{len(chunks)} chunks but {len(embeddings)} embeddings")
        self.chunks = chunks
        self.embeddings = embeddings.astype(np.float32, copy=False)
        self.meta = meta
        self._vectors = self._build_vectors()
        self._bm25 = self._build_bm25()

    # ------------------------------------------------------------ building

    def _build_vectors(self) -> FaissVectors | QdrantVectors:
        backend = self.meta.setdefault("backend", "faiss")
        if backend not in BACKENDS:
            raise VerticalError(f"index backend '{backend}': use one of {', '.join(BACKENDS)}")
        if backend == "qdrant":
            self.meta.pop("faiss", None)
            return QdrantVectors.build(self.embeddings, self.meta)
        return FaissVectors.build(self.embeddings, self.meta)

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
        return self._vectors.search(query_vec, depth)

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
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "chunks.jsonl", "w", encoding="utf-8") as handle:
            for chunk in self.chunks:
                handle.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
        np.save(folder / "embeddings.npy", self.embeddings)
        self._vectors.save(folder)
        if self._bm25 is not None:
            self._bm25.save(str(folder / "bm25"), show_progress=False)
        self.meta["chunks"] = len(self.chunks)
        self.meta["documents"] = len(self.doc_ids())
        (folder / "index.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "RetrievalIndex":
        """Load a saved index without re-embedding anything."""
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        with open(folder / "chunks.jsonl", encoding="utf-8") as handle:
            chunks = [Chunk(**json.loads(line)) for line in handle if line.strip()]
        embeddings = np.load(folder / "embeddings.npy")
        index = cls.__new__(cls)
        index.chunks, index.embeddings, index.meta = chunks, embeddings, meta
        if meta.get("backend", "faiss") == "qdrant":
            index._vectors = QdrantVectors.load(index.embeddings, meta)
        else:
            index._vectors = FaissVectors.load(folder, len(chunks))
        if (folder / "bm25").is_dir():
            import bm25s

            index._bm25 = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        else:
            index._bm25 = None
        return index

    def with_backend(self, backend: str, qdrant_url: str | None = None) -> "RetrievalIndex":
        """The same chunks and vectors on another vector store (nothing is re-embedded)."""
        meta = {k: v for k, v in self.meta.items() if k not in ("faiss", "qdrant_collection", "qdrant_url")}
        meta["backend"] = backend
        if backend == "qdrant" and qdrant_url:
            meta["qdrant_url"] = qdrant_url
        return RetrievalIndex(self.chunks, self.embeddings, meta)


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
