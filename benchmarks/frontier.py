"""Distillation frontier: students of several depths, each trained as the build's distill stage
trains one, measured for what they keep and how fast they run, in one run.

    python benchmarks/frontier.py [--build builds/medical] [--keep 0.8,0.6,0.4] [--steps 40] [--rounds 3]

For each `--keep` share of the teacher's layers, the build's distill stage runs in a scratch copy of
the build (hard links; the build itself is not touched) with `stages.distill.keep_layers` set and
`stages.export.model: teacher`, so every student trains all its steps and none is edited. Then:

- QA retention: the distill stage's own measure (the student's share of the teacher's score on the
  eval stage's sample with retrieval, the lower of the whole sample's and the short answers').
- decode tokens/s and time to first token of the teacher and every student, all exported to ONNX
  int8 as the bundle is (whole vocabulary), taking turns on the same prompts (`--rounds` rounds,
  the best per prompt, the median over prompts).
- ONNX model size.

Writes benchmarks/results/frontier-<pack>.{txt,json,png}. The shipping bar (issue 33): retention
>= 0.95 and decode >= 1.5x the teacher; the export stage's own bar is stages.export.min_retention.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "What should be checked before giving a blood transfusion?",
    "Explain how sepsis is recognised and what the first steps are.",
    "List the warning signs of a stroke and what to do.",
]
RESULTS = Path(__file__).with_name("results")


def scratch_build(build: Path, into: Path) -> Path:
    """A copy of `build` whose files are hard links (no model is copied) without its distill and
    export stages, so the distill stage there reads the same teacher and writes only its own."""
    copy = into / "build"
    left_out = {"distill", "export", ".lock", ".work"}
    shutil.copytree(build, copy, copy_function=os.link,
                    ignore=lambda folder, names: [n for n in names if Path(folder) == build and
                                                  (n in left_out or n.startswith(".tmp-"))])
    return copy


def train_student(pack: str, build: Path, keep: float, steps: int, into: Path) -> tuple[Path, dict]:
    from vertical.pipeline import build as run_build

    copy = scratch_build(build, into)
    started = time.perf_counter()
    run_build(pack, out=copy, steps=["distill"],
              settings={"distill": {"keep_layers": keep, "steps": steps}, "export": {"model": "teacher"}})
    metrics = json.loads((copy / "distill" / "metrics.json").read_text())
    metrics["stage_seconds"] = round(time.perf_counter() - started, 1)
    return copy / "distill" / "model", metrics


def onnx_megabytes(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "onnx" in f.name) / 1e6, 1)


def main() -> None:
    from vertical.export.convert import export_language_model
    from vertical.export.runtime import OnnxChatModel
    from vertical.generation import median_speeds
    from vertical.paths import best_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=Path("builds/medical"))
    parser.add_argument("--keep", default="0.8,0.6,0.4", help="shares of the teacher's layers, one student each")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps per student (the stage's default)")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per speed measurement")
    parser.add_argument("--rounds", type=int, default=3, help="speed measurements per model and prompt, taking turns")
    args = parser.parse_args()

    build = args.build.resolve()
    manifest = json.loads((build / "manifest.json").read_text())
    pack, pack_dir = manifest["pack"], manifest["pack_dir"]  # a customer's pack is a folder, not a name
    teacher_dir = best_model_dir(build)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="frontier-", dir=build.parent) as scratch:
        scratch = Path(scratch)
        students = {}
        for keep in [float(k) for k in args.keep.split(",")]:
            print(f"student keeping {keep:.0%} of the layers: distilling ({args.steps} steps)", flush=True)
            model_dir, metrics = train_student(pack_dir, build, keep, args.steps, scratch / f"keep-{keep}")
            students[keep] = (model_dir, metrics)
            print(f"  {metrics['student_layers']} layers, retention {metrics.get('retention')} "
                  f"(student {metrics.get('student_score')} / teacher {metrics.get('teacher_score')}), "
                  f"{metrics['stage_seconds']:.0f} s", flush=True)
        print("exporting the teacher and the students to ONNX int8", flush=True)
        onnx = {"teacher": export_language_model(teacher_dir, scratch / "onnx-teacher", "int8", scratch)}
        for keep, (model_dir, _) in students.items():
            onnx[f"keep {keep}"] = export_language_model(model_dir, scratch / f"onnx-{keep}", "int8", scratch)
        models = {name: OnnxChatModel(folder) for name, folder in onnx.items()}
        teacher_model = models["teacher"]
        print(f"decode speed: {len(PROMPTS)} prompts, {args.tokens} tokens, best of {args.rounds} taking turns",
              flush=True)
        speeds = median_speeds({name: (lambda ids, m=m: m.stream_ids(ids, args.tokens)) for name, m in models.items()},
                               PROMPTS, lambda p: teacher_model.prompt_ids([{"role": "user", "content": p}]),
                               args.rounds)
        teacher_rate, teacher_first = speeds["teacher"]
        teacher_score = next(iter(students.values()))[1].get("teacher_score") if students else None
        rows.append({"model": "teacher", "layers": None, "retention": 1.0, "score": teacher_score,
                     "decode_tokens_per_s": round(teacher_rate, 1), "first_token_ms": round(teacher_first, 1),
                     "speedup": 1.0, "onnx_mb": onnx_megabytes(onnx["teacher"])})
        for keep, (_, metrics) in students.items():
            rate, first = speeds[f"keep {keep}"]
            rows.append({"model": f"student, keep {keep}", "layers": metrics["student_layers"],
                         "kept_layers": metrics["kept_layers"], "retention": metrics.get("retention"),
                         "retention_short": metrics.get("retention_short"), "score": metrics.get("student_score"),
                         "teacher_score": metrics.get("teacher_score"), "steps": metrics.get("steps"),
                         "train_seconds": metrics.get("train_seconds"), "stage_seconds": metrics["stage_seconds"],
                         "kd_loss_start": metrics.get("kd_loss_start"), "kd_loss_end": metrics.get("kd_loss_end"),
                         "decode_tokens_per_s": round(rate, 1), "first_token_ms": round(first, 1),
                         "speedup": round(rate / teacher_rate, 2), "onnx_mb": onnx_megabytes(onnx[f"keep {keep}"])})

    teacher_layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    lines = [f"Distillation frontier of {pack} ({build.name}): teacher {teacher_dir.relative_to(build)}, "
             f"{teacher_layers} layers; students distilled {args.steps} steps each on {os.cpu_count()} CPUs; "
             "ONNX int8 decode, whole vocabulary",
             f"{'model':<20}{'layers':>7}{'retention':>10}{'score':>7}{'tok/s':>8}{'speedup':>8}{'TTFT ms':>8}"
             f"{'ONNX MB':>8}{'train s':>8}"]
    for row in rows:
        lines.append(f"{row['model']:<20}{row['layers'] or teacher_layers:>7}{row['retention'] or 0:>10.2f}"
                     f"{row['score'] or 0:>7.3f}{row['decode_tokens_per_s']:>8.1f}"
                     f"{row['speedup']:>7.2f}x{row['first_token_ms']:>8.0f}{row['onnx_mb']:>8.1f}"
                     f"{row.get('train_seconds') or 0:>8.0f}")
    lines.append("The shipping bar: retention >= 0.95 at >= 1.5x the teacher's decode "
                 "(the export stage ships a student from min_retention, 0.9 by default).")
    print("\n".join(lines), flush=True)
    out = RESULTS / f"frontier-{pack}"
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"pack": pack, "steps": args.steps, "rows": rows}, indent=2) + "\n",
                                        encoding="utf-8")
    plot(rows, out.with_suffix(".png"), f"{pack}: students distilled {args.steps} steps on this CPU")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for row in rows:
        axes.scatter(row["speedup"], row["retention"] or 0, color="black" if row["layers"] is None else "tab:blue")
        axes.annotate(f"{row['layers'] or 'teacher'}", (row["speedup"], row["retention"] or 0),
                      textcoords="offset points", xytext=(5, 5))
    axes.axhline(0.95, color="tab:red", linestyle="--", linewidth=1)
    axes.axvline(1.5, color="tab:red", linestyle="--", linewidth=1)
    axes.set_xlabel("ONNX int8 decode speed, x the teacher")
    axes.set_ylabel("QA retention (share of the teacher's score)")
    axes.set_ylim(0, 1.05)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
