"""A docs-only pack, end to end, on a held-out check written before any build.

    python benchmarks/heldout_docs.py [--data DIR] [--work DIR] [--skip-build]

What a customer does with a folder of documents: `vertical packs init NAME --docs DIR`, then
`vertical build` with the defaults, then questions with `vertical ask` on the build and on its
bundle. Each set (DIR/documents, DIR/questions.jsonl) was written before any build of it and is
in no training file; the build only ever sees the documents (the tune stage trains on questions it
generates from them and scores a held-out split of those). A set whose results have been looked at
while changing the product is no longer held out: benchmarks/heldout_docs/ (a water utility),
benchmarks/heldout_docs_v2/ (a veterinary group) and benchmarks/heldout_docs_v3/ (a ferry operator,
the default, for development) have been; benchmarks/heldout_docs_v4/ (a brewery) is the current
held-out one: run it only to report, never to choose.

An answer counts when it is right by the eval stage's rule (the gold span in an answer of at most
40 words) and cites the question's document. Writes benchmarks/results/<set>.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT / "benchmarks" / "heldout_docs_v3"
VERTICAL = [str(Path(sys.executable).with_name("vertical"))]


def run(*args: str) -> str:
    done = subprocess.run([*VERTICAL, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"vertical {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def ask_all(target: Path, questions: list[dict]) -> list[dict]:
    """Every question asked as `vertical ask --json` does, in one process (the models load once)."""
    from vertical.cli import _open_assistant, answer_json
    from vertical.scoring import is_correct

    assistant = _open_assistant(target)
    rows = []
    for item in questions:
        reply = answer_json(assistant.ask(item["question"]))
        cited = {c["doc_id"] for c in reply["citations"]}
        right = is_correct(reply["answer"], item["answer"])
        rows.append({**item, "reply": reply["answer"], "cited": sorted(cited), "right": right,
                     "right_and_cited": right and item["doc_id"] in cited, "fallback": reply["fallback"],
                     "faithful": reply["faithful"]})
    return rows


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"n": n, "right_and_cited": round(sum(r["right_and_cited"] for r in rows) / n, 3),
            "right": round(sum(r["right"] for r in rows) / n, 3),
            "cited_the_document": round(sum(r["doc_id"] in r["cited"] for r in rows) / n, 3),
            "faithful": round(sum(r["faithful"] for r in rows) / n, 3),
            "fallback": round(sum(r["fallback"] for r in rows) / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a set: documents/ and questions.jsonl")
    parser.add_argument("--work", type=Path, default=ROOT / "builds" / "heldout-docs-work")
    parser.add_argument("--skip-build", action="store_true", help="reuse the build in --work")
    args = parser.parse_args()
    data = args.data.resolve()
    questions = [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines() if line.strip()]
    pack, build = args.work / "pack", args.work / "build"
    minutes = None
    if not args.skip_build:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        run("packs", "init", "heldout", "--docs", str(data / "documents"), "--dir", str(pack))
        started = time.perf_counter()
        run("build", str(pack), "--out", str(build))
        minutes = round((time.perf_counter() - started) / 60, 1)
    answers = {"build": ask_all(build, questions), "bundle": ask_all(build / "export", questions)}
    results = {name: summary(rows) for name, rows in answers.items()}
    eval_metrics = json.loads((build / "eval" / "metrics.json").read_text())
    tune = json.loads((build / "tune" / "metrics.json").read_text())
    lines = [f"docs-only pack from {data.relative_to(ROOT)}: {len(questions)} held-out questions, "
             f"build {minutes if minutes is not None else '(reused)'} min",
             f"tune: {tune.get('generated_trained')} generated questions trained on, "
             f"{tune.get('generated_held_out')} held out; eval stage on those: {eval_metrics.get('qa_accuracy')}",
             "", "| model | right and cited | right | cited the document | faithful | fallback |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['right_and_cited']:.3f} | {row['right']:.3f} | {row['cited_the_document']:.3f} "
                     f"| {row['faithful']:.3f} | {row['fallback']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / f"{data.name}.txt"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"minutes": minutes, "summary": results, "answers": answers}, indent=1))


if __name__ == "__main__":
    main()
