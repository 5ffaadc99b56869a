"""The index stage's embedder: chunks/s of the sentence-transformers model in PyTorch beside the
ONNX graphs vertical exports (fp32 and int8), on a pack's own chunks, one after the other in this
one process; and how far each graph's vectors are from PyTorch's.

    python benchmarks/embedder.py [--pack domains/medical] [--chunks 600] [--batch 64]

The int8 graph quantises its activations per tensor, so a chunk's vector depends a little on what
is batched with it; the "int8, one at a time" row embeds every chunk alone, as queries are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from sentence_transformers import SentenceTransformer

    from vertical.index.embedder import export_embedder
    from vertical.export.runtime import OnnxEmbedder
    from vertical.index import _chunk_all, _chunk_tokenizer
    from vertical.index.documents import load_documents
    from vertical.models.registry import resolve_embedder
    from vertical.pack import load_pack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", default="domains/medical")
    parser.add_argument("--chunks", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    pack = load_pack(Path(args.pack))
    scratch = Path(tempfile.mkdtemp())
    for quantize in (False, True):
        export_embedder(pack.config.embedder, scratch / ("int8" if quantize else "fp32") / "embedder", quantize)
    documents, _ = load_documents(pack.document_files(), pack.root)
    chunks = _chunk_all(documents, _chunk_tokenizer(scratch / "int8"), pack.config.stages.index)
    texts = [c.embedding_text() for c in chunks[: args.chunks]]

    torch_model = SentenceTransformer(str(resolve_embedder(pack.config.embedder)), device="cpu", local_files_only=True)
    fp32, int8 = OnnxEmbedder(scratch / "fp32" / "embedder"), OnnxEmbedder(scratch / "int8" / "embedder")
    runs = {
        "PyTorch (sentence-transformers)": lambda batch: torch_model.encode(batch, batch_size=args.batch,
                                                                             normalize_embeddings=True),
        "ONNX fp32": lambda batch: fp32.encode(batch, args.batch),
        "ONNX int8": lambda batch: int8.encode(batch, args.batch),
        "ONNX int8, one at a time": lambda batch: int8.encode(batch, 1),
    }
    print(f"{len(texts)} chunks of {args.pack} ({len(chunks)} in all), batches of {args.batch}")
    print(f"{'embedder':<34} {'chunks/s':>9} {'vs PyTorch':>11} {'cosine to PyTorch: min':>23} {'mean':>7}")
    reference, reference_rate = None, None
    for name, run in runs.items():
        run(texts[:8])  # start-up (sessions, threads) is not timed
        started = time.perf_counter()
        vectors = np.asarray(run(texts), dtype=np.float32)
        rate = len(texts) / (time.perf_counter() - started)
        if reference is None:
            reference, reference_rate = vectors, rate
        cosine = (vectors * reference).sum(1)
        print(f"{name:<34} {rate:>9.1f} {rate / reference_rate:>11.2f} {cosine.min():>23.4f} {cosine.mean():>7.4f}",
              flush=True)


if __name__ == "__main__":
    main()
