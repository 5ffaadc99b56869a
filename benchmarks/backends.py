"""Vector-store benchmark: a build's index searched with FAISS and with Qdrant (embedded through
qdrant-client, as `stages.index.backend: qdrant` runs it), on the pack's retrieval eval set, in one run.

    python benchmarks/backends.py [--build builds/medical]

Both stores hold the same embeddings (nothing is re-embedded); BM25 and the fusion are shared, so
any difference in recall comes from the vector search itself. Target (issue 37): Qdrant's recall@5
within 0.01 of FAISS's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def main() -> None:
    from vertical.index import evaluate, open_index
    from vertical.pack import load_pack
    from vertical.pipeline import load_manifest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("builds/medical"))
    args = parser.parse_args()
    manifest = load_manifest(args.build)
    pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
    items = pack.retrieval_eval()
    if not items:
        sys.exit(f"{pack.config.name} has no retrieval eval set")
    index, embedder = open_index(args.build)
    started = time.perf_counter()
    stores = {"faiss": index.with_backend("faiss"), "qdrant": index.with_backend("qdrant")}
    load_seconds = time.perf_counter() - started
    rows = {}
    for mode in ("dense", "hybrid"):
        for name, store in stores.items():
            rows[f"{name} {mode}"] = evaluate(store, embedder, items, mode)
    lines = [f"vector stores on {args.build}: {len(index.chunks)} chunks, {len(items)} retrieval eval questions",
             f"{'store / mode':<16}{'recall@1':>10}{'recall@5':>10}{'mrr@10':>9}{'query ms p50':>14}"]
    for name, row in rows.items():
        lines.append(f"{name:<16}{row['recall@1']:>10.3f}{row['recall@5']:>10.3f}{row['mrr@10']:>9.3f}{row['query_ms_p50']:>14.2f}")
    gap = max(abs(rows[f"qdrant {m}"]["recall@5"] - rows[f"faiss {m}"]["recall@5"]) for m in ("dense", "hybrid"))
    lines.append(f"largest recall@5 gap, Qdrant vs FAISS: {gap:.3f} (target <= 0.01); building both stores took {load_seconds:.1f} s")
    print("\n".join(lines))
    out = ROOT / "results" / f"backends-{pack.config.name}"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"build": str(args.build), "chunks": len(index.chunks), "rows": rows,
                                                    "recall@5_gap": gap}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
