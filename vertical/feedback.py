"""Feedback on answers (thumbs up/down, a corrected answer) and its way back into the pack.

Feedback is appended to `feedback.jsonl` in the build or bundle folder, one JSON object per line,
outside the hashed stage folders, readable by its owner only. E-mail addresses, phone numbers
and personal identifiers are redacted before a record is stored unless redaction is switched off
(`vertical demo --keep-contacts`). Records hold the
question, the answer and the correction only: never request headers, so never an API key.

`export_feedback` turns corrections into pack-format files: instruction examples (Alpaca format)
and, where the user also named the fact's subject, knowledge-edit requests.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from vertical.io import exclusive_lock

FEEDBACK_FILE = "feedback.jsonl"

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# international or national numbers with at least 7 digits, separators allowed: +44 20 7946 0958, (555) 123-4567
_PHONE = re.compile(r"(?<!\w)(?<!\d\.)(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d(?:[\s.-]?\d){6,13}(?!\w|\.\d)")


# identifiers of a person that a question to a hospital, a bank or a law firm may carry
_IDENTIFIERS = [
    (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), "[iban]"),
    (re.compile(r"\b[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"), "[ni-number]"),  # UK National Insurance
    (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[number]"),  # card and account numbers, 13-19 digits
    (re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}\b"), "[postcode]"),  # UK postcodes: SW1A 1AA, M1 1AE
    (re.compile(r"\b(?:DOB|D\.O\.B\.|date of birth|born(?: on)?)\s*:?\s*\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}",
                re.IGNORECASE), "[date-of-birth]"),
]


def redact(text: str) -> str:
    """Replace e-mail addresses, phone numbers and personal identifiers (card, account and
    National Insurance numbers, IBANs, postcodes, dates of birth) with placeholders."""
    text = _EMAIL.sub("[email]", text)
    for pattern, placeholder in _IDENTIFIERS:
        text = pattern.sub(placeholder, text)
    return _PHONE.sub("[phone]", text)


class Feedback(BaseModel):
    """One judgement of one answer."""

    question: str = Field(min_length=1, max_length=8000)
    answer: str = Field(max_length=32000)
    rating: Literal["up", "down"]
    correction: str | None = Field(None, max_length=8000, description="what the answer should have said")
    subject: str | None = Field(None, max_length=200, description="the fact's subject, to make an edit request")
    sources: list[str] = Field(default_factory=list, description="the cited documents' paths")
    model: str = ""


def record(folder: Path, feedback: Feedback, redact_contacts: bool = True) -> dict:
    """Append one feedback record to `folder/feedback.jsonl` (whole lines, under a file lock)."""
    entry = feedback.model_dump()
    if redact_contacts:
        for key in ("question", "answer", "correction", "subject"):
            if entry[key]:
                entry[key] = redact(entry[key])
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    # readable by the operator alone: feedback holds patients' and clients' questions
    handle = os.fdopen(os.open(folder / FEEDBACK_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a",
                       encoding="utf-8")
    with handle, exclusive_lock(folder / ".feedback.lock", "the feedback file", wait=True):
        handle.write(line)  # one whole line under the lock: two demo sessions never interleave
        handle.flush()
        os.fsync(handle.fileno())
    return entry


def read(folder: Path, problems: list[str] | None = None) -> list[dict]:
    """The feedback records; a line that is not a JSON object is skipped and, with `problems`,
    reported there ("feedback.jsonl line 7: ...")."""
    path = folder / FEEDBACK_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            entry, reason = None, f"not JSON ({exc.msg})"
        else:
            reason = "" if isinstance(entry, dict) and isinstance(entry.get("question"), str) else \
                "not a feedback record (no question)"
        if reason:
            if problems is not None:
                problems.append(f"{FEEDBACK_FILE} line {number}: {reason}; skipped")
            continue
        records.append(entry)
    return records


def export_feedback(folder: Path, out: Path, problems: list[str] | None = None) -> dict[str, int]:
    """Write the corrections as `out/instructions.jsonl` and `out/edits.jsonl` (pack formats);
    damaged lines are skipped and counted (`skipped`), each described in `problems`."""
    from vertical.io import atomic_write_text

    instructions, edits = [], []
    problems = [] if problems is None else problems
    for entry in read(folder, problems):
        correction = (entry.get("correction") or "").strip()
        if not correction:
            continue
        instructions.append({"instruction": entry["question"], "output": correction})
        subject = (entry.get("subject") or "").strip()
        if subject and subject in entry["question"]:
            edits.append({"prompt": entry["question"], "subject": subject, "target_new": correction})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "instructions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in instructions))
    atomic_write_text(out / "edits.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in edits))
    return {"instructions": len(instructions), "edits": len(edits), "skipped": len(problems)}
