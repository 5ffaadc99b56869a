"""Retrieval-augmented answers with numbered citations (`vertical ask`, `vertical chat`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vertical.prompting import NO_ANSWER, Source, build_messages, cited_numbers


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Source]
    refused: bool  # nothing relevant was retrieved, so the model was not asked
    best_similarity: float
    cited: list[int] = field(default_factory=list)

    def citations(self) -> list[Source]:
        """The sources the answer cites; all retrieved ones if it cites none."""
        if self.refused:
            return []
        chosen = [s for s in self.sources if s.number in self.cited]
        return chosen or self.sources


def retrieve(index, encode, question: str, k: int | None = None) -> tuple[list[Source], float]:
    """The top-k chunks as numbered sources, and the best dense similarity (for the threshold)."""
    k = k or int(index.meta.get("top_k", 4))
    hits = index.search(question, encode, k=k)
    best = index.best_similarity(question, encode)
    sources = [Source(number=i + 1, title=h.chunk.title, source=h.chunk.source, start=h.chunk.start, end=h.chunk.end,
                      text=h.chunk.text, doc_id=h.chunk.doc_id, score=round(h.score, 4)) for i, h in enumerate(hits)]
    return sources, best


class Assistant:
    """A build's index, embedder, model and system prompt, ready to answer questions."""

    def __init__(self, build_dir: Path):
        from vertical.generation import ChatModel, best_model_dir
        from vertical.index import open_index
        from vertical.pack import load_pack
        from vertical.pipeline import load_manifest

        self.build_dir = Path(build_dir)
        manifest = load_manifest(self.build_dir)
        self.pack = load_pack(manifest.get("pack_dir") or manifest.get("pack"))
        self.index, self.embedder = open_index(self.build_dir)
        self.model = ChatModel(best_model_dir(self.build_dir))

    @property
    def threshold(self) -> float:
        return float(self.index.meta.get("threshold", 0.0))

    def stream(self, question: str, k: int | None = None, max_new_tokens: int = 200) -> tuple[Answer, Iterator[str]]:
        """Start an answer: returns the Answer (sources filled in) and an iterator of text pieces;
        the Answer's text and citations are complete once the iterator is exhausted."""
        sources, best = retrieve(self.index, self.embedder.encode_query, question, k)
        answer = Answer(question=question, text="", sources=sources, refused=best < self.threshold, best_similarity=best)

        def pieces() -> Iterator[str]:
            if answer.refused:
                answer.text = NO_ANSWER
                yield NO_ANSWER
                return
            messages = build_messages(self.pack.config.system_prompt, question, sources)
            for piece in self.model.stream(messages, max_new_tokens):
                answer.text += piece
                yield piece
            answer.text = answer.text.strip()
            answer.cited = cited_numbers(answer.text, len(sources))

        return answer, pieces()

    def ask(self, question: str, k: int | None = None, max_new_tokens: int = 200) -> Answer:
        answer, pieces = self.stream(question, k, max_new_tokens)
        for _ in pieces:
            pass
        return answer
