"""Training examples for the tune stage: the pack's instructions, some made retrieval-aware, and
tokenised with the loss on the assistant's tokens only.

Retrieval-aware examples put the evidence sentences of the top chunks retrieved for the question
(plus a distractor chunk) in the prompt, in the same format `vertical ask` and the runtime use,
and append the number of the source that supports the answer, so the model learns to answer from
evidence and cite it. A few examples get only unrelated sources and the answer "I don't know", so
it learns to refuse. Questions generated from the documents (vertical.tune.generate) become
examples whose reply states the fact, copying the exact span from the evidence.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from vertical.answer import evidence_selector, retrieve
from vertical.evidence import EVIDENCE_SENTENCES
from vertical.prompting import NO_ANSWER, Source, build_messages

log = logging.getLogger(__name__)

IGNORE = -100  # label id that the loss skips
# Worked examples of reading that ship with vertical: evidence sentences of sixteen invented
# organisations' documents, a plainly worded question, the exact span as the answer
READING_CORE = Path(__file__).with_name("reading_core.jsonl")
T = TypeVar("T")


@dataclass
class Example:
    messages: list[dict[str, str]]
    kind: str  # "plain" | "rag" | "no-answer" | "given-sources" | "generated" | "reading-core"


def share_evenly(tagged: list[tuple[int, T]], cap: int | None) -> list[tuple[int, T]]:
    """Up to `cap` of the (file, item) pairs, the files taking turns: a 500-example borrowed data
    set does not drown a pack's 60 hand-written examples, and a file smaller than its share gives
    all it has. The chosen pairs keep their given order; without a cap, every pair."""
    if not cap or len(tagged) <= cap:
        return list(tagged)
    queues: dict[int, list[int]] = {}
    for position, (key, _) in enumerate(tagged):
        queues.setdefault(key, []).append(position)
    chosen: set[int] = set()
    for turn in itertools.zip_longest(*queues.values()):
        for position in turn:
            if position is not None and len(chosen) < cap:
                chosen.add(position)
    return [pair for position, pair in enumerate(tagged) if position in chosen]


def _fit(messages: list[dict[str, str]], sources: list[Source], tokenizer, max_length: int, rebuild) -> list[dict[str, str]]:
    """Shorten the sources (evenly, at word boundaries) until the example fits in max_length tokens,
    so a long retrieval prompt is trimmed instead of the example being cut off before its answer."""
    if tokenizer is None:
        return messages
    length = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    excess = length - max_length + 8
    if excess <= 0:
        return messages
    source_tokens = [len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) for s in sources]
    keep = max(16, (sum(source_tokens) - excess) // max(len(sources), 1))
    trimmed = []
    for s, n in zip(sources, source_tokens):
        if n > keep:
            words = s.text.split(" ")
            s = Source(**{**s.__dict__, "text": " ".join(words[: max(1, len(words) * keep // n)]) + " …"})
        trimmed.append(s)
    return rebuild(trimmed)


def build_examples(conversations, system_prompt: str, index, embedder, settings, seed: int,
                   tokenizer=None) -> list[Example]:
    """Turn the pack's conversations into training examples (see module docstring). With the
    model's tokenizer, retrieved sources are shortened to fit `settings.max_length`."""
    rng = random.Random(seed)
    examples: list[Example] = []
    candidates: list[tuple[int, str, str]] = []  # (position, question, answer) of single-turn examples
    for messages in conversations:
        plain = [{"role": m.role, "content": m.content} for m in messages]
        if plain[0]["role"] != "system":
            plain.insert(0, {"role": "system", "content": system_prompt.strip()})
        user_turns = [m for m in plain if m["role"] == "user"]
        if len(user_turns) == 1 and "[1]" in user_turns[0]["content"]:
            examples.append(Example(plain, "given-sources"))  # written with sources already
            continue
        examples.append(Example(plain, "plain"))
        if len(user_turns) == 1 and index is not None:
            candidates.append((len(examples) - 1, user_turns[0]["content"], plain[-1]["content"]))

    if not candidates or (settings.rag_fraction == 0 and settings.no_answer_fraction == 0):
        return examples
    rng.shuffle(candidates)
    n_rag = round(len(candidates) * settings.rag_fraction)
    n_none = round(len(candidates) * settings.no_answer_fraction)
    rag, none = candidates[:n_rag], candidates[n_rag:n_rag + n_none]
    threshold = float(index.meta.get("threshold", 0.0))
    selector = evidence_selector(embedder.encode, int(index.meta.get("evidence_sentences", EVIDENCE_SENTENCES)))

    if rag:
        questions = embedder.encode([q for _, q, _ in rag])
        answers = embedder.encode([a for _, _, a in rag])
    made = 0
    for (position, question, answer), qvec, avec in zip(rag, questions if rag else [], answers if rag else []):
        hits = index.search(question, lambda _texts, v=qvec: v[None, :], k=max(1, settings.rag_sources - 1))
        chunks = [h.chunk for h in hits]
        used = {c.doc_id for c in chunks}
        others = [row for row in rng.sample(range(len(index.chunks)), min(len(index.chunks), 32))
                  if index.chunks[row].doc_id not in used]
        if others and settings.rag_sources > 1:  # one distractor from another document, so citing is a choice
            chunks.append(index.chunks[others[0]])
        rng.shuffle(chunks)  # the supporting source is not always [1]
        sources = selector.select(question, chunks, qvec)
        support = [float(np.max(selector.vectors([x.text for x in s.sentences] or [s.text]) @ avec)) for s in sources]
        best = int(np.argmax(support))
        if support[best] < threshold:
            continue  # the evidence does not back this answer; keep it as a plain example only
        target = f"{answer.rstrip()} [{sources[best].number}]"
        rebuild = lambda found, q=question, t=target: build_messages(system_prompt, q, found) + [  # noqa: E731
            {"role": "assistant", "content": t}]
        messages = _fit(rebuild(sources), sources, tokenizer, settings.max_length, rebuild)
        examples[position] = Example(messages, "rag")
        made += 1

    refused = 0
    for position, question, _ in none:
        qvec = embedder.encode([question])[0]
        pool = rng.sample(range(len(index.chunks)), min(len(index.chunks), 64))
        pool.sort(key=lambda row: float(index.embeddings[row] @ qvec))  # least related first
        chunks = [index.chunks[row] for row in pool[: settings.rag_sources]]
        closest = pool[min(settings.rag_sources, len(pool)) - 1]  # the most related of the sources given
        if float(index.embeddings[closest] @ qvec) >= threshold:
            continue  # a source might answer it after all: "I don't know" would be the wrong lesson
        sources = selector.select(question, chunks, qvec)
        rebuild = lambda found, q=question: build_messages(system_prompt, q, found) + [  # noqa: E731
            {"role": "assistant", "content": NO_ANSWER}]
        messages = _fit(rebuild(sources), sources, tokenizer, settings.max_length, rebuild)
        examples.append(Example(messages, "no-answer"))
        refused += 1
    log.info("tune data: %d retrieval-aware, %d no-answer examples added", made, refused)
    return examples


def tokenize(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[dict | None, bool]:
    """input_ids and labels with every non-assistant token masked.

    Assistant spans are found by rendering the chat template on growing prefixes of the
    conversation, so this works with any template without generation markers. Returns
    (None, False) when no assistant token survives truncation; the flag says it was truncated.
    """
    def render(upto: int, generation_prompt: bool) -> list[int]:
        return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation_prompt, tokenize=True,
                                             return_dict=True)["input_ids"]

    full = render(len(messages), False)
    labels = [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(i, True))
        end = len(render(i + 1, False))
        labels[start:end] = full[start:end]
    truncated = len(full) > max_length
    full, labels = full[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None, truncated
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}, truncated


def generated_examples(generated, system_prompt: str, index, embedder, settings, tokenizer=None) -> tuple[list[Example], list]:
    """Examples from generated questions whose own sentence comes back as evidence when the
    question is asked as a user would (retrieval, then evidence selection). The reply states the
    fact first, then the clause that states it, each cited by the number of the source holding it
    ("60 days [2].\nThe step-in period lasts at most 60 days [2]."): the pack's hand-written
    grounded answers have this shape, and a reply that restates the question first teaches a small
    model to restate it and stop before the fact. Returns
    (examples, the questions kept)."""
    examples, kept = [], []
    for item in generated:
        sources, _ = retrieve(index, embedder.encode, item.question, settings.rag_sources)
        holding = [s for s in sources if s.doc_id == item.doc_id and item.answer in s.text]
        if not holding:
            continue  # the question does not find its fact: it would teach the model to guess
        number = holding[0].number
        target = f"{item.answer} [{number}].\n{item.reply[:-1]} [{number}]."
        rebuild = lambda found, q=item.question, t=target: build_messages(system_prompt, q, found) + [  # noqa: E731
            {"role": "assistant", "content": t}]
        examples.append(Example(_fit(rebuild(sources), sources, tokenizer, settings.max_length, rebuild), "generated"))
        kept.append(item)
    return examples, kept


def reading_core_examples(system_prompt: str, path: Path = READING_CORE) -> list[Example]:
    """The shipped worked examples of reading (READING_CORE), in the prompt `ask` uses and with the
    reply generated questions are taught ("£4 [2].\nA day ticket costs £4 [2]."). They stand in
    for the hand-written examples a pack of documents alone lacks: a template question repeats
    its sentence's words, while a user's question is worded in their own, and these teach finding
    the answer to such a question among distractors of the same kind."""
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        sources = [Source(number=n, title=s["title"], source=s["file"], start=0, end=0,
                          text=" \u2026 ".join(s["sentences"]), doc_id=s["file"])
                   for n, s in enumerate(row["sources"], start=1)]
        number = row["source"]
        sentence = next(s for s in row["sources"][number - 1]["sentences"] if row["answer"] in s)
        target = f"{row['answer']} [{number}].\n{sentence.rstrip(' .!?')} [{number}]."
        examples.append(Example(build_messages(system_prompt, row["question"], sources) +
                                [{"role": "assistant", "content": target}], "reading-core"))
    return examples
