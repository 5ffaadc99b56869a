"""Questions generated from the pack's own documents, to teach the reader to copy facts from evidence.

    chunk -> sentences -> a fact in a sentence (a number with its unit, or a name) -> a question
    about it by template -> kept only if retrieval brings that sentence back as evidence and it is
    not one of the pack's evaluation facts -> (question, answer, provenance)

The Self-Instruct idea without a teacher model: a 135M model writes poor questions, and templates
cost nothing. A template question repeats its sentence's words, so it mostly teaches the skill
the reader lacks, finding the span in the evidence and copying it exactly (names, numbers, units);
the pack's hand-written examples teach the phrasing of real questions.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from dataclasses import asdict, dataclass

from vertical.evidence import STOPWORDS, content_words, split_sentences

log = logging.getLogger(__name__)

# A number with what it counts: "3 g", "90 days", "4%", "£1,250", "USD 10 million", "65 mmHg".
_QUANTITY = re.compile(
    r"(?:(?:£|\$|€)\s?|\b(?:USD|GBP|EUR)\s)?\b\d+(?:[.,:]\d+)*(?:\s?%|\s?(?:million|billion|thousand)\b)?"
    r"(?:\s[a-zA-Zµ/]{1,12}\b)?")
# Capitalised words in a row, after a word in lower case: "Doran Kest", "Forge Lane".
_NAME = re.compile(r"(?<=[a-z,;:] )[A-Z][a-zA-Z\-]+(?: (?:of |the )?[A-Z][a-zA-Z\-]+)*")
# Words that follow a number without being what it counts ("90 days after", "3 silver each").
_NOT_UNITS = STOPWORDS | {"after", "over", "need", "needs", "before", "later", "earlier", "each", "every", "ago",
                          "onwards", "times", "or", "than", "plus", "minus", "am", "pm"}
# Sentences that are formulas, table rows or quotations make no question.
_NO_QUESTION = re.compile(r"[=|+^\"“”]|^['‘(]")
_MONEY = re.compile(r"^(?:£|\$|€|USD|GBP|EUR)")
_CLAUSE_BREAK = re.compile(r";|:| — | - |, (?=and |but |while |which |whereas |so )")
MIN_WORDS, MAX_WORDS = 5, 28
SENTENCES_PER_PASS = 2  # sentences of a chunk tried before the next chunk's


@dataclass
class GeneratedQuestion:
    question: str
    answer: str  # the span: what is scored
    reply: str  # the clause that states it: what the model is taught to say (with its citation)
    doc_id: str
    chunk_id: str
    span: tuple[int, int]  # the answer's characters in the document
    sentence: str
    template: str

    def record(self) -> dict:
        return {**asdict(self), "span": list(self.span), "provenance": "generated from the pack's documents"}


def _answer_spans(sentence: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the facts a question can ask for."""
    spans = []
    if _NO_QUESTION.search(sentence):
        return spans
    for match in _QUANTITY.finditer(sentence):
        text = match.group().strip()
        last = text.split()[-1]
        if len(text.split()) > 1 and last.isalpha() and (last.lower() in _NOT_UNITS or last.endswith(("ed", "ly", "ing"))):
            text = text[: -len(last)].rstrip()
        if re.fullmatch(r"\d{1,2}", text):  # a bare small number is usually a list position or a clause number
            continue
        kind = "money" if _MONEY.match(text) else "percent" if text.endswith("%") else \
            "quantity" if re.search(r"[a-zA-Z]$", text) else "number"
        spans.append((match.start(), match.start() + len(text), kind))
    for match in _NAME.finditer(sentence):
        previous = sentence[:match.start()].split()[-1]
        if not previous[0].islower():
            continue
        if not any(s <= match.start() < e for s, e, _ in spans):
            spans.append((match.start(), match.end(), "name"))
    return spans


def _wh(kind: str, answer: str) -> str:
    if kind == "money":
        return "how much"
    if kind == "percent":
        return "what percentage"
    if kind == "quantity":
        unit = answer.split()[-1]
        return f"how many {unit}" if unit.isalpha() and unit.lower() not in ("million", "billion") else "what"
    return "what"


def _clause(sentence: str, start: int, end: int) -> tuple[str, int, int]:
    """The clause of a long sentence that holds the span (with the span's new offsets)."""
    bounds = [0] + [m.end() for m in _CLAUSE_BREAK.finditer(sentence)] + [len(sentence) + 1]
    for left, right in zip(bounds, bounds[1:]):
        if left <= start and end <= right - 1:
            text = sentence[left:right - 1]
            lead = len(text) - len(text.lstrip())
            return text.strip(), start - left - lead, end - left - lead
    return sentence, start, end


def question_for(sentence: str, start: int, end: int, kind: str) -> tuple[str, str] | None:
    """(question, reply) for the span sentence[start:end]. The question is the sentence with the
    span turned into a wh-word ("The notice period is 90 days." -> "The notice period is how many
    days?"), or, when the span opens the sentence, "Who/What <rest>?"; the reply is the clause
    that states the fact ("The notice period is 90 days."): restating the question and then
    copying the span from the evidence is the way of reading a small model learns best."""
    answer = sentence[start:end]
    if len(sentence.split()) > MAX_WORDS:
        sentence, start, end = _clause(sentence, start, end)
    before = sentence[:start].rstrip(" ,(")
    after = sentence[end:].strip().rstrip(".!?").rstrip(" ,;:")
    if len((before + " " + after).split()) < MIN_WORDS - 1 or len(sentence.split()) > MAX_WORDS:
        return None
    reply = sentence.strip().rstrip(".!?;:, ")
    reply = reply[0].upper() + reply[1:] + "."
    if not before:
        if not after or not re.match(r"[a-z]", after):
            return None
        wh = "Who" if kind == "name" and len(answer.split()) >= 2 else "What"
        return f"{wh} {after}?", reply
    text = f"{before} {_wh(kind, answer)} {after}".strip().replace(" 's", "'s").replace(" ,", ",")
    return text[0].upper() + text[1:] + "?", reply


def _collection(source: str) -> str:
    """The folder a document's file is in, or the site and path its record links to, without the
    last part: documents/reference/sepsis.md -> documents/reference, https://pubmed.../10135926/ ->
    https://pubmed.../"""
    return source.rstrip("/").rsplit("/", 1)[0] if "/" in source.rstrip("/") else ""


def _chunks_in_turns(chunks: list, rng: random.Random) -> list:
    """The chunks in random order, the pack's collections taking turns: 1,000 abstracts borrowed
    from a public data set do not drown the fourteen notes the hospital wrote (as the tune stage
    shares its example cap between instruction files)."""
    by_collection: dict[str, list] = {}
    for chunk in chunks:
        by_collection.setdefault(_collection(chunk.source), []).append(chunk)
    queues = list(by_collection.values())
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    return [chunk for turn in itertools.zip_longest(*queues) for chunk in turn if chunk is not None]


def generate_questions(chunks: list, count: int, seed: int, held_out_facts: set[tuple[str, str]],
                       held_out_questions: list[str]) -> list[GeneratedQuestion]:
    """Up to `count` template questions, one per sentence, the pack's files taking turns; none
    about a fact of `held_out_facts` ((doc_id, normalised answer) pairs of the pack's evaluation
    items) or close to one of `held_out_questions` (half or more of its content words).

    The chunks are visited in passes of SENTENCES_PER_PASS sentences each: a large pack has its
    questions from many chunks, while a pack of a dozen documents, which the first pass leaves
    short, still gets as many as its sentences hold."""
    rng = random.Random(seed)
    held_words = [content_words(q) for q in held_out_questions]
    found: list[GeneratedQuestion] = []
    seen_sentences: set[str] = set()
    visits = [[chunk, None] for chunk in _chunks_in_turns(chunks, rng)]
    for first in itertools.count(0, SENTENCES_PER_PASS):
        if first and not any(len(sentences) > first for _, sentences in visits):
            return found
        for visit in visits:
            chunk, sentences = visit
            if sentences is None:
                # shuffled on the first visit, so the first pass draws the same questions whether or
                # not later passes follow; a chunk that starts inside a sentence (its overlap)
                # begins with a fragment, which is left out
                sentences = visit[1] = [s for s in split_sentences(chunk.text, chunk.start) if not s.text[0].islower()]
                rng.shuffle(sentences)
            for sentence in sentences[first:first + SENTENCES_PER_PASS]:
                if sentence.text in seen_sentences:
                    continue
                made = _question_about(sentence, chunk, rng, held_out_facts, held_words)
                if made is not None:
                    seen_sentences.add(sentence.text)
                    found.append(made)
                if len(found) >= count:
                    return found
    return found


def _question_about(sentence, chunk, rng: random.Random, held_out_facts: set[tuple[str, str]],
                    held_words: list[set[str]]) -> GeneratedQuestion | None:
    """A question about one fact of `sentence` (tried in random order), or None."""
    from vertical.scoring import normalize

    spans = _answer_spans(sentence.text)
    rng.shuffle(spans)
    for start, end, kind in spans:
        answer = sentence.text[start:end]
        made = question_for(sentence.text, start, end, kind)
        if made is None or (chunk.doc_id, normalize(answer)) in held_out_facts:
            continue
        question, reply = made
        words = content_words(question)
        if any(h and len(words & h) >= len(h) / 2 for h in held_words):
            continue
        return GeneratedQuestion(question, answer, reply, chunk.doc_id, chunk.id,
                                 (sentence.start + start, sentence.start + end), sentence.text, f"wh-{kind}")
    return None
