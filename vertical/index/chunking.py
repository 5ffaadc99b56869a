"""Cut documents into overlapping chunks sized in embedder tokens, preferring to cut where a
paragraph or heading starts so a chunk reads as a unit. Every chunk keeps its character span."""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from vertical.index.documents import Document

_BLOCK_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


@dataclass
class Chunk:
    id: str  # "<doc_id>#<n>"
    doc_id: str
    title: str
    source: str
    start: int  # character span in the document text
    end: int
    text: str
    section: str = ""  # the nearest heading above the chunk

    def embedding_text(self) -> str:
        """What is embedded and searched: the title and section give a chunk its context."""
        head = self.title if not self.section or self.section == self.title else f"{self.title} - {self.section}"
        return f"{head}\n{self.text}"


def _boundaries(doc: Document) -> tuple[list[int], list[int]]:
    """Preferred cut points (block starts) and fallback cut points (sentence ends)."""
    blocks = sorted({0, *doc.heading_starts, *(m.end() for m in _BLOCK_BREAK.finditer(doc.text))})
    sentences = sorted(m.end() + 1 for m in _SENTENCE_END.finditer(doc.text))
    return blocks, sentences


def _section_at(doc: Document, offset: int) -> str:
    index = bisect.bisect_right(doc.heading_starts, offset) - 1
    if index < 0:
        return ""
    start = doc.heading_starts[index]
    end = doc.text.find("\n", start)  # no slice of the rest of the text: that made long documents quadratic
    line = doc.text[start:end if end >= 0 else len(doc.text)]
    return line.lstrip("#").strip()[:120]


def chunk_document(doc: Document, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Greedy windows of at most `chunk_tokens` tokens; each window ends at the last block start
    (else sentence end) in its second half, and the next window starts `overlap` tokens back."""
    encoding = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [span for span in encoding["offset_mapping"] if span[1] > span[0]]
    if not offsets:
        return []
    starts = [s for s, _ in offsets]
    blocks, sentences = _boundaries(doc)
    cut_chars = set(blocks) | set(sentences)  # once per document: a set per chunk made long texts quadratic
    chunks: list[Chunk] = []
    first = 0
    while first < len(offsets):
        last = min(first + chunk_tokens, len(offsets))  # exclusive token index
        if last < len(offsets):
            cut = _best_cut(starts, first, last, blocks) or _best_cut(starts, first, last, sentences)
            last = cut or last
        start_char, end_char = offsets[first][0], offsets[last - 1][1]
        text = doc.text[start_char:end_char].strip()
        if text:
            chunks.append(Chunk(
                id=f"{doc.id}#{len(chunks)}", doc_id=doc.id, title=doc.title, source=doc.source,
                start=start_char, end=end_char, text=text, section=_section_at(doc, start_char),
            ))
        if last >= len(offsets):
            break
        first = _overlap_start(starts, max(last - overlap, first + 1), last, cut_chars)
    return chunks


def _overlap_start(starts: list[int], candidate: int, last: int, cut_chars: set[int]) -> int:
    """Start the overlap at the first block or sentence start inside it, not mid-sentence."""
    for token in range(candidate, last):
        if starts[token] in cut_chars:
            return token
    return candidate


def _best_cut(starts: list[int], first: int, last: int, cut_chars: list[int]) -> int | None:
    """The largest token index in the window's second half whose token begins at a cut point."""
    lo_char, hi_char = starts[first + (last - first) // 2], starts[last] if last < len(starts) else None
    if hi_char is None:
        return None
    index = bisect.bisect_right(cut_chars, hi_char) - 1
    while index >= 0 and cut_chars[index] > lo_char:
        token = bisect.bisect_left(starts, cut_chars[index])
        if first < token <= last:
            return token
        index -= 1
    return None
