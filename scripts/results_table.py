"""The README's results table from eval reports (BUILD/eval/report.json or a `vertical eval --out`).

    python scripts/results_table.py builds/legal/eval/report.json builds/finance/eval/report.json ...

One row per report: QA accuracy of every model (the bundle's with the model it holds), and the margin of the full vertical model (edited,
else tuned, with retrieval) over the base model alone with a 95% interval from the paired per-item
differences (normal approximation: mean +- 1.96 sd / sqrt(n)). The build's time is the sum of its
stages' recorded seconds (manifest.json next to the report's build folder, when there is one).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

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


def main(paths: list[str]) -> None:
    print("| pack | QA items | " + " | ".join(COLUMNS) + " | vertical - base alone (95% interval) | build min |")
    print("| --- | --- |" + " --- |" * len(COLUMNS) + " --- | --- |")
    for name in paths:
        path = Path(name)
        report = json.loads(path.read_text())
        rows = {row["model"]: row for row in report["qa"]}
        cells = [f"{rows[c]['accuracy']:.3f}" if c in rows else "" for c in COLUMNS]
        if "bundle (ONNX)" in rows and report.get("bundle_model"):  # which model the bundle holds
            cells[-1] += f" ({report['bundle_model']['role']})"
        full = next((c for c in ("edited + retrieval", "tuned + retrieval") if c in rows), None)
        gap = ""
        if full and "base alone" in rows:
            mean, half = margin(rows[full]["items"], rows["base alone"]["items"])
            gap = f"**{mean:+.3f}** ({mean - half:+.2f} to {mean + half:+.2f})"
        print(f"| {report['pack']} | {report['questions']} | " + " | ".join(cells) + f" | {gap} | {build_minutes(path)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
