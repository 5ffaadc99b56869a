"""Stage `eval` and `vertical eval`: what each step of the build adds, on held-out data.

    QA accuracy (the pack's qa_eval, or --qa FILE) for each model the build has:
        base alone | base + retrieval | tuned + retrieval | edited + retrieval | student + retrieval |
        exported bundle (ONNX, its own embedder and index)
    edit efficacy / generalization / locality (the pack's edits, or --edits FILE) on base, edited,
        student and bundle
    retrieval recall (index stage; bundle) and decoding speed (distill, export stages)
    -> eval/report.json, eval/report.md, eval/qa.png, eval/edits.png

How each number is computed is written into report.md. Every model sees the same items, the same
prompt format and the same retrieved sources.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError
from vertical.io import sha256_text
from vertical.scoring import eval_sample, pack_questions, sample_items

log = logging.getLogger(__name__)

METHOD = {
    "qa_choice": "multiple-choice items: the choice with the highest summed log-probability as the continuation "
                 "of 'Answer:' after the chat prompt (label accuracy)",
    "qa_short": "short-answer items: greedy answer of up to `answer_tokens` tokens, cut at a repeated sentence or "
                "5-word run and after two sentences, and replaced by 'I could not find a clear answer in the sources' "
                "when it states a number or name its evidence lacks (what `vertical ask` returns); correct when it has at "
                "most 40 words and the normalised gold answer (lower case, no punctuation or articles, number words "
                "up to twenty as digits) occurs in it as whole words, after citations such as [2] are removed",
    "retrieval": "sources: the top `rag_sources` chunks of the row's own index (hybrid search); the model reads "
                 "their `evidence_sentences` sentences most similar to the question, numbered by chunk, in a "
                 "<sources> block after the pack's system prompt; 'base alone' gets the system prompt and the "
                 "question, no sources",
    "grounding": "recall@k: share of items whose gold document is among the sources the model was given; "
                 "accuracy_when_retrieved: accuracy on those items; faithfulness: share of the model's short answers "
                 "whose numbers and names all occur in their evidence (before any fallback); fallback: share replaced "
                 "by 'I could not find a clear answer' (never counted correct); abstention: share answering 'I don't know'",
    "edits": "CounterFact definitions on the raw prompt: efficacy P(target_new) > P(target_true); generalization "
             "the same on rephrasings; locality P(locality target) > P(target_new); P is the mean per-token "
             "probability",
    "edit_answers": "each edit's prompt asked as a question with retrieval (the sources carry the edits' document "
                    "changes), scored as a short answer against target_new",
    "reuse": "an answer the tune or distill stage already gave to the same item (same prompt and sources, same "
             "answer length, same numerics, same scoring rules) with identical weights (sha256 of the "
             "safetensors) is reused, not generated again",
    "recall": "retrieval recall@k and MRR@10 (mean reciprocal rank of the right document) over the pack's "
              "retrieval questions",
    "speed": "PyTorch rows: greedy decoding in fp32 eager, teacher and student taking turns (distill stage); "
             "bundle: the exported model's greedy decoding on onnxruntime-genai (export stage)",
    "numerics": "PyTorch rows run on the CPU in bf16 autocast where it has native bf16 (log-probabilities summed "
                "in fp32), else in fp32; the bundle row runs the exported ONNX model with its int8, int4 or fp32 "
                "weights",
}


def inputs(ctx) -> dict[str, Any]:
    pack = ctx.pack
    return {"qa_eval": pack.fingerprint("qa_eval"), "edits": pack.fingerprint("edits"),
            "system_prompt": sha256_text(pack.config.system_prompt),
            "settings": pack.config.stages.eval.model_dump(), "rag_sources": pack.config.stages.tune.rag_sources}


# ---------------------------------------------------------------- the models a build or bundle holds


def _rows(path: Path) -> list[tuple[str, str, Path, bool]]:
    """(name, kind, folder, with retrieval) for every model present: kind is torch or onnx."""
    if (path / "pack.json").is_file() and (path / "model" / "genai_config.json").is_file():
        return [("bundle (ONNX)", "onnx", path, True)]
    rows = []
    candidates = [("base alone", "base/model", False), ("base + retrieval", "base/model", True),
                  ("tuned + retrieval", "tune/merged", True), ("edited + retrieval", "edit/model", True),
                  ("student + retrieval", "distill/model", True)]
    for name, rel, rag in candidates:
        if (path / rel / "config.json").is_file():
            rows.append((name, "torch", path / rel, rag))
    if (path / "export" / "manifest.json").is_file():
        rows.append(("bundle (ONNX)", "onnx", path / "export", True))
    if not rows:
        raise VerticalError(f"{path} holds no model: give a build folder after `vertical build`, or a bundle")
    return rows


def _open(kind: str, folder: Path, build_index: tuple | None):
    """(lm, (index, encode)) for one row: a TorchLM with the build's index, or an OnnxLM with the bundle's."""
    from vertical.scoring import OnnxLM, TorchLM

    if kind == "onnx":
        from vertical.answer import open_bundle

        assistant = open_bundle(folder)
        return OnnxLM(assistant.model), (assistant.index, assistant.embedder.encode_query)
    from vertical.models import load_causal_lm, load_tokenizer

    index, embedder = build_index
    return TorchLM(load_causal_lm(folder), load_tokenizer(folder)), (index, embedder.encode)


# ---------------------------------------------------------------- edits, for any model


# the QA rows whose models are also scored on the edits, and their names in the edits table
EDIT_ROWS = {"base alone": "base", "edited + retrieval": "edited", "student + retrieval": "student",
             "bundle (ONNX)": "bundle (ONNX)"}


# the rows asked the edits' prompts through the answer path, with the build's (changed) sources:
# whether the edited weights and the documents give the same new value
EDIT_ANSWER_ROWS = ("tuned + retrieval", "edited + retrieval", "bundle (ONNX)")


def edit_scores(lm, requests, true_targets: list[str]) -> dict[str, float | None]:
    """Efficacy, generalization and locality of `requests` on a TorchLM or OnnxLM."""
    from vertical.edit.metrics import compared_pairs, tally

    pairs = compared_pairs(requests, true_targets)
    rows = [(lm.piece_ids(prompt), lm.piece_ids(" " + target.strip()))
            for _, prompt, winner, loser in pairs for target in (winner, loser)]
    logp = lm.mean_logprobs(rows)
    return {**tally(pairs, [logp[2 * i] > logp[2 * i + 1] for i in range(len(pairs))]), "n": len(requests)}


# ---------------------------------------------------------------- the evaluation


def evaluate(path: Path, qa_items: list, edits: list, system_prompt: str, settings, rag_sources: int,
             track=None) -> dict[str, Any]:
    """Score every model of a build (or the one of a bundle) on the same QA items and edits."""
    from vertical.answer import retrieve
    from vertical.scoring import known_predictions, score_qa

    path = Path(path)
    build_dir = None if (path / "pack.json").is_file() else path
    rows = _rows(path)
    # Without target_true an edit is judged against what the base model says (as the edit stage does).
    needs_truth = [r for r in edits if not r.target_true]
    if needs_truth and build_dir is None:
        raise VerticalError("every edit needs target_true to be evaluated on a bundle")
    true_targets = [r.target_true for r in edits]
    if needs_truth:
        from vertical.edit.metrics import greedy_target
        from vertical.models import load_causal_lm, load_tokenizer

        base = build_dir / "base" / "model"
        model, tokenizer = load_causal_lm(base), load_tokenizer(base)
        true_targets = [r.target_true or greedy_target(model, tokenizer, r.prompt) for r in edits]
        del model

    report: dict[str, Any] = {"qa": [], "edits": [], "edit_answers": [], "method": METHOD,
                              "questions": len(qa_items), "edit_requests": len(edits)}
    for _, kind, folder, _ in rows:
        if kind == "onnx":  # which model the bundle holds: the student, or the teacher it fell back to
            from vertical.export.bundle import read_manifest

            manifest = read_manifest(folder)
            report["bundle_model"] = {**manifest.get("model", {}),
                                      "reason": manifest.get("metrics", {}).get("export", {}).get("model_reason")}
    if build_dir is not None and (build_dir / "distill" / "metrics.json").is_file():
        from vertical.distill import EDITS_SKIPPED

        distill = json.loads((build_dir / "distill" / "metrics.json").read_text())
        if distill.get(EDITS_SKIPPED):
            report["student_edits_skipped"] = distill[EDITS_SKIPPED]
        if distill.get("stopped_early"):
            report["student_stopped_early"] = f"at step {distill['stopped_at_step']}: {distill['stopped_early']}"
    build_index = None
    if any(kind == "torch" for _, kind, _, _ in rows):
        from vertical.index import open_index

        build_index = open_index(build_dir)  # once: every torch row searches the same index
    loaded: dict[Path, tuple] = {}
    for name, kind, folder, rag in rows:
        if folder not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[folder] = _open(kind, folder, build_index)
        lm, (index, encode) = loaded[folder]
        retriever = (lambda q, index=index, encode=encode: retrieve(index, encode, q, rag_sources)[0]) if rag else None
        if qa_items:
            started = time.perf_counter()
            known = known_predictions(build_dir, folder) if build_dir is not None and kind == "torch" else {}
            result = score_qa(lm, qa_items, system_prompt, retriever, track, settings.answer_tokens, known)
            report["qa"].append({"model": name, "accuracy": result["accuracy"], "n": result["n"],
                                 "choice": result["by_kind"]["choice"], "short": result["by_kind"]["short"],
                                 "seconds": round(time.perf_counter() - started, 1),
                                 "reused_from_earlier_stages": result["reused"], "items": result["items"]})
            log.info("eval: %s QA accuracy %s", name, result["accuracy"])
        label = EDIT_ROWS.get(name)
        # a student that was not given the edits has no edit scores of its own to show
        if edits and label and not (label == "student" and "student_edits_skipped" in report):
            report["edits"].append({"model": label, **edit_scores(lm, edits, true_targets)})
        if edits and rag and name in EDIT_ANSWER_ROWS:
            from vertical.pack.schema import QAItem

            asked = [QAItem(question=r.prompt, answer=r.target_new) for r in edits]
            result = score_qa(lm, asked, system_prompt, retriever, None, settings.answer_tokens)
            report["edit_answers"].append({"model": name, "accuracy": result["accuracy"], "n": result["n"],
                                           "items": result["items"]})
    return report


def _build_metrics(build_dir: Path) -> dict[str, Any]:
    """Retrieval recall and speed recorded by the earlier stages."""
    from vertical.pipeline import load_manifest

    stages = load_manifest(build_dir)["stages"]
    return _recorded_metrics({name: entry.get("metrics", {}) for name, entry in stages.items()})


def _bundle_metrics(bundle: Path) -> dict[str, Any]:
    """The same, from what the bundle's manifest kept of its build."""
    from vertical.export.bundle import read_manifest

    recorded = read_manifest(bundle).get("metrics", {})
    return _recorded_metrics({**recorded.get("build", {}), "export": recorded.get("export", {})})


def _recorded_metrics(metrics: dict[str, dict]) -> dict[str, Any]:
    retrieval = {k: v for k, v in (metrics.get("index", {}).get("retrieval") or metrics.get("index", {})).items()
                 if isinstance(v, (int, float)) and (k.startswith("recall@") or k.startswith("mrr"))}
    export = metrics.get("export", {})
    distill = metrics.get("distill", {})
    return {"retrieval": retrieval,
            "speed": {k: v for k, v in {"teacher_tokens_per_s (torch)": distill.get("teacher_tokens_per_s"),
                                        "student_tokens_per_s (torch)": distill.get("student_tokens_per_s"),
                                        "bundle_tokens_per_s (ONNX)": export.get("onnx_tokens_per_s"),
                                        "bundle_quant": export.get("quant"),
                                        "bundle_mb": round(export["bundle_bytes"] / 1e6, 1)
                                        if export.get("bundle_bytes") else None}.items() if v is not None}}


def run(ctx, out: Path) -> dict[str, Any]:
    from vertical.evaluate.report import write_report

    settings = ctx.pack.config.stages.eval
    qa_items = eval_sample(ctx.pack, ctx.build_dir)
    report = evaluate(ctx.build_dir, qa_items, ctx.pack.edits(), ctx.pack.config.system_prompt, settings,
                      ctx.pack.config.stages.tune.rag_sources, ctx.reporter.track)
    report.update(_build_metrics(ctx.build_dir), pack=ctx.pack.name)
    write_report(report, out)
    return summary(report)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (metrics.json): accuracy per model, the vertical model's margin over the base."""
    qa = {row["model"]: row["accuracy"] for row in report["qa"]}
    result: dict[str, Any] = {"qa_accuracy": qa, "questions": report["questions"]}
    full = next((n for n in ("edited + retrieval", "tuned + retrieval", "base + retrieval") if n in qa), None)
    if full and qa.get("base alone") is not None and qa[full] is not None:
        result["vertical_model"] = full
        result["margin_over_base"] = round(qa[full] - qa["base alone"], 4)
        if qa.get("bundle (ONNX)") is not None:
            result["bundle_margin_over_base"] = round(qa["bundle (ONNX)"] - qa["base alone"], 4)
    result["short_answers"] = {row["model"]: {k: v for k, v in row["short"].items() if k != "n_retrieved"}
                               for row in report["qa"] if row["short"]["n"]}
    result["edits"] = {row["model"]: {k: row[k] for k in ("efficacy", "generalization", "locality")}
                       for row in report["edits"]}
    result["edit_answers_with_retrieval"] = {row["model"]: row["accuracy"] for row in report.get("edit_answers", [])}
    return result


def evaluate_path(path: Path, qa_file: Path | None = None, edits_file: Path | None = None,
                  out: Path | None = None, questions: int | None = None, track=None) -> tuple[Path, dict]:
    """`vertical eval BUILD|BUNDLE [--qa FILE] [--edits FILE]`: the same report for any build or bundle,
    on the pack's data or on external files in the pack formats."""
    from vertical.errors import PackInvalid
    from vertical.evaluate.report import write_report
    from vertical.pack import read_jsonl
    from vertical.pack.schema import EditRequest, EvalSettings, QAItem

    from vertical.paths import is_build
    from vertical.paths import is_bundle as looks_like_bundle

    path = Path(path)
    is_bundle = looks_like_bundle(path)
    if not is_bundle and not is_build(path):
        raise VerticalError(f"{path} is neither a build folder nor an exported bundle")
    pack = None
    if is_bundle:
        meta = json.loads((path / "pack.json").read_text(encoding="utf-8"))
        settings = EvalSettings(**({"answer_tokens": meta["answer_tokens"]} if "answer_tokens" in meta else {}))
        system_prompt, rag_sources = meta["system_prompt"], meta.get("rag_sources", 3)
    else:
        from vertical.pack import load_pack
        from vertical.pipeline import load_manifest

        manifest = load_manifest(path)
        pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
        system_prompt, settings = pack.config.system_prompt, pack.config.stages.eval
        rag_sources = pack.config.stages.tune.rag_sources

    def read(file: Path, parse):
        if not file.is_file():
            raise VerticalError(f"{file} does not exist")
        records, problems = read_jsonl(file, parse)
        if problems:
            raise PackInvalid(str(file), problems)
        return records

    if qa_file is not None:
        qa_items = read(qa_file, QAItem.model_validate)
    elif pack is not None:
        qa_items = sample_items(pack_questions(pack, path), settings.questions if questions is None else questions,
                                settings.seed)
    else:
        raise VerticalError("a bundle carries no evaluation set: give --qa FILE (and --edits FILE)")
    edits = read(edits_file, EditRequest.model_validate) if edits_file else (pack.edits() if pack else [])
    report = evaluate(path, qa_items, edits, system_prompt, settings, rag_sources, track)
    report.update(_bundle_metrics(path) if is_bundle else _build_metrics(path))
    report["pack"] = pack.name if pack else json.loads((path / "pack.json").read_text())["name"]
    report["qa_file"], report["edits_file"] = str(qa_file or "pack qa_eval"), str(edits_file or "pack edits")
    from vertical.io import atomic_dir

    out = Path(out or path / "eval-report")
    with atomic_dir(out) as tmp:  # a report is whole or absent
        write_report(report, tmp)
    return out, summary(report)
