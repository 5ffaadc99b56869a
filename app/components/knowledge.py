"""The Knowledge base tab: search the index, list its documents and, on a build that is not
read-only, add uploaded documents to it."""

import contextlib
import shutil
import tempfile
from pathlib import Path

from vertical.app.common import DemoSource, friendly
from vertical.errors import VerticalError

# What the demo accepts as an upload: documents, not .jsonl (whose lines name any id and any
# citation source), each at most UPLOAD_MAX_MB (Gradio refuses larger ones before they are stored).
UPLOAD_TYPES = (".pdf", ".docx", ".html", ".htm", ".md", ".txt")
UPLOAD_MAX_MB = 20


@friendly
def search(source: DemoSource, query: str, k: int) -> list[list]:
    """The index's top `k` chunks for `query`: rank, score, title, path, text."""
    if not (query or "").strip():
        return []
    hits = source.assistant.index.search(query, source.assistant.embedder.encode_query, k=int(k))
    return [[h.rank, round(h.score, 4), h.chunk.title, h.chunk.source, h.chunk.text[:400]] for h in hits]


def documents(source: DemoSource) -> list[list]:
    """One row per indexed document: id, title, path, number of chunks."""
    rows: dict[str, list] = {}
    for chunk in source.assistant.index.chunks:
        row = rows.setdefault(chunk.doc_id, [chunk.doc_id, chunk.title, chunk.source, 0])
        row[3] += 1
    return sorted(rows.values())


@friendly
def upload(source: DemoSource, files: list, replace: bool = False) -> tuple[str, list[list]]:
    """Add uploaded documents to the index. A file named like a document already indexed replaces
    it only when `replace` is ticked. Gradio's copies of the uploads are deleted afterwards."""
    from vertical.index import add_documents

    if not files:
        return "Choose files to add.", documents(source)
    uploads = [Path(f if isinstance(f, str) else f.name) for f in files]
    try:
        names = [path.name for path in uploads]
        if len(set(names)) < len(names):
            raise VerticalError("two of the files have the same name; a document's name is its id: rename one")
        for path in uploads:  # the API can send what the file picker would not offer
            if path.suffix.lower() not in UPLOAD_TYPES:
                raise VerticalError(f"{path.name}: only {' '.join(UPLOAD_TYPES)} files can be added here")
            if path.stat().st_size > UPLOAD_MAX_MB * 2**20:
                raise VerticalError(f"{path.name}: larger than {UPLOAD_MAX_MB} MB; add it with `vertical index add`")
        existing = {row[0] for row in documents(source)}
        clashes = sorted(path.stem for path in uploads if path.stem in existing)
        if clashes and not replace:
            raise VerticalError(f"{', '.join(clashes)} already in the index; tick \"Replace documents with the same "
                                "name\" to replace them")
        # Gradio keeps uploads under random temporary folders: cite each by its own file name instead
        with source.lock, tempfile.TemporaryDirectory() as scratch:
            staged = [Path(shutil.copy2(path, Path(scratch) / path.name)) for path in uploads]
            note = add_documents(source.path, staged, root=Path(scratch))
            source.reload_index()
    finally:
        for path in uploads:  # the documents now live in the index only
            with contextlib.suppress(OSError):
                path.unlink()
    message = (f"Added {len(note['added'])}, replaced {len(note['replaced'])}, unchanged {note['unchanged']} "
               f"({note['embedded_chunks']} chunks embedded).")
    return message, documents(source)


def create_knowledge_tab(source: DemoSource, read_only: bool = False) -> None:
    """The Knowledge base tab's widgets and events; call it inside `with gr.Tab(...)`. Uploads are
    offered on a build only, and not at all when `read_only` (never registered, so Gradio's API
    cannot call them either)."""
    import gradio as gr

    with gr.Row():
        query = gr.Textbox(label="Search the documents", elem_id="search-query", scale=4)
        k = gr.Slider(1, 20, value=5, step=1, label="results")
    search_button = gr.Button("Search", elem_id="search")
    hits = gr.Dataframe(headers=["rank", "score", "title", "path", "text"], wrap=True, elem_id="hits")
    search_button.click(lambda q, n: search(source, q, n), [query, k], hits)
    docs = gr.Dataframe(value=documents(source), headers=["id", "title", "path", "chunks"],
                        label="Documents in the index", elem_id="documents")
    if not source.is_bundle and not read_only:
        files = gr.File(label=f"Add documents (PDF, DOCX, HTML, Markdown, text; up to {UPLOAD_MAX_MB} MB each)",
                        file_count="multiple", file_types=list(UPLOAD_TYPES))
        replace = gr.Checkbox(label="Replace documents with the same name", value=False)
        add_button = gr.Button("Add to the index", elem_id="add-documents")
        add_note = gr.Markdown()
        add_button.click(lambda f, r: upload(source, f, r), [files, replace], [add_note, docs])
