"""Document ingestion: .txt .md .html .pdf .docx .jsonl files into plain-text documents.

Each document keeps the character offsets of its blocks (paragraphs, headings) so chunks can cut
on block boundaries and cite the exact span they came from. Files that cannot be read (encrypted
or broken PDFs, binary data behind a text extension, empty files, duplicate ids) are reported by
name and skipped; the rest of the corpus is still indexed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from vertical.errors import Problem, VerticalError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf", ".docx", ".jsonl")
# What one file may cost to read. A document over these is skipped and named, not read: a 20 KB
# DOCX can expand to gigabytes (a zip bomb), a PDF can hold a million empty pages.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_DOCX_EXPANDED_BYTES = 256 * 1024 * 1024
MAX_PDF_PAGES = 3000
MAX_TEXT_CHARS = 20_000_000


@dataclass
class Document:
    id: str
    title: str
    text: str
    source: str  # path (relative to the pack or as given) or the record's own source
    heading_starts: list[int] = field(default_factory=list)  # char offsets where a heading line starts

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.title}\n{self.text}".encode()).hexdigest()


class SkipDocument(Exception):
    """This file cannot be used; the message says why."""


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]


def _decode(path: Path, data: bytes) -> str:
    if _looks_binary(data):
        raise SkipDocument("binary data in a text file; convert it to text or remove it")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SkipDocument(f"line {line}: not UTF-8; save the file as UTF-8") from None


_MD_HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.MULTILINE)


def _markdown(path: Path, text: str) -> tuple[str, str, list[int]]:
    headings = list(_MD_HEADING.finditer(text))
    title = headings[0].group(1).strip() if headings else path.stem.replace("-", " ").replace("_", " ")
    return title, text, [m.start() for m in headings]


# Elements that start a new block of text; everything else (span, a, b, ...) flows inside one.
_HTML_BLOCKS = {"address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "div", "dl", "dt",
                "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
                "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "thead", "ul"}


def _html(path: Path, data: bytes) -> tuple[str, str, list[int]]:
    """Text blocks of an HTML page in reading order: every text node is kept (a div's text as much
    as a paragraph's), table rows become "cell | cell" lines, headings mark sections."""
    from bs4 import BeautifulSoup, Comment, NavigableString, Tag

    text = _decode(path, data)
    try:
        soup = BeautifulSoup(text, "html.parser")
    except Exception as exc:  # bs4 rejects some markup outright
        raise SkipDocument(f"unreadable HTML ({type(exc).__name__}: {exc})") from None
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title_tag = soup.find("title") or soup.find("h1")
    title = title_tag.get_text(" ", strip=True) if title_tag else path.stem
    if soup.head is not None:
        soup.head.decompose()
    parts: list[str] = []
    heading_starts: list[int] = []
    current: list[str] = []
    offset = 0

    def flush(heading: bool = False) -> None:
        nonlocal offset
        block = " ".join(" ".join(current).split())
        current.clear()
        if block:
            if heading:
                heading_starts.append(offset)
            parts.append(block)
            offset += len(block) + 2

    def walk(node) -> None:
        for child in node.children:
            if isinstance(child, Comment):
                continue
            if isinstance(child, NavigableString):
                current.append(str(child))
            elif isinstance(child, Tag):
                if child.name == "tr":
                    flush()
                    cells = [c.get_text(" ", strip=True) for c in child.find_all(["td", "th"], recursive=False)]
                    current.append(" | ".join(c for c in cells if c))
                    flush()
                elif child.name in _HTML_BLOCKS:
                    flush()
                    walk(child)
                    flush(heading=child.name in ("h1", "h2", "h3", "h4", "h5", "h6"))
                else:
                    walk(child)

    try:
        walk(soup.body or soup)
    except RecursionError:
        raise SkipDocument("HTML nested too deeply to read; save the page as text or PDF") from None
    flush()
    return title, "\n\n".join(parts), heading_starts


def _pdf(path: Path) -> tuple[str, str, list[int]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    raise SkipDocument("encrypted PDF; remove the password and add it again")
            except (NotImplementedError, PdfReadError) as exc:
                raise SkipDocument(f"encrypted PDF ({exc}); remove the password and add it again") from None
        if len(reader.pages) > MAX_PDF_PAGES:
            raise SkipDocument(f"{len(reader.pages)} pages, over {MAX_PDF_PAGES}; split the PDF")
        pages, size = [], 0
        for page in reader.pages:
            pages.append((page.extract_text() or "").strip())
            size += len(pages[-1])
            if size > MAX_TEXT_CHARS:
                raise SkipDocument(f"over {MAX_TEXT_CHARS:,} characters of text; split the PDF")
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except SkipDocument:
        raise
    except Exception as exc:  # pypdf raises many types for damaged files
        raise SkipDocument(f"unreadable PDF ({type(exc).__name__}: {exc})") from None
    text = "\n\n".join(p for p in pages if p)
    first_line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return (meta_title.strip() or first_line[:120] or path.stem), text, []


def _docx(path: Path) -> tuple[str, str, list[int]]:
    import docx

    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(entry.file_size for entry in archive.infolist())
        if expanded > MAX_DOCX_EXPANDED_BYTES:
            raise SkipDocument(f"expands to {expanded / 2**20:.0f} MB, over {MAX_DOCX_EXPANDED_BYTES // 2**20} MB "
                               "(a zip bomb, or a document to split)")
        return _docx_text(docx.Document(str(path)), path)
    except SkipDocument:
        raise
    except Exception as exc:  # python-docx raises zipfile/KeyError/ValueError for broken files
        raise SkipDocument(f"unreadable DOCX ({type(exc).__name__}: {exc})") from None


def _docx_text(document, path: Path) -> tuple[str, str, list[int]]:
    parts, heading_starts, offset, title = [], [], 0, document.core_properties.title or ""
    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        if not text:
            continue
        style = (paragraph.style.name or "").lower() if paragraph.style is not None else ""
        if style.startswith("heading") or style == "title":
            heading_starts.append(offset)
            title = title or text
        parts.append(text)
        offset += len(text) + 2
    for table in document.tables:
        for row in table.rows:
            text = " | ".join(cell.text.strip() for cell in row.cells if cell.text.strip())
            if text:
                parts.append(text)
                offset += len(text) + 2
    return (title or path.stem), "\n\n".join(parts), heading_starts


def read_file(path: Path, source: str) -> list[Document]:
    """Parse one file into documents (a .jsonl file holds one document per line)."""
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SkipDocument(f"{size / 2**20:.0f} MB, over {MAX_FILE_BYTES // 2**20} MB; split the file")
    data = path.read_bytes()
    if not data.strip():
        raise SkipDocument("empty file")
    if suffix == ".jsonl":
        docs = []
        for number, line in enumerate(_decode(path, data).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
                doc_id = str(record["id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise SkipDocument(f"line {number}: needs a JSON object with 'id' and 'text' ({exc})") from None
            if not isinstance(text, str) or not text.strip():
                raise SkipDocument(f"line {number}: 'text' must be a non-empty string")
            if not isinstance(record.get("title") or "", str) or not isinstance(record.get("source") or "", str):
                raise SkipDocument(f"line {number}: 'title' and 'source' must be strings")
            title = record.get("title") or doc_id
            docs.append(Document(id=doc_id, title=title, text=text, source=record.get("source") or f"{source}#{doc_id}"))
        return docs
    if suffix in (".md", ".txt"):
        title, text, headings = _markdown(path, _decode(path, data))
    elif suffix in (".html", ".htm"):
        title, text, headings = _html(path, data)
    elif suffix == ".pdf":
        title, text, headings = _pdf(path)
    elif suffix == ".docx":
        title, text, headings = _docx(path)
    else:
        raise SkipDocument(f"unsupported file type {suffix}; use one of {' '.join(SUFFIXES)}")
    if not text.strip():
        raise SkipDocument("no text could be extracted")
    return [Document(id=path.stem, title=title, text=text, source=source, heading_starts=headings)]


def load_documents(files: list[Path], root: Path | None = None) -> tuple[list[Document], list[Problem]]:
    """Parse every file; skip (and report) the ones that cannot be used and duplicate ids."""
    documents: list[Document] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for path in files:
        source = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        try:
            parsed = read_file(path, source)
        except SkipDocument as exc:
            problems.append(Problem(path, f"skipped: {exc}"))
            continue
        except OSError as exc:
            problems.append(Problem(path, f"skipped: cannot read ({exc.strerror})"))
            continue
        for doc in parsed:
            if doc.id in seen:
                problems.append(Problem(path, f"skipped document {doc.id!r}: the id is already used by {seen[doc.id]}"))
                continue
            seen[doc.id] = doc.source
            documents.append(doc)
    for problem in problems:
        log.warning("%s", problem)
    return documents, problems


def change_documents(documents: list[Document], changes) -> list[Document]:
    """`documents` with `changes` (vertical.pack.schema.DocumentChange, in order) applied: a passage
    replaced where it occurs, or a document's whole text. A change naming a document that is not
    there, or a passage the document does not hold, is an error naming both."""
    from dataclasses import replace

    by_id = {doc.id: doc for doc in documents}
    for change in changes:
        doc = by_id.get(change.doc_id)
        if doc is None:
            raise VerticalError(f"document change: no document with id {change.doc_id!r} (ids are file names without "
                                "their extension, or a JSONL record's id)")
        if change.text is not None:
            by_id[doc.id] = replace(doc, text=change.text, heading_starts=[])
            continue
        at = doc.text.find(change.old)
        if at < 0:
            raise VerticalError(f"document change for {change.doc_id!r}: the passage {change.old!r} is not in "
                                f"{doc.source}; quote it as the document has it now")
        shift = len(change.new) - len(change.old)
        text = doc.text.replace(change.old, change.new)  # every occurrence: the document must not say both
        starts = [p if p <= at else p + shift for p in doc.heading_starts] if doc.text.count(change.old) == 1 else []
        by_id[doc.id] = replace(doc, text=text, heading_starts=starts)
    return [by_id[doc.id] for doc in documents]
