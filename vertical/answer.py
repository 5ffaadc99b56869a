"""Retrieval-augmented answers with numbered citations (`vertical ask`, `vertical chat`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vertical.errors import VerticalError
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
    """An index, an embedder, a chat model and a system prompt, ready to answer questions.

    The same class answers from a build (torch models, `Assistant.from_build`) and from an
    exported bundle (ONNX models, `vertical.export.runtime.open_bundle`): anything with
    `encode_query(texts)` and `stream(messages, max_new_tokens)` fits.
    """

    def __init__(self, index, embedder, model, system_prompt: str, disclaimer: str = "", name: str = ""):
        self.index, self.embedder, self.model = index, embedder, model
        self.system_prompt, self.disclaimer, self.name = system_prompt, disclaimer, name

    @classmethod
    def from_build(cls, build_dir: Path) -> "Assistant":
        from vertical.generation import ChatModel, best_model_dir
        from vertical.index import open_index
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
        answer.text = answer.text.strip()
        answer.cited = cited_numbers(answer.text, len(answer.sources))
        return answer

    def stream(self, question: str, k: int | None = None, max_new_tokens: int = 200,
               history: list[dict[str, str]] | None = None) -> tuple[Answer, Iterator[str]]:
        """Start an answer: returns the Answer (sources filled in) and an iterator of text pieces;
        the Answer's text and citations are complete once the iterator is exhausted."""
        answer, messages = self.prepare(question, k, history)

        def pieces() -> Iterator[str]:
            if messages is None:
                yield answer.text
                return
            for piece in self.model.stream(messages, max_new_tokens):
                answer.text += piece
                yield piece
            self.finish(answer)

        return answer, pieces()

    def ask(self, question: str, k: int | None = None, max_new_tokens: int = 200) -> Answer:
        answer, pieces = self.stream(question, k, max_new_tokens)
        for _ in pieces:
            pass
        return answer
