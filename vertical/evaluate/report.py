"""The eval report: report.json (everything, per item), report.md (tables + method), PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vertical.io import atomic_write_json, atomic_write_text


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {report.get('pack', '')}", ""]
    if report["qa"]:
        lines += [f"## QA accuracy ({report['questions']} held-out items)", "",
                  "| model | accuracy | multiple choice | short answer |", "| --- | --- | --- | --- |"]
        for row in report["qa"]:
            lines.append(f"| {row['model']} | {_fmt(row['accuracy'])} | {_fmt(row['choice']['accuracy'])} "
                         f"(n={row['choice']['n']}) | {_fmt(row['short']['accuracy'])} (n={row['short']['n']}) |")
        lines += ["", "Short answers, where the right document was found and how the reader used it:", "",
                  "| model | recall@k | accuracy when retrieved | faithfulness | fallback | abstention |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in report["qa"]:
            short = row["short"]
            lines.append(f"| {row['model']} | {_fmt(short.get('recall@k'))} | {_fmt(short.get('accuracy_when_retrieved'))} "
                         f"| {_fmt(short.get('faithfulness'))} | {_fmt(short.get('fallback'))} "
                         f"| {_fmt(short.get('abstention'))} |")
        bundle = report.get("bundle_model")
        if bundle:
            reason = f" ({bundle['reason']})" if bundle.get("reason") else ""
            cut = f", cut to the pack's {bundle['vocabulary']:,} tokens" if bundle.get("vocabulary") else ""
            lines += ["", f"The bundle holds the {bundle.get('role')}, {bundle.get('quant')}{cut}{reason}."]
        if report.get("student_stopped_early"):
            lines += ["", f"The student's training stopped {report['student_stopped_early']}."]
        lines += ["", "![QA accuracy](qa.png)", ""]
    if report["edits"]:
        lines += [f"## Knowledge edits ({report['edit_requests']} requests)", "",
                  "| model | efficacy (EasyEdit rewrite_acc) | generalization (rephrase_acc) | locality |",
                  "| --- | --- | --- | --- |"]
        for row in report["edits"]:
            lines.append(f"| {row['model']} | {_fmt(row['efficacy'])} | {_fmt(row['generalization'])} "
                         f"| {_fmt(row['locality'])} |")
        if report.get("student_edits_skipped"):
            lines += ["", f"The student was not given the edits: {report['student_edits_skipped']}."]
        lines += ["", "![Edits](edits.png)", ""]
    if report.get("edit_answers"):
        lines += ["The edits' prompts asked through the answer path with the build's sources (which carry the "
                  "edits' document changes): the share of answers that give the new value.", "",
                  "| model | edits answered with the new value |", "| --- | --- |"]
        lines += [f"| {row['model']} | {_fmt(row['accuracy'])} (n={row['n']}) |" for row in report["edit_answers"]] + [""]
    for key, title in (("retrieval", "Retrieval (the index the build and the bundle search)"), ("speed", "Speed")):
        if report.get(key):
            lines += [f"## {title}", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in report[key].items()] + [""]
    lines += ["## How each number is computed", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["method"].items()]
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report["qa"]:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        names = [row["model"] for row in report["qa"]]
        values = [row["accuracy"] or 0 for row in report["qa"]]
        bars = ax.barh(names[::-1], values[::-1], color="#4c72b0")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set(xlim=(0, 1), xlabel="QA accuracy", title=f"{report.get('pack', '')}: {report['questions']} held-out items")
        fig.tight_layout()
        fig.savefig(out / "qa.png", dpi=110)
        plt.close(fig)
    if report["edits"]:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        metrics = ("efficacy", "generalization", "locality")
        width = 0.8 / len(report["edits"])
        for i, row in enumerate(report["edits"]):
            ax.bar([m + i * width for m in range(3)], [row[k] or 0 for k in metrics], width, label=row["model"])
        ax.set_xticks([m + 0.4 - width / 2 for m in range(3)], metrics)
        ax.set(ylim=(0, 1), title="knowledge edits")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "edits.png", dpi=110)
        plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plots(report, out)
