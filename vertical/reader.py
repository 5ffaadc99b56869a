"""Extractive second reading: a factoid answer is weighed against the evidence spans it could copy.

    question + evidence -> the chat prompt, read once (a KV cache / generator state)
    -> the model's own greedy answer, as before; its head ("70 g/L" of "70 g/L [1]. ...")
    -> candidate spans of the evidence: 1..MAX_SPAN_WORDS words, starting at the STARTS words the
       model most expects to write first, not ending in a stopword or in a number whose unit
       follows, not made only of the question's own words, holding a number when the question
       asks for one, and of a kind the question allows (`kind`: no year for "how old", no length
       of time for "what dose", no figure for "who")
    -> each candidate and the head score log P("<text> [n]") under the same model, plus how well
       the words around it match the question (CONTEXT_WEIGHT x the question's words within
       CONTEXT_WORDS of the span, SENTENCE_WEIGHT x the share of the question's words in its
       sentence)
    -> the best span replaces the model's answer when it scores MARGIN higher than the head (a
       head of at most MAX_SPAN_WORDS words: a sentence-long answer is not weighed against short
       spans), or when the model's answer states what its evidence does not
       (vertical.evidence.check_answer), only repeats the question, or is of a kind the
       question rules out

A 135M-parameter reader that writes freely commits to its first token greedily and garbles
figures ("133 mg" for the evidence's "5 mg twice daily" beside "133 micromol/L"); scored as whole
spans, the same model's probabilities often prefer the figure the evidence states. Where its free
answer is already the likelier one it stands: it may write "12" for the evidence's "twelve", or
answer in the pack's voice. The model alone often prefers a figure of the right kind from the
wrong clause ("70 g/L" for most adults, where the question asks about acute coronary syndrome,
"80 g/L", in the next sentence); the question's own words near a span, the way a reader scans for
them, tell the clauses apart. A span answer is faithful by construction. Why / how-does / yes-or-no
questions keep the free answer.

Torch-free: the build's torch models (vertical.generation.TorchPrefilled) and the bundle's
onnxruntime-genai model (vertical.export.runtime.OnnxPrefilled) read prompts for it, so the bundle
answers as the build was measured.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vertical.evidence import STOPWORDS, asks_for_number, content_words, digits, is_abstention
from vertical.prompting import CITED_NUMBER, Source, cited_numbers

MAX_SPAN_WORDS = 8  # "the direct answer alone": a longer span is a quote
STARTS = 12  # start words followed per question: those with the likeliest first tokens
# Weights of the question's words around a span, in nats of the span's log P: set on
# benchmarks/dev_questions.jsonl, never on an eval item (docs/grounded-answers.md has the numbers)
CONTEXT_WORDS = 6
CONTEXT_WEIGHT = 1.0  # per question word within CONTEXT_WORDS words before or after the span
SENTENCE_WEIGHT = 2.0  # times the share of the question's words in the span's sentence
# A span replaces the model's own supported answer only when it scores this much higher: greedy
# decoding already preferred the model's answer, and a close call is noise in a 135M model's log P
MARGIN = 0.5

_FACTOID = re.compile(
    r"^\W*(?:[\w'-]+[\s,;:]+){0,5}?(?:what|which|who|whom|whose|where|when|"
    r"how\s+(?:much|many|long|often|soon|quickly|far|old|high|low|large|big|fast|frequently|early|late))\b",
    re.IGNORECASE)
_EXPLAIN = re.compile(r"\b(why|explain|describe|summari[sz]e|compare|difference|how (?:does|do|can|should)|"
                      r"what happens)\b", re.IGNORECASE)
_EDGE = "\"'()[]{},;:.!?*"
_NUMBER_WORD = re.compile(r"^[\d.,:/%-]+$")
_CURRENCY = re.compile(r"^(?:[A-Z]{3}|[$£€¥])$")
_DIGIT = re.compile(r"\d")
# where the model's own short answer ends: at its citation, a line break or a sentence's end
_HEAD_END = re.compile(r"\s*\[|\n|(?<=[A-Za-z0-9%)])[.,;](?:\s|$)")


# The kinds of value a span can state, tried in this order so that an amount of money "a day" is
# money and an age in years is an age, not a length of time: a percentage, money, an age, a count
# of time units, a year or calendar date (a year of an era included), any other figure, text.
PERCENT, MONEY, AGE, DURATION, YEAR, NUMBER, TEXT = "percent", "money", "age", "duration", "year", "number", "text"
_TIME_UNIT = r"(?:seconds?|minutes?|mins?|hours?|hrs?|days?|weeks?|fortnights?|months?|years?|decades?)"
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_SPAN_KINDS = (
    (PERCENT, re.compile(r"%|\bper ?cent\b", re.IGNORECASE)),
    (MONEY, re.compile(r"[£$€¥]|\b(?:GBP|USD|EUR|pence|pounds?|dollars?|euros?)\b")),
    (AGE, re.compile(r"\byears? old\b|\baged? \d", re.IGNORECASE)),
    # a count of time units ("per day" of "300 mg per day" is a rate, not a length of time)
    (DURATION, re.compile(r"\d[ -](?:business |working |calendar )?" + _TIME_UNIT + r"\b", re.IGNORECASE)),
    (YEAR, re.compile(r"^(?:in |since |from |by |until )?(?:1[5-9]\d\d|20\d\d)(?:[-/]\d{2,4})?$|\b\d+ (?:DR|AD|BC|BCE|CE)\b"
                      r"|\b" + _MONTH + r",? \d{4}\b")),
)
# What a question's wording rules out: the first pattern that matches gives the span kinds that
# cannot answer it. Only contradictions are ruled out, not every kind but the expected one: a fee
# may be a percentage, "how long" may be answered "until the end of the term".
_RULED_OUT = (
    (re.compile(r"\bhow old\b|\bat what age\b|\bwhat age\b", re.IGNORECASE), {YEAR, MONEY, PERCENT}),
    (re.compile(r"\bhow long\b|\bhow soon\b|\bhow many (?:business |working )?" + _TIME_UNIT + r"|\btenure\b",
                re.IGNORECASE), {YEAR, MONEY, PERCENT}),
    (re.compile(r"\b(?:what|which) year\b|\bon what date\b", re.IGNORECASE), {DURATION, AGE, MONEY, PERCENT}),
    (re.compile(r"\bdose\b|\bhow much (?!time\b)\w+ (?:goes|is given|is used)\b", re.IGNORECASE), {DURATION, YEAR, AGE}),
    (re.compile(r"\b(?:cost|costs|price|pay|pays|paid|charge|charges|sell|sells|fine|salary|spend)\b", re.IGNORECASE),
     {DURATION, YEAR, AGE}),
    (re.compile(r"^\W*(?:who|whom)\b", re.IGNORECASE), {PERCENT, MONEY, AGE, DURATION, YEAR}),
)


def kind(span: str) -> str:
    """The kind of value `span` states (PERCENT ... TEXT, see _SPAN_KINDS)."""
    span = digits(span.strip(_EDGE))
    for name, pattern in _SPAN_KINDS:
        if pattern.search(span):
            return name
    return NUMBER if _DIGIT.search(span) else TEXT


def ruled_out(question: str) -> set[str]:
    """The kinds of value that cannot answer `question` (none where its wording says nothing)."""
    return next((kinds for pattern, kinds in _RULED_OUT if pattern.search(question)), set())


def is_factoid(question: str) -> bool:
    """A what / which / who / when / where / how much ... question that a span can answer; not a
    why, how-does or yes-or-no question, which needs a sentence of its own."""
    return bool(_FACTOID.match(question)) and not _EXPLAIN.search(question)


class Prefilled(Protocol):
    """A model that has read a prompt once."""

    first: Sequence[float]  # log P of each vocabulary token as the first of the answer

    def follow(self, paths: list[list[int]]) -> list[list[float]]:
        """log P of each token of each path, after the prompt and the path's tokens before it."""
        ...


@dataclass(frozen=True)
class Candidate:
    text: str
    source: int  # the number of the source it is copied from
    context: float = 0.0  # how well the words around it match the question (see `context`)


def _words(text: str) -> set[str]:
    """Content words, a possessive counted as its noun ("Thornwick's" is "thornwick")."""
    return {w[:-2] if w.endswith("'s") else w for w in content_words(text)}


def _stem(word: str) -> str:
    """A word without a plural or verb ending, so "payments" meets "payment"."""
    for ending in ("ing", "ed", "es", "s"):
        if len(word) > 4 and word.endswith(ending):
            return word[:-len(ending)]
    return word


def _question_words(question: str) -> set[str]:
    return {_stem(w) for w in _words(question)}


def context(asked: set[str], words: list[str], start: int, count: int) -> float:
    """How well the words around words[start:start + count] match the question's stemmed content
    words `asked`: CONTEXT_WEIGHT per one of them within CONTEXT_WORDS words on either side, plus
    SENTENCE_WEIGHT times the share of them in the whole sentence."""
    if not asked:
        return 0.0

    def found(part: list[str]) -> set[str]:
        return {_stem(w) for w in _words(" ".join(part))} & asked
    near = found(words[max(0, start - CONTEXT_WORDS):start] + words[start + count:start + count + CONTEXT_WORDS])
    return CONTEXT_WEIGHT * len(near) + SENTENCE_WEIGHT * len(found(words)) / len(asked)


def _head_context(asked: set[str], head: str, source: Source | None) -> float:
    """`context` of the model's own short answer where the source it cites states it word for word, else 0."""
    span = head.split()
    best = 0.0
    if source is not None:
        for sentence in source.sentences or ():
            words = sentence.text.split()
            for i in range(len(words) - len(span) + 1):
                if _trim(" ".join(words[i:i + len(span)])).strip(_EDGE) == head.strip(_EDGE):
                    best = max(best, context(asked, words, i, len(span)))
    return best


def _trim(text: str) -> str:
    """A span without the punctuation that ends its last word, brackets kept when they pair."""
    text = text.rstrip(",;:.!?\"'*")
    while text.endswith((")", "]")) and text.count(text[-1]) > text.count("(" if text[-1] == ")" else "["):
        text = text[:-1].rstrip(",;:.!?\"'*")
    return text


def _spans(words: list[str], start: int) -> list[str]:
    """The spans that start at words[start]: not ending after a stopword, nor after a bare number
    whose unit follows ("133" of "133 micromol/L")."""
    spans = []
    window = [words[start].lstrip(_EDGE), *words[start + 1:start + MAX_SPAN_WORDS]]
    for count in range(1, len(window) + 1):
        last = window[count - 1]
        core = last.strip(_EDGE)
        if not core or core.lower() in STOPWORDS:
            continue
        following = words[start + count].strip(_EDGE).lower() if start + count < len(words) else ""
        if _NUMBER_WORD.match(last) and following and following not in STOPWORDS:
            continue
        spans.append(_trim(" ".join(window[:count])))
    return [s for s in spans if s]


def candidates(question: str, sources: Sequence[Source]) -> list[list[Candidate]]:
    """The evidence's candidate answers, grouped by the word they start at."""
    asked, wants_number, excluded = _words(question), asks_for_number(question), ruled_out(question)
    stems = _question_words(question)
    groups: list[list[Candidate]] = []
    loose: list[list[Candidate]] = []  # the same, without asking for a number: when none holds one
    seen: set[tuple[int, str]] = set()
    for source in sources:
        for sentence in source.sentences or ():
            words = sentence.text.split()
            for i, word in enumerate(words):
                head = word.strip(_EDGE)
                if not head or head.lower() in STOPWORDS:
                    continue
                if i and _NUMBER_WORD.match(head) and _CURRENCY.match(words[i - 1]):
                    continue  # "100" of "GBP 100": the amount starts at its currency
                found = [Candidate(text, source.number, context(stems, words, i, len(text.split())))
                         for text in _spans(words, i)
                         if not _words(text) <= asked and kind(text) not in excluded and (source.number, text) not in seen]
                seen.update((c.source, c.text) for c in found)
                if found:
                    loose.append(found)
                    numbered = [c for c in found if _DIGIT.search(digits(c.text))]
                    if numbered or not wants_number:
                        groups.append(numbered if wants_number else found)
    return groups or loose


def answer_head(answer: str) -> str:
    """The model's short answer without its citation and what follows ("70 g/L [1]. ..." -> "70 g/L")."""
    return _HEAD_END.split(answer.strip(), maxsplit=1)[0].strip()


@dataclass
class Reading:
    """The second reading of one answer: every candidate span and the model's own head, scored."""

    chosen: list[Candidate]
    span_scores: list[float]  # log P("<span> [n]") of each candidate, without its context
    head: str  # the model's own short answer ("" when it gave none)
    head_score: float  # log P("<head> [n]") plus its context; -inf without a head
    unsupported: bool  # the model's answer states what its evidence does not

    def scores(self) -> list[float]:
        return [score + c.context for score, c in zip(self.span_scores, self.chosen)]

    def best_span(self) -> str | None:
        """The span to answer with instead of the model's own answer, or None to keep it."""
        scores = self.scores()
        best = max(range(len(self.chosen)), key=lambda i: scores[i])
        if self.unsupported or scores[best] > self.head_score + MARGIN:
            return f"{self.chosen[best].text} [{self.chosen[best].source}]."
        return None


def read(prefill: Callable[[], Prefilled], tokenize: Callable[[str], list[int]], question: str,
         sources: Sequence[Source], answer: str, unsupported: bool) -> Reading | None:
    """Score the evidence's candidate spans and the model's own short `answer` under the model, or
    None where a span is not weighed (not a factoid question, no evidence, an abstention, a
    sentence-long answer that is supported). `unsupported`: the answer states what its evidence
    does not, so any span is better. `prefill()` reads the prompt; it is called only when needed."""
    head = answer_head(answer)
    if not sources or not is_factoid(question) or is_abstention(answer):
        return None
    if len(head.split()) > MAX_SPAN_WORDS and not unsupported:
        return None  # a sentence is not weighed against short spans: a sum of log P favours the shorter
    groups = candidates(question, sources)
    if not groups:
        return None
    prefilled = prefill()
    first = prefilled.first
    leads = [tokenize(group[0].text)[:1] for group in groups]
    ranked = sorted((g for g in range(len(groups)) if leads[g]), key=lambda g: -float(first[leads[g][0]]))
    chosen = [c for g in ranked[:STARTS] for c in groups[g]]
    if not chosen:
        return None
    cited = (cited_numbers(answer, len(sources)) or [sources[0].number])[0]
    texts = [f"{c.text} [{c.source}]" for c in chosen] + ([f"{head} [{cited}]"] if head else [])
    scores = [sum(row) for row in prefilled.follow([tokenize(text) for text in texts])]
    cited_source = next((s for s in sources if s.number == cited), None)
    # an answer that only repeats the question ("Jory Thornwick [1]." for Jory Thornwick's
    # godfather; the whole answer, as a second sentence may hold what the head does not) or whose
    # head is of a kind the question rules out ("289 DR" for how old) is no answer: any span is better
    repeats = _words(CITED_NUMBER.sub(" ", answer)) <= _words(question)
    answers = head and not repeats and kind(head) not in ruled_out(question)
    own = scores[-1] + _head_context(_question_words(question), head, cited_source) if answers else -np.inf
    return Reading(chosen, scores[:len(chosen)], head, own, unsupported)


def reconsider(prefill: Callable[[], Prefilled], tokenize: Callable[[str], list[int]], question: str,
               sources: Sequence[Source], answer: str, unsupported: bool) -> str | None:
    """The evidence span to answer with instead of the model's `answer`, or None to keep it (`read`)."""
    reading = read(prefill, tokenize, question, sources, answer, unsupported)
    return reading.best_span() if reading else None


def log_softmax(logits) -> np.ndarray:
    """Log-probabilities from one position's logits (float64, for stable sums)."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    top = row.max()
    return row - top - np.log(np.exp(row - top).sum())
