"""Token positions the editing methods need: where the subject ends, how a target tokenizes."""

from __future__ import annotations

from vertical.errors import VerticalError


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of raw text (no chat template), with the BOS token if the model uses one."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def subject_span(tokenizer, prompt: str, subject: str, after: int = 0) -> tuple[int, int]:
    """[start, end) token positions of the subject's first occurrence in the prompt at or after
    character `after` (where the edit's own prompt begins behind a context prefix, so a subject
    that the sampled prefix happens to mention is not the one edited).

    Found through character offsets, so it is right whatever the tokenizer does at the subject's
    boundaries (a leading space merged into the first subject token, for example)."""
    at = prompt.find(subject, after)
    if at < 0:
        raise VerticalError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    encoding = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    first = last = None
    for position, (start, end) in enumerate(encoding["offset_mapping"]):
        if end <= start:
            continue  # special tokens
        if end > at and start < at + len(subject):
            first = position if first is None else first
            last = position
    if first is None:
        raise VerticalError(f"subject {subject!r} covers no token of prompt {prompt!r}")
    return first, last + 1


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt (with its leading space)."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not target.strip() or not ids:
        raise VerticalError(f"target {target!r} is empty or tokenizes to nothing")
    return ids
