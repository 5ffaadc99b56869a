"""The reader on the development questions: the model's own answers against the second reading.

    python benchmarks/reader.py builds/medical builds/legal builds/finance builds/games

Asks each build's shipped model (the best model of the build: edited > tuned > base) the
development questions of its pack (`benchmarks/dev_questions.jsonl`, never evaluation items),
with retrieved evidence, exactly as the eval stage scores a short answer, and prints per pack:
how many are right with the model's own (checked) answer, with the second reading
(vertical.reader), how many had the gold answer among the second reading's candidates, and how
often the second reading replaced a right answer by a wrong one and the reverse.

Every reading's candidates and scores go to `benchmarks/results/reader-dev.json` (the table to `reader-dev.txt`), so a change of
the choosing rule can be tried on the recorded scores before the model is asked again. Design
choices of the reader are measured here, so that the evaluation items stay held out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent


def ask_pack(build: Path, questions: list[dict]) -> dict:
    from vertical.answer import retrieve
    from vertical.evidence import check_answer
    from vertical.index import open_index
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.pack import load_pack
    from vertical.pack.schema import QAItem
    from vertical.paths import best_model_dir
    from vertical.pipeline import load_manifest
    from vertical.prompting import build_messages
    from vertical.reader import read
    from vertical.scoring import TorchLM, is_correct, score_qa

    manifest = load_manifest(build)
    pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
    folder = best_model_dir(build)
    lm = TorchLM(load_causal_lm(folder), load_tokenizer(folder))
    index, embedder = open_index(build)
    k = pack.config.stages.tune.rag_sources
    given: dict[str, list] = {}

    def retriever(question: str) -> list:
        given[question] = retrieve(index, embedder.encode, question, k)[0]
        return given[question]

    items = [QAItem(question=q["question"], answer=q["answer"], doc_id=q.get("doc_id")) for q in questions]
    started = time.perf_counter()
    result = score_qa(lm, items, pack.config.system_prompt, retriever, max_new_tokens=pack.config.stages.eval.answer_tokens)
    seconds = time.perf_counter() - started
    rows = []
    for item, row in zip(items, result["items"]):
        sources = given[item.question]
        own = check_answer(row["raw"], item.question, sources)
        messages = build_messages(pack.config.system_prompt, item.question, sources)
        reading = read(lambda: lm.prefill(lm.chat_ids(messages)), lm.piece_ids, item.question, sources,
                       own.raw, own.fallback)
        rows.append({
            "question": item.question, "gold": item.gold, "retrieved": row["retrieved"], "raw": row["raw"],
            "sources": [{"number": s.number, "doc_id": s.doc_id, "sentences": [x.text for x in s.sentences]}
                        for s in sources],
            "own": own.text, "own_correct": is_correct(own.text, item.gold),
            "prediction": row["prediction"], "correct": row["correct"], "reread": row["reread"],
            "reading": None if reading is None else {
                "head": reading.head, "head_score": reading.head_score, "unsupported": reading.unsupported,
                "candidates": [{"text": c.text, "source": c.source, "context": c.context, "logp": score,
                                "gold": is_correct(c.text, item.gold)}
                               for c, score in zip(reading.chosen, reading.span_scores)]}})
    return {"pack": pack.name, "model": str(folder.relative_to(build)), "seconds": round(seconds, 1), "items": rows}


def summary(result: dict) -> dict:
    rows = result["items"]
    return {"pack": result["pack"], "questions": len(rows), "own": sum(r["own_correct"] for r in rows),
            "reread": sum(r["correct"] for r in rows),
            "gold_among_candidates": sum(bool(r["reading"]) and any(c["gold"] for c in r["reading"]["candidates"])
                                         for r in rows),
            "right_to_wrong": sum(r["own_correct"] and not r["correct"] for r in rows),
            "wrong_to_right": sum(r["correct"] and not r["own_correct"] for r in rows),
            "retrieved": sum(bool(r["retrieved"]) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", type=Path, nargs="+")
    parser.add_argument("--questions", type=Path, default=HERE / "dev_questions.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "reader-dev.json")
    args = parser.parse_args()

    from vertical.pipeline import load_manifest

    questions = [json.loads(line) for line in args.questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    results = []
    for build in args.builds:
        name = load_manifest(build).get("pack")
        mine = [q for q in questions if q["pack"] == Path(str(name)).name]
        if not mine:
            print(f"{build}: no development questions for pack {name}", flush=True)
            continue
        results.append(ask_pack(build, mine))
        print(f"{build}: {summary(results[-1])} in {results[-1]['seconds']} s", flush=True)

    lines = ["| pack | questions | gold document retrieved | own answer right | with the second reading | "
             "gold among candidates | right -> wrong | wrong -> right |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    total = {"questions": 0, "retrieved": 0, "own": 0, "reread": 0, "gold_among_candidates": 0,
             "right_to_wrong": 0, "wrong_to_right": 0}
    for result in results:
        s = summary(result)
        for key in total:
            total[key] += s[key]
        lines.append(f"| {s['pack']} | {s['questions']} | {s['retrieved']} | {s['own']} | {s['reread']} | "
                     f"{s['gold_among_candidates']} | {s['right_to_wrong']} | {s['wrong_to_right']} |")
    lines.append(f"| all | {total['questions']} | {total['retrieved']} | {total['own']} | {total['reread']} | "
                 f"{total['gold_among_candidates']} | {total['right_to_wrong']} | {total['wrong_to_right']} |")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, ensure_ascii=False) + "\n", encoding="utf-8")
    models = ", ".join(f"{r['pack']}: {r['model']}" for r in results)
    args.out.with_suffix(".txt").write_text(f"python benchmarks/reader.py {' '.join(map(str, args.builds))}\n"
                                            f"models: {models}\n\n{table}\n", encoding="utf-8")
    print(f"\nreadings written to {args.out}, the table to {args.out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
