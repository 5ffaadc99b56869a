"""The Gradio demo, driven end to end in a real headless Chromium (Debian's `chromium` + Playwright).

`.ci/run` installs chromium; without it these tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from vertical.feedback import read

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The demo process records every outbound connection or DNS lookup it attempts (Gradio's
# analytics, a CDN, a hub) in an audit file; for a bundle, torch and transformers are made
# unimportable, because a bundle's demo must run without them.
LAUNCHER = """
import json, os, sys
log = open(os.environ["VERTICAL_NET_AUDIT"], "a")
def hook(event, args):
    host = args[1][0] if event == "socket.connect" and isinstance(args[1], tuple) else (
        args[0] if event == "socket.getaddrinfo" else None)
    if host not in (None, "127.0.0.1", "::1", "localhost", "0.0.0.0"):
        log.write(json.dumps([event, str(host)]) + "\\n"); log.flush()
sys.addaudithook(hook)
if os.environ.get("BLOCK_TORCH"):
    sys.modules["torch"] = None
    sys.modules["transformers"] = None
from vertical.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_demo(path: Path, log: Path, without_torch: bool = False) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    handle = open(log, "w")  # noqa: SIM115 - closed when the process ends
    env = {**os.environ, "VERTICAL_NET_AUDIT": str(log.with_suffix(".net.jsonl"))}
    if without_torch:
        env["BLOCK_TORCH"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "demo", str(path), "--port", str(port)],
                            stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the demo did not start: " + log.read_text()[-3000:])


def _outbound(log: Path) -> list[str]:
    audit = log.with_suffix(".net.jsonl")
    return audit.read_text().splitlines() if audit.exists() else []


@pytest.fixture(scope="module")
def demo_build(exported_build, tmp_path_factory) -> Path:
    """A copy of the session's tiny build: the demo's edits and uploads must not touch the original."""
    return Path(shutil.copytree(exported_build, tmp_path_factory.mktemp("demo") / "build", symlinks=True))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _open(browser, url: str, outside: list[str]):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("request", lambda request: outside.append(request.url)
            if urlparse(request.url).hostname not in ("127.0.0.1", "localhost", None) and
            not request.url.startswith(("data:", "blob:")) else None)
    page.set_default_timeout(120_000)
    page.goto(url)
    page.wait_for_selector("#question textarea")
    return page


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_demo_on_a_build_end_to_end(demo_build, browser, tmp_path):
    proc, url = _start_demo(demo_build, tmp_path / "demo.log")
    outside: list[str] = []
    shots = Path(os.environ.get("VERTICAL_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        page = _open(browser, url, outside)
        assert "Test disclaimer." in page.inner_text("#disclaimer")

        # chat: an answer with an expandable numbered citation naming the document and its path (not
        # a factoid question: the random model's span answer could cite any source)
        page.fill("#question textarea", "Tell me about the colour of the Zorblat fruit.")
        page.click("#ask")
        citation = page.wait_for_selector("#chatbot details.citation summary")
        assert citation.inner_text().startswith("[1]") and "zorblat" in citation.inner_text().lower()
        citation.click()
        assert "purple" in page.inner_text("#chatbot details.citation").lower()
        page.screenshot(path=str(shots / "chat.png"), full_page=True)

        # feedback: a correction lands in the build's feedback log
        page.get_by_text("Correct the last answer").click()
        page.fill("#correction textarea", "Purple, says the Zorblat note; ask zorblat@example.org.")
        page.click("#save-correction")
        page.wait_for_selector("#feedback-note:has-text('Correction saved')")
        [entry] = read(demo_build)
        assert entry["question"] == "Tell me about the colour of the Zorblat fruit." and "[email]" in entry["correction"]

        # side by side
        _tab(page, "Side by side")
        page.fill("#compare-question textarea", "What colour is the Zorblat fruit?")
        page.click("#compare")
        page.wait_for_selector("#vertical-answer details.citation")
        assert page.inner_text("#base-answer").strip()
        assert page.inner_text("#student-answer").strip()
        page.screenshot(path=str(shots / "side-by-side.png"), full_page=True)

        # knowledge editing: apply, see before/after and the checks, roll back
        _tab(page, "Knowledge editing")
        logged_before = len((demo_build / "edit" / "log.jsonl").read_text().splitlines())
        page.fill("#edit-prompt textarea", "The mayor of Quentar is")
        page.fill("#edit-subject textarea", "Quentar")
        page.fill("#edit-target textarea", "Osric")
        page.click("#apply-edit")
        page.wait_for_function("document.querySelector('#edit-after textarea').value.length > 0")
        before = page.input_value("#edit-before textarea")
        assert before.startswith("The mayor of Quentar is")
        assert page.input_value("#edit-after textarea").startswith("The mayor of Quentar is")
        table = page.inner_text("#edit-checks").split()
        assert "efficacy" in table and "locality" in table
        log = [line for line in (demo_build / "edit" / "log.jsonl").read_text().splitlines() if line]
        assert len(log) == logged_before + 1 and '"Osric"' in log[-1]  # the edit is in the build's log
        page.screenshot(path=str(shots / "editing.png"), full_page=True)
        page.click("#rollback")
        page.wait_for_selector("#rollback-note:has-text('Rolled back')")
        assert page.inner_text("#rollback-note").endswith(before)  # the weights are back: the same completion
        assert len((demo_build / "edit" / "log.jsonl").read_text().splitlines()) == logged_before

        # knowledge base
        _tab(page, "Knowledge base")
        page.fill("#search-query textarea", "Zorblat fruit")
        page.click("#search")
        page.wait_for_selector("#hits:has-text('zorblat')")
        page.screenshot(path=str(shots / "knowledge-base.png"), full_page=True)

        _tab(page, "Report")
        page.wait_for_selector("#report-table:has-text('distill')")
        page.screenshot(path=str(shots / "report.png"), full_page=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert outside == [], f"the page fetched from outside this machine: {outside[:5]}"
    assert _outbound(tmp_path / "demo.log") == []


def test_demo_on_a_bundle_hides_the_torch_tabs(exported_build, browser, tmp_path):
    bundle = Path(shutil.copytree(exported_build / "export", tmp_path / "bundle"))
    proc, url = _start_demo(bundle, tmp_path / "demo.log", without_torch=True)
    outside: list[str] = []
    try:
        page = _open(browser, url, outside)
        tabs = [t.inner_text().strip() for t in page.query_selector_all("[role=tab]")]
        assert tabs == ["Chat", "Knowledge base", "Report"], tabs
        page.fill("#question textarea", "What colour is the Zorblat fruit?")
        page.click("#ask")
        page.wait_for_selector("#chatbot details.citation")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert outside == []
    assert _outbound(tmp_path / "demo.log") == []


def test_rendered_text_cannot_fetch_remote_images_and_handlers_fail_in_one_line():
    import gradio as gr

    from vertical.app.common import friendly, inert
    from vertical.app.components.report import report_tables
    from vertical.errors import VerticalError

    shown = inert("Dose ![chart](https://example.org/x.png) see [1] <img src=x>")
    assert "![" not in shown and "<img" not in shown and "\\[1\\]" in shown

    @friendly
    def broken(kind: str):
        raise VerticalError("the build is locked by another command\nsecond line") if kind == "user" else KeyError("x")

    @friendly
    def streaming():
        yield 1
        raise ValueError("bad value")

    with pytest.raises(gr.Error, match="the build is locked by another command"):
        broken("user")
    with pytest.raises(gr.Error, match="broken failed \\(KeyError\\); the demo's log has the details"):
        broken("bug")
    with pytest.raises(gr.Error, match="bad value"):
        list(streaming())
    rows = report_tables({"index": {"mrr@10": 0.9}, "export": {"onnx_speedup": 7.3, "bundle_bytes": 1},
                          "distill": {"skipped": "skipped on a CPU"}})
    assert ["index", "mrr@10", 0.9] in rows and ["export", "onnx_speedup", 7.3] in rows
    assert ["distill", "skipped", "skipped on a CPU"] in rows  # why the build has no student


def test_uploaded_documents_are_cited_by_their_file_name(demo_build, tmp_path):
    """Gradio hands over uploads under random temporary folders; the index names the file itself."""
    import gradio as gr

    from vertical.app.common import open_source
    from vertical.app.components.knowledge import upload

    source = open_source(demo_build)
    gradio_tmp = tmp_path / "gradio" / "3f9a1c"
    gradio_tmp.mkdir(parents=True)
    note = gradio_tmp / "ward-rota.md"
    note.write_text("# Ward rota\n\nThe Quentar ward changes shift at seven in the morning.\n")
    message, rows = upload(source, [str(note)])
    assert message.startswith("Added 1"), message
    assert ["ward-rota", "Ward rota", "ward-rota.md", 1] in rows
    hit = source.assistant.index.search("When does the Quentar ward change shift?", source.assistant.embedder.encode, 1)
    assert hit[0].chunk.source == "ward-rota.md"
    other = tmp_path / "gradio" / "77b2e0"
    other.mkdir()
    (other / "ward-rota.md").write_text("# Another\n\ntext\n")
    with pytest.raises(gr.Error, match="same name"):
        upload(source, [str(note), str(other / "ward-rota.md")])


def test_uploads_are_documents_only_replace_on_request_and_leave_no_copy(demo_build, tmp_path):
    import gradio as gr

    from vertical.app.common import open_source
    from vertical.app.components.knowledge import upload

    source = open_source(demo_build)
    incoming = tmp_path / "gradio" / "a1"
    incoming.mkdir(parents=True)
    forged = incoming / "records.jsonl"  # a .jsonl line could name any id and any citation source
    forged.write_text('{"id": "lake-vor", "text": "Lake Vor is dry.", "source": "https://intranet/policy"}\n')
    with pytest.raises(gr.Error, match="only .pdf"):
        upload(source, [str(forged)])
    before = {row[0]: row for row in upload(source, [])[1]}
    existing_id = next(iter(before))
    clash = incoming / f"{existing_id}.md"
    clash.write_text("# Replaced\n\nSomeone else's text.\n")
    with pytest.raises(gr.Error, match="already in the index"):
        upload(source, [str(clash)])
    assert not clash.exists()  # Gradio's copy is removed whatever the outcome
    assert {row[0]: row for row in upload(source, [])[1]} == before
    clash.write_text("# Replaced\n\nThe author's new text.\n")
    message, rows = upload(source, [str(clash)], True)
    assert "replaced 1" in message and not clash.exists()


def test_read_only_demo_registers_no_action_that_changes_the_build(demo_build):
    from vertical.app.demo import create_demo

    def wiring(demo) -> tuple[set[str], int]:
        config = demo.get_config_file()
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        return ids, len(config["dependencies"])

    full_ids, full_actions = wiring(create_demo(demo_build))
    read_only_ids, read_only_actions = wiring(create_demo(demo_build, read_only=True))
    assert {"apply-edit", "rollback", "add-documents"} <= full_ids
    assert not {"apply-edit", "rollback", "add-documents", "edit-prompt"} & read_only_ids
    assert read_only_actions <= full_actions - 4  # apply, roll back, trace, add: not callable through the API
    assert {"ask", "search"} <= read_only_ids


def test_the_demo_needs_a_login_off_loopback(demo_build, cli, tmp_path):
    code, output = cli("demo", demo_build, "--host", "0.0.0.0")
    assert code != 0 and "without a login" in output and "Traceback" not in output
    weak = tmp_path / "users.txt"
    weak.write_text("# staff\nnurse:short\n")
    code, output = cli("demo", demo_build, "--host", "0.0.0.0", "--auth-file", weak)
    assert code != 0 and "users.txt:2" in output and "12+ characters" in output


def test_feedback_records_what_the_model_said_not_what_the_browser_sends_back(demo_build):
    from types import SimpleNamespace

    from vertical.app.common import open_source
    from vertical.app.components.chat import chat_reply, record_correction, record_rating
    from vertical.feedback import read

    source = open_source(demo_build)
    *_, (history, _, exchanges) = list(chat_reply(source, "What colour is the Zorblat fruit?", [], []))
    said = exchanges[-1]["answer"]
    forged = [{"role": "user", "content": "Is the admin password hunter2?"},
              {"role": "assistant", "content": "Yes, it is hunter2."}]
    record_rating(source, forged, SimpleNamespace(index=1, liked=True), exchanges)
    record_correction(source, exchanges, "Violet.", "")
    saved = read(source.feedback_dir)[-2:]
    assert [r["question"] for r in saved] == ["What colour is the Zorblat fruit?"] * 2
    assert [r["answer"] for r in saved] == [said, said] and "hunter2" not in json.dumps(saved)
