"""Stage `distill`: a smaller, faster student learns from the build's best model.

    teacher (edit/model > tune/merged > base/model)
      -> student: a fraction of the teacher's layers (stages.distill.keep_layers), same family,
         the layout (even / most influential / one dropped block) closest to the teacher on pack text
    or, with stages.distill.teacher (a larger model of the same tokenizer, e.g. tuned on a GPU):
      teacher: that model -> student: the build's own model before its edits (tune/merged > base/model)
      -> token-level distillation: KL(teacher || student) at temperature T on the assistant's
         tokens of the pack's instruction examples (as served, with retrieved sources) and on
         document text
      -> sequence-level distillation: KL and cross-entropy on the answers the teacher itself
         generates for the pack's prompts
      -> the teacher's edit log re-applied to the student, and measured, if the student will ship
         (stages.export: a student the export stage passes over for the teacher is not edited)
      -> distill/model/ and metrics.json (teacher_score, student_score, retention, speedup, edits)

Training runs on transformers' Trainer, as the tune stage's does (bf16 where native, `torchrun` and
`accelerate launch` for data-parallel runs); it checkpoints into the build's scratch folder every
few steps, so a killed build resumes where it stopped. The teacher's generated answers are cached
there too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vertical.distill.data import training_sequences
from vertical.distill.train import train_student
from vertical.errors import VerticalError
from vertical.io import sha256_text

log = logging.getLogger(__name__)

EDITS_SKIPPED = "edits_skipped"  # metrics key: why the edits were not re-applied to the student
PROBE_SEQUENCES = 8  # sequences on which the candidate layer layouts are compared


GPU_STEPS = 40  # optimizer steps when stages.distill.steps is unset and a GPU or a named teacher trains the student


def training_steps(settings) -> tuple[int, str]:
    """How many steps the student trains (0: the stage makes no student), and why.

    On a CPU the default is none: no student shape measured there keeps the teacher's answers at a
    speed worth the minutes it trains (benchmarks/frontier.py, docs/distill.md), and a student the
    export stage passes over costs every build those minutes for nothing."""
    import torch

    if settings.steps is not None:
        return settings.steps, f"stages.distill.steps: {settings.steps}"
    if torch.cuda.is_available():
        return GPU_STEPS, f"{GPU_STEPS} steps on the GPU"
    if settings.teacher:  # a named teacher is a request to distil, whatever the machine
        return GPU_STEPS, f"{GPU_STEPS} steps from stages.distill.teacher"
    return 0, ("skipped on a CPU: no student measured on a CPU keeps the teacher's answers at a speed worth its "
               "minutes (docs/distill.md); set stages.distill.steps to distil one anyway")


def inputs(ctx) -> dict[str, Any]:
    from vertical.scoring import sample_inputs

    pack = ctx.pack
    teacher = pack.config.stages.distill.teacher
    return {"instructions": pack.fingerprint("instructions"), "system_prompt": sha256_text(pack.config.system_prompt),
            "settings": pack.config.stages.distill.model_dump(), "tune_settings": pack.config.stages.tune.model_dump(),
            "steps": training_steps(pack.config.stages.distill)[0],  # unset steps depend on the machine
            # whether the student ships decides whether it is given the edits
            "export_choice": pack.config.stages.export.model_dump(include={"model", "min_retention"}),
            # new weights at the same path are another teacher
            **({"teacher_sha256": _teacher_source(teacher, pack.root).sha256} if teacher else {}),
            **sample_inputs(pack)}


# ---------------------------------------------------------------- which model ships


def student_ships(settings, retention: float | None) -> tuple[bool, str]:
    """Whether `stages.export` ships the distilled student rather than the teacher, and why. `auto`
    ships it only if it kept at least `min_retention` of the teacher's QA score: a faster model that
    lost the pack's answers is no deployment, and an unmeasured one is not shipped by default."""
    if settings.model == "student":
        return True, "asked for (stages.export.model: student)"
    if settings.model == "teacher":
        return False, "asked for (stages.export.model: teacher)"
    if retention is None:
        return False, ("no QA score to compare the student with the teacher, so the teacher ships "
                       "(stages.export.model: student ships the student unmeasured)")
    if retention >= settings.min_retention:
        return True, f"retention {retention:.2f} >= {settings.min_retention}"
    return False, f"student retention {retention:.2f} < {settings.min_retention}"


def student_worth_finishing(settings, retention_at_check: float | None) -> tuple[bool, str]:
    """Halfway through distillation, whether the rest of the training can still make the
    student ship under `auto` (the only choice retention decides), and why. A student below half
    of `min_retention` then does not double its score in the remaining steps (docs/distill.md shows
    the students' scores halfway and at the end)."""
    if retention_at_check is None:
        return True, "no QA score to compare the student with the teacher"
    if retention_at_check < settings.min_retention / 2:
        return False, (f"retention {retention_at_check:.2f} halfway, below half of the "
                       f"{settings.min_retention} the export needs: the bundle ships the teacher")
    return True, f"retention {retention_at_check:.2f} halfway"


def _teacher_source(spec: str, pack_root: Path):
    """The model `stages.distill.teacher` names (registry name, HF folder or .gguf; a relative path
    is the pack folder's), resolved and fingerprinted."""
    from vertical.models import resolve_base_model

    if (pack_root / spec).exists():
        spec = str(pack_root / spec)
    try:
        return resolve_base_model(spec)
    except VerticalError as exc:
        raise VerticalError(f"stages.distill.teacher: {exc}") from None


def external_teacher(spec: str, student_dir: Path, pack_root: Path) -> Path:
    """The folder of the model `stages.distill.teacher` names (`_teacher_source`), checked to share
    the student's tokenizer: distillation matches the two models' distributions over the same
    vocabulary, token by token."""
    from vertical.models import ensure_local, load_tokenizer

    folder = ensure_local(_teacher_source(spec, pack_root))
    theirs, ours = load_tokenizer(folder).get_vocab(), load_tokenizer(student_dir).get_vocab()
    if theirs != ours:
        raise VerticalError(f"stages.distill.teacher: {spec} has another tokenizer than the build's model "
                            f"({len(theirs)} against {len(ours)} tokens, {len(theirs.keys() ^ ours.keys())} differ): "
                            "name a teacher of the base model's family, or remove the setting to distil the build's "
                            "own model into a smaller one")
    return folder


def own_model_dir(build_dir: Path) -> Path:
    """The build's model before its knowledge edits: the student an external teacher trains (the
    edits are re-applied to it afterwards, as to any student that ships)."""
    from vertical.paths import MODEL_PREFERENCE

    for rel in MODEL_PREFERENCE[1:]:
        if (build_dir / rel / "config.json").is_file():
            return build_dir / rel
    raise VerticalError(f"{build_dir} has no model to distil into: run the base stage first")


def run(ctx, out: Path) -> dict[str, Any]:
    from vertical.answer import retrieve
    from vertical.distill.student import choose_layers, make_student, student_layer
    from vertical.edit import read_log, replay_edits
    from vertical.scoring import TorchLM, eval_sample, known_predictions, score_qa, write_predictions
    from vertical.generation import SPEED_PROMPT, chat_prompt_ids, decode_speeds, greedy_ids
    from vertical.paths import best_model_dir
    from vertical.index import open_index
    from vertical.models import load_causal_lm, load_tokenizer, save_tokenizer
    from vertical.pipeline import PhaseClock

    settings = ctx.pack.config.stages.distill
    steps, why = training_steps(settings)
    if steps == 0:
        log.info("distill: no student: %s", why)
        return {"skipped": why}
    settings = settings.model_copy(update={"steps": steps})
    student_dir = own_model_dir(ctx.build_dir) if settings.teacher else None
    teacher_dir = external_teacher(settings.teacher, student_dir, ctx.pack.root) if settings.teacher else best_model_dir(ctx.build_dir)
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir)
    index, embedder = open_index(ctx.build_dir)
    work = ctx.work_dir("distill")
    clock = PhaseClock()
    lap = clock.lap

    # Under torchrun / accelerate launch every rank trains; only rank 0 measures, decides and saves.
    main = int(os.environ.get("RANK", "0")) == 0
    sequences, counts = training_sequences(ctx, teacher, tokenizer, index, embedder, work)
    lap("data_and_teacher_answers")
    # the layout is judged on a few training sequences (every 8th, up to PROBE_SEQUENCES), before any training
    probe = [s["input_ids"] for s in sequences[::8][:PROBE_SEQUENCES]]
    if student_dir is None:
        kept, layout_kl = choose_layers(teacher, settings.keep_layers, probe, settings.temperature)
        student = make_student(teacher, kept)
        teacher_name = str(teacher_dir.relative_to(ctx.build_dir))
    else:  # every layer of the build's own model is the student's: its edits map onto the same layers
        student = load_causal_lm(student_dir)
        kept, layout_kl = list(range(student.config.num_hidden_layers)), {}
        teacher_name = settings.teacher
    lap("layout")
    log.info("distill: teacher %s (%d layers) -> student with layers %s (untrained KL by layout: %s)",
             teacher_name, teacher.config.num_hidden_layers, kept, layout_kl)
    metrics: dict[str, Any] = {"teacher": teacher_name, "kept_layers": kept,
                               "layout_kl": layout_kl,
                               "teacher_layers": teacher.config.num_hidden_layers, "student_layers": len(kept),
                               "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
                               "student_parameters": sum(p.numel() for p in student.parameters()),
                               "sequences": len(sequences), **counts}
    tune = ctx.pack.config.stages.tune
    # The eval stage's whole sample: whether the student ships is decided on it. On the tune stage's
    # 20 items a student can tie its teacher by chance; the eval stage reuses these answers.
    qa_items = eval_sample(ctx.pack, ctx.build_dir)
    answer_tokens = ctx.pack.config.stages.eval.answer_tokens
    retriever = lambda question: retrieve(index, embedder.encode, question, tune.rag_sources)[0]  # noqa: E731
    system = ctx.pack.config.system_prompt
    teacher_score = None
    if qa_items and main:
        teacher_qa = score_qa(TorchLM(teacher, tokenizer), qa_items, system, retriever, ctx.reporter.track,
                              answer_tokens, known_predictions(ctx.build_dir, teacher_dir))
        teacher_score = metrics["teacher_score"] = teacher_qa["accuracy"]
    # the student's shape, hence its speed, is final here: training and the edits change values only
    if main:
        prompt = chat_prompt_ids(tokenizer, SPEED_PROMPT)
        speeds = {name: round(speed.tokens_per_s, 2) for name, speed in decode_speeds(
            {name: (lambda model=model: greedy_ids(model, prompt, 48))
             for name, model in (("teacher", teacher), ("student", student))}).items()}
        metrics.update(teacher_tokens_per_s=speeds["teacher"], student_tokens_per_s=speeds["student"],
                       speedup=round(speeds["student"] / speeds["teacher"], 3))
    lap("teacher_qa_and_speeds")

    export = ctx.pack.config.stages.export
    student_qa: dict[str, Any] | None = None  # the student's latest QA result, as its predictions record it

    def score_student() -> float | None:
        """The student's retention: the lower of its share of the teacher's score on the whole
        sample and on the short answers alone. On the whole sample a student can keep the score
        with yes/no choices while its own answers collapse (medical: 0.92 overall, 0.05 of 0.25
        on the short answers)."""
        nonlocal student_qa
        student_qa = score_qa(TorchLM(student, tokenizer), qa_items, system, retriever, ctx.reporter.track,
                              answer_tokens)
        metrics["student_score"] = student_qa["accuracy"]
        metrics["qa_questions"] = len(qa_items)
        shares = []
        if teacher_score:
            shares.append(student_qa["accuracy"] / teacher_score)
        teacher_short = teacher_qa["by_kind"]["short"]["accuracy"]
        if teacher_short:
            metrics["retention_short"] = round(student_qa["by_kind"]["short"]["accuracy"] / teacher_short, 4)
            shares.append(metrics["retention_short"])
        metrics["retention"] = round(min(shares), 4) if shares else None
        return metrics["retention"]

    def worth_finishing() -> bool:
        metrics["retention_at_check"] = score_student()
        go_on, why = student_worth_finishing(export, metrics["retention_at_check"])
        if not go_on:
            metrics["stopped_early"] = why
            log.info("distill: training stops halfway: %s", why)
        return go_on

    # the check only matters where retention decides what ships (stages.export.model: auto)
    check = worth_finishing if main and qa_items and teacher_score and export.model == "auto" else None
    if sequences:
        metrics.update(train_student(student, teacher, sequences, settings, tokenizer.pad_token_id, work, check))
    del teacher
    if not main:
        return metrics
    student.save_pretrained(out / "model", safe_serialization=True)
    save_tokenizer(student_dir or teacher_dir, out / "model")
    lap("training")

    def write_scores() -> None:  # once the student is saved: its predictions are keyed by its weights
        write_predictions(out / "qa_predictions.json", [("teacher + retrieval", teacher_dir, teacher_qa),
                                                        ("student + retrieval", out / "model", student_qa)])

    if qa_items:
        if metrics.get("stopped_at_step") is None:  # a stopped student was scored at the check
            score_student()
        write_scores()
    lap("student_qa")
    # Re-applying the edits costs minutes; a student the export stage will pass over for the teacher
    # (it lost the pack's answers) does not need them.
    ships, why = student_ships(export, metrics.get("retention"))
    edits = replay_edits(ctx.build_dir, ctx.pack, out / "model", lambda layer: student_layer(layer, kept), len(kept),
                         ctx.reporter.track) if ships else None
    if edits is not None:
        metrics["edits"] = edits
        metrics["edit_efficacy"] = edits["efficacy"]
        student = load_causal_lm(out / "model")
        lap("edits_reapplied")
        if qa_items:  # the student as it ships, with the edits
            score_student()
            write_scores()
            lap("student_qa_after_edits")
    elif not ships and read_log(ctx.build_dir / "edit"):
        metrics[EDITS_SKIPPED] = f"the student will not be exported ({why})"
        log.info("distill: edits not re-applied: %s", metrics[EDITS_SKIPPED])
    metrics["phase_seconds"] = clock.seconds
    return metrics
