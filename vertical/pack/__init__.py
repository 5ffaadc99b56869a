"""Domain packs: a folder with pack.yaml and data files, loaded into typed records.

`load_pack(ref)` finds and parses a pack; `Pack.problems()` checks every file and line and returns
all problems at once, so `vertical packs validate` can list them together.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from vertical.errors import PackInvalid, Problem, VerticalError
from vertical.io import files_under, sha256_file, sha256_json
from vertical.pack.schema import (
    SUPPORTED_DOCUMENT_SUFFIXES,
    AlpacaExample,
    DocumentRecord,
    EditRequest,
    Message,
    PackConfig,
    QAItem,
    RetrievalItem,
    ShareGPTExample,
)
from vertical.paths import domains_dir

log = logging.getLogger(__name__)

PACK_FILE = "pack.yaml"
R = TypeVar("R", bound=BaseModel)


def _pydantic_problems(file: Path, exc: ValidationError, line: int | None = None, lines_of=None) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        where = line if line is not None else (lines_of(error["loc"]) if lines_of else None)
        problems.append(Problem(file, message, line=where, field=loc or None))
    return problems


def _yaml_line_finder(text: str):
    """Map a pydantic error location (keys and indices) to the line of that node in the YAML."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None

    def find(loc) -> int | None:
        node, line = root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                match = next((v for k, v in node.value if k.value == str(part)), None)
                key = next((k for k, v in node.value if k.value == str(part)), None)
                if match is None:
                    return (node.start_mark.line + 1) if line is None else line
                line, node = key.start_mark.line + 1, match
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    return find


class NotUtf8(VerticalError):
    def __init__(self, path: Path, line: int, byte: int):
        self.problem = Problem(path, f"not UTF-8 (byte 0x{byte:02x}); save the file as UTF-8", line=line)
        super().__init__(str(self.problem))


def read_text_utf8(path: Path) -> str:
    """Read a text file; a non-UTF-8 file raises NotUtf8 naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUtf8(path, data[: exc.start].count(b"\n") + 1, data[exc.start]) from None


def read_jsonl(path: Path, parse) -> tuple[list, list[Problem]]:
    """Parse every non-blank line of a JSONL file with `parse(dict)`; collect problems by line."""
    records, problems = [], []
    try:
        text = read_text_utf8(path)
    except NotUtf8 as exc:
        return [], [exc.problem]
    if not text.strip():
        return [], [Problem(path, "file is empty; add at least one JSON line or remove it from pack.yaml")]
    # split on "\n" only: str.splitlines() also breaks on U+2028 and friends, which are legal
    # inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(path, f"not valid JSON ({exc.msg} at column {exc.colno})", line=number))
            continue
        if not isinstance(value, dict):
            problems.append(Problem(path, "each line must be a JSON object", line=number))
            continue
        try:
            records.append(parse(value))
        except ValidationError as exc:
            problems.extend(_pydantic_problems(path, exc, line=number))
    return records, problems


def parse_instruction(value: dict) -> list[Message]:
    """An alpaca or sharegpt example as a list of chat messages."""
    model = ShareGPTExample if "conversations" in value else AlpacaExample
    return model.model_validate(value).to_messages()


@dataclass
class Pack:
    root: Path
    config: PackConfig

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pack_file(self) -> Path:
        return self.root / PACK_FILE

    def paths(self, kind: str) -> list[Path]:
        return [self.root / rel for rel in getattr(self.config.data, kind)]

    # ------------------------------------------------------------ records

    def _records_by_file(self, kind: str, parse) -> list[list]:
        groups, problems = [], []
        for path in self.paths(kind):
            if not path.is_file():
                problems.append(Problem(self.pack_file, f"file {path.relative_to(self.root)} does not exist", field=f"data.{kind}"))
                continue
            found, bad = read_jsonl(path, parse)
            groups.append(found)
            problems.extend(bad)
        if problems:
            raise PackInvalid(self.name, problems)
        return groups

    def _records(self, kind: str, parse) -> list:
        return [record for group in self._records_by_file(kind, parse) for record in group]

    def instructions(self) -> list[list[Message]]:
        return self._records("instructions", parse_instruction)

    def instructions_by_file(self) -> list[list[list[Message]]]:
        """The instruction examples, one list per file of data.instructions."""
        return self._records_by_file("instructions", parse_instruction)

    def edits(self) -> list[EditRequest]:
        return self._records("edits", EditRequest.model_validate)

    def qa_eval(self) -> list[QAItem]:
        return self._records("qa_eval", QAItem.model_validate)

    def retrieval_eval(self) -> list[RetrievalItem]:
        return self._records("retrieval_eval", RetrievalItem.model_validate)

    def document_files(self) -> list[Path]:
        """Every supported document file under the pack's document paths, sorted; symbolic links
        are skipped, with a warning (io.files_under)."""
        files: list[Path] = []
        for path in self.paths("documents"):
            if path.is_symlink():
                log.warning("%s is a symbolic link: skipped (copy the file into the pack instead)", path)
            elif path.is_file():
                files.append(path)
            elif path.is_dir():
                found, links = files_under(path, SUPPORTED_DOCUMENT_SUFFIXES)
                for link in links:
                    log.warning("%s is a symbolic link: skipped (copy the file into the pack instead)", link)
                files.extend(found)
        return files

    # ------------------------------------------------------------ fingerprints

    def fingerprint(self, *kinds: str) -> str:
        """Content hash of the pack's files of the given kinds (what a stage reads)."""
        files = self.document_files() if "documents" in kinds else []
        for kind in kinds:
            if kind != "documents":
                files += [p for p in self.paths(kind) if p.is_file()]
        return sha256_json({str(p.relative_to(self.root)): sha256_file(p) for p in files})

    # ------------------------------------------------------------ validation

    def problems(self) -> list[Problem]:
        """Check every data file and line; return all problems (empty when the pack is valid)."""
        problems: list[Problem] = []
        for kind, parse in (("instructions", parse_instruction), ("edits", EditRequest.model_validate),
                            ("qa_eval", QAItem.model_validate), ("retrieval_eval", RetrievalItem.model_validate)):
            try:
                self._records(kind, parse)
            except PackInvalid as exc:
                problems.extend(exc.problems)
        problems.extend(self._document_problems())
        if not problems:
            problems.extend(self._held_out_problems())
        return problems

    def _held_out_problems(self) -> list[Problem]:
        """Evaluation questions that also occur in the instruction data (the same text, or inside a
        longer training prompt): a score on them would measure recall of the training set."""
        asked: dict[str, str] = {}  # normalised user message -> "file line N"
        for path in self.paths("instructions"):
            for number, line in enumerate(read_text_utf8(path).split("\n"), 1):  # as read_jsonl splits
                if line.strip():
                    for message in parse_instruction(json.loads(line)):
                        if message.role == "user":
                            asked.setdefault(f" {_words(message.content)} ", f"{path.relative_to(self.root)} line {number}")
        problems = []
        for path in self.paths("qa_eval"):
            for number, line in enumerate(read_text_utf8(path).split("\n"), 1):
                if not line.strip():
                    continue
                question = _words(QAItem.model_validate(json.loads(line)).question)
                if not question:
                    continue
                exact = asked.get(f" {question} ")
                inside = exact or (next((where for text, where in asked.items() if f" {question} " in text), None)
                                   if len(question.split()) >= 6 else None)
                if inside:
                    problems.append(Problem(path, f"this question is also in the training data ({inside}): an evaluation "
                                                  "item must be held out; remove it from one of the two", line=number))
        return problems

    def _document_problems(self) -> list[Problem]:
        problems = []
        for rel, path in zip(self.config.data.documents, self.paths("documents")):
            if not path.exists():
                problems.append(Problem(self.pack_file, f"documents path {rel} does not exist", field="data.documents"))
        files = self.document_files()
        if not files and not problems:
            kinds = " ".join(SUPPORTED_DOCUMENT_SUFFIXES)
            problems.append(Problem(self.pack_file, f"no documents ({kinds}) found under {', '.join(self.config.data.documents)}", field="data.documents"))
        ids: dict[str, Path] = {}
        for path in files:
            if path.stat().st_size == 0:
                problems.append(Problem(path, "document is empty"))
                continue
            if path.suffix.lower() in (".pdf", ".docx"):
                continue  # binary formats are parsed (and reported) by the index stage
            if path.suffix.lower() == ".jsonl":
                records, bad = read_jsonl(path, DocumentRecord.model_validate)
                problems.extend(bad)
                for record in records:
                    if record.id in ids:
                        problems.append(Problem(path, f"duplicate document id {record.id!r} (also in {ids[record.id].name})"))
                    ids[record.id] = path
                continue
            try:
                read_text_utf8(path)
            except NotUtf8 as exc:
                problems.append(exc.problem)
        return problems


def _words(text: str) -> str:
    """Lower-case words and numbers only, for comparing questions across files."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def resolve_pack_dir(ref: str | Path) -> Path:
    """A pack reference is a folder path or the name of a shipped pack."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    shipped = domains_dir() / str(ref)
    if shipped.is_dir():
        return shipped.resolve()
    names = ", ".join(shipped_pack_names()) or "none"
    raise VerticalError(f"pack '{ref}' not found: give a pack folder or a shipped pack name ({names})")


def shipped_pack_names() -> list[str]:
    root = domains_dir()
    return sorted(p.name for p in root.iterdir() if (p / PACK_FILE).is_file()) if root.is_dir() else []


def load_pack(ref: str | Path) -> Pack:
    """Find and parse a pack's pack.yaml; raises PackInvalid listing every schema problem."""
    root = resolve_pack_dir(ref)
    pack_file = root / PACK_FILE
    if not pack_file.is_file():
        raise PackInvalid(str(ref), [Problem(root, f"no {PACK_FILE} in this folder; create one (see `vertical packs init`)")])
    try:
        text = read_text_utf8(pack_file)
    except NotUtf8 as exc:
        raise PackInvalid(str(ref), [exc.problem]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PackInvalid(str(ref), [Problem(pack_file, f"invalid YAML: {reason}", line=line)]) from None
    if not isinstance(raw, dict):
        raise PackInvalid(str(ref), [Problem(pack_file, "must be a YAML mapping of fields (name, description, system_prompt, ...)")])
    try:
        config = PackConfig.model_validate(raw)
    except ValidationError as exc:
        raise PackInvalid(str(ref), _pydantic_problems(pack_file, exc, lines_of=_yaml_line_finder(text))) from None
    return Pack(root=root, config=config)


def validate_pack(ref: str | Path) -> tuple[Pack | None, list[Problem]]:
    """Load a pack and check all its files. Returns the pack (None if pack.yaml is broken) and every problem."""
    try:
        pack = load_pack(ref)
    except PackInvalid as exc:
        return None, exc.problems
    return pack, pack.problems()


def init_pack(name: str, docs: Path, template: str | None = None, dest: Path | None = None) -> Path:
    """Create a new pack from a folder of documents, settings copied from `template` (a pack)."""
    if not docs.is_dir():
        raise VerticalError(f"--docs {docs} is not a folder")
    doc_files, links = files_under(docs, SUPPORTED_DOCUMENT_SUFFIXES)
    for link in links:
        log.warning("%s is a symbolic link: skipped (copy the file into the folder instead)", link)
    if not doc_files:
        raise VerticalError(f"--docs {docs} has no documents ({' '.join(SUPPORTED_DOCUMENT_SUFFIXES)})")
    dest = (dest or Path(name)).resolve()
    if dest.exists():
        raise VerticalError(f"{dest} already exists; choose another name or remove it")
    base = load_pack(template).config if template else None
    settings = {
        "name": name,
        "description": f"Pack made from the documents in {docs}",
        "language": base.language if base else "en",
        "base_model": base.base_model if base else PackConfig.model_fields["base_model"].default,
        "embedder": base.embedder if base else PackConfig.model_fields["embedder"].default,
        "system_prompt": base.system_prompt if base else (
            "You are a careful assistant for this organisation. Answer only from the numbered sources you are "
            "given and cite them like [1]. If the sources do not contain the answer, say that you do not know."),
        "disclaimer": base.disclaimer if base else "",
        "data": {"documents": ["documents"]},
        # only what the template sets: written-out defaults would override the model's tuned edit settings
        "stages": base.stages.model_dump(exclude_unset=True) if base else {},
    }
    try:
        PackConfig.model_validate(settings)
    except ValidationError as exc:
        raise VerticalError(f"cannot make pack '{name}': {_pydantic_problems(Path(PACK_FILE), exc)[0]}") from None
    from vertical.io import atomic_dir

    with atomic_dir(dest) as tmp:
        for path in doc_files:
            target = tmp / "documents" / path.relative_to(docs)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        (tmp / PACK_FILE).write_text(yaml.safe_dump(settings, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return dest
