"""`vertical demo BUILD|BUNDLE`: show a vertical model to a domain expert in a browser.

Tabs: Chat (streaming answers with expandable numbered citations, the pack's disclaimer and
example questions, thumbs up/down and corrections), Side by side (base vs vertical vs student),
Knowledge editing (answer before, ROME edit, answer after, locality, rollback, causal trace),
Knowledge base (search, upload, list), Report (the build's metrics as tables and plots).

On a bundle only the tabs that run on the ONNX runtime are shown (Chat, Knowledge base search
and list, Report): nothing here imports torch unless the source is a build. Gradio's analytics
are off (vertical/__init__.py) and the theme uses system fonts, so the page fetches nothing from
outside the machine.
"""

import contextlib
import html
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError

log = logging.getLogger(__name__)

MAX_TOKENS = 200
EMPTY_ANSWER = "(no answer: the model's greedy output was empty or only whitespace)"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


@dataclass
class DemoSource:
    """What the demo shows: a build (torch models, every tab) or a bundle (ONNX runtime)."""

    path: Path
    is_bundle: bool
    assistant: Any  # vertical.answer.Assistant
    examples: list[str]
    metrics: dict[str, dict]  # stage -> metrics
    redact_feedback: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)  # edits and uploads replace models/index
    _models: dict[str, Any] = field(default_factory=dict)

    @property
    def feedback_dir(self) -> Path:
        return self.path

    def side_models(self) -> dict[str, Any]:
        """Base (no retrieval) and student (with retrieval) ChatModels of a build, loaded once."""
        from vertical.generation import ChatModel

        if not self._models:
            self._models["base"] = ChatModel(self.path / "base" / "model")
            if (self.path / "distill" / "model" / "config.json").is_file():
                self._models["student"] = ChatModel(self.path / "distill" / "model")
        return self._models

    def reload_model(self) -> None:
        from vertical.generation import ChatModel, best_model_dir

        self.assistant.model = ChatModel(best_model_dir(self.path))

    def reload_index(self) -> None:
        from vertical.index import open_index

        self.assistant.index, self.assistant.embedder = open_index(self.path)


def open_source(path: Path, redact_feedback: bool = True) -> DemoSource:
    """A build folder (has manifest.json with stages) or an exported bundle (has pack.json)."""
    from vertical.export.bundle import is_bundle

    path = Path(path).resolve()
    if is_bundle(path):
        from vertical.export.runtime import open_bundle

        assistant = open_bundle(path)
        pack = json.loads((path / "pack.json").read_text(encoding="utf-8"))
        stages = assistant.manifest.get("metrics", {})
        return DemoSource(path, True, assistant, pack.get("example_questions", []), stages, redact_feedback)
    if (path / "manifest.json").is_file():
        from vertical.answer import Assistant
        from vertical.pack import load_pack
        from vertical.pipeline import load_manifest

        manifest = load_manifest(path)
        if not manifest.get("pack"):
            raise VerticalError(f"{path}/manifest.json is unreadable or names no pack: build again with "
                                f"`vertical build PACK --out {path}`")
        pack = load_pack(manifest.get("pack_dir") or manifest.get("pack"))
        assistant = Assistant.from_build(path)
        stages = {name: entry.get("metrics", {}) for name, entry in manifest["stages"].items()}
        return DemoSource(path, False, assistant, list(pack.config.example_questions), stages, redact_feedback)
    raise VerticalError(f"{path} is neither a build folder (manifest.json) nor an exported bundle (pack.json); "
                        "run `vertical build PACK` or `vertical export BUILD` first")


def _user_error(exc: Exception):
    import gradio as gr
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.errors():  # "prompt: subject 'X' does not occur in prompt"
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return gr.Error(f"{where + ': ' if where else ''}{first['msg']}"[:300])
    return gr.Error(str(exc).splitlines()[0][:300])


def friendly(handler):
    """A Gradio handler (function or generator) whose failures show as one line in the page: the
    message of a user error, or a pointer to the log for anything else (never a bare "Error")."""
    import functools
    import inspect

    import gradio as gr

    def shown(exc: Exception) -> Exception:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, (VerticalError, ValueError, OSError)):
            return _user_error(exc)
        log.exception("demo: %s failed", handler.__name__)
        return gr.Error(f"{handler.__name__} failed ({type(exc).__name__}); the demo's log has the details")

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def generator(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown to the user, logged when unexpected
                raise shown(exc) from None
        return generator

    @functools.wraps(handler)
    def function(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise shown(exc) from None
    return function


# ---------------------------------------------------------------- chat


def inert(text: str) -> str:
    """Document or model text made safe to render as Markdown: HTML escaped, and link and image
    brackets escaped, so that a document's `![](https://...)` cannot make the browser fetch a
    remote image (the demo must not reach outside the machine)."""
    return html.escape(text).replace("[", "\\[").replace("]", "\\]")


def render_answer(answer) -> str:
    """The answer's text, then each cited source as an expandable block: number, title, path, and
    the evidence sentences the answer rests on, highlighted, with their character spans."""
    text = inert(answer.text.strip()) or "…"
    blocks = []
    for source in answer.citations():
        summary = f"[{source.number}] {inert(source.title)} <code>{html.escape(source.source)}</code>"
        evidence = [f"<mark>{inert(s.text)}</mark> <small>(characters {s.start}-{s.end})</small>"
                    for s in source.sentences] or [inert(source.text)]
        blocks.append(f"<details class='citation'><summary>{summary}</summary>\n\n"
                      + "<br>\n".join(evidence) + "\n\n</details>")
    return text + ("\n\n" + "\n".join(blocks) if blocks else "")


@friendly
def chat_reply(source: DemoSource, question: str, history: list[dict], exchanges: list[dict] | None = None):
    """Stream an answer into the chat history (messages format); citations appear when it ends.
    Each finished exchange is also appended to `exchanges`, the session's server-side record
    that feedback is taken from (the history comes back from the browser, which can rewrite it)."""
    exchanges = [] if exchanges is None else exchanges
    question = (question or "").strip()
    if not question:
        yield history, "", exchanges
        return
    turns = [{"role": m["role"], "content": _plain(m["content"])} for m in history if m["role"] in ("user", "assistant")]
    history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": "…"}]
    yield history, "", exchanges
    answer, pieces = source.assistant.stream(question, max_new_tokens=MAX_TOKENS, history=turns[-6:])
    text = ""
    for piece in pieces:
        text += piece
        history[-1] = {"role": "assistant", "content": inert(text)}
        yield history, "", exchanges
    history[-1] = {"role": "assistant", "content": render_answer(answer)}
    exchanges = exchanges + [{"question": question, "answer": answer.text}]
    yield history, "", exchanges


def _plain(content: Any) -> str:
    """A chat message's text without the rendered citation blocks (Gradio 6 sends content back as
    a list of typed parts)."""
    if isinstance(content, list):
        content = "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    text = content if isinstance(content, str) else str(content)
    return html.unescape(text.split("\n\n<details", 1)[0])


@friendly
def record_rating(source: DemoSource, history: list[dict], like, exchanges: list[dict]) -> str:
    """Thumbs up or down for the answer clicked: the n-th assistant message is the session's n-th
    exchange, so what is saved is what the model said, whatever the browser sends back."""
    from vertical.feedback import Feedback, record

    index = like.index if isinstance(like.index, int) else like.index[0]
    number = sum(1 for m in history[:index + 1] if m["role"] == "assistant") - 1
    if not 0 <= number < len(exchanges):
        return "Nothing to rate yet."
    exchange = exchanges[number]
    record(source.feedback_dir, Feedback(question=exchange["question"], answer=exchange["answer"],
                                         rating="up" if like.liked else "down", model=source.assistant.name),
           source.redact_feedback)
    return f"Thanks: recorded thumbs {'up' if like.liked else 'down'}."


@friendly
def record_correction(source: DemoSource, exchanges: list[dict], correction: str, subject: str) -> str:
    from vertical.feedback import Feedback, record

    if not exchanges or not (correction or "").strip():
        return "Ask a question first, then write the answer it should have given."
    last = exchanges[-1]
    record(source.feedback_dir, Feedback(question=last["question"], answer=last["answer"], rating="down",
                                         correction=correction.strip(), subject=(subject or "").strip() or None,
                                         model=source.assistant.name), source.redact_feedback)
    return "Correction saved; `vertical feedback export` turns it into training and edit data."


# ---------------------------------------------------------------- side by side, editing (builds only)


@friendly
def compare(source: DemoSource, question: str) -> tuple[str, str, str]:
    from vertical.prompting import build_messages

    question = (question or "").strip()
    if not question:
        return "", "", ""
    models = source.side_models()
    base = models["base"].generate(build_messages(source.assistant.system_prompt, question, None), MAX_TOKENS)
    vertical = render_answer(source.assistant.ask(question, max_new_tokens=MAX_TOKENS))
    student = "(this build has no distilled student)"
    if "student" in models:
        answer, messages = source.assistant.prepare(question)
        if messages is not None:
            answer.text = models["student"].generate(messages, MAX_TOKENS, answer.numbers())
            source.assistant.finish(answer)
            source.assistant.reread(answer, messages, models["student"])
        student = render_answer(answer)
    return inert(base.strip() or EMPTY_ANSWER), vertical, student


def complete(source: DemoSource, prompt: str) -> str:
    """The model's greedy continuation of a fact prompt (what ROME edits)."""
    import torch

    chat = source.assistant.model
    ids = chat.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = chat.model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=chat.tokenizer.pad_token_id)
    return prompt + chat.tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)


@friendly
def apply_edit(source: DemoSource, prompt: str, subject: str, target: str) -> tuple[str, str, list[list]]:
    from vertical.edit import edit_build
    from vertical.pack.schema import EditRequest

    try:
        request = EditRequest(prompt=prompt, subject=subject, target_new=target)
    except ValueError as exc:
        raise _user_error(exc) from None
    with source.lock, tempfile.TemporaryDirectory() as scratch:
        before = complete(source, prompt)
        requests = Path(scratch) / "edit.jsonl"
        requests.write_text(request.model_dump_json(exclude_none=True) + "\n")
        metrics = edit_build(source.path, requests, "rome")
        source.reload_model()
        after = complete(source, prompt)
    rows = [[key, metrics["before"].get(key), metrics["after"].get(key)]
            for key in ("efficacy", "generalization", "locality", "fluency")]
    return before, after, rows


@friendly
def roll_back(source: DemoSource, prompt: str) -> str:
    from vertical.edit import rollback

    with source.lock:
        undone = rollback(source.path)
        source.reload_model()
        answer = complete(source, prompt) if prompt.strip() else ""
    return f"Rolled back {', '.join(undone)}. " + (f"Now: {answer}" if answer else "")


@friendly
def trace(source: DemoSource, prompt: str, subject: str) -> str:
    from vertical.edit.trace import trace_build

    with source.lock:
        png, _ = trace_build(source.path, prompt, subject, "mlp")
    return str(png)


# ---------------------------------------------------------------- knowledge base


@friendly
def search(source: DemoSource, query: str, k: int) -> list[list]:
    if not (query or "").strip():
        return []
    hits = source.assistant.index.search(query, source.assistant.embedder.encode_query, k=int(k))
    return [[h.rank, round(h.score, 4), h.chunk.title, h.chunk.source, h.chunk.text[:400]] for h in hits]


def documents(source: DemoSource) -> list[list]:
    rows: dict[str, list] = {}
    for chunk in source.assistant.index.chunks:
        row = rows.setdefault(chunk.doc_id, [chunk.doc_id, chunk.title, chunk.source, 0])
        row[3] += 1
    return sorted(rows.values())


# What the demo accepts as an upload: documents, not .jsonl (whose lines name any id and any
# citation source), each at most UPLOAD_MAX_MB (Gradio refuses larger ones before they are stored).
UPLOAD_TYPES = (".pdf", ".docx", ".html", ".htm", ".md", ".txt")
UPLOAD_MAX_MB = 20


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


# ---------------------------------------------------------------- report


def report_tables(metrics: dict[str, dict]) -> list[list]:
    """One row per headline number: stage, metric, value."""
    picks = {
        "index": ["recall@1", "recall@5", "mrr@10", "chunks", "mode"],
        "tune": ["eval_loss_base", "eval_loss_tuned", "accuracy_base", "accuracy_tuned", "verdict"],
        "edit": ["efficacy", "generalization", "locality", "edits", "method"],
        "distill": ["teacher_score", "student_score", "retention", "speedup", "edit_efficacy", "student_layers"],
        "export": ["model", "quant", "bundle_bytes", "onnx_tokens_per_s", "torch_tokens_per_s", "onnx_speedup"],
    }
    rows = []
    for stage, keys in picks.items():
        values = _flatten(metrics.get(stage, {}))
        for key in keys:
            for name, value in values.items():
                if name == key or name.endswith("." + key):
                    rows.append([stage, name, value if not isinstance(value, float) else round(value, 4)])
    return rows


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def report_figure(metrics: dict[str, dict]):
    """Four panels: retrieval recall, tuning loss, edit metrics before/after, student vs teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    index = _flatten(metrics.get("index", {}))
    recall = {k.split(".")[-1]: v for k, v in index.items() if k.split(".")[-1].startswith("recall@")
              and isinstance(v, (int, float))}
    axes[0].bar(list(recall), list(recall.values()), color="#4c72b0")
    axes[0].set(title="retrieval recall", ylim=(0, 1))
    tune = metrics.get("tune", {})
    curve = tune.get("train_loss_curve") or []
    axes[1].plot(curve, color="#dd8452")
    if tune.get("eval_loss_base") is not None:
        axes[1].axhline(tune["eval_loss_base"], ls="--", color="grey", label="held-out, base")
        axes[1].axhline(tune["eval_loss_tuned"], ls=":", color="black", label="held-out, tuned")
        axes[1].legend(fontsize=7)
    axes[1].set(title="tuning loss", xlabel="logged step")
    edit = metrics.get("edit", {})
    before, after = edit.get("before", {}), edit.get("after", {})
    names = [n for n in ("efficacy", "generalization", "locality") if n in after]
    xs = range(len(names))
    axes[2].bar([x - 0.2 for x in xs], [before.get(n) or 0 for n in names], 0.4, label="before")
    axes[2].bar([x + 0.2 for x in xs], [after.get(n) or 0 for n in names], 0.4, label="after")
    axes[2].set(title="knowledge edits", xticks=list(xs), ylim=(0, 1))
    axes[2].set_xticklabels(names, fontsize=8)
    axes[2].legend(fontsize=7)
    distill = metrics.get("distill", {})
    pairs = [("QA score", distill.get("teacher_score"), distill.get("student_score")),
             ("tokens/s", distill.get("teacher_tokens_per_s"), distill.get("student_tokens_per_s"))]
    pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
    for i, (name, teacher, student) in enumerate(pairs):
        top = max(teacher, student) or 1
        axes[3].bar(i - 0.2, teacher / top, 0.4, color="#55a868", label="teacher" if i == 0 else None)
        axes[3].bar(i + 0.2, student / top, 0.4, color="#c44e52", label="student" if i == 0 else None)
        axes[3].text(i - 0.2, teacher / top, f"{teacher:g}", ha="center", va="bottom", fontsize=7)
        axes[3].text(i + 0.2, student / top, f"{student:g}", ha="center", va="bottom", fontsize=7)
    axes[3].set(title="student vs teacher (relative)", xticks=range(len(pairs)), ylim=(0, 1.2))
    axes[3].set_xticklabels([p[0] for p in pairs], fontsize=8)
    if pairs:
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the app


def create_demo(path: Path, redact_feedback: bool = True, read_only: bool = False):
    """The Gradio Blocks app for a build or a bundle. `read_only` leaves out everything that
    changes the build (knowledge editing, uploads): not hidden, never registered, so Gradio's API
    cannot call it either."""
    import gradio as gr

    source = open_source(path, redact_feedback)
    name = source.assistant.name
    kind = "bundle (ONNX runtime)" if source.is_bundle else "build"
    with gr.Blocks(title=f"vertical · {name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## vertical · {name}\n{kind}: `{source.path}`")
        with gr.Tab("Chat", id="chat"):
            if source.assistant.disclaimer:
                gr.Markdown(f"*{source.assistant.disclaimer}*", elem_id="disclaimer")
            chatbot = gr.Chatbot(label="Answers with numbered sources", height=420, elem_id="chatbot",
                                 sanitize_html=True)
            question = gr.Textbox(label="Question", placeholder="Ask about the documents…", elem_id="question")
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                clear = gr.Button("Clear")
            if source.examples:
                gr.Examples(source.examples, inputs=question, label="Example questions")
            with gr.Accordion("Correct the last answer", open=False):
                correction = gr.Textbox(label="What the answer should have said", elem_id="correction")
                subject = gr.Textbox(label="The fact's subject, as it occurs in the question (optional: makes an "
                                           "edit request)")
                save = gr.Button("Save correction", elem_id="save-correction")
            feedback_note = gr.Markdown(elem_id="feedback-note")
            exchanges = gr.State([])  # held on the server, per browser session
            ask.click(lambda q, h, e: (yield from chat_reply(source, q, h, e)), [question, chatbot, exchanges],
                      [chatbot, question, exchanges])
            question.submit(lambda q, h, e: (yield from chat_reply(source, q, h, e)), [question, chatbot, exchanges],
                            [chatbot, question, exchanges])
            clear.click(lambda: ([], []), None, [chatbot, exchanges])

            def on_like(history: list[dict], exchanges: list[dict], like: gr.LikeData) -> str:  # found by annotation
                return record_rating(source, history, like, exchanges)

            chatbot.like(on_like, [chatbot, exchanges], feedback_note)
            save.click(lambda e, c, s: record_correction(source, e, c, s), [exchanges, correction, subject],
                       feedback_note)

        if not source.is_bundle:
            with gr.Tab("Side by side", id="compare"):
                gr.Markdown("The same question to the base model (no documents), the vertical model (with "
                            "retrieval) and, if the build has one, the distilled student.")
                compare_question = gr.Textbox(label="Question", elem_id="compare-question")
                compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("#### Base model, no documents")
                        base_out = gr.Markdown(elem_id="base-answer")
                    with gr.Column():
                        gr.Markdown("#### Vertical model, with retrieval")
                        vertical_out = gr.Markdown(elem_id="vertical-answer")
                    with gr.Column():
                        gr.Markdown("#### Distilled student, with retrieval")
                        student_out = gr.Markdown(elem_id="student-answer")
                compare_button.click(lambda q: compare(source, q), compare_question,
                                     [base_out, vertical_out, student_out])

        if not source.is_bundle and not read_only:
            with gr.Tab("Knowledge editing", id="edit"):
                gr.Markdown("Write a changed fact into the model's FFN weights with ROME, see the answer before "
                            "and after, and roll it back. The edit is saved in the build's edit log.")
                with gr.Row():
                    edit_prompt = gr.Textbox(label="Prompt", placeholder="The mayor of Quentar is",
                                             elem_id="edit-prompt")
                    edit_subject = gr.Textbox(label="Subject (as in the prompt)", placeholder="Quentar",
                                              elem_id="edit-subject")
                    edit_target = gr.Textbox(label="New target", placeholder="Osric", elem_id="edit-target")
                with gr.Row():
                    apply_button = gr.Button("Apply edit (ROME)", variant="primary", elem_id="apply-edit")
                    rollback_button = gr.Button("Roll back the last edit", elem_id="rollback")
                    trace_button = gr.Button("Causal trace", elem_id="trace")
                before_out = gr.Textbox(label="Before", elem_id="edit-before")
                after_out = gr.Textbox(label="After", elem_id="edit-after")
                edit_table = gr.Dataframe(headers=["metric", "before", "after"], elem_id="edit-checks", label="Edit checks "
                                          "(efficacy: the new target wins; locality: unrelated facts unchanged)")
                rollback_out = gr.Markdown(elem_id="rollback-note")
                heatmap = gr.Image(label="Causal trace: where the fact is stored", type="filepath", elem_id="trace-image")
                apply_button.click(lambda p, s, t: apply_edit(source, p, s, t), [edit_prompt, edit_subject, edit_target],
                                   [before_out, after_out, edit_table])
                rollback_button.click(lambda p: roll_back(source, p), edit_prompt, rollback_out)
                trace_button.click(lambda p, s: trace(source, p, s), [edit_prompt, edit_subject], heatmap)

        with gr.Tab("Knowledge base", id="knowledge"):
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

        with gr.Tab("Report", id="report"):
            rows = report_tables(source.metrics)
            gr.Dataframe(value=rows or [["-", "no metrics yet", ""]], headers=["stage", "metric", "value"],
                         label="The build's metrics", elem_id="report-table")
            gr.Plot(value=report_figure(source.metrics), label="What each step added")
            evaluated = source.path / "eval"
            if (evaluated / "qa.png").is_file():  # the eval stage's report: every model on the same QA items
                with gr.Row():
                    gr.Image(str(evaluated / "qa.png"), label="QA accuracy by model (eval stage)")
                    if (evaluated / "edits.png").is_file():
                        gr.Image(str(evaluated / "edits.png"), label="Knowledge edits by model (eval stage)")
            with gr.Accordion("All metrics (JSON)", open=False):
                gr.JSON(value=source.metrics)
    return demo


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """user:password lines (blank lines and # comments skipped) for Gradio's login."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VerticalError(f"--auth-file {path}: cannot read it ({exc})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.strip().partition(":")
        if not colon or not user or len(password) < 12:
            raise VerticalError(f"--auth-file {path}:{number}: write `user:password` with a password of 12+ characters")
        pairs.append((user, password))
    if not pairs:
        raise VerticalError(f"--auth-file {path}: no `user:password` line in it")
    return pairs


def launch(path: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           redact_feedback: bool = True, auth_file: Path | None = None, read_only: bool = False) -> None:
    """Start the demo and block until interrupted. Off this machine's loopback it needs a login
    (`auth_file`): anyone who reaches the port could otherwise read the documents, edit the
    model and replace documents."""
    import gradio as gr

    if share:
        raise VerticalError("--share would publish the demo through gradio.live, outside this machine; "
                            "vertical keeps everything local (use --host 0.0.0.0 on a trusted network)")
    auth = read_auth_file(auth_file) if auth_file else None
    from vertical.export.server import LOOPBACK_HOSTS

    if host not in LOOPBACK_HOSTS and not auth:
        raise VerticalError(f"refusing to open the demo on {host} without a login: give --auth-file (user:password "
                            "lines), and --read-only to keep others from editing; or use --host 127.0.0.1")
    demo = create_demo(path, redact_feedback, read_only)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)  # no Google Fonts fetch
    demo.queue(default_concurrency_limit=2).launch(server_name=host, server_port=port, share=False, theme=theme,
                                                   footer_links=[], ssr_mode=False, quiet=True, auth=auth,
                                                   max_file_size=f"{UPLOAD_MAX_MB}mb")
