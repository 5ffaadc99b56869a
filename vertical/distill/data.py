"""The student's training data: the pack's instruction examples as served (with retrieved
sources), document text, and the teacher's own answers to the pack's prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

from vertical.prompting import prompt_length

# A sequence is {"input_ids", "positions", "targets"}: `positions` are the token positions whose
# next-token distribution the loss reads, `targets` the token each should predict for the
# cross-entropy term (-100: KL only). Only those positions go through the vocabulary projection:
# with a 49k vocabulary that projection costs as much per position as eight of the student's layers.


def sequence(ids: list[int], positions: list[int], teacher_tokens: bool = False) -> dict | None:
    if len(ids) < 8 or not positions:
        return None
    targets = [ids[p + 1] for p in positions] if teacher_tokens else [-100] * len(positions)
    return {"input_ids": ids, "positions": positions, "targets": targets}


def training_sequences(ctx, teacher, tokenizer, index, embedder, work: Path) -> tuple[list[dict], dict[str, int]]:
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
            add(sequence(ids, [p for p in range(len(ids) - 1) if labels[p + 1] != IGNORE]))
    chunks = rng.sample(index.chunks, min(settings.documents, len(index.chunks))) if index is not None else []
    for chunk in chunks:
        ids = tokenizer(chunk.text, add_special_tokens=False)["input_ids"][:length]
        add(sequence(ids, list(range(len(ids) - 1))))
    counts = {"conversations": len(examples), "document_chunks": len(chunks)}

    prompts = [example.messages[:-1] for example in examples[: settings.teacher_answers]]
    answers = teacher_answers(teacher, tokenizer, prompts, settings.answer_tokens, work / "teacher_answers.json")
    for messages, answer in zip(prompts, answers):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        ids = (prompt + answer)[:length]
        add(sequence(ids, list(range(len(prompt) - 1, len(ids) - 1)), teacher_tokens=True))
    counts["teacher_answers"] = len(answers)
    counts["loss_positions"] = sum(len(s["positions"]) for s in sequences)
    return sequences, counts


def teacher_answers(teacher, tokenizer, prompts: list[list[dict]], max_new_tokens: int, cache: Path) -> list[list[int]]:
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
