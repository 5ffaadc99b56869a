"""Retrieval benchmark: indexing throughput and query latency of vertical's index stage (its ONNX
int8 embedder, FAISS + BM25) beside a plain sentence-transformers + FAISS loop, at 1k, 10k and
100k chunks, measured in one run.

    python benchmarks/retrieval.py [--sizes 1000,10000,100000] [--max-embed 1000] [--queries 100]

Synthetic text (sentences drawn from a fixed vocabulary, seeded) stands in for documents. Each
synthetic document is about one chunk. Embedding 100k chunks twice takes well over half an hour
on a 2-core machine (about 18 chunks/s), so above --max-embed chunks both sides reuse real embeddings of the
--max-embed chunks with small noise: at those sizes "index" times FAISS + BM25 building only
(labelled in the output), while query latency is always real (query embedding + search).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vertical.index.chunking import chunk_document  # noqa: E402
from vertical.index.documents import Document  # noqa: E402
from vertical.index.store import RetrievalIndex  # noqa: E402

WORDS = ("patient dose therapy trial cohort risk outcome infection renal cardiac insulin sepsis antibiotic "
         "pressure guideline screening mortality biopsy tumour vaccine fracture stroke asthma diabetes "
         "pneumonia warfarin statin clinic nurse surgery recovery symptom diagnosis imaging marker protein "
         "gene receptor enzyme plasma serum chronic acute elderly children pregnancy hospital ward").split()


def synthetic_documents(n: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(8, 16))).capitalize() + "." for _ in range(8)]
        text = f"# Study {i}\n\n" + " ".join(sentences[:4]) + "\n\n" + " ".join(sentences[4:])
        docs.append(Document(id=f"doc-{i}", title=f"Study {i}", text=text, source=f"synthetic/{i}.md", heading_starts=[0]))
    return docs


def p50(values: list[float]) -> float:
    return statistics.median(values)


def run_size(n: int, embedder, tokenizer, plain_model, max_embed: int, n_queries: int,
             real_vectors: np.ndarray | None):
    """`embedder`: the index stage's ONNX embedder; `plain_model`: the same model in sentence-transformers."""
    import faiss

    docs = synthetic_documents(n)
    chunks = [c for d in docs for c in chunk_document(d, tokenizer, 200, 32)]
    texts = [c.embedding_text() for c in chunks]
    embedded_for_real = n <= max_embed or real_vectors is None

    # vertical: chunks -> embeddings -> FAISS + BM25
    started = time.perf_counter()
    if embedded_for_real:
        vectors = embedder.encode(texts, batch_size=64)
    else:
        reps = int(np.ceil(len(texts) / len(real_vectors)))
        rng = np.random.default_rng(1)
        vectors = np.tile(real_vectors, (reps, 1))[: len(texts)] + rng.normal(0, 0.02, (len(texts), real_vectors.shape[1])).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        started = time.perf_counter()  # time index building only
    index = RetrievalIndex(chunks, vectors, {"mode": "hybrid"})
    vertical_seconds = time.perf_counter() - started

    # plain loop: sentence-transformers encode + FAISS flat inner product
    started = time.perf_counter()
    plain_vectors = (plain_model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                           show_progress_bar=False) if embedded_for_real else vectors)
    if not embedded_for_real:
        started = time.perf_counter()
    plain = faiss.IndexFlatIP(plain_vectors.shape[1])
    plain.add(plain_vectors)
    plain_seconds = time.perf_counter() - started

    queries = [" ".join(np.random.default_rng(100 + i).choice(WORDS, size=6)) for i in range(n_queries)]
    for q in queries[:3]:  # warm-up
        index.search(q, embedder.encode, k=5)
    vertical_ms, dense_ms, plain_ms = [], [], []
    for q in queries:
        t = time.perf_counter()
        index.search(q, embedder.encode, k=5)
        vertical_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        index.search(q, embedder.encode, k=5, mode="dense")
        dense_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        qv = plain_model.encode([q], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        plain.search(qv, 5)
        plain_ms.append((time.perf_counter() - t) * 1000)
    return {
        "chunks": len(chunks), "faiss": index.meta["faiss"],
        "what_index_time_covers": "embed + index" if embedded_for_real else "index build only (vectors reused)",
        "vertical_chunks_per_s": len(chunks) / vertical_seconds, "plain_chunks_per_s": len(chunks) / plain_seconds,
        "hybrid_query_ms_p50": p50(vertical_ms), "dense_query_ms_p50": p50(dense_ms), "plain_query_ms_p50": p50(plain_ms),
        "vectors": vectors if embedded_for_real else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--max-embed", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    import tempfile

    from sentence_transformers import SentenceTransformer

    from vertical.index.embedder import export_embedder
    from vertical.index import EMBEDDER, _chunk_tokenizer, open_embedder
    from vertical.models.registry import resolve_embedder

    folder = Path(tempfile.mkdtemp())
    export_embedder("all-minilm-l6-v2", folder / EMBEDDER)  # as the index stage does
    embedder, tokenizer = open_embedder(folder), _chunk_tokenizer(folder)
    plain_model = SentenceTransformer(str(resolve_embedder("all-minilm-l6-v2")), device="cpu", local_files_only=True)
    real_vectors = None
    print(f"{'chunks':>8} {'faiss':>6} {'vertical ch/s':>14} {'plain ch/s':>11} {'ratio':>6} "
          f"{'hybrid ms':>10} {'dense ms':>9} {'plain ms':>9} {'dense/plain':>11}  index time covers")
    for size in (int(s) for s in args.sizes.split(",")):
        result = run_size(size, embedder, tokenizer, plain_model, args.max_embed, args.queries, real_vectors)
        if result["vectors"] is not None:
            real_vectors = result["vectors"]
        print(f"{result['chunks']:>8} {result['faiss']:>6} {result['vertical_chunks_per_s']:>14.1f} "
              f"{result['plain_chunks_per_s']:>11.1f} {result['vertical_chunks_per_s'] / result['plain_chunks_per_s']:>6.2f} "
              f"{result['hybrid_query_ms_p50']:>10.2f} {result['dense_query_ms_p50']:>9.2f} {result['plain_query_ms_p50']:>9.2f} "
              f"{result['dense_query_ms_p50'] / result['plain_query_ms_p50']:>11.2f}  {result['what_index_time_covers']}",
              flush=True)


if __name__ == "__main__":
    main()
