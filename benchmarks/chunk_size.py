"""Retrieval chunk size: what it does to retrieval, prompt length, QA accuracy and scoring time,
side by side in one run.

    python benchmarks/chunk_size.py PACK [--sizes 200:32,128:24] [--work DIR]

For each size (chunk_tokens:chunk_overlap) the pack's base and index stages are built into their
own folder under --work, then the base model (loaded once) answers the eval stage's seeded sample
with retrieved sources (stages.tune.rag_sources of them, as the stages score). It
prints the index's retrieval metrics, the mean prompt length in model tokens, the accuracy, the
seconds of the scoring, and each size's ratios to the first. Nothing is reused between sizes
except the base model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pack", help="shipped pack name or pack folder")
    parser.add_argument("--sizes", default="200:32,128:24", help="comma-separated chunk_tokens:chunk_overlap")
    parser.add_argument("--work", type=Path, default=None, help="folder for the builds (default: a temporary one)")
    args = parser.parse_args()

    from vertical import pipeline
    from vertical.answer import retrieve
    from vertical.scoring import sample_items
    from vertical.scoring import TorchLM, score_qa
    from vertical.index import open_index
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.pack import load_pack
    from vertical.prompting import build_messages

    sizes = [tuple(int(v) for v in size.split(":")) for size in args.sizes.split(",")]
    pack = load_pack(args.pack)
    settings = pack.config.stages.eval
    items = sample_items(pack.qa_eval(), settings.questions, settings.seed)
    system, k = pack.config.system_prompt, pack.config.stages.tune.rag_sources
    work = args.work or Path(tempfile.mkdtemp(prefix="chunk-size-"))
    lm = None
    rows = []
    for tokens, overlap in sizes:
        out = work / f"chunks-{tokens}"
        pipeline.build(args.pack, out=out, steps=["base", "index"],
                       settings={"index": {"chunk_tokens": tokens, "chunk_overlap": overlap}})
        if lm is None:  # the same base model for every size
            lm = TorchLM(load_causal_lm(out / "base" / "model"), load_tokenizer(out / "base" / "model"))
        index, embedder = open_index(out)
        retriever = lambda q: retrieve(index, embedder.encode, q, k)[0]  # noqa: B023, E731
        lengths = [len(lm.chat_ids(build_messages(system, item.question, retriever(item.question)))) for item in items]
        started = time.perf_counter()
        result = score_qa(lm, items, system, retriever, max_new_tokens=settings.answer_tokens)
        seconds = time.perf_counter() - started
        metrics = pipeline.load_manifest(out)["stages"]["index"]["metrics"]
        rows.append({"size": f"{tokens}:{overlap}", "chunks": metrics["chunks"], "recall@1": metrics["recall@1"],
                     "recall@5": metrics["recall@5"], "mrr@10": metrics["mrr@10"],
                     "prompt_tokens": sum(lengths) / len(lengths), "accuracy": result["accuracy"],
                     "right": sum(item["correct"] for item in result["items"]), "seconds": seconds})
        print(f"{rows[-1]['size']}: {result['accuracy']} accuracy in {seconds:.1f} s", flush=True)

    first = rows[0]
    print(f"\n{pack.name}: {len(items)} eval items, {k} sources a question, base model, {work}")
    print(f"{'chunk:overlap':>13} {'chunks':>6} {'R@1':>6} {'R@5':>6} {'MRR@10':>6} {'prompt tok':>10} "
          f"{'right':>7} {'seconds':>8} {'prompt x':>8} {'time x':>6}")
    for row in rows:
        print(f"{row['size']:>13} {row['chunks']:>6} {row['recall@1']:>6.3f} {row['recall@5']:>6.3f} "
              f"{row['mrr@10']:>6.3f} {row['prompt_tokens']:>10.1f} {row['right']:>3}/{len(items):<3} "
              f"{row['seconds']:>8.1f} {row['prompt_tokens'] / first['prompt_tokens']:>8.2f} "
              f"{row['seconds'] / first['seconds']:>6.2f}")


if __name__ == "__main__":
    main()
