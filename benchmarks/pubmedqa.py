"""PubMedQA test accuracy of a medical build beside the published references.

    python benchmarks/pubmedqa.py [BUILD] [--limit N] [--models base,vertical]

Scores the 500 PubMedQA PQA-L test questions (domains/medical/eval/pubmedqa_test.jsonl, reasoning-
required setting: the abstract's conclusion is not in the documents) exactly as the eval stage does:
the yes/no/maybe label with the highest probability after "Answer:". Rows: the base model alone
(question only) and the vertical model (the build's best model: edited, else tuned) with retrieval
from the build's index. Published references on the same test set (Jin et al., 2019): majority
class 55.2%, BioBERT 68.1%, human (single annotator) 78.0%. The majority share is recomputed here
from the gold labels. Each accuracy has a 95% Wilson interval, the accuracy a guesser with the
model's own label frequencies would get (sum over labels of P(predicted) x P(gold): a model that
only learned a label prior scores about that), and the share of each gold label it gets right.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEST = Path(__file__).resolve().parent.parent / "domains" / "medical" / "eval" / "pubmedqa_test.jsonl"
LABELS = ("yes", "no", "maybe")
PUBLISHED = {"majority class (published)": 0.552, "BioBERT (published)": 0.681, "human, single annotator (published)": 0.780}


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if not n:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _right_by_label(rows: list[dict]) -> dict[str, float | None]:
    """The share of each gold label's items answered right (None: no such item, e.g. with --limit)."""
    share = {}
    for label in LABELS:
        verdicts = [r["correct"] for r in rows if r["gold"] == label]
        share[label] = sum(verdicts) / len(verdicts) if verdicts else None
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", nargs="?", default="builds/medical", type=Path)
    parser.add_argument("--limit", type=int, default=0, help="first N test questions only (0: all 500)")
    parser.add_argument("--models", default="base,vertical")
    args = parser.parse_args()

    from vertical.answer import retrieve
    from vertical.scoring import TorchLM, score_qa
    from vertical.paths import best_model_dir
    from vertical.index import open_index
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.pack import load_pack, read_jsonl
    from vertical.pack.schema import QAItem

    items, problems = read_jsonl(TEST, QAItem.model_validate)
    if problems:
        raise SystemExit(f"{TEST}: {problems[0]}")
    items = items[: args.limit] if args.limit else items
    pack = load_pack(Path(__file__).resolve().parent.parent / "domains" / "medical")
    system, k = pack.config.system_prompt, pack.config.stages.tune.rag_sources
    index, embedder = open_index(args.build)

    rows: list[tuple[str, float, int, int, Counter, dict[str, float | None]]] = []
    for which in args.models.split(","):
        folder = args.build / "base" / "model" if which == "base" else best_model_dir(args.build)
        lm = TorchLM(load_causal_lm(folder), load_tokenizer(folder))
        retriever = None if which == "base" else (lambda q: retrieve(index, embedder.encode, q, k)[0])
        started = time.perf_counter()
        result = score_qa(lm, items, system, retriever)
        seconds = time.perf_counter() - started
        correct = sum(r["correct"] for r in result["items"])
        name = "base alone" if which == "base" else f"vertical ({folder.relative_to(args.build)}) + retrieval"
        rows.append((name, correct / len(items), correct, len(items), Counter(r["prediction"] for r in result["items"]),
                     _right_by_label(result["items"])))
        print(f"{name}: {correct}/{len(items)} in {seconds:.0f} s", flush=True)

    gold = Counter(item.gold for item in items)
    print(f"\nPubMedQA PQA-L test, {len(items)} questions (gold labels {dict(gold)})\n")
    print(f"| {'model':<48} | accuracy | 95% interval  | prior-only guess | right on yes / no / maybe | predicted labels |")
    print(f"|{'-' * 50}|----------|---------------|------------------|---------------------------|------------------|")
    for name, accuracy, correct, n, predicted, recall in rows:
        low, high = wilson(correct, n)
        chance = sum(predicted[label] / n * gold[label] / n for label in gold)
        by_label = " / ".join("-" if recall[label] is None else f"{recall[label]:.2f}" for label in LABELS)
        print(f"| {name:<48} | {accuracy:8.3f} | {low:.3f}-{high:.3f}   | {chance:16.3f} | {by_label:<25} | {dict(predicted)} |")
    references = {"majority class (these gold labels)": max(gold.values()) / len(items), **PUBLISHED}
    for name, value in references.items():
        print(f"| {name:<48} | {value:8.3f} | {'':13} | {'':16} | {'':25} |  |")


if __name__ == "__main__":
    main()
