"""Stage `distill`: a smaller, faster student learns from the build's best model.

    teacher (edit/model > tune/merged > base/model)
      -> student: a fraction of the teacher's layers (stages.distill.keep_layers), same family,
         the layout (even / most influential / one dropped block) closest to the teacher on pack text
      -> token-level distillation: KL(teacher || student) at temperature T on the assistant's
         tokens of the pack's instruction examples (as served, with retrieved sources) and on
         document text
      -> sequence-level distillation: KL and cross-entropy on the answers the teacher itself
         generates for the pack's prompts
      -> the teacher's edit log re-applied to the student, and measured, if the student will ship
         (stages.export: a student the export stage passes over for the teacher is not edited)
      -> distill/model/ and metrics.json (teacher_score, student_score, retention, speedup, edits)

Training checkpoints into the build's scratch folder every few steps, so a killed build resumes
where it stopped; the teacher's generated answers are cached there too.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vertical.io import sha256_text
from vertical.prompting import prompt_length

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 20  # optimizer steps
EDITS_SKIPPED = "edits_skipped"  # metrics key: why the edits were not re-applied to the student
PROBE_SEQUENCES = 8  # sequences on which the candidate layer layouts are compared


def inputs(ctx) -> dict[str, Any]:
    from vertical.scoring import sample_inputs

    pack = ctx.pack
    return {"instructions": pack.fingerprint("instructions"), "system_prompt": sha256_text(pack.config.system_prompt),
            "settings": pack.config.stages.distill.model_dump(), "tune_settings": pack.config.stages.tune.model_dump(),
            # whether the student ships decides whether it is given the edits
            "export_choice": pack.config.stages.export.model_dump(include={"model", "min_retention"}),
            **sample_inputs(pack)}


# ---------------------------------------------------------------- training data
#
# A sequence is {"input_ids", "positions", "targets"}: `positions` are the token positions whose
# next-token distribution the loss reads, `targets` the token each should predict for the
# cross-entropy term (-100: KL only). Only those positions go through the vocabulary projection:
# with a 49k vocabulary that projection costs as much per position as eight of the student's layers.


def _sequence(ids: list[int], positions: list[int], teacher_tokens: bool = False) -> dict | None:
    if len(ids) < 8 or not positions:
        return None
    targets = [ids[p + 1] for p in positions] if teacher_tokens else [-100] * len(positions)
    return {"input_ids": ids, "positions": positions, "targets": targets}


def _training_sequences(ctx, teacher, tokenizer, index, embedder, work: Path) -> tuple[list[dict], dict[str, int]]:
    """The student's training text:

    - the pack's conversations as served (retrieved sources in the prompt), KL on the assistant's
      tokens only: that is where the answers the QA evaluation reads are formed;
    - document chunks, KL on every token: plain language modelling of the domain's text;
    - the teacher's own greedy answers to the pack's prompts, KL and cross-entropy on the answer.
    """
    from vertical.tune.data import IGNORE, build_examples, tokenize

    settings = ctx.pack.config.stages.distill
    length = settings.max_length
    rng = random.Random(settings.seed)
    conversations = ctx.pack.instructions()
    rng.shuffle(conversations)
    # the tune stage's retrieval-aware examples, sources shortened to the student's sequence length
    # so that the answer at the end is never the part cut off
    shaped = ctx.pack.config.stages.tune.model_copy(update={"max_length": length})
    examples = build_examples(conversations, ctx.pack.config.system_prompt, index, embedder, shaped,
                              settings.seed, tokenizer)
    sequences: list[dict] = []

    def add(sequence: dict | None) -> None:
        if sequence is not None:
            sequences.append(sequence)

    for example in examples:
        features, _ = tokenize(tokenizer, example.messages, length)
        if features is not None:
            ids, labels = features["input_ids"], features["labels"]
            add(_sequence(ids, [p for p in range(len(ids) - 1) if labels[p + 1] != IGNORE]))
    chunks = rng.sample(index.chunks, min(settings.documents, len(index.chunks))) if index is not None else []
    for chunk in chunks:
        ids = tokenizer(chunk.text, add_special_tokens=False)["input_ids"][:length]
        add(_sequence(ids, list(range(len(ids) - 1))))
    counts = {"conversations": len(examples), "document_chunks": len(chunks)}

    prompts = [example.messages[:-1] for example in examples[: settings.teacher_answers]]
    answers = _teacher_answers(teacher, tokenizer, prompts, settings.answer_tokens, work / "teacher_answers.json")
    for messages, answer in zip(prompts, answers):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        ids = (prompt + answer)[:length]
        add(_sequence(ids, list(range(len(prompt) - 1, len(ids) - 1)), teacher_tokens=True))
    counts["teacher_answers"] = len(answers)
    counts["loss_positions"] = sum(len(s["positions"]) for s in sequences)
    return sequences, counts


def _teacher_answers(teacher, tokenizer, prompts: list[list[dict]], max_new_tokens: int, cache: Path) -> list[list[int]]:
    """Greedy answers in batches (a batch costs about one sequence on a CPU), in bf16 autocast where
    native (as the QA scoring), cached for a resume."""
    from vertical.generation import chat_prompt_ids, generate_batch
    from vertical.io import atomic_write_json
    from vertical.models.registry import autocast

    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except ValueError:  # unreadable (an older, non-atomic write cut short): answer again
            cached = None
        if isinstance(cached, list) and len(cached) == len(prompts):
            return cached
    answers: list[list[int]] = [[] for _ in prompts]
    # batches of similar length: the prompts mix bare questions with ones carrying retrieved sources
    order = sorted(range(len(prompts)), key=lambda i: prompt_length(prompts[i]))
    for start in range(0, len(order), 16):
        rows = order[start:start + 16]
        out = generate_batch(teacher, [chat_prompt_ids(tokenizer, prompts[i]) for i in rows], tokenizer.pad_token_id,
                             max_new_tokens, precision=autocast)
        for i, row in zip(rows, out):
            while row and row[-1] == tokenizer.pad_token_id and row[-1] != tokenizer.eos_token_id:
                row.pop()
            answers[i] = row
    atomic_write_json(cache, answers)
    return answers


# ---------------------------------------------------------------- the loss and the loop


def distillation_loss(student_logits, teacher_logits, targets, temperature: float, weights=None):
    """KL(teacher || student) on softened distributions, scaled by T^2 so its gradients keep the
    size of a hard-label loss (Hinton et al.), plus cross-entropy where `targets` has a token.
    Logits are [positions, vocab]: only the positions the loss reads; `weights` (summing to 1)
    weigh the positions' KL, uniform by default."""
    import torch.nn.functional as F

    t = temperature
    student_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    kd = (kl.mean() if weights is None else (kl * weights).sum()) * t * t
    if (targets != -100).any():
        ce = F.cross_entropy(student_logits.float(), targets, ignore_index=-100)
    else:
        ce = kd.new_zeros(())
    return kd + ce, kd.detach(), ce.detach()


def _batch(sequences: list[dict], pad_id: int):
    """Right-padded ids and mask, the (row, position) pairs the loss reads with their targets, and
    their weights: each sequence weighs the same, so a 300-token document chunk does not outweigh
    the 40-token answer beside it."""
    import torch

    width = max(len(s["input_ids"]) for s in sequences)
    ids = torch.tensor([s["input_ids"] + [pad_id] * (width - len(s["input_ids"])) for s in sequences])
    mask = torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in sequences])
    rows = torch.tensor([row for row, s in enumerate(sequences) for _ in s["positions"]])
    columns = torch.tensor([p for s in sequences for p in s["positions"]])
    targets = torch.tensor([t for s in sequences for t in s["targets"]])
    weights = torch.tensor([1 / (len(s["positions"]) * len(sequences)) for s in sequences for _ in s["positions"]])
    return ids, mask, rows, columns, targets, weights


def load_checkpoint(path: Path) -> dict | None:
    """A resumable training state, or None to start over. Loaded with `weights_only=True`:
    tensors and plain values only, so a checkpoint planted in a copied build folder cannot run
    code (torch's full unpickler would call whatever the file names)."""
    import pickle

    import torch

    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        log.warning("distill: %s is not a checkpoint this stage wrote (%s); starting over", path,
                    str(exc).splitlines()[0][:200])
        return None


def train_student(student, teacher, sequences: list[dict], settings, pad_id: int, work: Path, track,
                  check: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The distillation loop: AdamW, warmup then cosine decay, bf16 autocast where native,
    a checkpoint every CHECKPOINT_EVERY steps (resumed after a kill). `check`, called once halfway
    (the student in eval mode), may end the training there by returning False."""
    import torch

    from vertical.models import selected_logits
    from vertical.models.registry import autocast

    torch.manual_seed(settings.seed)
    for param in student.get_input_embeddings().parameters():  # shared with the head; the teacher's are kept
        param.requires_grad_(False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, settings.steps) / max(settings.steps, 1))))
    order = list(range(len(sequences)))
    random.Random(settings.seed).shuffle(order)
    order.sort(key=lambda i: len(sequences[i]["input_ids"]))  # similar lengths batch together: less padding
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    random.Random(settings.seed + 1).shuffle(batches)

    checkpoint = work / "checkpoint.pt"
    step, curve = 0, []
    state = load_checkpoint(checkpoint)
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, curve = state["step"], state["curve"]
        log.info("distill: resuming at step %d of %d", step, settings.steps)
    resumed_at = step

    student.train()
    teacher.eval()
    tokens, started = 0, time.perf_counter()
    check_at, stopped_at = settings.steps // 2, None
    for step in track(range(step, settings.steps), settings.steps - step, "distilling the student"):
        if check is not None and 0 < check_at == step:
            student.eval()
            checked = time.perf_counter()
            go_on = check()
            started += time.perf_counter() - checked  # the check's QA is not training time
            if not go_on:
                stopped_at = step
                break
            student.train()
        ids, mask, rows, columns, targets, weights = _batch([sequences[i] for i in batches[step % len(batches)]],
                                                             pad_id)
        with torch.no_grad(), autocast():
            teacher_logits = selected_logits(teacher, ids, mask, rows, columns)
        with autocast():
            student_logits = selected_logits(student, ids, mask, rows, columns)
        loss, kd, ce = distillation_loss(student_logits, teacher_logits, targets, settings.temperature, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        curve.append([round(float(kd), 4), round(float(ce), 4)])
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < settings.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1, "curve": curve}, tmp)
            tmp.replace(checkpoint)  # a kill never leaves a half-written checkpoint behind
    student.eval()
    seconds = time.perf_counter() - started
    window = max(1, len(curve) // 5)
    return {"steps": stopped_at or settings.steps, "stopped_at_step": stopped_at, "resumed_at_step": resumed_at,
            "train_seconds": round(seconds, 1),
            "train_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
            "kd_loss_start": _mean(c[0] for c in curve[:window]), "kd_loss_end": _mean(c[0] for c in curve[-window:]),
            "loss_curve": curve[:: max(1, len(curve) // 50)]}


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


# ---------------------------------------------------------------- measurements


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
    teacher_dir = best_model_dir(ctx.build_dir)
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir)
    index, embedder = open_index(ctx.build_dir)
    work = ctx.work_dir("distill")
    clock = PhaseClock()
    lap = clock.lap

    sequences, counts = _training_sequences(ctx, teacher, tokenizer, index, embedder, work)
    lap("data_and_teacher_answers")
    # the layout is judged on a few training sequences (every 8th, up to PROBE_SEQUENCES), before any training
    probe = [s["input_ids"] for s in sequences[::8][:PROBE_SEQUENCES]]
    kept, layout_kl = choose_layers(teacher, settings.keep_layers, probe, settings.temperature)
    student = make_student(teacher, kept)
    lap("layout")
    log.info("distill: teacher %s (%d layers) -> student with layers %s (untrained KL by layout: %s)",
             teacher_dir.relative_to(ctx.build_dir), teacher.config.num_hidden_layers, kept, layout_kl)
    metrics: dict[str, Any] = {"teacher": str(teacher_dir.relative_to(ctx.build_dir)), "kept_layers": kept,
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
    if qa_items:
        teacher_qa = score_qa(TorchLM(teacher, tokenizer), qa_items, system, retriever, ctx.reporter.track,
                              answer_tokens, known_predictions(ctx.build_dir, teacher_dir))
        teacher_score = metrics["teacher_score"] = teacher_qa["accuracy"]
    # the student's shape, hence its speed, is final here: training and the edits change values only
    prompt = chat_prompt_ids(tokenizer, SPEED_PROMPT)
    speeds = {name: round(speed.tokens_per_s, 2) for name, speed in decode_speeds(
        {"teacher": lambda: greedy_ids(teacher, prompt, 48), "student": lambda: greedy_ids(student, prompt, 48)}).items()}
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
    check = worth_finishing if qa_items and teacher_score and export.model == "auto" else None
    if sequences and settings.steps:
        metrics.update(train_student(student, teacher, sequences, settings, tokenizer.pad_token_id, work,
                                     ctx.reporter.track, check))
    del teacher
    student.save_pretrained(out / "model", safe_serialization=True)
    save_tokenizer(teacher_dir, out / "model")
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
