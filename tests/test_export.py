"""Export stage and the torch-free runtime: bundle contents, verification, the OpenAI-style API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from vertical.export.bundle import BundleInvalid, verify

QUESTION = "What colour is the Zorblat fruit?"


@pytest.fixture(scope="module")
def bundle(exported_build) -> Path:
    return exported_build / "export"


@pytest.fixture(scope="module")
def assistant(bundle):
    from vertical.answer import open_bundle

    return open_bundle(bundle)


def _client(assistant, **kwargs):
    from fastapi.testclient import TestClient

    from vertical.export.server import Limits, create_app

    limits = Limits(**{k: v for k, v in kwargs.items() if k not in ("api_key", "allowed_hosts")})
    hosts = kwargs.get("allowed_hosts", ("127.0.0.1", "localhost", "::1"))
    return TestClient(create_app(assistant, kwargs.get("api_key"), limits, hosts), base_url="http://127.0.0.1:8000")


def _chat(content: str = QUESTION, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}


# ---------------------------------------------------------------- the bundle


def test_bundle_lists_every_file_with_its_hash(bundle):
    manifest = verify(bundle)
    files = manifest["files"]
    for needed in ("model/model.onnx", "model/genai_config.json", "embedder/model.onnx", "embedder/tokenizer.json",
                   "index/chunks.jsonl", "index/faiss.index", "pack.json"):
        assert needed in files and len(files[needed]["sha256"]) == 64
    assert manifest["model"] == {"role": "student", "source": "distill/model", "quant": "int8",
                                 "vocabulary": manifest["metrics"]["export"]["vocabulary_size"]}
    assert {"onnxruntime", "onnxruntime-genai", "vertical"} <= set(manifest["versions"])
    export = manifest["metrics"]["export"]
    assert export["bundle_bytes"] == sum(f["bytes"] for f in files.values())
    # a model this small is not worth an int4 build (see INT4_FROM_PARAMETERS)
    assert set(export["agreement_by_quant"]) == {"fp32", "int8"} and export["quant_candidates"] == ["int8"]
    assert export["onnx_tokens_per_s"] > 0 and export["torch_tokens_per_s"] > 0
    # the tiny model's whole vocabulary is its pack's (vocabulary: pack keeps it all), so nothing may change
    assert export["vocabulary_size"] == export["vocabulary_full_size"] and export["vocabulary_agreement"] == 1.0
    assert export["vocabulary"] == "pack" and "model/vocabulary.json" in files
    assert manifest["metrics"]["build"]["distill"]["student_layers"] == 2
    pack = json.loads((bundle / "pack.json").read_text())
    assert pack["disclaimer"] == "Test disclaimer." and pack["system_prompt"]


def test_the_bundles_embedder_returns_vectors_in_the_texts_order(bundle):
    import numpy as np

    from vertical.export.runtime import OnnxEmbedder

    texts = ["a long text about the notice period of a supply agreement and how it renews", "short", "",
             "a text of middling length", "tiny"]
    embedder = OnnxEmbedder(bundle / "embedder")
    together = embedder.encode(texts)
    alone = np.concatenate([embedder.encode([t]) for t in texts])
    # one text per run: a text's vector is the same whatever it is embedded with
    assert np.array_equal(together, alone)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    similarity = together @ together.T
    assert list(similarity.argmax(1)) == list(range(len(texts)))
    # in batches the int8 graph quantises a batch's activations with one scale: vectors move with
    # their batchmates (cosine 0.97-1.0 here), but each must still be its own text's
    batched = embedder.encode(texts, batch_size=2)
    assert list((batched @ alone.T).argmax(1)) == list(range(len(texts)))


@pytest.mark.parametrize("setting, retention, role", [
    ("auto", 0.95, "student"), ("auto", 0.43, "teacher"), ("auto", None, "teacher"),  # never unmeasured
    ("student", 0.43, "student"), ("teacher", 0.95, "teacher")])
def test_auto_exports_the_student_only_if_it_kept_the_teachers_score(tmp_path, setting, retention, role):
    from vertical.export import model_to_export
    from vertical.pack.schema import ExportSettings

    for folder in ("edit/model", "distill/model"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    (tmp_path / "distill" / "metrics.json").write_text(json.dumps({"retention": retention}))
    folder, chosen, reason = model_to_export(tmp_path, ExportSettings(model=setting))
    assert chosen == role and reason
    assert folder == tmp_path / ("distill/model" if role == "student" else "edit/model")


@pytest.mark.parametrize("damage", ["alter", "truncate", "delete", "add"])
def test_tampered_bundle_is_refused_naming_the_file(bundle, tmp_path, damage, cli):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    target = copy / "index" / "chunks.jsonl"
    if damage == "add":  # the runtime opens these folders whole: an unlisted file could be loaded
        target = copy / "index" / "chunks.extra.jsonl"
        target.write_text("{}\n")
    elif damage == "alter":
        target.write_text(target.read_text().replace("Zorblat", "Zorblax", 1))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    with pytest.raises(BundleInvalid, match=target.relative_to(copy).as_posix()):
        verify(copy)
    code, output = cli("ask", copy, QUESTION)
    assert code == 1 and target.relative_to(copy).as_posix() in output and "Traceback" not in output


def test_damaged_manifest_or_a_bundle_given_for_a_build_is_one_line(bundle, tmp_path, cli):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    code, output = cli("export", copy)  # would have rebuilt stages inside the bundle
    assert code == 1 and "is an exported bundle, not a build folder" in output and "Traceback" not in output
    verify(copy)  # untouched
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text()[:100])
    for command in (["ask", copy, QUESTION], ["verify", copy]):
        code, output = cli(*command)
        assert code == 1 and "manifest.json" in output and "Traceback" not in output, output


def test_verify_command_lists_exactly_the_files_that_differ(bundle, tmp_path, cli):
    code, output = cli("verify", bundle)
    assert code == 0 and "ok: all" in output, output
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    (copy / "pack.json").write_text((copy / "pack.json").read_text().replace("Test disclaimer.", "Changed."))
    (copy / "index" / "chunks.jsonl").unlink()
    code, output = cli("verify", copy)
    differs = sorted(line.split()[1].rstrip(":") for line in output.splitlines() if line.startswith("DIFFERS"))
    assert code == 1 and differs == ["index/chunks.jsonl", "pack.json"], output
    assert "2 of" in output and "Traceback" not in output


def test_manifest_that_is_not_json_or_escapes_the_bundle_is_refused(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = {"bytes": 1, "sha256": "0" * 64}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleInvalid, match="outside the bundle"):
        verify(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleInvalid, match="not valid JSON"):
        verify(copy)
    with pytest.raises(BundleInvalid, match="no manifest.json"):
        verify(tmp_path)


def test_runtime_never_imports_torch_or_transformers(bundle):
    code = f"""
import sys
from fastapi.testclient import TestClient
from vertical.answer import open_bundle
from vertical.export.server import create_app
client = TestClient(create_app(open_bundle({str(bundle)!r})), base_url="http://localhost")
reply = client.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": {QUESTION!r}}}], "max_tokens": 8}})
assert reply.status_code == 200, reply.text
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sentence_transformers"))
print("HEAVY", heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout


def test_the_second_reading_continues_the_answers_own_generator(assistant, monkeypatch):
    """The bundle's second reading of an answer starts from the generator that wrote it, rewound to
    the prompt, and scores the spans exactly as a generator that reads the prompt anew."""
    from vertical.export.runtime import OnnxPrefilled

    model = assistant.model
    ids = model.prompt_ids([{"role": "user", "content": QUESTION}])
    paths = [model.piece_ids(text) for text in ("purple [1]", "purple and round [1]", "Quentar [2]")]
    fresh = OnnxPrefilled.read(model, ids)
    expected_first, expected = fresh.first.copy(), fresh.follow(paths)
    other = model.prompt_ids([{"role": "user", "content": "Where is Quentar?"}])
    other_expected = OnnxPrefilled.read(model, other).follow(paths)
    for pieces in (model.stream_ids(ids, 80), model.stream_ids(other, 80)):
        next(pieces)
        pieces.close()  # stopped early, as an answer cut after two sentences
    monkeypatch.setattr(OnnxPrefilled, "read", classmethod(lambda *args, **kwargs: pytest.fail("read anew")))
    assert model.prefill(other).follow(paths) == other_expected  # the last answer's prompt: its generator
    monkeypatch.undo()
    assert model.prefill(ids).follow(paths) == expected  # not the last answer's prompt: read anew
    "".join(model.stream_ids(ids, 80))
    monkeypatch.setattr(OnnxPrefilled, "read", classmethod(lambda *args, **kwargs: pytest.fail("read anew")))
    reused = model.prefill(ids)
    assert np.array_equal(reused.first, expected_first) and reused.follow(paths) == expected
    assert reused.follow(paths[::-1]) == expected[::-1]  # rewound after each path, not left at the answer


def test_ask_accepts_a_bundle(bundle, cli):
    code, output = cli("ask", bundle, QUESTION, "--max-tokens", "8")
    assert code == 0, output
    # the random model's answer may be a span of either document (the second reading): it cites that one
    assert re.search(r"^\[\d\] The (Zorblat fruit|valley of Quentar) — documents/", output, re.M), output
    assert "Test disclaimer." in output


def test_ask_json_gives_the_answer_its_citations_and_evidence_apart(bundle, cli):
    code, output = cli("ask", bundle, QUESTION, "--max-tokens", "8", "--json")
    assert code == 0, output
    reply = json.loads(output.strip().splitlines()[-1])
    assert set(reply) >= {"answer", "citations", "evidence"}
    titles = {"zorblat": "The Zorblat fruit", "quentar": "The valley of Quentar"}
    assert all(titles.get(c["doc_id"]) == c["title"] for c in reply["citations"]) and reply["citations"]
    assert all(set(e) == {"doc_id", "span", "text"} for e in reply["evidence"]) and reply["evidence"]
    text = (Path(bundle) / "index" / "chunks.jsonl").read_text()
    assert all(e["text"] in text for e in reply["evidence"])
    assert all(e["text"] not in reply["answer"] for e in reply["evidence"]) or reply["fallback"]


@pytest.mark.slow
def test_export_cli_other_quant_and_out(exported_build, tmp_path, cli):
    code, output = cli("export", exported_build, "--quant", "int4", "--out", tmp_path / "b4")
    assert code == 0, output
    manifest = verify(tmp_path / "b4")
    assert manifest["model"]["quant"] == "int4"
    assert manifest["metrics"]["export"]["quant_candidates"] == ["int4"]
    code, output = cli("export", exported_build, "--quant", "int3")
    assert code == 1 and "--quant int3" in output
    code, output = cli("export", exported_build, "--out", tmp_path / "b4")
    assert code == 1 and "not an empty folder" in output


# ---------------------------------------------------------------- the API


def test_health_and_models(assistant):
    client = _client(assistant)
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny"


def test_chat_completion_returns_answer_sources_and_usage(assistant):
    reply = _client(assistant).post("/v1/chat/completions", json=_chat())
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert body["sources"][0]["title"] == "The Zorblat fruit" and body["sources"][0]["text"]
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["completion_tokens"] <= 12
    # the same question asked through the library gives the same (greedy) text
    direct = assistant.ask(QUESTION, max_new_tokens=12)
    assert choice["message"]["content"] == direct.text
    # the evidence the answer rests on: sentences of the sources, with document spans
    assert body["evidence"] and all(e["text"] in " ".join(s["text"] for s in body["sources"]) for e in body["evidence"])
    assert all(e["span"][1] - e["span"][0] == len(e["text"]) for e in body["evidence"])
    assert body["faithful"] in (True, False) and body["fallback"] == (not body["faithful"])


def test_streaming_sends_sources_then_tokens_then_done(assistant):
    client = _client(assistant)
    whole = client.post("/v1/chat/completions", json=_chat()).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert events[0]["sources"] and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    # an answer the evidence does not back is followed by the quote that replaces it (the last event's `answer`)
    assert (events[-1].get("answer") or text.strip()) == whole and events[-1]["evidence"]


def test_api_key_is_required_when_configured(assistant):
    client = _client(assistant, api_key=["s3cret-key-number-one", "s3cret-key-number-two"])
    assert client.get("/health").status_code == 200  # liveness stays open for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key-number-one"}):
        reply = client.post("/v1/chat/completions", json=_chat(), headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers=headers).status_code == 401
        assert client.get("/metrics", headers=headers).status_code == 401
    for key in ("s3cret-key-number-one", "s3cret-key-number-two"):  # every key of the file is accepted
        ok = client.post("/v1/chat/completions", json=_chat(), headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200


def test_a_key_less_server_answers_only_requests_addressed_to_this_machine(assistant):
    """DNS rebinding: a web page that points its own name at 127.0.0.1 sends that name as the Host."""
    client = _client(assistant)
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        reply = client.post("/v1/chat/completions", json=_chat(), headers={"host": host})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_host", host
        assert client.get("/v1/models", headers={"host": host}).status_code == 400
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
    listed = _client(assistant, allowed_hosts=["127.0.0.1", "vertical.ward7.internal"])
    assert listed.get("/v1/models", headers={"host": "vertical.ward7.internal:8000"}).status_code == 200


def test_the_body_must_be_declared_json(assistant):
    """A cross-site form post (text/plain, form-urlencoded) cannot reach the model."""
    client = _client(assistant)
    body = json.dumps(_chat()).encode()
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        headers = {"content-type": content_type} if content_type else {}
        reply = client.post("/v1/chat/completions", content=body, headers=headers)
        assert reply.status_code == 415 and reply.json()["error"]["code"] == "unsupported_media_type"
    ok = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_a_lone_surrogate_is_a_400_not_a_500(assistant, caplog):
    reply = _client(assistant).post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": '
                                    b'"hi \\ud800"}]}', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "surrogate" in reply.json()["error"]["message"]
    assert "Traceback" not in caplog.text


def test_metrics_count_requests_latency_and_tokens(assistant):
    client = _client(assistant)
    client.post("/v1/chat/completions", json=_chat())
    client.post("/v1/chat/completions", json={"messages": []})
    text = client.get("/metrics").text
    assert 'vertical_requests_total{path="/v1/chat/completions",status="200"} 1.0' in text
    assert 'vertical_requests_total{path="/v1/chat/completions",status="400"} 1.0' in text
    assert 'vertical_request_seconds_count{path="/v1/chat/completions"} 2.0' in text
    generated = [line for line in text.splitlines() if line.startswith("vertical_completion_tokens_total")]
    assert generated and 0 < float(generated[0].split()[-1]) <= 12
    assert "vertical_requests_waiting 0.0" in text


def test_metrics_parse_as_prometheus_text_with_errors_and_time_to_first_token(assistant):
    from prometheus_client.parser import text_string_to_metric_families

    client = _client(assistant)
    client.post("/v1/chat/completions", json=_chat())
    client.post("/v1/completions", json={"prompt": "The Zorblat fruit is", "max_tokens": 4})
    client.post("/v1/search", json={"query": ""})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("vertical_errors_total", (("path", "/v1/search"), ("status", "400")))] == 1
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert samples[("vertical_time_to_first_token_seconds_count", (("path", path),))] == 1
    assert ("vertical_requests_waiting", ()) in samples


def _openai(assistant):
    import openai

    return openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:8000/v1", http_client=_client(assistant),
                         max_retries=0)


def test_the_openai_client_gets_the_bundles_embeddings(assistant):
    import numpy as np
    import openai

    client = _openai(assistant)
    models = [m.id for m in client.models.list()]
    texts = ["The Zorblat fruit is purple.", "A second text."]
    result = client.embeddings.create(model=models[1], input=texts)  # the client asks for base64
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, assistant.embedder.dim) and result.usage.prompt_tokens > 0
    assert np.allclose(vectors, assistant.embedder.encode(texts), atol=1e-6)
    plain = _client(assistant).post("/v1/embeddings", json={"input": "The Zorblat fruit is purple.",
                                                            "encoding_format": "float"}).json()
    assert np.allclose(plain["data"][0]["embedding"], vectors[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="token arrays"):
        client.embeddings.create(model=models[1], input=[[1, 2, 3]])


def test_completions_continue_the_prompt_and_honour_stop(assistant):
    client = _openai(assistant)
    full = client.completions.create(model=assistant.name, prompt="The Zorblat fruit is", max_tokens=6)
    assert full.object == "text_completion" and full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"
    text = full.choices[0].text
    stop = text.strip()[:2]
    if stop:
        cut = client.completions.create(model=assistant.name, prompt="The Zorblat fruit is", max_tokens=6, stop=[stop])
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_search_endpoint_gives_the_same_top_five_as_vertical_search(exported_build, assistant, cli):
    query = "Zorblat fruit colour"
    code, out = cli("search", str(exported_build), query, "--json")
    assert code == 0
    expected = [(r["doc_id"], r["chunk_id"], r["span"]) for r in json.loads(out)["results"]]
    reply = _client(assistant).post("/v1/search", json={"query": query, "k": 5})
    assert reply.status_code == 200
    got = [(r["doc_id"], r["chunk_id"], r["span"]) for r in reply.json()["data"]]
    assert got == expected and len(got) == min(5, len(assistant.index.chunks))
    bad = _client(assistant).post("/v1/search", json={"query": query, "top_k": 3})
    assert bad.status_code == 400 and "top_k" in bad.json()["error"]["message"]


def test_json_access_log_is_one_line_per_request(assistant, caplog):
    from fastapi.testclient import TestClient

    from vertical.export.server import create_app

    client = TestClient(create_app(assistant, access_log=True), base_url="http://127.0.0.1:8000")
    with caplog.at_level("INFO", logger="vertical.access"):
        client.get("/health")
        client.post("/v1/search", json={"query": "fruit"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "vertical.access"]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [("GET", "/health", 200),
                                                                                   ("POST", "/v1/search", 200)]


def test_serving_is_refused_on_an_open_address_without_a_long_enough_key(bundle, cli, tmp_path):
    from vertical.errors import VerticalError
    from vertical.export.server import check_serving

    with pytest.raises(VerticalError, match="without an API key"):
        check_serving("0.0.0.0", [])
    with pytest.raises(VerticalError, match="at least 16"):
        check_serving("127.0.0.1", ["short"])
    check_serving("127.0.0.1", [])  # loopback alone may go without a key
    check_serving("0.0.0.0", ["a-key-of-enough-characters"])
    code, output = cli("serve", str(bundle), "--host", "0.0.0.0")
    assert code != 0 and "without an API key" in output and "Traceback" not in output
    keys = tmp_path / "keys.txt"
    keys.write_text("# one per line\n\nshort\n")
    code, output = cli("serve", str(bundle), "--api-key-file", str(keys))
    assert code != 0 and "at least 16" in output


def test_a_body_or_head_that_never_arrives_does_not_hold_the_connection(assistant):
    """A client that sends headers and then withholds its body gets 408 once the body deadline
    passes; one that never finishes its headers is disconnected at the head deadline."""
    import socket
    import time

    import uvicorn

    from vertical.export.server import Limits, create_app

    from vertical.export.server import header_deadline_protocol

    app = create_app(assistant, None, Limits(body_seconds=1.0), ["127.0.0.1"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           http=header_deadline_protocol(1.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            started = time.monotonic()
            reply = sock.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and time.monotonic() - started < 5, reply
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # slowloris: headers never end
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            assert sock.recv(4096) == b""  # closed by the server
            assert time.monotonic() - started < 5
    finally:
        server.should_exit = True
        thread.join(10)


BAD_REQUESTS = [
    ("empty message list", {"messages": []}, 400, "messages"),
    ("too many messages", {"messages": [{"role": "user", "content": "hi"}] * 65}, 400, "at most 64"),
    ("message too long", {"messages": [{"role": "user", "content": "x" * 9000}]}, 400, "longer than"),
    ("max_tokens 0", _chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens 10^9", _chat(max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens not a number", _chat(max_tokens="many"), 400, "max_tokens"),
    ("last message from assistant", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
    ("blank question", {"messages": [{"role": "user", "content": "   "}]}, 400, "non-empty"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("content not a string", {"messages": [{"role": "user", "content": {"a": 1}}]}, 400, "content"),
    ("messages missing", {"model": "tiny"}, 400, "messages"),
    ("unknown model", _chat(model="gpt-9"), 404, "gpt-9"),
    ("body is a list", [1, 2], 400, "JSON object"),
    ("max_completion_tokens 0", _chat(max_completion_tokens=0), 400, "max_tokens"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "text content parts"),
]


@pytest.mark.parametrize("name,body,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_json_error(assistant, name, body, status, words):
    reply = _client(assistant).post("/v1/chat/completions", json=body)
    assert reply.status_code == status, reply.text
    assert words in reply.json()["error"]["message"]


def test_malformed_json_and_oversized_body(assistant):
    client = _client(assistant, max_body_bytes=2000)
    reply = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    reply = client.post("/v1/chat/completions", content=b"[" * 1500, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "error" in reply.json()
    reply = client.post("/v1/chat/completions", json=_chat("x" * 5000))
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()


def test_openai_content_parts_are_read_as_text(assistant):
    client = _client(assistant)
    plain = client.post("/v1/chat/completions", json=_chat()).json()
    parts = client.post("/v1/chat/completions", json={"messages": [
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]}], "max_tokens": 12}).json()
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_a_full_queue_is_turned_away_with_503_before_any_work(assistant):
    reply = _client(assistant, max_waiting=0).post("/v1/chat/completions", json=_chat())
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "overloaded"


def test_concurrent_clients_get_their_own_answers(assistant):
    questions = [QUESTION, "Where does the Siln river flow?", "Who is the mayor of Quentar?", "Tell me about Lake Vor."]
    got: dict[int, tuple[str, str]] = {}
    # `with`: one event loop serves every request, as under uvicorn (without it TestClient starts a
    # loop per request, and an asyncio semaphore cannot be shared between loops)
    with _client(assistant, max_concurrent=2) as client:
        expected = {q: client.post("/v1/chat/completions", json=_chat(q)).json()["choices"][0]["message"]["content"]
                    for q in questions}

        def ask(i: int) -> None:
            question = questions[i % len(questions)]
            reply = client.post("/v1/chat/completions", json=_chat(question))
            got[i] = (question, reply.json()["choices"][0]["message"]["content"])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert client.get("/health").json()["waiting"] == 0  # every admitted request left the queue
    assert len(got) == 12
    for question, text in got.values():
        assert text == expected[question]


def test_client_disconnect_mid_stream_frees_its_slot(assistant):
    client = _client(assistant, max_concurrent=1)
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True, max_tokens=64)) as reply:
        for line in reply.iter_lines():
            if '"content"' in line:
                break  # leave after the first token
    # with one slot, a leaked slot would block this request forever
    reply = client.post("/v1/chat/completions", json=_chat(), timeout=60)
    assert reply.status_code == 200
    health = client.get("/health").json()
    assert health["running"] == 0 and health["waiting"] == 0


# ---------------------------------------------------------------- who made the bundle


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.mark.slow
def test_a_signed_bundle_is_trusted_only_with_its_own_key(exported_build, tmp_path, cli):
    from vertical.export.bundle import check_signature, sign
    from vertical.answer import open_bundle
    from vertical.pipeline import load_manifest

    build = tmp_path / "build"
    shutil.copytree(exported_build, build)
    ours, ours_public = _key_pair(tmp_path, "ours")
    theirs, theirs_public = _key_pair(tmp_path, "theirs")
    code, output = cli("export", build, "--sign", ours)
    assert code == 0 and "signed with key" in output, output
    bundle = build / "export"
    assert "signature.json" in load_manifest(build)["stages"]["export"]["files"]  # the next build keeps it
    code, output = cli("verify", bundle, "--key", ours_public)
    assert code == 0 and "signed by key" in output, output
    code, output = cli("verify", bundle, "--key", theirs_public)
    assert code != 0 and "does not match" in output and "Traceback" not in output
    # someone who can write the bundle re-signs it with their own key: refused
    sign(bundle, theirs)
    with pytest.raises(BundleInvalid, match="does not match"):
        open_bundle(bundle, public_key=ours_public)
    # or edits the manifest after signing (its hashes then describe other files): refused
    sign(bundle, ours)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["metrics"] = {"qa": 1.0}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleInvalid, match="does not match"):
        check_signature(bundle, ours_public)
    (bundle / "signature.json").unlink()
    code, output = cli("serve", bundle, "--require-signature", ours_public)
    assert code != 0 and "not signed" in output and "Traceback" not in output
    code, output = cli("verify", bundle, "--key", ours)  # a private key where the public one belongs
    assert code != 0 and "Ed25519 public key" in output


def test_a_bundle_that_names_native_code_is_refused(bundle, tmp_path):
    from vertical.export.bundle import list_files

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    config = copy / "model" / "genai_config.json"
    settings = json.loads(config.read_text())
    settings["model"]["decoder"]["session_options"] = {"custom_ops_library": "/tmp/evil.so"}
    config.write_text(json.dumps(settings))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = list_files(copy)  # the hashes rewritten, as anyone with write access can
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleInvalid, match="custom_ops_library"):
        verify(copy)



def test_a_stream_whose_client_leaves_while_a_chunk_is_sent_is_closed_at_once():
    """The client leaves while the server waits to send a chunk (a full socket): the stream's
    generator, whose `finally` frees the generation slot, is closed when the response ends, not
    whenever the garbage collector finds it."""
    import asyncio

    from vertical.export.server import ClosingStreamingResponse

    freed = []

    async def chunks():
        try:
            for n in range(100):
                yield f"data: {n}\n\n"
        finally:
            freed.append(True)

    async def leave_mid_stream() -> None:
        second_chunk, gone = asyncio.Event(), asyncio.Event()
        sent = []

        async def receive() -> dict:
            await second_chunk.wait()
            gone.set()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:  # as uvicorn's: waits until a full socket drains or closes
            sent.append(message)
            if len(sent) == 3:
                second_chunk.set()
                await gone.wait()
                await asyncio.sleep(3600)  # cancelled by the response once it sees the disconnect

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
        await asyncio.wait_for(ClosingStreamingResponse(chunks())(scope, receive, send), 30)
        assert freed, "the generator was left open"

    asyncio.run(leave_mid_stream())


def test_the_vocabulary_check_read_in_one_pass_finds_the_first_difference_generating_finds(tmp_path, tiny_model_dir):
    import torch

    from vertical.export import AGREEMENT_TOKENS, vocabulary_agreement
    from vertical.export.convert import prefix_agreement
    from vertical.generation import chat_prompt_ids, greedy_ids
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.models.vocabulary import trim_vocabulary

    def shaken(model, scale: float):  # the fixture's model writes one token forever; shaken, it writes many
        with torch.no_grad():
            for layer in model.model.layers:
                for weight in layer.parameters():
                    if weight.dim() == 2:
                        weight.add_(scale * torch.randn_like(weight))
        return model

    torch.manual_seed(0)
    full_dir = tmp_path / "full"
    shutil.copytree(tiny_model_dir, full_dir)
    full_model = shaken(load_causal_lm(full_dir), 0.5)
    full_model.save_pretrained(full_dir)
    prompts = [[{"role": "user", "content": text}] for text in ("What colour is the Zorblat fruit?", "blue blue",
                                                                 "Who is the mayor of Quentar?", "Quentar")]
    # the prompts read the same in both vocabularies; what the model writes may leave the cut one
    texts = [load_tokenizer(full_dir).apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    trimmed = trim_vocabulary(full_dir, texts, tmp_path / "cut", core_merges=0)
    assert trimmed.size < trimmed.full_size
    cut_model = load_causal_lm(tmp_path / "cut")
    full_tokenizer, cut_tokenizer = load_tokenizer(full_dir), load_tokenizer(tmp_path / "cut")
    generated = []
    for messages in prompts:  # what generating with each model gives
        full = list(greedy_ids(full_model, chat_prompt_ids(full_tokenizer, messages), AGREEMENT_TOKENS))
        cut = list(greedy_ids(cut_model, chat_prompt_ids(cut_tokenizer, messages), AGREEMENT_TOKENS))
        generated.append(prefix_agreement(full, [trimmed.kept[i] for i in cut]))
    assert 0 < max(generated) and min(generated) < 1  # differences to find, some after agreeing a while
    expected = round(sum(generated) / len(generated), 4)
    assert vocabulary_agreement(full_dir, tmp_path / "cut", trimmed.kept, prompts) == expected
    # a pack without questions to check on (documents alone) has nothing agreed: the cut is not shipped
    assert vocabulary_agreement(full_dir, tmp_path / "cut", trimmed.kept, []) == 0.0


@pytest.mark.slow
def test_a_pack_of_documents_alone_builds_a_bundle(cli, tmp_path, tiny_model_dir):
    """What a customer with a folder of documents does: `packs init --docs`, then a build through
    export. Such a pack has no questions of its own, so the export's checks run on none."""
    from vertical import pipeline

    docs = tmp_path / "docs"
    docs.mkdir()
    for number in range(4):
        (docs / f"policy-{number}.md").write_text(
            f"# Policy {number}\n\nStaff in team {number} get {20 + number} days of leave a year. "
            f"Requests go to the team {number} manager at least {number + 2} weeks ahead.\n", encoding="utf-8")
    code, output = cli("packs", "init", "acme", "--docs", docs, "--dir", tmp_path / "acme")
    assert code == 0, output
    pipeline.build(tmp_path / "acme", out=tmp_path / "build", steps=["export"], base_model=str(tiny_model_dir))
    verify(tmp_path / "build" / "export")
    metrics = json.loads((tmp_path / "build" / "export" / "metrics.json").read_text())
    assert metrics["vocabulary_size"] == metrics["vocabulary_full_size"]  # nothing checked, nothing cut
