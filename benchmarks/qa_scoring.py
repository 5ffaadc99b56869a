"""QA scoring in bf16 autocast vs fp32: speed and agreement, side by side in one run.

    python benchmarks/qa_scoring.py BUILD [--questions N] [--model REL]

Scores the same eval-stage items (the pack's seeded sample, with retrieved sources) with the
build's model twice, fp32 first, then bf16 autocast (what the tune, distill and eval stages use
where the CPU has native bf16), and prints the seconds of each, the ratio, the accuracy of each
and how many predictions agree. Nothing is reused between the two runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("--questions", type=int, default=16, help="items from the eval stage's sample")
    parser.add_argument("--model", default="", help="model folder inside the build (default: the best model)")
    args = parser.parse_args()

    from vertical.answer import retrieve
    from vertical.scoring import sample_items
    from vertical.scoring import TorchLM, score_qa
    from vertical.paths import best_model_dir
    from vertical.index import open_index
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.models.registry import bf16_supported
    from vertical.pack import load_pack
    from vertical.pipeline import load_manifest

    if not bf16_supported():
        raise SystemExit("this CPU has no native bf16: the stages score in fp32 here, nothing to compare")
    manifest = load_manifest(args.build)
    pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
    settings = pack.config.stages.eval
    items = sample_items(pack.qa_eval(), settings.questions, settings.seed)[: args.questions]
    folder = args.build / args.model if args.model else best_model_dir(args.build)
    model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    index, embedder = open_index(args.build)
    k = pack.config.stages.tune.rag_sources
    retriever = lambda q: retrieve(index, embedder.encode, q, k)[0]  # noqa: E731

    results = {}
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        started = time.perf_counter()
        result = score_qa(TorchLM(model, tokenizer, bf16=bf16), items, pack.config.system_prompt, retriever,
                          max_new_tokens=settings.answer_tokens)
        results[name] = (time.perf_counter() - started, result)
        print(f"{name}: {result['accuracy']} accuracy in {results[name][0]:.1f} s", flush=True)

    (t32, r32), (t16, r16) = results["fp32"], results["bf16 autocast"]
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(r32["items"], r16["items"]))
    same_verdict = sum(a["correct"] == b["correct"] for a, b in zip(r32["items"], r16["items"]))
    kinds = {kind: v["n"] for kind, v in r32["by_kind"].items()}
    print(f"\n{pack.name}, {folder.relative_to(args.build)}, {len(items)} items {kinds}\n")
    print("| scoring | seconds | accuracy |")
    print("| --- | --- | --- |")
    print(f"| fp32 | {t32:.1f} | {r32['accuracy']} |")
    print(f"| bf16 autocast | {t16:.1f} | {r16['accuracy']} |")
    print(f"\nbf16 / fp32 speed: {t32 / t16:.2f}x; identical predictions {same}/{len(items)}, "
          f"same right/wrong verdict {same_verdict}/{len(items)}")


if __name__ == "__main__":
    main()
