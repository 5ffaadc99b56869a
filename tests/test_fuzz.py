"""Fuzzing the two doors untrusted input comes through: the HTTP API and the document readers.

Whatever arrives, the answer is a JSON error with a 4xx status or a normal reply, never a 500, a
traceback or a hang. VERTICAL_FUZZ_EXAMPLES sets the number of cases per test (CI runs the
default; a longer pass is `VERTICAL_FUZZ_EXAMPLES=3000 pytest tests/test_fuzz.py`).
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("VERTICAL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

text = st.text(st.characters(codec=None, exclude_categories=()), max_size=60) | st.sampled_from(
    ["\ud800", "<|im_start|>system", "</sources>", "\x00", "é" * 40, "[INST]", "{}"])
json_value = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | text,
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                          max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x", ""]) | json_value,
                                 "content": text | json_value |
                                 st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                 "text": text | json_value}), max_size=3)})
body = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=4) | json_value},
    optional={"model": text | json_value, "max_tokens": st.integers(-5, 2**40) | json_value,
              "max_completion_tokens": st.integers(-5, 600) | json_value, "stream": st.booleans() | json_value,
              "temperature": json_value})


@pytest.fixture(scope="module")
def client(exported_build):
    from fastapi.testclient import TestClient

    from vertical.answer import open_bundle
    from vertical.export.server import Limits, create_app

    app = create_app(open_bundle(exported_build / "export"), None, Limits(max_tokens=8, default_max_tokens=4))
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as client:
        yield client


def _check(reply) -> None:
    assert reply.status_code in (200, 400, 404, 408, 413, 415), (reply.status_code, reply.text[:300])
    if reply.status_code != 200:
        assert set(reply.json()) == {"error"}
    elif reply.headers["content-type"].startswith("application/json"):
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    else:
        assert reply.text.rstrip().endswith("data: [DONE]")


@FUZZ
@given(request=body)
def test_the_api_answers_any_json_body_with_a_reply_or_a_4xx(client, request):
    _check(client.post("/v1/chat/completions", content=json.dumps(request).encode("utf-8", "surrogatepass"),
                       headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; x"]))
def test_the_api_answers_any_bytes_with_a_reply_or_a_4xx(client, raw, content_type):
    _check(client.post("/v1/chat/completions", content=raw, headers={"content-type": content_type} if content_type else {}))


# ---------------------------------------------------------------- document readers


def _samples() -> dict[str, bytes]:
    """A small valid file of each kind, the seed the mutations start from."""
    import docx
    from pypdf import PdfWriter

    document = docx.Document()
    document.add_heading("Leave policy", 1)
    document.add_paragraph("Staff get 25 days of leave a year.")
    buffer = io.BytesIO()
    document.save(buffer)
    pdf = io.BytesIO()
    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    writer.write(pdf)
    return {".docx": buffer.getvalue(), ".pdf": pdf.getvalue(),
            ".html": b"<html><head><title>T</title></head><body><h1>A</h1><table><tr><td>x</td></tr></table>"
                     b"<p>Leave is 25 days.</p></body></html>",
            ".jsonl": b'{"id": "a", "text": "Leave is 25 days.", "title": "T", "source": "s"}\n',
            ".md": b"# Leave\n\nStaff get 25 days.\n- one\n- two\n"}


SAMPLES = _samples()


@st.composite
def mutated(draw):
    suffix = draw(st.sampled_from(sorted(SAMPLES)))
    data = bytearray(SAMPLES[suffix])
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 32))] * draw(st.integers(1, 50))
    return suffix, bytes(data)


@FUZZ
@given(case=mutated())
def test_a_damaged_document_is_read_or_skipped_with_a_reason(tmp_path_factory, case):
    from vertical.index.documents import load_documents

    suffix, data = case
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / f"doc{suffix}"
    path.write_bytes(data)
    documents, problems = load_documents([path], folder)
    assert documents or problems
    for problem in problems:
        assert str(problem).startswith(str(path)) and "skipped" in str(problem)
    for document in documents:
        assert document.text.strip()


def test_a_docx_with_a_huge_entry_is_skipped_before_it_is_expanded(tmp_path, monkeypatch):
    from vertical.index import documents

    monkeypatch.setattr(documents, "MAX_DOCX_EXPANDED_BYTES", 10_000)
    path = tmp_path / "bomb.docx"
    with zipfile.ZipFile(io.BytesIO(SAMPLES[".docx"])) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for entry in source.infolist():
            out.writestr(entry, source.read(entry))
        out.writestr("word/media/filler.bin", b"\0" * 50_000)
    _, problems = documents.load_documents([path], tmp_path)
    assert problems and "zip bomb" in problems[0].message
