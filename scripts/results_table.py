"""The README's results table from eval reports (BUILD/eval/report.json or a `vertical eval --out`).

    python scripts/results_table.py builds/legal/eval/report.json builds/finance ...   (a build folder: its eval report)

One row per report: QA accuracy of every model (the bundle's with the model it holds), and the margin of the full vertical model (edited,
else tuned, with retrieval) over the base model alone with a 95% interval from the paired per-item
differences (normal approximation: mean +- 1.96 sd / sqrt(n)). The build's time is the sum of its
stages' recorded seconds (manifest.json next to the report's build folder, when there is one).

A second table gives the short answers' grounding (recall@k, accuracy when the right document was
retrieved, faithfulness, fallback, span answers of the second reading) for the full vertical model and the bundle. A third splits each report's items by whether the pack's instruction data asks a similar
question (at least half of the content words shared, Jaccard): such an item's fact is taught by
training as well as given by retrieval, so the split shows how much of the margin holds on facts
the training data does not ask about. (Identical questions are refused by `vertical packs validate`.)
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TAUGHT_JACCARD = 0.5
STOP = set("a an the of to is are was were be what which who whom whose where when how does do did in at on for "
           "and or by with from as it its this that under our their".split())

COLUMNS = ["base alone", "base + retrieval", "tuned + retrieval", "edited + retrieval", "student + retrieval",
           "bundle (ONNX)"]


def margin(full: list[dict], base: list[dict]) -> tuple[float, float]:
    by_question = {item["question"]: item["correct"] for item in base}
    diffs = [int(item["correct"]) - int(by_question[item["question"]]) for item in full]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
    return mean, 1.96 * sd / math.sqrt(len(diffs))


def build_minutes(report_path: Path) -> str:
    for folder in (report_path.parent.parent, report_path.parent):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            stages = json.loads(manifest.read_text())["stages"]
            return f"{sum(s.get('seconds', 0) for s in stages.values()) / 60:.1f}"
    return ""


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.sub(r"[^0-9a-z]+", " ", text.lower()).split() if w not in STOP)


def taught_questions(report_path: Path) -> set[str] | None:
    """The report's questions that a training question resembles (None without the build's pack)."""
    from vertical.pack import load_pack

    manifest = report_path.parent.parent / "manifest.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    pack = load_pack(data.get("pack_dir") or data["pack"])
    asked = [_content_words(m.content) for conversation in pack.instructions() for m in conversation if m.role == "user"]
    asked = [words for words in asked if words]
    report = json.loads(report_path.read_text())
    taught = set()
    for item in report["qa"][0]["items"]:
        words = _content_words(item["question"])
        if words and any(len(words & other) / len(words | other) >= TAUGHT_JACCARD for other in asked):
            taught.add(item["question"])
    return taught


def taught_table(paths: list[str]) -> None:
    print()
    print("| pack | items a training question resembles | base alone / vertical on them | other items | "
          "base alone / vertical on them |")
    print("| --- | --- | --- | --- | --- |")
    for name in paths:
        path = Path(name)
        taught = taught_questions(path)
        if taught is None:
            continue
        report = json.loads(path.read_text())
        rows = {row["model"]: row for row in report["qa"]}
        full = next((c for c in ("edited + retrieval", "tuned + retrieval") if c in rows), None)
        if not full or "base alone" not in rows:
            continue
        cells = []
        for subset in (True, False):
            def accuracy(model: str) -> str:
                kept = [i["correct"] for i in rows[model]["items"] if (i["question"] in taught) == subset]
                return f"{sum(kept) / len(kept):.3f}" if kept else "-"
            n = sum((i["question"] in taught) == subset for i in rows[full]["items"])
            cells += [str(n), f"{accuracy('base alone')} / {accuracy(full)}"]
        print(f"| {report['pack']} | " + " | ".join(cells) + " |")


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(name).read_text()) for name in paths]
    # a column no report has (the student of CPU builds, which make none) is left out
    columns = [c for c in COLUMNS if any(c == row["model"] for report in reports for row in report["qa"])]
    print("| pack | QA items | " + " | ".join(columns) + " | vertical - base alone (95% interval) | build min |")
    print("| --- | --- |" + " --- |" * len(columns) + " --- | --- |")
    for path, report in zip(map(Path, paths), reports):
        rows = {row["model"]: row for row in report["qa"]}
        cells = [f"{rows[c]['accuracy']:.3f}" if c in rows else "" for c in columns]
        if "bundle (ONNX)" in rows and report.get("bundle_model"):  # which model the bundle holds
            cells[-1] += f" ({report['bundle_model']['role']})"
        full = next((c for c in ("edited + retrieval", "tuned + retrieval") if c in rows), None)
        gap = ""
        if full and "base alone" in rows:
            mean, half = margin(rows[full]["items"], rows["base alone"]["items"])
            gap = f"**{mean:+.3f}** ({mean - half:+.2f} to {mean + half:+.2f})"
        print(f"| {report['pack']} | {report['questions']} | " + " | ".join(cells) + f" | {gap} | {build_minutes(path)} |")


def grounding_table(paths: list[str]) -> None:
    """Short answers of the full vertical model and of the bundle: where the right document was
    among the sources, how often the reader then answered right, and how it held to its evidence."""
    print()
    print("| pack | model | short answers | accuracy | recall@k | accuracy when retrieved | faithfulness | fallback "
          "| span answers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in paths:
        report = json.loads(Path(name).read_text())
        rows = {row["model"]: row for row in report["qa"]}
        full = next((c for c in ("edited + retrieval", "tuned + retrieval") if c in rows), None)
        for model in (full, "bundle (ONNX)"):
            short = rows.get(model, {}).get("short") if model else None
            if not short or not short["n"]:
                continue
            cells = [f"{short.get(k):.3f}" if short.get(k) is not None else "-"
                     for k in ("accuracy", "recall@k", "accuracy_when_retrieved", "faithfulness", "fallback", "reread")]
            print(f"| {report['pack']} | {model} | {short['n']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    # a build folder stands for its eval/report.json
    reports = [str(Path(a) / "eval" / "report.json") if Path(a).is_dir() else a for a in sys.argv[1:]]
    missing = [r for r in reports if not Path(r).is_file()]
    if missing:
        sys.exit(f"no eval report at {', '.join(missing)}: give BUILD/eval/report.json or a build folder")
    main(reports)
    grounding_table(reports)
    taught_table(reports)
