"""What every tab of the demo shares: the source it shows (a build or a bundle), the error
wrapper for Gradio handlers, and the Markdown rendering of answers and document text.

The tab modules in app/components import this module and app/demo.py imports them, never the
other way round.
"""

import functools
import html
import inspect
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError

log = logging.getLogger(__name__)

MAX_TOKENS = 200
EMPTY_ANSWER = "(no answer: the model's greedy output was empty or only whitespace)"


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
        from vertical.generation import ChatModel
        from vertical.paths import best_model_dir

        self.assistant.model = ChatModel(best_model_dir(self.path))

    def reload_index(self) -> None:
        from vertical.index import open_index

        self.assistant.index, self.assistant.embedder = open_index(self.path)


def open_source(path: Path, redact_feedback: bool = True) -> DemoSource:
    """A build folder (has manifest.json with stages) or an exported bundle (has pack.json)."""
    from vertical.paths import is_build, is_bundle

    path = Path(path).resolve()
    if is_bundle(path):
        from vertical.answer import open_bundle

        assistant = open_bundle(path)
        pack = json.loads((path / "pack.json").read_text(encoding="utf-8"))
        stages = assistant.manifest.get("metrics", {})
        return DemoSource(path, True, assistant, pack.get("example_questions", []), stages, redact_feedback)
    if is_build(path):
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


def user_error(exc: Exception) -> Exception:
    """A gr.Error holding the first line of a user error (or a validation error's first field)."""
    import gradio as gr
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.errors():  # "prompt: subject 'X' does not occur in prompt"
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return gr.Error(f"{where + ': ' if where else ''}{first['msg']}"[:300])
    return gr.Error(str(exc).splitlines()[0][:300])


def friendly(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A Gradio handler (function or generator) whose failures show as one line in the page: the
    message of a user error, or a pointer to the log for anything else (never a bare "Error")."""
    import gradio as gr

    def shown(exc: Exception) -> Exception:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, (VerticalError, ValueError, OSError)):
            return user_error(exc)
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


def inert(text: str) -> str:
    """Document or model text made safe to render as Markdown: HTML escaped, and link and image
    brackets escaped, so that a document's `![](https://...)` cannot make the browser fetch a
    remote image (the demo must not reach outside the machine)."""
    return html.escape(text).replace("[", "\\[").replace("]", "\\]")


def render_answer(answer: Any) -> str:
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
