"""The Report tab: the build's headline metrics as a table and four plots, the eval stage's
figures when the build has them, and every metric as JSON."""

from typing import TYPE_CHECKING, Any

from vertical.app.common import DemoSource

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def report_tables(metrics: dict[str, dict]) -> list[list]:
    """One row per headline number: stage, metric, value."""
    picks = {
        "index": ["recall@1", "recall@5", "mrr@10", "chunks", "mode"],
        "tune": ["eval_loss_base", "eval_loss_tuned", "accuracy_base", "accuracy_tuned", "verdict"],
        "edit": ["efficacy", "generalization", "locality", "edits", "method"],
        "distill": ["skipped", "teacher_score", "student_score", "retention", "speedup", "edit_efficacy", "student_layers"],
        "export": ["model", "model_reason", "quant", "bundle_bytes", "onnx_tokens_per_s", "torch_tokens_per_s", "onnx_speedup"],
    }
    rows = []
    for stage, keys in picks.items():
        values = _flatten(metrics.get(stage, {}))
        for key in keys:
            for name, value in values.items():
                if name == key or name.endswith("." + key):
                    rows.append([stage, name, value if not isinstance(value, float) else round(value, 4)])
    return rows


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def report_figure(metrics: dict[str, dict]) -> "Figure":
    """Four panels: retrieval recall, tuning loss, edit metrics before/after, student vs teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    index = _flatten(metrics.get("index", {}))
    recall = {k.split(".")[-1]: v for k, v in index.items() if k.split(".")[-1].startswith("recall@")
              and isinstance(v, (int, float))}
    axes[0].bar(list(recall), list(recall.values()), color="#4c72b0")
    axes[0].set(title="retrieval recall", ylim=(0, 1))
    tune = metrics.get("tune", {})
    curve = tune.get("train_loss_curve") or []
    axes[1].plot(curve, color="#dd8452")
    if tune.get("eval_loss_base") is not None:
        axes[1].axhline(tune["eval_loss_base"], ls="--", color="grey", label="held-out, base")
        axes[1].axhline(tune["eval_loss_tuned"], ls=":", color="black", label="held-out, tuned")
        axes[1].legend(fontsize=7)
    axes[1].set(title="tuning loss", xlabel="logged step")
    edit = metrics.get("edit", {})
    before, after = edit.get("before", {}), edit.get("after", {})
    names = [n for n in ("efficacy", "generalization", "locality") if n in after]
    xs = range(len(names))
    axes[2].bar([x - 0.2 for x in xs], [before.get(n) or 0 for n in names], 0.4, label="before")
    axes[2].bar([x + 0.2 for x in xs], [after.get(n) or 0 for n in names], 0.4, label="after")
    axes[2].set(title="knowledge edits", xticks=list(xs), ylim=(0, 1))
    axes[2].set_xticklabels(names, fontsize=8)
    axes[2].legend(fontsize=7)
    distill = metrics.get("distill", {})
    pairs = [("QA score", distill.get("teacher_score"), distill.get("student_score")),
             ("tokens/s", distill.get("teacher_tokens_per_s"), distill.get("student_tokens_per_s"))]
    pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
    for i, (name, teacher, student) in enumerate(pairs):
        top = max(teacher, student) or 1
        axes[3].bar(i - 0.2, teacher / top, 0.4, color="#55a868", label="teacher" if i == 0 else None)
        axes[3].bar(i + 0.2, student / top, 0.4, color="#c44e52", label="student" if i == 0 else None)
        axes[3].text(i - 0.2, teacher / top, f"{teacher:g}", ha="center", va="bottom", fontsize=7)
        axes[3].text(i + 0.2, student / top, f"{student:g}", ha="center", va="bottom", fontsize=7)
    title = "no student (see the distill stage)" if distill.get("skipped") else "student vs teacher (relative)"
    axes[3].set(title=title, xticks=range(len(pairs)), ylim=(0, 1.2))
    axes[3].set_xticklabels([p[0] for p in pairs], fontsize=8)
    if pairs:
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    return fig


def create_report_tab(source: DemoSource) -> None:
    """The Report tab's widgets; call it inside `with gr.Tab(...)`."""
    import gradio as gr

    rows = report_tables(source.metrics)
    gr.Dataframe(value=rows or [["-", "no metrics yet", ""]], headers=["stage", "metric", "value"],
                 label="The build's metrics", elem_id="report-table")
    gr.Plot(value=report_figure(source.metrics), label="What each step added")
    evaluated = source.path / "eval"
    if (evaluated / "qa.png").is_file():  # the eval stage's report: every model on the same QA items
        with gr.Row():
            gr.Image(str(evaluated / "qa.png"), label="QA accuracy by model (eval stage)")
            if (evaluated / "edits.png").is_file():
                gr.Image(str(evaluated / "edits.png"), label="Knowledge edits by model (eval stage)")
    with gr.Accordion("All metrics (JSON)", open=False):
        gr.JSON(value=source.metrics)
