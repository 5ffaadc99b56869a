"""Evidence and faithful answers: the few sentences of the retrieved chunks that answer a question,
and the checks that keep an answer to what those sentences say.

    chunks -> sentences (document character spans) -> scored against the question (embedder cosine
    + word overlap) -> the best few, grouped by chunk (the best one's chunk first), become the
    numbered sources the model reads
    -> the answer is cut at a repeated sentence or n-gram, kept to two sentences, and checked:
    numbers and names it states must appear in the evidence, else the user is told it could not
    be found and pointed at the evidence

A 135M-parameter reader copies a fact well from three sentences and badly from three 128-token
chunks, so the model reads the evidence only; the citations still name the whole chunk.

Torch-free: the build (`vertical ask`, tuning, evaluation) and the exported runtime share it, so
a model is served with exactly the evidence it was tuned and measured on.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from vertical.prompting import NO_ANSWER, Source

Encoder = Callable[[list[str]], np.ndarray]

EVIDENCE_SENTENCES = 5  # sentences the model reads, over all retrieved chunks (see the index stage setting)
OVERLAP_WEIGHT = 0.3  # a question's own words in a sentence count beside the embedder's cosine
MAX_ANSWER_SENTENCES = 2  # "the direct answer alone": one or two sentences
LOOP_NGRAM = 5  # an answer that repeats 5 words of itself is looping: it is cut there

# Words that end with a full stop without ending a sentence.
_ABBREVIATIONS = {"e.g", "i.e", "etc", "Dr", "Mr", "Mrs", "Ms", "St", "vs", "No", "approx", "Fig", "Inc", "Ltd",
                  "Co", "Prof", "Jr", "Sr", "Mt", "cf", "al", "min", "max", "ca"}
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_MARK = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-./%]*")
STOPWORDS = frozenset(
    "a an the of to in on at for from by with and or but is are was were be been being it its this that these "
    "those what which who whom whose when where why how do does did done can could should would will shall may "
    "might must there their they them he she his her i you your we our us as if than then so not no yes any all "
    "each per about into over under after before up out only also more most less least much many some such".split())


@dataclass(frozen=True)
class Sentence:
    start: int  # character span in the document
    end: int
    text: str
    score: float = 0.0  # how well it matches the question it was chosen for


# "two working days" and "2 working days" state the same number
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def digits(text: str) -> str:
    """Number words up to twenty written as digits."""
    return NUMBER_WORD.sub(lambda m: NUMBER_WORDS[m.group(1).lower()], text)


def split_sentences(text: str, offset: int = 0) -> list[Sentence]:
    """The sentences of `text`, with spans shifted by `offset` (the chunk's start in its document).

    Lines are units first (headings, list items and table rows end at a newline in Markdown and in
    the parsed HTML, PDF and DOCX text); a line is then cut after . ! ? followed by a capital or a
    digit, unless the word before the stop is a known abbreviation. Headings are left out: they
    name a section, the chunk's title already carries it."""
    sentences: list[Sentence] = []
    position = 0
    for line in text.split("\n"):
        line_start, position = position, position + len(line) + 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or set(stripped) <= set("|-: "):
            continue
        mark = _LIST_MARK.match(line)
        begin = mark.end() if mark else len(line) - len(line.lstrip())
        for piece_start, piece_end in _cut_line(line, begin):
            piece = line[piece_start:piece_end].strip()
            if len(_WORD.findall(piece)) >= 2:
                lead = len(line[piece_start:piece_end]) - len(line[piece_start:piece_end].lstrip())
                start = offset + line_start + piece_start + lead
                sentences.append(Sentence(start, start + len(piece), piece))
    return sentences


def _cut_line(line: str, begin: int) -> list[tuple[int, int]]:
    pieces, start = [], begin
    for match in _SENTENCE_END.finditer(line, begin):
        before = line[start:match.start()].rstrip(".!?\"')]").split()
        if before and before[-1].rstrip(".") in _ABBREVIATIONS:
            continue
        pieces.append((start, match.start()))
        start = match.end()
    pieces.append((start, len(line)))
    return pieces


def content_words(text: str) -> set[str]:
    return {w.lower().strip(".'-") for w in _WORD.findall(text) if w.lower().strip(".'-") not in STOPWORDS}


class EvidenceSelector:
    """Chooses the evidence sentences of retrieved chunks for a question. Sentence vectors are
    cached (the same chunks come back for many questions, and for every model a build scores)."""

    def __init__(self, encode: Encoder, sentences: int = EVIDENCE_SENTENCES, cache_size: int = 20_000):
        self.encode, self.sentences, self.cache_size = encode, sentences, cache_size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def vectors(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts` (sentences), from the cache where it has them."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            for text, vector in zip(missing, self.encode(missing)):
                self._vectors[text] = np.asarray(vector, dtype=np.float32)
            while len(self._vectors) > self.cache_size:
                self._vectors.popitem(last=False)
        return np.stack([self._vectors[t] for t in texts])

    def select(self, question: str, chunks: Sequence, question_vector: np.ndarray | None = None) -> list[Source]:
        """Numbered sources holding only the chosen sentences: the chunks that have at least one,
        the chunk with the best sentence first (a small reader leans on what it reads first),
        each with its sentences in document order."""
        candidates = [(c, s) for c, chunk in enumerate(chunks)
                      for s in split_sentences(chunk.text, chunk.start)] if self.sentences else []
        if not candidates:  # evidence_sentences 0, or no sentence to choose: the whole chunks
            return [_source(i + 1, chunk, chunk.text, ()) for i, chunk in enumerate(chunks)]
        if question_vector is None:
            question_vector = self.encode([question])[0]
        vectors = self.vectors([s.text for _, s in candidates])
        asked = content_words(question)
        scores = vectors @ np.asarray(question_vector, dtype=np.float32)
        if asked:
            scores = scores + OVERLAP_WEIGHT * np.array([len(asked & content_words(s.text)) / len(asked)
                                                         for _, s in candidates])
        if asks_for_number(question):
            scores = scores + NUMBER_WEIGHT * np.array([bool(_NUMBER.search(digits(s.text))) for _, s in candidates])
        by_chunk: dict[int, list[Sentence]] = {}
        for position in np.argsort(-scores, kind="stable")[: self.sentences].tolist():  # best first
            c, sentence = candidates[position]
            by_chunk.setdefault(c, []).append(replace(sentence, score=round(float(scores[position]), 4)))
        sources = []
        for c, picked in by_chunk.items():
            picked = tuple(sorted(picked, key=lambda s: s.start))
            sources.append(_source(len(sources) + 1, chunks[c], " … ".join(s.text for s in picked), picked))
        return sources


# Questions that ask for an amount, a count, a time or a date: the sentence that answers them
# states a number.
_ASKS_NUMBER = re.compile(r"\b(how (?:much|many|long|soon|often|old|far|big|large|high|low|quickly|frequently)|"
                          r"what (?:\w+ ){0,2}(?:number|amount|percentage|percent|rate|level|dose|limit|threshold|"
                          r"date|year|age|size|fee|price|cost|value|figure|deadline|period|time|target|cap|"
                          r"ratio|extension|score|sum)|when|which year|in what year)\b", re.IGNORECASE)
NUMBER_WEIGHT = 0.1


def asks_for_number(question: str) -> bool:
    return bool(_ASKS_NUMBER.search(question))


def _source(number: int, chunk, text: str, sentences: tuple[Sentence, ...]) -> Source:
    return Source(number=number, title=chunk.title, source=chunk.source, start=chunk.start, end=chunk.end,
                  text=text, doc_id=chunk.doc_id, sentences=sentences)


# ---------------------------------------------------------------- decoding that stays on the evidence


def _normal(sentence: str) -> str:
    return " ".join(w.lower() for w in _WORD.findall(sentence))


class LoopGuard:
    """Watches an answer as it is generated and says when to stop: at a sentence that repeats an
    earlier one, at a run of LOOP_NGRAM words that already occurred in the answer, or after
    MAX_ANSWER_SENTENCES sentences. `text` is the answer cut there. Only the answer's own words
    count: copying a phrase from the evidence is what the reader should do."""

    def __init__(self, max_sentences: int = MAX_ANSWER_SENTENCES, ngram: int = LOOP_NGRAM):
        self.max_sentences, self.ngram = max_sentences, ngram
        self.raw = ""
        self.text = ""
        self.stopped = False

    def feed(self, piece: str) -> bool:
        """Add a generated piece; True when generation should stop."""
        if self.stopped:
            return True
        self.raw += piece
        self.text, self.stopped = cut_answer(self.raw, self.max_sentences, self.ngram, final=False)
        return self.stopped


def cut_answer(raw: str, max_sentences: int = MAX_ANSWER_SENTENCES, ngram: int = LOOP_NGRAM,
               final: bool = True) -> tuple[str, bool]:
    """(the answer up to where it starts repeating itself or has said enough, whether it was cut).
    With `final=False` the last sentence may still be growing, so it does not count yet."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", raw.strip()) if s.strip()]
    # while streaming, a sentence is complete once a space or line follows its stop: "3." may be "3.5"
    complete = sentences if final or re.search(r"[.!?]\s+$|\n\s*$", raw) else sentences[:-1]
    kept: list[str] = []
    seen_sentences: set[str] = set()
    seen_grams: set[tuple[str, ...]] = set()
    for position, sentence in enumerate(sentences):
        words = _normal(sentence).split()
        key = " ".join(words)
        if key and key in seen_sentences:
            return " ".join(kept), True
        inside = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
        grams = set(inside)
        if grams & seen_grams or len(grams) < len(inside):
            # cut the sentence at the first repeated run of words, keep what came before it
            repeated = next(i for i, g in enumerate(inside) if g in seen_grams or inside.index(g) < i)
            head = " ".join(sentence.split()[:repeated]).strip()
            return " ".join([*kept, head] if head else kept), True
        kept.append(sentence.strip())
        seen_sentences.add(key)
        seen_grams |= grams
        if position < len(complete) and len(kept) >= max_sentences:
            return " ".join(kept), position + 1 < len(sentences) or not final
    return " ".join(kept), False


_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
# a citation of the numbered sources, "[2]" or "[1, 3]": without removing it first, an answer
# citing source 2 would "contain" the number 2
CITATION = re.compile(r"\[\s*\d+(?:\s*[,;\u2013-]\s*\d+)*\s*\]")


def numbers_in(text: str) -> set[str]:
    """The numbers `text` writes, thousands separators dropped ("1,250" -> "1250")."""
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def key_content(answer: str) -> tuple[set[str], set[str]]:
    """(numbers, names) an answer states: what must be in its evidence for it to be faithful.
    A name is a capitalised word that does not start a sentence."""
    text = CITATION.sub(" ", answer)
    numbers = numbers_in(text)
    names = set()
    for sentence in re.split(r"(?<=[.!?:])\s+|\n+", text):
        for position, word in enumerate(sentence.split()):
            token = word.strip("\"'()[],;:.!?")
            if position and len(token) > 1 and token[0].isupper() and token.lower() not in STOPWORDS:
                names.add(token.lower())
    return numbers, names


def is_abstention(answer: str) -> bool:
    text = answer.lower()
    return text.startswith(NO_ANSWER.lower()[:12]) or "i don't know" in text or "i do not know" in text


_WH_QUESTION = re.compile(r"^\W*(?:\w+\s+){0,3}?(what|which|who|whom|whose|where|when|how)\b", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"^\s*answer\s*:\s*", re.IGNORECASE)


def answers_the_question(answer: str, question: str) -> bool:
    """False for a bare yes or no to a what / which / who / where / when / how question: the
    form of a PubMedQA-style answer, not an answer to that question."""
    first = re.match(r"\W*(\w+)", _ANSWER_LABEL.sub("", answer))
    return not (first and first.group(1).lower() in ("yes", "no") and _WH_QUESTION.match(question))


# The sum that ends a step of an answer's own arithmetic: numbers, brackets and operators ("(400 / 250)^(1/4) - 1")
_ARITHMETIC = re.compile(r"[\d.,\s()+\-*/x\u00d7^]+$")
_FORMULA_CONSTANTS = {"1", "100"}  # "1 + r", "x 100": a formula's own figures, not facts
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow}


def _evaluate(node: ast.AST) -> float:
    """The value of a parsed arithmetic expression: numbers and + - * / ** only, nothing callable."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("power out of range")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError("not arithmetic")


def _states(number: str, value: float) -> bool:
    """Whether `number` ("12.5") writes `value` (0.1247 or 12.47) at its own precision, as a
    figure or as a percentage, and within 5% of it: "1" is no statement of 0.6 or 1.33."""
    places = len(number.partition(".")[2])
    written = float(number)
    return any(abs(written - candidate) <= 0.5 * 10 ** -places + 1e-9 and abs(written - candidate) <= 0.05 * abs(candidate)
               for candidate in (value, 100 * value))


def worked_numbers(answer: str, known: set[str]) -> set[str]:
    """The numbers an answer computes and shows its working for ("CAGR = (400 / 250)^(1/4) - 1 =
    12.5%"): the arithmetic before each "=" whose operands are all `known` (or a formula's 1 and
    100) is evaluated, and its operands and every number of the answer that states its value are
    derived. A sum written out but done wrong derives nothing."""
    numbers = key_content(digits(answer))[0]
    derived: set[str] = set()
    for step in CITATION.sub(" ", digits(answer)).split("=")[:-1]:
        expression = _ARITHMETIC.search(step.rstrip())
        written = re.sub(r"^[^\d(]+", "", expression.group()).strip(" .,") if expression else ""  # from "tax 20 x 3": "20 x 3"
        operands = numbers_in(written)
        if len(operands) < 2 or not operands <= known | _FORMULA_CONSTANTS:
            continue  # "current assets / current liabilities", or a figure the answer made up
        python = re.sub(r"(?<=\d),(?=\d{3})", "", written).replace("^", "**").replace("\u00d7", "*").replace("x", "*")
        try:
            value = _evaluate(ast.parse(python, mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
            continue  # not a whole sum
        derived |= operands | {n for n in numbers if _states(n, value)}
    return derived


def is_faithful(answer: str, evidence: str, question: str = "") -> bool:
    """Every number and name the answer states occurs in the evidence or in the question it
    answers, or, for a number, is the result of the answer's own shown arithmetic on such numbers
    (`worked_numbers`). An abstention is faithful: it claims nothing."""
    if is_abstention(answer):
        return True
    numbers, names = key_content(digits(answer))
    known_numbers = numbers_in(digits(f"{evidence} {question}"))
    if not numbers <= known_numbers:
        known_numbers |= worked_numbers(answer, known_numbers)
    known_words = {w.lower().strip(".'-") for w in _WORD.findall(f"{evidence} {question}")}
    known_words |= {part for w in known_words for part in w.split("-")}
    return numbers <= known_numbers and all(name.strip(".'-") in known_words for name in names)


# What the user gets instead of an answer its evidence does not back. It says so, and points at the
# evidence (shown apart from the answer, as always) without quoting it: the answer is scored as it
# stands, so a quote that happens to contain the fact must not pass for a reader's answer.
UNSUPPORTED = "I could not find a clear answer in the sources; the closest evidence is in [{number}]."


@dataclass
class Checked:
    text: str  # what the user is given
    raw: str  # what the model said, cut at a loop
    faithful: bool  # the raw answer's numbers and names are all in the evidence
    fallback: bool  # the raw answer was not faithful, so the user is told so and pointed at the evidence
    abstained: bool
    cut: bool  # the raw answer looped or ran past two sentences and was cut


def check_answer(raw: str, question: str, sources: list[Source]) -> Checked:
    """The answer the user gets: the model's, cut at a loop; or, when it states a number or name
    that its evidence does not hold (or says yes or no to a what / which / how question), a line
    saying so that cites the source with the best-matching evidence (UNSUPPORTED)."""
    text, cut = cut_answer(raw)
    text = _ANSWER_LABEL.sub("", text)  # "Answer: 22 breaths [1]." is "22 breaths [1]."
    evidence = " ".join(s.text for s in sources)
    abstained = is_abstention(text)
    faithful = is_faithful(text, evidence, question) and answers_the_question(text, question)
    if faithful or not sources:
        return Checked(text, text, faithful, False, abstained, cut)
    # the source with the sentence that matched the question best: its evidence is shown apart
    scored = [(sentence.score, source.number) for source in sources for sentence in source.sentences]
    number = max(scored)[1] if scored else sources[0].number
    return Checked(UNSUPPORTED.format(number=number), text, False, True, False, cut)


# ---------------------------------------------------------------- numbers copied, not invented

_RUN = re.compile(r"\d[\d.,]*$")
_LEADING_RUN = re.compile(r"\d[\d.,]*")
_IN_CITATION = re.compile(r"\[[\d,;\s]*$")


def allowed_numbers(question: str, sources: Sequence[Source]) -> set[str]:
    """The numbers an answer to `question` may write: those its sources' evidence and the
    question itself state (number words as digits), as written ("1,250", "5.30")."""
    text = digits(" ".join([question, *(s.text for s in sources)]))
    return {match.group().rstrip(".,") for match in _LEADING_RUN.finditer(text)}


class NumberVocabulary:
    """The tokens of a vocabulary that can write part of a number: those that start with a digit,
    a comma or a full stop (a separator may continue "1,250" or end a sentence). Built once per
    tokenizer from each token's decoded text."""

    def __init__(self, pieces: Sequence[str]):
        self.size = len(pieces)
        self.pieces = {i: p for i, p in enumerate(pieces) if p[:1].isdigit() or p[:1] in ",."}
        self.digit_ids = np.array([i for i, p in self.pieces.items() if p[:1].isdigit()], dtype=np.int64)


class NumberCopy:
    """A decoding constraint: every number the answer writes is one its evidence or its question
    states, character for character. The small reader knows which sentence answers and often
    garbles the figure in it ("16 months" for the evidence's "6 months"); a number it may not
    write is never a fact of the sources, and the figures it may write are exactly theirs.

    `blocked(text)` says which tokens may not come next after the answer so far: digits that no
    allowed number continues with, and, while a number is unfinished, anything that would end it.
    Citation numbers ("[2]") are free. Torch-free, so the build and the exported runtime apply the
    same rule (a transformers logits processor and an onnxruntime-genai loop wrap it)."""

    def __init__(self, allowed: set[str], vocabulary: NumberVocabulary):
        self.allowed = allowed
        self.prefixes = {number[:i] for number in allowed for i in range(1, len(number) + 1)}
        self.vocabulary = vocabulary

    def _fits(self, run: str, piece: str) -> bool:
        """Whether `piece` may follow an answer ending in the number run `run` ("" if none)."""
        combined = run + piece
        match = _LEADING_RUN.match(combined)
        if not match:  # no number under way, and the piece does not start one
            return True
        number = match.group()
        if match.end() == len(combined):  # the number goes on past this piece: a prefix so far
            return number in self.prefixes or number.rstrip(".,") in self.allowed
        return number.rstrip(".,") in self.allowed

    def blocked(self, text: str) -> np.ndarray:
        """A boolean mask over the vocabulary: True for the tokens that may not come next."""
        match = _RUN.search(text)
        run = match.group() if match else ""
        if _IN_CITATION.search(text[: len(text) - len(run)]):
            return np.zeros(self.vocabulary.size, dtype=bool)  # a citation's number
        # an unfinished number: only a piece that continues it fits, so every other token is blocked
        unfinished = bool(run) and run.rstrip(".,") not in self.allowed
        mask = np.full(self.vocabulary.size, unfinished, dtype=bool)
        for i, piece in self.vocabulary.pieces.items():
            mask[i] = not self._fits(run, piece)
        return mask
