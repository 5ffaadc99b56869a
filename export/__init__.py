"""Stage `export`, and the torch-free runtime that serves what it writes (imported as vertical.export).

    student (distill/model, if it kept the teacher's score) or teacher
    -> cut to the tokens the pack uses (`vocabulary: pack`, vertical.models.vocabulary; checked
       against the whole vocabulary's greedy answers)
    -> onnxruntime-genai model builder -> model/
    the index stage's ONNX embedder -> embedder/, its index -> index/ (the vectors the build searched)
    pack.json (system prompt, disclaimer), manifest.json (sha256 of every file, versions, metrics)

With `quant: auto` the stage keeps int8; from 1B parameters up it builds int4 too and keeps it
if its greedy answers agree better with fp32's on the pack's prompts. Modules: `convert` (needs torch, export time
only), `bundle` + `runtime` + `server` (torch-free, what a deployment installs).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AGREEMENT_TOKENS = 48  # greedy tokens compared per prompt between quantisations
# `quant: auto` weighs int4 against int8 from this size up. Below it block-wise int4 loses the model
# (a 135M model's int4 keeps a small fraction of fp32's greedy tokens; docs/export.md, quantisation).
INT4_FROM_PARAMETERS = 1_000_000_000
# The model cut to the pack's vocabulary ships only if it writes the whole model's greedy tokens: it
# differs only where the whole model's choice is a token the pack never uses
MIN_VOCABULARY_AGREEMENT = 0.95


def inputs(ctx) -> dict[str, Any]:
    config = ctx.pack.config
    return {"settings": config.stages.export.model_dump(), "embedder": config.embedder, "name": config.name,
            "description": config.description, "system_prompt": config.system_prompt, "disclaimer": config.disclaimer,
            "example_questions": config.example_questions, "instructions": ctx.pack.fingerprint("instructions"),
            "retrieval_eval": ctx.pack.fingerprint("retrieval_eval")}


def model_to_export(build_dir: Path, settings) -> tuple[Path, str, str]:
    """(model folder, "student" | "teacher", why) that a build ships, by distill's student_ships on
    the student's retention; `settings`: the pack's stages.export."""
    from vertical.distill import EDITS_SKIPPED, student_ships
    from vertical.edit import read_log
    from vertical.errors import VerticalError
    from vertical.paths import best_model_dir

    student = build_dir / "distill" / "model"
    teacher = best_model_dir(build_dir)
    distill = json.loads((student.parent / "metrics.json").read_text()) if (student.parent / "metrics.json").is_file() else {}
    if not (student / "config.json").is_file():
        if distill.get("skipped"):
            if settings.model == "student":
                raise VerticalError(f"stages.export.model is student, but the distill stage made none ({distill['skipped']})")
            log.info("export: no distilled student (%s); exporting %s", distill["skipped"], teacher.relative_to(build_dir))
            return teacher, "teacher", f"no distilled student: {distill['skipped']}"
        if settings.model != "teacher":
            log.warning("export: the build has no distilled student (the distill stage has not run); exporting the teacher")
        return teacher, "teacher", "no distilled student"
    ships, reason = student_ships(settings, distill.get("retention"))
    if not ships:
        if settings.model == "auto" and distill.get("retention") is None:
            log.warning("export: the student was never scored (the build has no QA items to score it on); exporting "
                        "the build's own model, %s (stages.export.model: student ships it unmeasured)",
                        teacher.relative_to(build_dir))
        elif settings.model == "auto":
            log.warning("export: the student keeps %.0f%% of the teacher's QA score (below stages.export.min_retention"
                        "=%s); exporting the build's own model, %s (stages.export.model: student forces the student)",
                        100 * distill["retention"], settings.min_retention, teacher.relative_to(build_dir))
        return teacher, "teacher", reason
    if distill.get(EDITS_SKIPPED) and read_log(build_dir / "edit"):
        raise VerticalError("the distilled student lacks the build's knowledge edits (the distill stage gives them only "
                            "to a student that will ship): set stages.export.model: student in pack.yaml and run "
                            "`vertical build PACK` again, which re-runs distill with the edits")
    return student, "student", reason


def pack_questions(pack) -> list[str]:
    """The pack's example questions, then its single-turn instruction questions that carry no sources."""
    questions = list(pack.config.example_questions)
    for conversation in pack.instructions():
        users = [m.content for m in conversation if m.role == "user"]
        if len(users) == 1 and "<sources>" not in users[0] and "[1]" not in users[0]:
            questions.append(users[0])
    return questions


def pack_texts(pack, build_dir: Path, index, prompts: list[list[dict[str, str]]]) -> Iterator[str]:
    """What the shipped model reads and writes in this pack: the documents as sources are shown to
    it (with their edits' changes), the instructions, the edits, the generated questions, the
    pack's prompts, and `prompts` (chat messages with retrieved sources) in the chat template.
    Each text comes again one word a line, and capitalised both ways, because an answer starts with
    a word as it stands alone ("Meropenem [1]." where the documents say " meropenem"), the second
    reading scores evidence spans that way, and a question starts capitalised after "Question:".
    Evaluation items are not read: they stay held out."""
    from vertical.models import load_tokenizer
    from vertical.prompting import Source, format_sources

    def texts() -> Iterator[str]:
        config = pack.config
        for chunk in index.chunks:
            yield format_sources([Source(1, chunk.title, chunk.source, chunk.start, chunk.end, chunk.text)])
        for conversation in pack.instructions():
            yield from (message.content for message in conversation)
        for edit in pack.edits():
            yield from (edit.prompt, edit.target_new, edit.target_true or "", *edit.rephrase)
            yield from (f"{check.prompt} {check.target}" for check in (*edit.locality, *edit.portability))
        generated = build_dir / "tune" / "generated.jsonl"
        if generated.is_file():
            for line in generated.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                yield from (str(row.get(key, "")) for key in ("question", "answer", "reply"))
        yield from (config.system_prompt, config.disclaimer, config.description, *config.example_questions)
        tokenizer = load_tokenizer(build_dir / "base" / "model")
        for messages in prompts:
            yield tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "."}], tokenize=False)

    for text in texts():
        words = text.split()
        capitalised = [word[:1].upper() + word[1:] for word in words]
        yield from (text, "\n".join(words), "\n".join(capitalised), " ".join(capitalised))


def vocabulary_agreement(full_dir: Path, trimmed_dir: Path, kept: list[int], prompts: list[list[dict[str, str]]]) -> float:
    """Share of the whole-vocabulary model's greedy tokens (AGREEMENT_TOKENS per prompt) that the
    trimmed model reproduces before the first difference, in PyTorch.

    The trimmed model reads the whole model's greedy tokens in one forward pass: while the two
    agree, its argmax at each position is the token it would generate itself, so the first
    difference is the one generating would find, for one pass instead of AGREEMENT_TOKENS."""
    import itertools

    import torch

    from vertical.export.convert import prefix_agreement
    from vertical.generation import chat_prompt_ids, greedy_rows
    from vertical.models import load_causal_lm, load_tokenizer

    full_model, full_tokenizer = load_causal_lm(full_dir), load_tokenizer(full_dir)
    trimmed_model, trimmed_tokenizer = load_causal_lm(trimmed_dir), load_tokenizer(trimmed_dir)
    trimmed_id = {token: i for i, token in enumerate(kept)}
    # the whole model's greedy tokens for all prompts in one batch: the decoding steps are shared
    greedy = greedy_rows(full_model, [chat_prompt_ids(full_tokenizer, m) for m in prompts],
                         full_tokenizer.pad_token_id, AGREEMENT_TOKENS) if prompts else []
    scores = []
    for messages, full in zip(prompts, greedy):
        prompt = chat_prompt_ids(trimmed_tokenizer, messages)
        # up to the first token the trimmed vocabulary lacks, which it cannot write
        readable = [trimmed_id[t] for t in itertools.takewhile(trimmed_id.__contains__, full)]
        with torch.inference_mode():
            logits = trimmed_model(torch.tensor([prompt + readable])).logits[0, len(prompt) - 1:]
        scores.append(prefix_agreement(full, [kept[i] for i in logits.argmax(-1).tolist()]))
    return round(sum(scores) / max(len(scores), 1), 4)


def cut_vocabulary(ctx, model_dir: Path, index, prompts: list[list[dict[str, str]]], out: Path,
                   metrics: dict[str, Any]) -> Path:
    """`out`, the model cut to its pack's tokens, if it writes the whole model's greedy tokens on
    `prompts`; else `model_dir`, saying why. Its size and agreement go into `metrics`."""
    from vertical.errors import VerticalError
    from vertical.models.vocabulary import trim_vocabulary

    try:
        trimmed = trim_vocabulary(model_dir, pack_texts(ctx.pack, ctx.build_dir, index, prompts), out)
    except VerticalError as exc:
        log.warning("export: exporting the whole vocabulary: %s", exc)
        return model_dir
    agreement = vocabulary_agreement(model_dir, out, trimmed.kept, prompts)
    metrics.update(vocabulary_size=trimmed.size, vocabulary_full_size=trimmed.full_size, vocabulary_agreement=agreement)
    if agreement < MIN_VOCABULARY_AGREEMENT:
        log.warning("export: the model cut to the pack's %d tokens agrees with the whole vocabulary on %.0f%% of the "
                    "greedy tokens of the pack's prompts (below %.0f%%); exporting the whole vocabulary",
                    trimmed.size, 100 * agreement, 100 * MIN_VOCABULARY_AGREEMENT)
        return model_dir
    return out


def agreement_prompts(pack, index, embedder, count: int) -> list[list[dict[str, str]]]:
    """Chat prompts as the server builds them: `pack_questions`, each with its retrieved sources."""
    from vertical.answer import Assistant
    from vertical.prompting import build_messages

    assistant = Assistant(index, embedder, None, pack.config.system_prompt)
    prompts = []
    for question in pack_questions(pack)[:count]:
        _, messages = assistant.prepare(question)
        prompts.append(messages or build_messages(pack.config.system_prompt, question, None))
    return prompts


def _build_metrics(build_dir: Path) -> dict[str, Any]:
    """The headline numbers of every stage, for the bundle's manifest."""
    from vertical.pipeline import load_manifest

    keep = {"index": ("recall@1", "recall@5", "mrr@10", "threshold"),
            "tune": ("eval_loss_base", "eval_loss_tuned", "accuracy_base", "accuracy_tuned"),
            "edit": ("edits", "method", "efficacy", "generalization", "locality"),
            "distill": ("teacher_score", "student_score", "retention", "speedup", "edit_efficacy", "student_layers")}
    stages = load_manifest(build_dir)["stages"]
    return {stage: {k: stages[stage]["metrics"].get(k) for k in names}
            for stage, names in keep.items() if stage in stages}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("vertical", "onnxruntime", "onnxruntime-genai", "onnx", "tokenizers", "faiss-cpu", "bm25s",
                    "transformers", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def run(ctx, out: Path) -> dict[str, Any]:
    from vertical.base import count_parameters
    from vertical.export.bundle import FORMAT, FORMAT_VERSION, MANIFEST, list_files
    from vertical.export.convert import export_language_model, prefix_agreement
    from vertical.generation import SPEED_PROMPT, chat_prompt_ids, decode_speeds, greedy_ids
    from vertical.export.runtime import OnnxChatModel, OnnxEmbedder
    from vertical.index import EMBEDDER
    from vertical.index.store import RetrievalIndex
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.models.vocabulary import VOCABULARY_FILE
    from vertical.pipeline import PhaseClock

    config = ctx.pack.config
    settings = config.stages.export
    model_dir, role, reason = model_to_export(ctx.build_dir, settings)
    scratch = ctx.work_dir("export")
    metrics: dict[str, Any] = {"model": role, "model_reason": reason, "source": str(model_dir.relative_to(ctx.build_dir))}
    clock = PhaseClock()
    lap = clock.lap

    # the index and its embedder as the build searched them (the index stage embedded with the ONNX graph)
    built = ctx.stage_dir("index")
    shutil.copytree(built / EMBEDDER, out / "embedder")
    embedder_info = json.loads((out / "embedder" / "embedder.json").read_text(encoding="utf-8"))
    embedder = OnnxEmbedder(out / "embedder")
    index = RetrievalIndex.load(built)
    index.save(out / "index")
    lap("embedder_and_index")

    # the vocabulary: the pack's tokens only, if the cut model answers the pack's prompts as the whole one does
    prompts_messages = agreement_prompts(ctx.pack, index, embedder, settings.agreement_prompts)
    source_dir = model_dir
    if settings.vocabulary == "pack":
        ctx.reporter.stage("export", "running", "cutting the vocabulary to the pack's tokens")
        source_dir = cut_vocabulary(ctx, model_dir, index, prompts_messages, scratch / "vocabulary", metrics)
    metrics["vocabulary"] = "pack" if source_dir != model_dir else "full"
    lap("vocabulary")

    # the language model: candidates, compared with fp32 on the pack's prompts
    candidates = [settings.quant]
    if settings.quant == "auto":
        candidates = ["int8", "int4"] if count_parameters(source_dir) >= INT4_FROM_PARAMETERS else ["int8"]
    built_models = {}
    for quant in dict.fromkeys(["fp32", *candidates]):
        ctx.reporter.stage("export", "running", f"language model to ONNX ({quant})")
        built_models[quant] = export_language_model(source_dir, scratch / f"lm-{quant}", quant, scratch)
    lap("language_model_builds")
    reference = OnnxChatModel(built_models["fp32"])
    prompts = [reference.prompt_ids(m) for m in prompts_messages]
    greedy = {"fp32": [reference.greedy_ids(ids, AGREEMENT_TOKENS) for ids in prompts]}
    agreement = {"fp32": 1.0}
    for quant in candidates:
        if quant == "fp32":
            continue
        model = OnnxChatModel(built_models[quant])
        greedy[quant] = [model.greedy_ids(ids, AGREEMENT_TOKENS) for ids in prompts]
        scores = [prefix_agreement(r, o) for r, o in zip(greedy["fp32"], greedy[quant])]
        agreement[quant] = round(sum(scores) / max(len(scores), 1), 4)
    if settings.quant == "auto":
        chosen = "int8" if agreement["int8"] >= agreement.get("int4", -1.0) else "int4"
    else:
        chosen = settings.quant
    del reference
    shutil.move(str(built_models[chosen]), str(out / "model"))
    if (source_dir / VOCABULARY_FILE).is_file():  # which token of the whole vocabulary each id is
        shutil.copy2(source_dir / VOCABULARY_FILE, out / "model" / VOCABULARY_FILE)
    metrics.update(quant=chosen, greedy_agreement=agreement[chosen], agreement_by_quant=agreement,
                   agreement_prompts=len(prompts), quant_candidates=candidates)
    lap("quant_agreement")

    # speed of the exported model and of the same model in PyTorch eager (fp32)
    ctx.reporter.stage("export", "running", "measuring decode speed")
    onnx_model, torch_model = OnnxChatModel(out / "model"), load_causal_lm(model_dir)
    onnx_prompt = chat_prompt_ids(load_tokenizer(source_dir), SPEED_PROMPT)
    prompt = chat_prompt_ids(load_tokenizer(model_dir), SPEED_PROMPT)
    speeds = decode_speeds({"onnx": lambda model=onnx_model: model.stream_ids(onnx_prompt, 64),
                            "torch": lambda model=torch_model: greedy_ids(model, prompt, 64)}, runs=2)
    metrics["onnx_tokens_per_s"] = round(speeds["onnx"].tokens_per_s, 2)
    metrics["torch_tokens_per_s"] = round(speeds["torch"].tokens_per_s, 2)
    del torch_model, onnx_model
    metrics["onnx_speedup"] = round(metrics["onnx_tokens_per_s"] / max(metrics["torch_tokens_per_s"], 1e-9), 2)
    lap("decode_speed")
    metrics["phase_seconds"] = clock.seconds

    pack_info = {"name": config.name, "description": config.description, "language": config.language,
                 "system_prompt": config.system_prompt, "disclaimer": config.disclaimer,
                 "example_questions": config.example_questions,
                 # how the build's eval stage asked: `vertical eval BUNDLE` asks the same way
                 "rag_sources": config.stages.tune.rag_sources, "answer_tokens": config.stages.eval.answer_tokens}
    (out / "pack.json").write_text(json.dumps(pack_info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files = list_files(out)
    metrics["bundle_bytes"] = sum(f["bytes"] for f in files.values())
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "pack": config.name,
                "model": {"role": role, "source": metrics["source"], "quant": chosen,
                          "vocabulary": metrics.get("vocabulary_size") if metrics["vocabulary"] == "pack" else None},
                "embedder": embedder_info, "versions": _versions(),
                "metrics": {"build": _build_metrics(ctx.build_dir), "export": metrics}, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics
