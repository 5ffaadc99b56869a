"""Pack schema, loader and `vertical packs` commands, including the bad-input battery."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vertical.pack import load_pack, shipped_pack_names, validate_pack


def test_tiny_pack_is_valid_and_loads_records(tiny_pack):
    pack, problems = validate_pack(tiny_pack)
    assert problems == []
    assert len(pack.instructions()) == 4
    # alpaca with input joins instruction and input; sharegpt turns map to chat roles
    roles = [m.role for m in pack.instructions()[2]]
    assert roles == ["user", "assistant"]
    assert "[1] The Siln river" in pack.instructions()[3][0].content
    assert pack.edits()[0].target_new == "Bram Kett"
    qa = pack.qa_eval()
    assert qa[0].gold == "purple" and qa[1].gold == "no"
    assert {p.name for p in pack.document_files()} == {"zorblat.md", "quentar.md", "extra.jsonl"}


@pytest.mark.parametrize("name", ["medical", "legal", "finance", "games"])
def test_shipped_packs_validate(name):
    assert name in shipped_pack_names()
    _, problems = validate_pack(name)
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("name", ["medical", "legal", "finance", "games"])
def test_shipped_packs_meet_the_content_aims(name):
    """At least 40 documents (a JSONL document file holds one per line), 200 instruction
    examples, 20 edits and 50 evaluation items, with their sources recorded."""
    pack = load_pack(name)

    def documents_in(file: Path) -> int:
        return sum(1 for line in file.open(encoding="utf-8") if line.strip()) if file.suffix == ".jsonl" else 1

    counts = {"documents": sum(documents_in(f) for f in pack.document_files()),
              "instructions": len(pack.instructions()), "edits": len(pack.edits()), "qa_eval": len(pack.qa_eval())}
    aims = {"documents": 40, "instructions": 200, "edits": 20, "qa_eval": 50}
    assert all(counts[k] >= aims[k] for k in aims), f"{name}: {counts} (aims {aims})"
    assert all(e.rephrase and e.locality for e in pack.edits())
    assert (pack.root / "SOURCES.md").is_file()


@pytest.mark.parametrize("name", ["legal", "finance", "games"])
def test_shipped_packs_edits_change_the_documents_that_state_the_old_value(name):
    """These packs' documents state the values before the edits: every edit carries the document
    changes that make the sources say its new value, and each change applies."""
    from vertical.index import change_documents, document_changes, load_documents

    pack = load_pack(name)
    assert all(edit.document for edit in pack.edits())
    documents, _ = load_documents(pack.document_files(), pack.root)
    changed = {doc.id: doc.text for doc in change_documents(documents, document_changes(pack))}
    for edit in pack.edits():
        for change in edit.document:
            assert change.new in changed[change.doc_id], (edit.id, change)


def test_an_edit_request_takes_one_document_change_or_a_list():
    from vertical.pack.schema import EditRequest

    base = {"prompt": "The mayor of Quentar is", "subject": "Quentar", "target_new": "Bram Kett"}
    one = EditRequest.model_validate({**base, "document": {"doc_id": "quentar", "old": "Ada", "new": "Bram"}})
    many = EditRequest.model_validate({**base, "document": [{"doc_id": "quentar", "old": "Ada", "new": "Bram"},
                                                            {"doc_id": "council", "text": "Bram Kett leads."}]})
    assert [c.doc_id for c in one.document] == ["quentar"]
    assert [c.doc_id for c in many.document] == ["quentar", "council"]
    assert EditRequest.model_validate(base).document == []


def test_medical_pack_has_required_content():
    pack = load_pack("medical")
    assert len(pack.instructions()) >= 530  # 500 PubMedQA + at least 30 written examples
    qa = pack.qa_eval()
    assert sum(1 for q in qa if q.choices == ["yes", "no", "maybe"]) == 500
    assert len(pack.retrieval_eval()) >= 500
    assert (pack.root / "licenses" / "PUBMEDQA-LICENSE").is_file()


def _write(pack: Path, rel: str, content: str | bytes) -> None:
    path = pack / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


# (what is broken, how to break it, text the one-line error must contain)
BAD_PACKS = [
    ("missing pack.yaml", lambda p: (p / "pack.yaml").unlink(), "no pack.yaml"),
    ("YAML syntax", lambda p: _write(p, "pack.yaml", "name: tiny\ndescription: [unclosed\n"), "pack.yaml:3: invalid YAML"),
    ("YAML not a mapping", lambda p: _write(p, "pack.yaml", "- a\n- b\n"), "must be a YAML mapping"),
    ("unknown field", lambda p: _write(p, "pack.yaml", (p / "pack.yaml").read_text() + "colour: red\n"), "colour: unknown field"),
    ("bad name", lambda p: _write(p, "pack.yaml", (p / "pack.yaml").read_text().replace("name: tiny", "name: Tiny Pack")), "pack.yaml:1: name: String should match"),
    ("missing system prompt", lambda p: _write(p, "pack.yaml", "name: tiny\ndescription: d\n"), "system_prompt: Field required"),
    ("wrong type in stages", lambda p: _write(p, "pack.yaml", (p / "pack.yaml").read_text().replace("chunk_tokens: 64", "chunk_tokens: many")), "stages.index.chunk_tokens: Input should be a valid integer"),
    ("overlap >= chunk", lambda p: _write(p, "pack.yaml", (p / "pack.yaml").read_text().replace("chunk_overlap: 8", "chunk_overlap: 64")), "chunk_overlap must be smaller"),
    ("broken JSONL line", lambda p: _write(p, "instructions/train.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n'), "train.jsonl:2: not valid JSON"),
    ("JSONL line not an object", lambda p: _write(p, "instructions/train.jsonl", '[1, 2]\n'), "train.jsonl:1: each line must be a JSON object"),
    ("instruction without output", lambda p: _write(p, "instructions/train.jsonl", '{"instruction": "a"}\n'), "train.jsonl:1: output: Field required"),
    ("sharegpt ending with human", lambda p: _write(p, "instructions/train.jsonl", '{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}\n'), "last turn"),
    ("unknown sharegpt role", lambda p: _write(p, "instructions/train.jsonl", '{"conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'), "train.jsonl:1: conversations.0.from"),
    ("empty output", lambda p: _write(p, "instructions/train.jsonl", '{"instruction": "a", "output": ""}\n'), "train.jsonl:1: output: String should have at least 1 character"),
    ("non-UTF-8 instruction file", lambda p: _write(p, "instructions/train.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "c"}\n'), "train.jsonl:2: not UTF-8"),
    ("empty JSONL", lambda p: _write(p, "instructions/train.jsonl", ""), "train.jsonl: file is empty"),
    ("missing data file", lambda p: (p / "edits/edits.jsonl").unlink(), "data.edits: file edits/edits.jsonl does not exist"),
    ("subject not in prompt", lambda p: _write(p, "edits/edits.jsonl", '{"prompt": "The mayor is", "subject": "Quentar", "target_new": "X"}\n'), "edits.jsonl:1: subject 'Quentar' does not occur in prompt"),
    ("edit without target", lambda p: _write(p, "edits/edits.jsonl", '{"prompt": "Quentar is", "subject": "Quentar"}\n'), "edits.jsonl:1: target_new: Field required"),
    ("label not in choices", lambda p: _write(p, "eval/qa.jsonl", '{"question": "q", "choices": ["a", "b"], "label": "c"}\n'), "qa.jsonl:1: label 'c' is not one of choices"),
    ("QA without answer", lambda p: _write(p, "eval/qa.jsonl", '{"question": "q"}\n'), "qa.jsonl:1: give `answer`"),
    ("retrieval item without doc id", lambda p: _write(p, "eval/retrieval.jsonl", '{"question": "q"}\n'), "retrieval.jsonl:1: doc_id: Field required"),
    ("eval question in training", lambda p: (_write(p, "instructions/train.jsonl", '{"instruction": "Where is Lake Vor?", "output": "North."}\n'),
                                            _write(p, "eval/qa.jsonl", '{"question": "q", "answer": "a"}\n{"question": "where is lake vor", "answer": "north"}\n')),
     "qa.jsonl:2: this question is also in the training data (instructions/train.jsonl line 1)"),
    ("MEMIT layers not increasing", lambda p: _write(p, "pack.yaml", (p / "pack.yaml").read_text() + "  edit: {hparams: {layers: [8, 4]}}\n"),
     "layers must be a non-empty list of increasing layer numbers"),
    ("empty documents folder", lambda p: [f.unlink() for f in (p / "documents").iterdir()], "no documents"),
    ("non-UTF-8 document", lambda p: _write(p, "documents/bad.txt", b"ok line\n\xc3\x28 broken\n"), "bad.txt:2: not UTF-8"),
    ("empty document", lambda p: _write(p, "documents/empty.md", ""), "empty.md: document is empty"),
    ("duplicate document id", lambda p: _write(p, "documents/more.jsonl", '{"id": "lake-vor", "text": "again"}\n'), "duplicate document id 'lake-vor'"),
    ("absolute data path", lambda p: _write(p, "pack.yaml", (p / "pack.yaml").read_text() + "data:\n  documents: [/etc]\n"),
     "'/etc' points outside the pack"),
    ("data path with ..", lambda p: _write(p, "pack.yaml", (p / "pack.yaml").read_text() + "data:\n  instructions: [../x.jsonl]\n"),
     "'../x.jsonl' points outside the pack"),
]


@pytest.mark.parametrize("what,breaker,expected", BAD_PACKS, ids=[b[0] for b in BAD_PACKS])
def test_validate_reports_bad_input_in_one_line(tiny_pack, cli, what, breaker, expected):
    breaker(tiny_pack)
    code, output = cli("packs", "validate", tiny_pack)
    assert code != 0
    assert expected in output, output
    assert "Traceback" not in output
    problem_lines = [line for line in output.splitlines() if expected in line]
    assert problem_lines, output


def test_build_refuses_invalid_pack_without_writing(tiny_pack, cli, tmp_path, tiny_model_dir):
    _write(tiny_pack, "edits/edits.jsonl", '{"prompt": "The mayor is", "subject": "Quentar", "target_new": "X"}\n')
    out = tmp_path / "build"
    code, output = cli("build", tiny_pack, "--out", out, "--base-model", tiny_model_dir)
    assert code != 0
    assert "edits.jsonl:1" in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not out.exists()


def test_packs_show_and_list(cli, tiny_pack):
    code, output = cli("packs", "show", tiny_pack)
    assert code == 0 and "instruction examples" in output and "tiny" in output
    code, output = cli("packs", "list")
    assert code == 0 and "medical" in output


def test_unknown_pack_is_one_line(cli):
    code, output = cli("packs", "validate", "no-such-pack")
    assert code != 0 and "pack 'no-such-pack' not found" in output and "Traceback" not in output


def test_packs_init_from_docs(cli, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "policy.md").write_text("# Leave policy\n\nStaff get 25 days of leave.\n", encoding="utf-8")
    (docs / "notes.bin").write_bytes(b"\x00\x01")  # not a document type: not copied
    code, output = cli("packs", "init", "acme", "--docs", docs, "--from", "medical", "--dir", tmp_path / "acme")
    assert code == 0, output
    pack, problems = validate_pack(tmp_path / "acme")
    assert problems == []
    assert pack.config.disclaimer == load_pack("medical").config.disclaimer
    assert [p.name for p in pack.document_files()] == ["policy.md"]
    # the template's own settings only: written-out defaults would override the model's tuned edit layer
    assert pack.config.stages.model_dump(exclude_unset=True) == load_pack("medical").config.stages.model_dump(exclude_unset=True)
    written = yaml.safe_load((tmp_path / "acme" / "pack.yaml").read_text())["stages"]["edit"].get("hparams", {})
    assert "layer" not in written and "layers" not in written
    # refusing to overwrite is also a one-line error
    code, output = cli("packs", "init", "acme", "--docs", docs, "--dir", tmp_path / "acme")
    assert code != 0 and "already exists" in output


def test_packs_init_rejects_bad_name_and_empty_docs(cli, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    code, output = cli("packs", "init", "acme", "--docs", docs, "--dir", tmp_path / "x")
    assert code != 0 and "has no documents" in output
    (docs / "a.txt").write_text("text", encoding="utf-8")
    code, output = cli("packs", "init", "Bad Name", "--docs", docs, "--dir", tmp_path / "y")
    assert code != 0 and "name" in output and not (tmp_path / "y").exists()


def test_symbolic_links_are_never_followed_into_the_pack_or_the_index(cli, tmp_path, tiny_pack, tiny_model_dir):
    """`docs/notes.txt -> ~/.ssh/config` must not end up in the pack, the index or the bundle."""
    secret = tmp_path / "secret.txt"
    secret.write_text("Host bastion\n  IdentityFile ~/.ssh/id_ed25519 private-key-marker\n", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "leak.md").write_text("# Leak\n\nprivate-key-marker in a linked folder.\n", encoding="utf-8")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "policy.md").write_text("# Leave policy\n\nStaff get 25 days of leave.\n", encoding="utf-8")
    (docs / "notes.txt").symlink_to(secret)
    (docs / "linked").symlink_to(outside, target_is_directory=True)
    code, output = cli("packs", "init", "acme", "--docs", docs, "--dir", tmp_path / "acme")
    assert code == 0, output
    copied = [p.name for p in (tmp_path / "acme").rglob("*") if p.is_file()]
    assert "notes.txt" not in copied and "leak.md" not in copied
    # a link planted inside a pack's documents folder is skipped by the build too
    (tiny_pack / "documents" / "notes.txt").symlink_to(secret)
    (tiny_pack / "documents" / "linked").symlink_to(outside, target_is_directory=True)
    pack = load_pack(tiny_pack)
    assert all("secret" not in str(p) and p.name not in ("notes.txt", "leak.md") for p in pack.document_files())
    from vertical import pipeline

    out = tmp_path / "build"
    pipeline.build(tiny_pack, out=out, steps=["base", "index"], base_model=str(tiny_model_dir))
    assert "private-key-marker" not in (out / "index" / "chunks.jsonl").read_text(encoding="utf-8")
    code, output = cli("index", "add", out, docs / "notes.txt")
    assert code != 0 and "symbolic link" in output and "Traceback" not in output
