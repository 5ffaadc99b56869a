"""The bundle's second reading, as exported before and now, side by side in one run.

    python benchmarks/bundle_reading.py builds/medical

The build's shipped model is exported twice with onnxruntime-genai's builder (int8, the full
vocabulary): with `prune_lm_head` (logits of the last position only, as vertical exported it
before) and without (every position's logits, as it exports now). Each model answers the
development questions of the pack (`benchmarks/dev_questions.jsonl`, never evaluation items) with
the bundle's retrieved evidence, streamed as `vertical ask` streams them, and then reads the
evidence's candidate spans (vertical.reader.read):

- before: a new generator reads the prompt again, the candidates are appended one token a step;
- now: the answer's own generator is rewound to the prompt, each candidate is appended in one step;
- now, read anew: the same, from a new generator (what the evaluation's batched answers do).

It prints the seconds of each, their ratio, the prefill of the prompt in both graphs (the cost of
keeping every position's logits), and how often the two exports' readings choose the same span.
The full vocabulary overstates that cost: a bundle's trimmed vocabulary has about half the rows.
The table goes to `benchmarks/results/bundle-reading-<pack>.txt`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent


def build_graph(model_dir: Path, out: Path, prune: bool) -> Path:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
               "-p", "int8", "-e", "cpu", "-c", str(out.parent / f"cache-{out.name}")]
    if prune:
        command += ["--extra_options", "prune_lm_head=true"]
    subprocess.run(command, check=True, capture_output=True)
    return out


def timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path, help="a build folder with an exported bundle (BUILD/export)")
    parser.add_argument("--answer-tokens", type=int, default=64)
    args = parser.parse_args()

    from vertical.answer import open_bundle
    from vertical.evidence import check_answer, is_abstention
    from vertical.export.runtime import OnnxChatModel, OnnxPrefilled
    from vertical.reader import is_factoid, read

    bundle = args.build / "export"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assistant = open_bundle(bundle)
    pack = assistant.name
    questions = [q for q in map(json.loads, (HERE / "dev_questions.jsonl").read_text().splitlines())
                 if q["pack"] == pack and is_factoid(q["question"])]
    with tempfile.TemporaryDirectory() as scratch:
        source = args.build / manifest["model"]["source"]
        before = OnnxChatModel(build_graph(source, Path(scratch) / "last-position", prune=True))
        now = OnnxChatModel(build_graph(source, Path(scratch) / "every-position", prune=False))
        rows = []
        for question in questions:
            answer, messages = assistant.prepare(question["question"])
            if messages is None:
                continue
            sources, numbers = answer.sources, answer.numbers()
            row = {}
            readings = {}
            for name, model in (("before", before), ("now", now)):
                ids = model.prompt_ids(messages)
                _, row[f"prefill {name}"] = timed(lambda: OnnxPrefilled.read(model, ids))
                text, row[f"answer {name}"] = timed(lambda: "".join(model.stream_ids(ids, args.answer_tokens,
                                                                                      numbers=numbers)))
                checked = check_answer(text, question["question"], sources)
                if is_abstention(checked.raw):
                    break

                def reading(prefill):
                    return read(prefill, model.piece_ids, question["question"], sources, checked.raw, checked.fallback)

                if name == "before":
                    readings[name], row["reading before"] = timed(lambda: reading(lambda: OnnxPrefilled.read(model, ids)))
                else:
                    readings[name], row["reading now"] = timed(lambda: reading(lambda: model.prefill(ids)))
                    _, row["reading now, read anew"] = timed(lambda: reading(lambda: OnnxPrefilled.read(model, ids)))
            if len(readings) == 2 and all(readings.values()):
                scores = {name: r.scores() for name, r in readings.items()}
                row["same span"] = max(range(len(scores["before"])), key=scores["before"].__getitem__) == \
                    max(range(len(scores["now"])), key=scores["now"].__getitem__)
                row["score difference"] = statistics.mean(abs(a - b) for a, b in zip(scores["before"], scores["now"]))
                rows.append(row)
    read_rows = [r for r in rows if "reading now" in r]

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in read_rows)

    lines = [f"python benchmarks/bundle_reading.py {args.build}",
             f"{pack}: {len(read_rows)} development questions read a second time (int8, full vocabulary, "
             f"{args.answer_tokens}-token answers); seconds per question, mean",
             "",
             "| | last position only (before) | every position (now) | ratio |",
             "|---|---|---|---|",
             f"| prefill of the prompt | {mean('prefill before'):.3f} | {mean('prefill now'):.3f} | "
             f"{mean('prefill now') / mean('prefill before'):.2f} |",
             f"| streamed answer | {mean('answer before'):.3f} | {mean('answer now'):.3f} | "
             f"{mean('answer now') / mean('answer before'):.2f} |",
             f"| second reading | {mean('reading before'):.3f} | {mean('reading now'):.3f} | "
             f"{mean('reading now') / mean('reading before'):.2f} |",
             f"| second reading, prompt read anew | {mean('reading before'):.3f} | {mean('reading now, read anew'):.3f} | "
             f"{mean('reading now, read anew') / mean('reading before'):.2f} |",
             f"| answer + second reading | {mean('answer before') + mean('reading before'):.3f} | "
             f"{mean('answer now') + mean('reading now'):.3f} | "
             f"{(mean('answer now') + mean('reading now')) / (mean('answer before') + mean('reading before')):.2f} |",
             "",
             f"same span chosen by both exports: {sum(r['same span'] for r in read_rows)} of {len(read_rows)}; "
             f"mean |score difference| of a candidate: {mean('score difference'):.3f} nats"]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results" / f"bundle-reading-{pack}.txt").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
