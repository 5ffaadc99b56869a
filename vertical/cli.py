"""The `vertical` command line: a thin layer over the library API.

User errors (VerticalError) print as one line on stderr with a non-zero exit code; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, TypeVar

import click
import typer

try:  # typer 0.26+ carries its own copy of click, with its own exception classes
    from typer._click import exceptions as _typer_click
except ImportError:  # older typer uses click itself
    _typer_click = click.exceptions
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, _typer_click.ClickException)
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import vertical  # noqa: F401 - sets the offline defaults before anything else is imported
from vertical.errors import PackInvalid, VerticalError

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

app = typer.Typer(
    name="vertical",
    help="Turn a small general language model into a private, domain-specific model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
packs_app = typer.Typer(help="List, inspect, validate and create domain packs.", no_args_is_help=True)
models_app = typer.Typer(help="Base models and embedders available offline.", no_args_is_help=True)
index_app = typer.Typer(help="Update a build's retrieval index without retraining.", no_args_is_help=True)
app.add_typer(packs_app, name="packs")
app.add_typer(models_app, name="models")
feedback_app = typer.Typer(help="Feedback collected by the demo, turned into pack data.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(feedback_app, name="feedback")


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs."),
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=debug)])
    for noisy in ("httpx", "urllib3", "filelock", "bm25s", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not (debug or verbose):
        # "Loading weights" bars on every model load are noise; long steps draw their own bars.
        import os

        os.environ.setdefault("VERTICAL_QUIET_LOADS", "1")


# ---------------------------------------------------------------- packs


@packs_app.command("list")
def packs_list() -> None:
    """List the shipped packs."""
    from vertical.pack import load_pack, shipped_pack_names

    table = Table("name", "description", "base model", "folder")
    for name in shipped_pack_names():
        try:
            pack = load_pack(name)
            table.add_row(name, pack.config.description, pack.config.base_model, str(pack.root))
        except PackInvalid as exc:
            table.add_row(name, f"[red]invalid: {exc}[/red]", "-", "-")
    console.print(table)


@packs_app.command("show")
def packs_show(pack: str = typer.Argument(..., help="Shipped pack name or pack folder.")) -> None:
    """Show a pack's settings and how much data it holds."""
    from vertical.pack import load_pack

    loaded = load_pack(pack)
    cfg = loaded.config
    table = Table("field", "value", show_header=False)
    table.add_row("name", cfg.name)
    table.add_row("folder", str(loaded.root))
    table.add_row("description", cfg.description)
    table.add_row("language", cfg.language)
    table.add_row("base model", cfg.base_model)
    table.add_row("embedder", cfg.embedder)
    table.add_row("system prompt", cfg.system_prompt.strip())
    table.add_row("disclaimer", cfg.disclaimer.strip() or "-")
    table.add_row("document files", str(len(loaded.document_files())))
    for label, records in (("instruction examples", loaded.instructions), ("knowledge edits", loaded.edits),
                           ("QA eval items", loaded.qa_eval), ("retrieval eval items", loaded.retrieval_eval)):
        try:
            table.add_row(label, str(len(records())))
        except PackInvalid as exc:
            table.add_row(label, f"[red]{len(exc.problems)} problems: run vertical packs validate[/red]")
    table.add_row("stage settings", cfg.stages.model_dump_json(indent=1))
    console.print(table)


@packs_app.command("validate")
def packs_validate(pack: str = typer.Argument(..., help="Shipped pack name or pack folder.")) -> None:
    """Check pack.yaml and every data file; list every problem with its file and line."""
    from vertical.pack import validate_pack

    loaded, problems = validate_pack(pack)
    if problems:
        for problem in problems:
            err_console.print(str(problem), markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"pack '{pack}': {len(problems)} problem(s)", style="red")
        raise typer.Exit(1)
    console.print(f"pack '{loaded.name}' is valid ({loaded.root})")


@packs_app.command("init")
def packs_init(
    name: str = typer.Argument(..., help="Name of the new pack (lowercase, digits, - and _)."),
    docs: Path = typer.Option(..., "--docs", help="Folder of documents to copy into the pack."),
    from_pack: Optional[str] = typer.Option(None, "--from", help="Copy settings (prompt, disclaimer, stages) from this pack."),
    dest: Optional[Path] = typer.Option(None, "--dir", help="Where to create the pack (default: ./NAME)."),
) -> None:
    """Make a new pack from a folder of documents, ready for `vertical build`."""
    from vertical.pack import init_pack

    path = init_pack(name, docs, from_pack, dest)
    console.print(f"created pack {path}; build it with: vertical build {path}")


# ---------------------------------------------------------------- build


class RichReporter:
    """Draws one progress line per stage, with a bar for stages that report their progress."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.current: str | None = None

    def stage(self, name: str, status: str, detail: str = "") -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(f"{name:<8} {detail}", total=None)
        task = self.tasks[name]
        if status == "running":
            self.current = name
            self.progress.update(task, description=f"[bold]{name:<8}[/bold] {detail}")
        elif status in ("done", "skipped"):
            self.progress.update(task, description=f"[green]{name:<8}[/green] {status} {detail}", total=1, completed=1)

    def track(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        task = self.progress.add_task(f"  {description}", total=total)
        for item in items:
            yield item
            self.progress.advance(task)
        self.progress.remove_task(task)


def _split(value: Optional[str]) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


@app.command("build")
def build_cmd(
    pack: str = typer.Argument(..., help="Shipped pack name or pack folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Build folder (default: builds/<pack>)."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Comma-separated stages to run (their prerequisites are added)."),
    force: Optional[str] = typer.Option(None, "--force", help="Comma-separated stages to rerun even if up to date."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Registry name, HF model folder or .gguf file."),
) -> None:
    """Build a vertical model from a pack. Up-to-date stages are skipped; a killed build resumes."""
    from vertical.pipeline import build

    with _progress(transient=False) as progress:
        results = build(pack, out=out, steps=_split(steps), force=_split(force), base_model=base_model,
                        reporter=RichReporter(progress))
    table = Table("stage", "status", "seconds", "metrics")
    for result in results:
        shown = ", ".join(f"{k}={v}" for k, v in result.metrics.items() if not isinstance(v, (dict, list)))
        table.add_row(result.name, result.status, f"{result.seconds:.1f}", shown)
    console.print(table)


def _progress(transient: bool = True) -> Progress:
    """The progress display every long command shows on stderr (kept on screen for build and export)."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err_console, transient=transient)


# ---------------------------------------------------------------- retrieval and answers


def _build_dir(path: Path) -> Path:
    from vertical.paths import is_build, is_bundle

    if is_bundle(path):
        raise VerticalError(f"{path} is an exported bundle, not a build folder: give the build it came from "
                            "(builds/<pack>)")
    if not is_build(path):
        raise VerticalError(f"{path} is not a build folder (no manifest.json); give builds/<pack> or the --out of a build")
    return path


@app.command("search")
def search_cmd(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>)."),
    query: str = typer.Argument(..., help="What to look for."),
    k: int = typer.Option(5, "--k", min=1, max=100, help="How many chunks to return."),
    mode: Optional[str] = typer.Option(None, "--mode", help="dense, bm25 or hybrid (default: the build's best)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Search a build's document index: ranked chunks with scores and sources."""
    import json

    from vertical.index import open_index

    if mode not in (None, "dense", "bm25", "hybrid"):
        raise VerticalError(f"--mode {mode}: use dense, bm25 or hybrid")
    index, embedder = open_index(_build_dir(build))
    hits = index.search(query, embedder.encode_query, k=k, mode=mode)
    if as_json:
        rows = [h.as_json() for h in hits]
        print(json.dumps({"query": query, "mode": mode or index.meta.get("mode"), "results": rows}, indent=2, ensure_ascii=False))
        return
    table = Table("#", "score", "title", "source", "span", "text")
    for h in hits:
        table.add_row(str(h.rank + 1), f"{h.score:.4f}", h.chunk.title, h.chunk.source, f"{h.chunk.start}-{h.chunk.end}",
                      h.chunk.text[:160].replace("\n", " ") + ("…" if len(h.chunk.text) > 160 else ""))
    console.print(table)


def _open_assistant(path: Path):
    """A bundle runs on onnxruntime (no torch); a build folder on its torch models."""
    from vertical.paths import is_bundle

    if is_bundle(path):  # a damaged manifest is then reported as the bundle's problem
        from vertical.answer import open_bundle

        return open_bundle(path)
    from vertical.answer import Assistant

    return Assistant.from_build(_build_dir(path))


def _print_citations(answer) -> None:
    """The cited sources, each with the evidence sentences the answer rests on."""
    for s in answer.citations():
        console.print(f"[{s.number}] {s.title} — {s.source}, characters {s.start}-{s.end}", markup=False, highlight=False)
        for sentence in s.sentences:
            console.print(f"    “{sentence.text}” (characters {sentence.start}-{sentence.end})", style="dim",
                          markup=False, highlight=False)


def answer_json(answer) -> dict:
    """`vertical ask --json`: the direct answer, its citations and the evidence it rests on."""
    return {"answer": answer.text,
            "citations": [{"number": s.number, "doc_id": s.doc_id, "title": s.title, "source": s.source,
                           "span": [s.start, s.end]} for s in answer.citations()],
            "evidence": [{k: e[k] for k in ("doc_id", "span", "text")} for e in answer.evidence()],
            "faithful": answer.faithful, "fallback": answer.fallback, "refused": answer.refused}


@app.command("ask")
def ask_cmd(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>) or exported bundle."),
    question: str = typer.Argument(..., help="The question."),
    k: Optional[int] = typer.Option(None, "--k", min=1, max=20, help="Sources to retrieve (default: the pack's top_k)."),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, max=2048, help="Longest answer, in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print {answer, citations, evidence} as JSON instead."),
) -> None:
    """Answer one question from the build's documents: the direct answer, then each cited source
    with the sentences the answer rests on (document character spans)."""
    assistant = _open_assistant(build)
    if as_json:
        print(json.dumps(answer_json(assistant.ask(question, k, max_tokens)), ensure_ascii=False))
        return
    answer, pieces = assistant.stream(question, k, max_tokens)
    for piece in pieces:
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    _print_citations(answer)
    if assistant.disclaimer:
        console.print(assistant.disclaimer, style="dim", markup=False)


@app.command("chat")
def chat_cmd(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>) or exported bundle."),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, max=2048, help="Longest answer, in tokens."),
) -> None:
    """Chat in the terminal; each question is answered from the documents. Empty line or Ctrl-D ends."""
    assistant = _open_assistant(build)
    if assistant.disclaimer:
        console.print(assistant.disclaimer, style="dim", markup=False)
    history: list[dict[str, str]] = []
    while True:
        try:
            question = console.input("[bold]you>[/bold] ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            answer, pieces = assistant.stream(question, None, max_tokens, history)
            for piece in pieces:
                console.print(piece, end="", markup=False, highlight=False)
        except VerticalError as exc:  # e.g. the conversation outgrew the context: say so, keep chatting
            console.print()
            err_console.print(f"error: {exc}", markup=False)
            history = []
            continue
        console.print()
        _print_citations(answer)
        # earlier turns go with the next question (sources are retrieved for the newest one only)
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": answer.text}][-8:]


@index_app.command("add")
def index_add(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>)."),
    paths: list[Path] = typer.Argument(..., help="Document files or folders to add or replace (matched by id)."),
) -> None:
    """Add or replace documents in a built index; unchanged documents are not re-embedded."""
    from vertical.index import add_documents

    with _progress() as progress:
        note = add_documents(_build_dir(build), paths, track=RichReporter(progress).track)
    console.print(f"added {len(note['added'])}, replaced {len(note['replaced'])}, unchanged {note['unchanged']} "
                  f"({note['embedded_chunks']} chunks embedded)")


@index_app.command("remove")
def index_remove(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>)."),
    doc_ids: list[str] = typer.Argument(..., help="Document ids to delete from the index."),
) -> None:
    """Delete documents from a built index."""
    from vertical.index import remove_documents

    remove_documents(_build_dir(build), doc_ids)
    console.print(f"removed {len(doc_ids)} document(s)")


@index_app.command("migrate")
def index_migrate(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>)."),
    to: str = typer.Option(..., "--to", help="faiss (in the process) or qdrant."),
    url: Optional[str] = typer.Option(None, "--url", help="Qdrant server or cluster URL (API key from "
                                      "QDRANT_API_KEY); without it, Qdrant runs embedded in the process."),
) -> None:
    """Move a built index's vectors to another vector store; nothing is re-embedded. Export again
    (`vertical export BUILD`) for the bundle to use it."""
    from vertical.index import migrate_index

    note = migrate_index(_build_dir(build), to, url)
    where = f" at {url}" if url else (" (embedded)" if to == "qdrant" else "")
    console.print(f"index moved from {note['migrated_from']} to {to}{where}")


# ---------------------------------------------------------------- knowledge editing


def _print_edit_metrics(metrics: dict) -> None:
    table = Table("metric", "before", "after")
    for key in ("efficacy", "generalization", "locality", "portability", "fluency", "fluency_greedy"):
        if metrics["after"].get(key) is not None or key != "portability":
            table.add_row(key, str(metrics["before"].get(key)), str(metrics["after"].get(key)))
    console.print(table)
    console.print(f"{metrics['edits']} edit(s) with {metrics['method']} on layer(s) {metrics['layers']}; "
                  f"{metrics['seconds_per_edit']} s per edit")
    if metrics.get("documents_changed"):
        console.print(f"documents changed and re-indexed: {', '.join(metrics['documents_changed'])}")


@app.command("edit", context_settings={"help_option_names": ["--help", "-h"]})
def edit_cmd(
    args: list[str] = typer.Argument(..., metavar="BUILD | rollback BUILD [EDIT_ID]",
                                     help="`BUILD` to apply --requests; `rollback BUILD [EDIT_ID]` to undo the last "
                                          "edit, or EDIT_ID and every edit after it."),
    requests: Optional[Path] = typer.Option(None, "--requests", help="Edit requests JSONL (EasyEdit fields)."),
    method: Optional[str] = typer.Option(None, "--method", help="rome, memit, alphaedit or ft (default: the pack's)."),
) -> None:
    """Edit facts in the build's FFN weights and measure the edits, or roll edits back."""
    from vertical.edit import edit_build, rollback

    if args[0] == "rollback":
        if len(args) not in (2, 3):
            raise VerticalError("usage: vertical edit rollback BUILD [EDIT_ID]")
        undone = rollback(_build_dir(Path(args[1])), args[2] if len(args) == 3 else None)
        console.print(f"rolled back {', '.join(undone)}; the weights are as they were before {undone[0]}")
        return
    if len(args) != 1:
        raise VerticalError("usage: vertical edit BUILD --requests FILE [--method rome|memit|ft]")
    if requests is None:
        raise VerticalError("--requests FILE is required: a JSONL of edits (prompt, subject, target_new, ...)")
    if method not in (None, "rome", "memit", "alphaedit", "ft"):
        raise VerticalError(f"--method {method}: use rome, memit, alphaedit or ft")
    _print_edit_metrics(edit_build(_build_dir(Path(args[0])), requests, method))


@app.command("trace")
def trace_cmd(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>)."),
    prompt: str = typer.Option(..., "--prompt", help="A prompt the fact completes, e.g. 'The Eiffel Tower is in'."),
    subject: str = typer.Option(..., "--subject", help="The subject, as it occurs in the prompt."),
    kind: str = typer.Option("mlp", "--kind", help="Which states to restore: mlp, hidden or attn."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: BUILD/trace/<subject>-<kind>.png)."),
) -> None:
    """Causal tracing: which layers carry the fact? Writes a heatmap PNG."""
    from vertical.edit.trace import trace_build

    if kind not in ("mlp", "hidden", "attn"):
        raise VerticalError(f"--kind {kind}: use mlp, hidden or attn")
    png, result = trace_build(_build_dir(build), prompt, subject, kind, out)
    console.print(f"answer {result.answer!r}: p={result.p_clean:.3f} clean, {result.p_corrupt:.3f} with the subject corrupted")
    console.print(f"heatmap: {png}")


# ---------------------------------------------------------------- models


@models_app.command("list")
def models_list() -> None:
    """Show the known base models and embedders, whether they are installed, and where they are cached."""
    from vertical.models import list_models
    from vertical.paths import cache_dir

    table = Table("name", "kind", "package", "installed", "location")
    for row in list_models():
        table.add_row(row["name"], row["kind"], row["package"], row["installed"], row["location"])
    console.print(table)
    console.print(f"cache: {cache_dir()} (set VERTICAL_CACHE to move it)")


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="Registry name, HF model folder or .gguf file.")) -> None:
    """Prepare a base model for offline use (convert a GGUF once into the cache). Nothing is downloaded."""
    from vertical.models import ensure_local, resolve_base_model

    path = ensure_local(resolve_base_model(name))
    console.print(f"{name}: ready at {path}")


# ---------------------------------------------------------------- bundle: export and serve


@app.command("export")
def export_cmd(
    build: Path = typer.Argument(..., help="Build folder (builds/<pack>)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="int4, int8 or fp32 (default: the pack's setting, "
                                        "auto = int8 unless int4 agrees better with fp32); with --format gguf: auto "
                                        "(default: q8_0 if it keeps 90% of the model's greedy answers, else f16), "
                                        "q8_0 or f16."),
    model: Optional[str] = typer.Option(None, "--model", help="auto (default: the student if it kept the teacher's "
                                        "QA score, see stages.export.min_retention), student or teacher."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also copy the bundle here (default: BUILD/export)."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the bundle with this Ed25519 private key (PEM); "
                                        "`vertical verify --key PUB` and `serve --require-signature PUB` check it."),
    fmt: str = typer.Option("onnx", "--format", help="onnx: the bundle `vertical serve` runs (default); gguf: "
                            "model.gguf (Q8_0 or F16) and an Ollama Modelfile for llama.cpp / Ollama; hf: the safetensors "
                            "folder vLLM and TGI serve. gguf and hf go to BUILD/export-FORMAT (or --out) with the "
                            "index and embedder beside the model."),
) -> None:
    """Export the build as a self-contained bundle (ONNX model and embedder, index, manifest), or its
    model for llama.cpp / Ollama (--format gguf) or vLLM / TGI (--format hf)."""
    import shutil

    from vertical.io import atomic_dir
    from vertical.pipeline import build as run_build
    from vertical.pipeline import load_manifest

    build = _build_dir(build).resolve()
    if fmt != "onnx":
        _export_format(build, fmt, out, quant, model=model, sign=sign)
        return
    if quant not in (None, "auto", "int4", "int8", "fp32"):
        raise VerticalError(f"--quant {quant}: use int4, int8 or fp32")
    if model not in (None, "auto", "student", "teacher"):
        raise VerticalError(f"--model {model}: use auto, student or teacher")
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VerticalError(f"--out {out} exists and is not an empty folder; choose a new folder")
    overrides = {k: v for k, v in {"quant": quant, "model": model}.items() if v is not None}
    manifest = load_manifest(build)
    if not manifest.get("pack"):
        raise VerticalError(f"{build}/manifest.json names no pack: rebuild with `vertical build PACK --out {build}`")
    with _progress(transient=False) as progress:
        results = run_build(manifest.get("pack_dir") or manifest["pack"], out=build, steps=["export"],
                            settings={"export": overrides}, reporter=RichReporter(progress))
    metrics = results[-1].metrics
    bundle = build / "export"
    signed = ""
    if sign is not None:
        from vertical.export.bundle import sign as sign_bundle
        from vertical.io import exclusive_lock
        from vertical.pipeline import record_outputs

        with exclusive_lock(build / ".lock", f"build folder {build}"):
            signed = sign_bundle(bundle, sign)
            record_outputs(build, "export", metrics)  # the signature is the export stage's own file now
    if out is not None:
        out = out.resolve()
        with atomic_dir(out) as tmp:
            shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        bundle = out
    console.print(f"bundle: {bundle}  ({metrics.get('bundle_bytes', 0) / 1e6:.1f} MB, {metrics.get('model')} ({metrics.get('model_reason')}) "
                  f"{metrics.get('quant')}, greedy agreement with fp32 {metrics.get('greedy_agreement')}, "
                  f"{metrics.get('onnx_tokens_per_s')} tokens/s vs {metrics.get('torch_tokens_per_s')} in PyTorch)")
    if signed:
        console.print(f"signed with key {signed}")


def _export_format(build: Path, fmt: str, out: Optional[Path], quant: Optional[str], **onnx_only) -> None:
    from vertical.export.formats import FORMATS, MIN_AGREEMENT, export_format

    if fmt not in FORMATS:
        raise VerticalError(f"--format {fmt}: use {', '.join(FORMATS)}")
    given = [f"--{name}" for name, value in onnx_only.items() if value is not None]
    if given:
        raise VerticalError(f"{', '.join(given)} apply to --format onnx only")
    out = (out or build / f"export-{fmt}").resolve()
    if out.exists():
        raise VerticalError(f"{out} exists; remove it or choose another --out")
    with console.status(f"exporting {build.name} as {fmt} ({'calibrating, ' if fmt == 'gguf' and quant != 'f16' else ''}writing, then reading it back)"):
        metrics = export_format(build, fmt, out, quant=quant)
    line = f"{fmt}: {out}  ({metrics['model']})"
    if fmt == "gguf":
        line += (f"  {metrics['gguf_bytes'] / 1e6:.1f} MB {metrics['gguf_quant']} ({metrics['gguf_quant_reason']}); read "
                 f"back: greedy answers agree with the source model on {metrics['gguf_greedy_agreement']:.0%} of "
                 f"{metrics['gguf_agreement_prompts']} prompts, tokenizer on {metrics['gguf_tokenizer_agreement']:.0%}")
    console.print(line)
    if fmt == "gguf" and metrics["gguf_quant"] == "Q8_0" and metrics["gguf_greedy_agreement"] < MIN_AGREEMENT:
        console.print("note: Q8_0's rounding changes some of this model's greedy answers; the default (auto) or "
                      "`--quant f16` (twice the size) keeps them")
    console.print(f"how to serve it: {out / 'README.md'}")


@app.command("serve")
def serve_cmd(
    bundle: Path = typer.Argument(..., help="Exported bundle folder (BUILD/export or the --out of `vertical export`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface; "
                                                          "needs an API key)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="VERTICAL_API_KEY",
                                          help="Require `Authorization: Bearer KEY` (prefer the VERTICAL_API_KEY "
                                               "variable: a command-line argument is visible to other users)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file",
                                                help="File of accepted API keys, one per line (16+ characters each)."),
    allow_host: list[str] = typer.Option([], "--allow-host",
                                         help="Another name clients use for this server (the Host header); "
                                              "repeatable. Loopback names and the --host address are always allowed."),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="Serve HTTPS with this certificate (PEM)."),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="The certificate's private key (PEM)."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, max=8192, help="Largest max_tokens a request may ask for."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=256, help="Answers generated at the same time."),
    require_signature: Optional[Path] = typer.Option(None, "--require-signature",
                                                     help="Serve only a bundle signed by the private key of this "
                                                          "Ed25519 public key (PEM)."),
    json_logs: bool = typer.Option(False, "--json-logs", help="One JSON line per request (time, method, path, "
                                   "status, seconds, client) instead of uvicorn's access log."),
) -> None:
    """Serve a bundle behind an OpenAI-compatible API, without torch. The bundle is verified first.

    POST /v1/chat/completions answers from the documents; /v1/completions, /v1/embeddings and /v1/search
    give a RAG stack of your own the bare model, the embedder and the index. GET /metrics gives
    Prometheus metrics (requests, errors, latency, time to first token, tokens, queue), behind the key
    like the API."""
    from vertical.export.server import Limits, check_serving, read_key_file, serve

    keys = ([api_key] if api_key else []) + (read_key_file(api_key_file) if api_key_file else [])
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise VerticalError("give both --ssl-certfile and --ssl-keyfile for HTTPS, or neither")
    check_serving(host, keys)
    serve(bundle, host, port, keys, Limits(max_tokens=max_tokens, max_concurrent=concurrency,
                                           default_max_tokens=min(200, max_tokens)),
          allow_host, str(ssl_certfile) if ssl_certfile else None, str(ssl_keyfile) if ssl_keyfile else None,
          require_signature, json_logs)


@app.command("verify")
def verify_cmd(
    bundle: Path = typer.Argument(..., help="Exported bundle folder."),
    key: Optional[Path] = typer.Option(None, "--key", help="Also check the signature against this Ed25519 public "
                                                           "key (PEM): who made the bundle, not only that it is whole."),
) -> None:
    """Check every file of a bundle against its manifest (sha256 and size); list each one that differs."""
    from vertical.export.bundle import check_signature, problems, read_manifest

    manifest = read_manifest(bundle)
    found = problems(bundle, manifest)
    for line in found:
        console.print(f"DIFFERS  {line}", markup=False, highlight=False)
    if found:
        raise VerticalError(f"bundle {bundle}: {len(found)} of {len(manifest['files'])} files do not match "
                            "the manifest; copy or export the bundle again")
    if key is not None:
        console.print(f"ok: signed by key {check_signature(bundle, key)}")
    console.print(f"ok: all {len(manifest['files'])} files of {bundle} match manifest.json")


@app.command("eval")
def eval_cmd(
    path: Path = typer.Argument(..., help="Build folder or exported bundle."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="QA JSONL in the pack format (default: the pack's qa_eval)."),
    edits: Optional[Path] = typer.Option(None, "--edits", help="Edit requests JSONL (default: the pack's edits)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: PATH/eval-report)."),
    questions: Optional[int] = typer.Option(None, "--questions", min=0,
                                            help="QA items sampled from the pack (0: all; default: the pack's)."),
) -> None:
    """QA accuracy of every model of a build (base alone, with retrieval, tuned, edited, student, bundle),
    edit efficacy / generalization / locality, retrieval and speed: report.json, report.md and plots."""
    from vertical.evaluate import evaluate_path

    with _progress() as progress:
        folder, summary = evaluate_path(path, qa, edits, out, questions, RichReporter(progress).track)
    table = Table("model", "QA accuracy")
    for name, accuracy in summary["qa_accuracy"].items():
        table.add_row(name, str(accuracy))
    console.print(table)
    if "margin_over_base" in summary:
        console.print(f"{summary['vertical_model']} vs base alone: {summary['margin_over_base']:+.3f}")
    console.print(f"report: {folder / 'report.md'}")


# ---------------------------------------------------------------- demo and feedback


@app.command("demo")
def demo_cmd(
    path: Path = typer.Argument(..., help="Build folder or exported bundle."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535),
    share: bool = typer.Option(False, "--share/--no-share", help="Refused: a public gradio.live link would take "
                                                                  "the documents off this machine."),
    keep_contacts: bool = typer.Option(False, "--keep-contacts", help="Store feedback as typed; by default "
                                                                       "e-mail addresses and phone numbers are "
                                                                       "redacted before it is saved."),
    auth_file: Optional[Path] = typer.Option(None, "--auth-file", help="Login: a file of user:password lines "
                                                                        "(required with a --host other than loopback)."),
    read_only: bool = typer.Option(False, "--read-only", help="Leave out knowledge editing and document uploads "
                                                               "(in the page and in Gradio's API)."),
) -> None:
    """The Gradio demo: chat with citations, side by side, knowledge editing, knowledge base, report.
    On a bundle only the tabs that run without torch are shown."""
    from vertical.app.demo import launch

    if not path.exists():
        raise VerticalError(f"{path} does not exist; give a build folder (builds/<pack>) or a bundle")
    console.print(f"demo of {path} on http://{host}:{port} (Ctrl+C to stop)")
    launch(path, host, port, share, redact_feedback=not keep_contacts, auth_file=auth_file, read_only=read_only)


@feedback_app.command("export")
def feedback_export(
    path: Path = typer.Argument(..., help="Build folder or bundle whose feedback.jsonl to export."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for instructions.jsonl and edits.jsonl "
                                                           "(default: PATH/feedback-export)."),
) -> None:
    """Turn corrections into pack files: instruction examples, and edit requests where a subject was given.
    Copy them into the pack's instructions/ and edits/ folders and list them in pack.yaml."""
    from vertical.feedback import FEEDBACK_FILE, export_feedback

    if not (path / FEEDBACK_FILE).is_file():
        raise VerticalError(f"{path / FEEDBACK_FILE} does not exist: no feedback has been given in the demo yet")
    out = out or path / "feedback-export"
    problems: list[str] = []
    counts = export_feedback(path, out, problems)
    for problem in problems:
        err_console.print(problem, style="yellow", markup=False, highlight=False)
    console.print(f"wrote {counts['instructions']} instruction example(s) to {out / 'instructions.jsonl'} and "
                  f"{counts['edits']} edit request(s) to {out / 'edits.jsonl'}")
    if counts["skipped"]:
        err_console.print(f"skipped {counts['skipped']} damaged line(s) of {path / FEEDBACK_FILE}",
                          style="yellow")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args, prog_name="vertical", standalone_mode=False)
    except _EXIT as exc:
        return getattr(exc, "exit_code", 0)
    except _USAGE as exc:
        exc.show()
        return exc.exit_code
    except _ABORT:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except VerticalError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2 if isinstance(exc, PackInvalid) else 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
