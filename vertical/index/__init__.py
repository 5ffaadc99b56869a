"""Stage `index`: the pack's documents as a searchable, citable retrieval index.

    embedder -> ONNX (int8), kept in index/embedder/ (the build's stages and the bundle embed with it)
    documents -> chunks (embedder tokens, block boundaries, overlap) -> embeddings (normalised)
              -> FAISS (exact, or HNSW above a size threshold) + BM25 -> fused by reciprocal rank

The stage measures dense, BM25 and hybrid search on the pack's retrieval evaluation set, keeps
the best as the default (unless the pack fixes one), and calibrates the similarity below which
an answer is "I don't know" instead of a guess. `add_documents` / `remove_documents` update a
built index in place, re-embedding only new or changed documents.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from vertical.errors import VerticalError
from vertical.index.chunking import Chunk, chunk_document
from vertical.index.documents import Document, change_documents, load_documents
from vertical.index.store import EMBEDDER, Hit, RetrievalIndex, open_embedder, open_index  # noqa: F401 (the stage's public names)
from vertical.io import atomic_dir, atomic_write_json, files_under, read_json, sha256_json

log = logging.getLogger(__name__)

MODES = ("dense", "bm25", "hybrid")
DEFAULT_THRESHOLD = 0.25  # used when a pack has no retrieval evaluation set to calibrate on

__all__ = ["Hit", "RetrievalIndex", "add_documents", "change_documents", "document_changes", "inputs", "load_documents",
           "migrate_index", "open_index", "remove_documents", "replace_documents", "run"]


def inputs(ctx) -> dict[str, Any]:
    from vertical.models.registry import resolve_embedder

    settings = ctx.pack.config.stages.index
    return {
        "documents": ctx.pack.fingerprint("documents"),
        "retrieval_eval": ctx.pack.fingerprint("retrieval_eval"),
        "settings": settings.model_dump(),
        "embedder": ctx.pack.config.embedder,
        "embedder_files": sha256_json(sorted(p.name for p in resolve_embedder(ctx.pack.config.embedder).rglob("*"))),
        "document_changes": sha256_json([c.model_dump() for c in document_changes(ctx.pack)]),
    }


def document_changes(pack) -> list:
    """The document changes the pack's knowledge edits carry: the index holds the documents as the
    edited model will know them, so the sources it retrieves never contradict an edit."""
    return [change for request in pack.edits() for change in request.document]


def _chunk_all(documents: list[Document], tokenizer, settings) -> list[Chunk]:
    return [c for doc in documents for c in chunk_document(doc, tokenizer, settings.chunk_tokens, settings.chunk_overlap)]


def _chunk_tokenizer(folder: Path):
    """The embedder's tokenizer with character offsets and without its truncation, for chunking."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / EMBEDDER / "tokenizer.json"))


def run(ctx, out: Path) -> dict[str, Any]:
    from vertical.index.embedder import export_embedder

    settings = ctx.pack.config.stages.index
    documents, problems = load_documents(ctx.pack.document_files(), ctx.pack.root)
    if problems:  # an index silently missing a document would answer "I don't know" from it
        raise VerticalError(_unusable(problems, "fix, convert or remove them, then build again"))
    documents = change_documents(documents, document_changes(ctx.pack))
    # The embedder the bundle will ship, from the start: the build's stages then search exactly the
    # vectors the bundle holds, nothing is embedded twice, and the int8 graph embeds more than twice
    # as fast as the PyTorch model on 2 CPU cores (benchmarks/embedder.py: 2.3x on medical's chunks)
    ctx.reporter.stage("index", "running", "embedder to ONNX")
    export_embedder(ctx.pack.config.embedder, out / EMBEDDER)
    embedder = open_embedder(out)
    if settings.chunk_tokens > embedder.max_tokens:  # the embedder would silently drop each chunk's tail
        raise VerticalError(f"{ctx.pack.root / 'pack.yaml'}: stages.index.chunk_tokens is {settings.chunk_tokens}, "
                            f"longer than the {embedder.max_tokens}-token window of the embedder "
                            f"{ctx.pack.config.embedder}; set it to {embedder.max_tokens} or less")
    chunks = _chunk_all(documents, _chunk_tokenizer(out), settings)

    started = time.perf_counter()
    vectors = embedder.encode([c.embedding_text() for c in chunks], track=ctx.reporter.track)
    embed_seconds = time.perf_counter() - started

    meta = {"embedder": f"onnx:{ctx.pack.config.embedder}", "dim": embedder.dim, "mode": "hybrid", "top_k": settings.top_k,
            "evidence_sentences": settings.evidence_sentences,
            "chunk_tokens": settings.chunk_tokens, "chunk_overlap": settings.chunk_overlap,
            "threshold": DEFAULT_THRESHOLD, "doc_hashes": {d.id: d.content_hash for d in documents},
            "backend": settings.backend, **({"qdrant_url": settings.qdrant_url} if settings.qdrant_url else {})}
    index = RetrievalIndex(chunks, vectors, meta)

    metrics: dict[str, Any] = {
        "documents": len(documents), "chunks": len(chunks),
        "chunks_per_s": round(len(chunks) / max(embed_seconds, 1e-9), 1), "backend": settings.backend,
        "faiss": index.meta.get("faiss"),
    }
    items = ctx.pack.retrieval_eval()
    if items:
        by_mode = {mode: evaluate(index, embedder, items, mode) for mode in MODES}
        chosen = settings.retrieval if settings.retrieval != "auto" else max(
            MODES, key=lambda m: (by_mode[m]["mrr@10"], by_mode[m]["recall@5"], m == "hybrid"))
        metrics.update(by_mode[chosen])
        metrics["modes"] = by_mode
        index.meta["mode"] = chosen
        calibration = calibrate_threshold(index, embedder, [item.question for item in items])
        index.meta["threshold"] = calibration["threshold"]
        metrics["no_answer"] = calibration
    else:
        index.meta["mode"] = "hybrid" if settings.retrieval == "auto" else settings.retrieval
        metrics["note"] = "no retrieval_eval set in the pack: nothing measured, default threshold"
    metrics["mode"] = index.meta["mode"]
    metrics["threshold"] = index.meta["threshold"]
    index.save(out)
    return metrics


# ---------------------------------------------------------------- evaluation


def evaluate(index: RetrievalIndex, embedder, items, mode: str, k: int = 10) -> dict[str, float]:
    """Document-level recall@1/5, MRR@10 and nDCG@10 (one relevant document per question), and
    the median query time including the query's embedding."""
    reciprocal, ndcg, hit1, hit5, times = [], [], 0, 0, []
    for item in items:
        started = time.perf_counter()
        hits = index.search(item.question, embedder.encode, k=k * 4, mode=mode)
        times.append((time.perf_counter() - started) * 1000)
        ranked_docs = list(dict.fromkeys(h.chunk.doc_id for h in hits))[:k]
        rank = ranked_docs.index(item.doc_id) + 1 if item.doc_id in ranked_docs else None
        hit1 += rank == 1
        hit5 += rank is not None and rank <= 5
        reciprocal.append(1 / rank if rank else 0.0)
        ndcg.append(1 / math.log2(rank + 1) if rank else 0.0)
    n = max(len(items), 1)
    return {
        "recall@1": round(hit1 / n, 4), "recall@5": round(hit5 / n, 4),
        "mrr@10": round(sum(reciprocal) / n, 4), "ndcg@10": round(sum(ndcg) / n, 4),
        "query_ms_p50": round(float(np.median(times)), 2) if times else 0.0, "queries": len(items),
    }


def _offtopic_questions() -> list[str]:
    path = Path(__file__).with_name("offtopic.txt")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def calibrate_threshold(index: RetrievalIndex, embedder, questions: list[str]) -> dict[str, Any]:
    """Pick the best-chunk similarity below which the answer is "I don't know".

    In-domain questions (the pack's evaluation set) should stay above it and general off-topic
    questions (shipped with vertical) fall below; the threshold maximises balanced accuracy.
    """
    offtopic = _offtopic_questions()
    inside = np.array([index.best_similarity(q, embedder.encode) for q in questions])
    outside = np.array([index.best_similarity(q, embedder.encode) for q in offtopic])
    scores = np.unique(np.concatenate([inside, outside]))
    # candidates sit halfway between neighbouring observed scores, so the threshold is not
    # glued to one question's score
    candidates = (scores[:-1] + scores[1:]) / 2 if len(scores) > 1 else scores
    best = (0.0, DEFAULT_THRESHOLD)
    for candidate in candidates:
        balanced = ((inside >= candidate).mean() + (outside < candidate).mean()) / 2
        if balanced > best[0]:
            best = (balanced, float(candidate))
    threshold = best[1]
    return {
        "threshold": round(threshold, 4),
        "answerable_kept": round(float((inside >= threshold).mean()), 4),
        "offtopic_refused": round(float((outside < threshold).mean()), 4),
        "in_domain_questions": len(questions), "offtopic_questions": len(offtopic),
    }


# ---------------------------------------------------------------- using a built index


def _rewrite_index(build_dir: Path, index: RetrievalIndex, note: dict[str, Any]) -> None:
    """Save the updated index atomically and record its new file hashes in the build manifest,
    so the next `vertical build` keeps it instead of treating it as corrupt."""
    import shutil

    from vertical.io import exclusive_lock
    from vertical.pipeline import record_outputs

    folder = Path(build_dir) / "index"
    with exclusive_lock(Path(build_dir) / ".lock", f"build folder {build_dir}"):
        metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
        metrics.setdefault("updates", []).append(note)
        metrics["documents"], metrics["chunks"] = len(index.doc_ids()), len(index.chunks)
        with atomic_dir(folder) as tmp:
            shutil.copytree(folder / EMBEDDER, tmp / EMBEDDER)
            index.save(tmp)
            atomic_write_json(tmp / "metrics.json", metrics)
        record_outputs(Path(build_dir), "index", metrics)


def _unusable(problems: list, what_to_do: str) -> str:
    lines = "\n".join(f"  {problem}" for problem in problems)
    return f"{len(problems)} document file(s) cannot be used; {what_to_do}:\n{lines}"


def add_documents(build_dir: Path, paths: list[Path], track=None, root: Path | None = None) -> dict[str, Any]:
    """Add or replace documents (matched by id; unchanged content is not re-embedded). Nothing is
    added when any file cannot be used. Citations name each file as given, or relative to `root`."""
    index, embedder = open_index(build_dir)
    files = []
    for path in paths:
        if path.is_symlink():
            raise VerticalError(f"{path} is a symbolic link; give the file itself (links are not followed)")
        if path.is_dir():
            from vertical.index.documents import SUFFIXES

            found, links = files_under(path, SUFFIXES)
            for link in links:
                log.warning("%s is a symbolic link: skipped", link)
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise VerticalError(f"{path} does not exist")
    documents, problems = load_documents(files, root)
    if problems:
        raise VerticalError(_unusable(problems, "nothing was added; fix, convert or remove them and add again"))
    return replace_documents(build_dir, documents, track, index, embedder)


def replace_documents(build_dir: Path, documents: list, track=None, index=None, embedder=None) -> dict[str, Any]:
    """Add or replace `documents` (vertical.index.documents.Document, matched by id) in a built
    index; unchanged ones are not re-embedded. The caller must not hold the build's lock."""
    if index is None:
        index, embedder = open_index(build_dir)
    hashes: dict[str, str] = index.meta.setdefault("doc_hashes", {})
    changed = [d for d in documents if hashes.get(d.id) != d.content_hash]
    unchanged = len(documents) - len(changed)
    replaced = [d.id for d in changed if d.id in hashes]
    from vertical.pack.schema import IndexSettings

    # new documents are cut exactly like the ones the build indexed
    settings = IndexSettings(chunk_tokens=index.meta["chunk_tokens"], chunk_overlap=index.meta["chunk_overlap"])
    new_chunks = _chunk_all(changed, _chunk_tokenizer(Path(build_dir) / "index"), settings)
    vectors = embedder.encode([c.embedding_text() for c in new_chunks], track=track)
    drop = {d.id for d in changed}
    keep = [i for i, c in enumerate(index.chunks) if c.doc_id not in drop]
    chunks = [index.chunks[i] for i in keep] + new_chunks
    embeddings = np.concatenate([index.embeddings[keep], vectors]) if len(keep) else vectors
    for doc in changed:
        hashes[doc.id] = doc.content_hash
    updated = RetrievalIndex(chunks, embeddings, index.meta)
    note = {"added": [d.id for d in changed if d.id not in replaced], "replaced": replaced, "unchanged": unchanged,
            "embedded_chunks": len(new_chunks)}
    if changed:
        _rewrite_index(build_dir, updated, note)
    return note


def migrate_index(build_dir: Path, backend: str, qdrant_url: str | None = None) -> dict[str, Any]:
    """Move a build's vectors to another store (FAISS, embedded Qdrant, a Qdrant server); nothing
    is re-embedded, and the chunks, BM25 and settings stay as they are."""
    from vertical.index.store import BACKENDS

    if backend not in BACKENDS:
        raise VerticalError(f"--to {backend}: use one of {', '.join(BACKENDS)}")
    if qdrant_url and backend != "qdrant":
        raise VerticalError("--url is a Qdrant server's address: use it with --to qdrant")
    index, _ = open_index(build_dir)
    note = {"migrated_from": index.meta.get("backend", "faiss"), "migrated_to": backend,
            "qdrant_url": qdrant_url if backend == "qdrant" else None}
    _rewrite_index(build_dir, index.with_backend(backend, qdrant_url), note)
    return note


def remove_documents(build_dir: Path, doc_ids: list[str]) -> dict[str, Any]:
    index, _ = open_index(build_dir)
    missing = [d for d in doc_ids if d not in index.meta.get("doc_hashes", {})]
    if missing:
        raise VerticalError(f"no document with id {', '.join(map(repr, missing))} in {build_dir}/index")
    keep = [i for i, c in enumerate(index.chunks) if c.doc_id not in set(doc_ids)]
    for doc_id in doc_ids:
        index.meta["doc_hashes"].pop(doc_id)
    updated = RetrievalIndex([index.chunks[i] for i in keep], index.embeddings[keep], index.meta)
    note = {"removed": doc_ids}
    _rewrite_index(build_dir, updated, note)
    return note
