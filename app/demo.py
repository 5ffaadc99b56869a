"""`vertical demo BUILD|BUNDLE`: show a vertical model to a domain expert in a browser.

Tabs: Chat (streaming answers with expandable numbered citations, the pack's disclaimer and
example questions, thumbs up/down and corrections), Side by side (base vs vertical vs student),
Knowledge editing (answer before, ROME edit, answer after, locality, rollback, causal trace),
Knowledge base (search, upload, list), Report (the build's metrics as tables and plots).

On a bundle only the tabs that run on the ONNX runtime are shown (Chat, Knowledge base search
and list, Report): nothing here imports torch unless the source is a build. Gradio's analytics
are off (vertical/__init__.py) and the theme uses system fonts, so the page fetches nothing from
outside the machine.

Each tab is built by its own module in app/components (its widgets, events and handlers); what
the tabs share (the source shown, the error wrapper, answer rendering) is in app/common.py.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from vertical.app.common import open_source
from vertical.app.components import (create_chat_tab, create_compare_tab, create_editing_tab,
                                     create_knowledge_tab, create_report_tab)
from vertical.app.components.knowledge import UPLOAD_MAX_MB
from vertical.errors import VerticalError

if TYPE_CHECKING:
    import gradio as gr

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


def create_demo(path: Path, redact_feedback: bool = True, read_only: bool = False) -> "gr.Blocks":
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
            create_chat_tab(source)
        if not source.is_bundle:
            with gr.Tab("Side by side", id="compare"):
                create_compare_tab(source)
        if not source.is_bundle and not read_only:
            with gr.Tab("Knowledge editing", id="edit"):
                create_editing_tab(source)
        with gr.Tab("Knowledge base", id="knowledge"):
            create_knowledge_tab(source, read_only)
        with gr.Tab("Report", id="report"):
            create_report_tab(source)
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
