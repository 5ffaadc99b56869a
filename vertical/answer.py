"""Retrieval-augmented answers with numbered citations (`vertical ask`, `vertical chat`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from vertical.errors import VerticalError
from vertical.evidence import EVIDENCE_SENTENCES, EvidenceSelector, LoopGuard, allowed_numbers, check_answer
from vertical.prompting import NO_ANSWER, Source, build_messages, cited_numbers
from vertical.reader import is_factoid, reconsider


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Source]
    refused: bool  # nothing relevant was retrieved, so the model was not asked
    best_similarity: float
    cited: list[int] = field(default_factory=list)
    faithful: bool = True  # the model's numbers and names are all in the evidence it was given
    fallback: bool = False  # they were not, so `text` says so and points at the evidence
    raw: str = ""  # what the model said (cut at a loop), before the faithfulness check
    reread: bool = False  # `text` is the evidence span the model found likelier than its own answer

    def citations(self) -> list[Source]:
        """The sources the answer cites; all retrieved ones if it cites none."""
        if self.refused:
            return []
        chosen = [s for s in self.sources if s.number in self.cited]
        return chosen or self.sources

    def numbers(self) -> set[str]:
        """The numbers the model may write: those of its evidence and the question (NumberCopy)."""
        return allowed_numbers(self.question, self.sources)

    def evidence(self) -> list[dict]:
        """The sentences the answer rests on: those of the sources it cites, with document spans."""
        return [{"doc_id": s.doc_id, "source": s.source, "number": s.number, "span": [sentence.start, sentence.end],
                 "text": sentence.text} for s in self.citations() for sentence in s.sentences]


_selectors: dict = {}


def evidence_selector(encode, sentences: int) -> EvidenceSelector:
    """One selector (and its sentence-vector cache) per embedder and size."""
    key = (encode, sentences)
    if key not in _selectors:
        if len(_selectors) > 8:
            _selectors.clear()
        _selectors[key] = EvidenceSelector(encode, sentences)
    return _selectors[key]


def retrieve(index, encode, question: str, k: int | None = None) -> tuple[list[Source], float]:
    """The top-k chunks as numbered sources holding their evidence sentences (the index's
    `evidence_sentences` over all chunks; 0 keeps whole chunks), and the best dense similarity."""
    k = k or int(index.meta.get("top_k", 4))
    vector = encode([question])[0]
    given = lambda _texts: vector[None, :]  # noqa: E731  (the question is embedded once)
    hits = index.search(question, given, k=k)
    best = index.best_similarity(question, given)
    sentences = int(index.meta.get("evidence_sentences", EVIDENCE_SENTENCES))
    found = evidence_selector(encode, sentences).select(question, [h.chunk for h in hits], vector)
    score_of = {(h.chunk.doc_id, h.chunk.start): round(h.score, 4) for h in hits}
    return [replace(s, score=score_of.get((s.doc_id, s.start), 0.0)) for s in found], best


class Assistant:
    """An index, an embedder, a chat model and a system prompt, ready to answer questions.

    The same class answers from a build (torch models, `Assistant.from_build`) and from an
    exported bundle (ONNX models, `open_bundle` below): anything with
    `encode_query(texts)` and `stream(messages, max_new_tokens)` fits.
    """

    def __init__(self, index, embedder, model, system_prompt: str, disclaimer: str = "", name: str = ""):
        self.index, self.embedder, self.model = index, embedder, model
        self.system_prompt, self.disclaimer, self.name = system_prompt, disclaimer, name

    @classmethod
    def from_build(cls, build_dir: Path) -> "Assistant":
        from vertical.generation import ChatModel
        from vertical.paths import best_model_dir
        from vertical.index.store import open_index
        from vertical.pack import load_pack
        from vertical.pipeline import load_manifest

        manifest = load_manifest(Path(build_dir))
        if not manifest.get("pack"):
            raise VerticalError(f"{build_dir}/manifest.json is unreadable or names no pack: build again with "
                                f"`vertical build PACK --out {build_dir}`")
        pack = load_pack(manifest.get("pack_dir") or manifest.get("pack"))
        index, embedder = open_index(Path(build_dir))
        return cls(index, embedder, ChatModel(best_model_dir(Path(build_dir))), pack.config.system_prompt,
                   pack.config.disclaimer, pack.name)

    @property
    def threshold(self) -> float:
        return float(self.index.meta.get("threshold", 0.0))

    def prepare(self, question: str, k: int | None = None,
                history: list[dict[str, str]] | None = None) -> tuple[Answer, list[dict[str, str]] | None]:
        """Retrieve sources for the question: the Answer so far, and the messages for the model
        (None when nothing relevant was found, so the answer is "I don't know" without asking it)."""
        sources, best = retrieve(self.index, self.embedder.encode_query, question, k)
        answer = Answer(question=question, text="", sources=sources, refused=best < self.threshold, best_similarity=best)
        if answer.refused:
            answer.text = NO_ANSWER
            return answer, None
        return answer, build_messages(self.system_prompt, question, sources, history)

    @staticmethod
    def finish(answer: Answer) -> Answer:
        """The model's text made the final answer: cut at a loop, checked against its evidence
        (replaced by a line saying so when it states what the evidence does not), citations read."""
        if not answer.refused:
            checked = check_answer(answer.text, answer.question, answer.sources)
            answer.text, answer.raw = checked.text, checked.raw
            answer.faithful, answer.fallback = checked.faithful, checked.fallback
        answer.text = answer.text.strip()
        answer.cited = cited_numbers(answer.text, len(answer.sources))
        return answer

    def reread(self, answer: Answer, messages: list[dict[str, str]], model=None) -> None:
        """Replace a finished factoid answer by the evidence span the model that wrote it (by
        default the assistant's) finds likelier, if there is one (vertical.reader.reconsider)."""
        model = model or self.model
        span = reconsider(lambda: model.prefill(model.prompt_ids(messages)), model.piece_ids,
                          answer.question, answer.sources, answer.raw, answer.fallback)
        if span is not None:
            raw, answer.text = answer.raw, span
            self.finish(answer)
            answer.raw, answer.reread = raw, True

    def stream(self, question: str, k: int | None = None, max_new_tokens: int = 200,
               history: list[dict[str, str]] | None = None) -> tuple[Answer, Iterator[str]]:
        """Start an answer: returns the Answer (sources filled in) and an iterator of text pieces;
        the Answer's text and citations are complete once the iterator is exhausted."""
        answer, messages = self.prepare(question, k, history)

        def pieces() -> Iterator[str]:
            if messages is None:
                yield answer.text
                return
            # a factoid answer may be replaced by an evidence span (vertical.reader): it is given whole
            whole = is_factoid(question) and hasattr(self.model, "prefill")
            guard = LoopGuard()
            for piece in self.model.stream(messages, max_new_tokens, numbers=answer.numbers()):
                answer.text += piece
                if not whole:
                    yield piece
                if guard.feed(piece):  # looping, or two sentences said: answer.text is cut in finish()
                    break
            self.finish(answer)
            if whole:
                self.reread(answer, messages)
                yield answer.text
            elif answer.fallback:  # the streamed words are withdrawn: say so
                yield f"\n(Withdrawn: not what the sources say. {answer.text})"

        return answer, pieces()

    def ask(self, question: str, k: int | None = None, max_new_tokens: int = 200) -> Answer:
        answer, pieces = self.stream(question, k, max_new_tokens)
        for _ in pieces:
            pass
        return answer


def open_bundle(path: Path, verify_files: bool = True, public_key: Path | None = None) -> Assistant:
    """An Assistant over an exported bundle, torch-free: the bundle is verified against its
    manifest first and, with `public_key`, its signature against that key (unsigned or signed by
    another key: refused)."""
    from vertical.export.bundle import check_signature, verify
    from vertical.export.runtime import load_models
    from vertical.index.store import RetrievalIndex

    path = Path(path)
    if public_key is not None:
        check_signature(path, public_key)
    manifest = verify(path) if verify_files else json.loads((path / "manifest.json").read_text())
    pack = json.loads((path / "pack.json").read_text(encoding="utf-8"))
    try:
        index = RetrievalIndex.load(path / "index")
    except (OSError, ValueError, KeyError) as exc:
        raise VerticalError(f"bundle {path}: the index cannot be read ({exc}); export the bundle again") from None
    embedder, model = load_models(path, manifest)
    assistant = Assistant(index, embedder, model, pack["system_prompt"], pack.get("disclaimer", ""), pack["name"])
    assistant.manifest = manifest
    return assistant
