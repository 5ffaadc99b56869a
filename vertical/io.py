"""Atomic file writes and content hashing.

Every artifact is written under a temporary name and renamed into place, so a killed process
never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def files_under(folder: Path, suffixes) -> tuple[list[Path], list[Path]]:
    """(the files under `folder` with one of `suffixes`, sorted; the symbolic links skipped).

    Links are never followed, to files or folders: `docs/notes.txt -> ~/.ssh/config` would put
    a private file into the index, the bundle and every answer that cites it."""
    found, links = [], []
    for top, folders, names in os.walk(folder, followlinks=False):
        for name in sorted(folders):
            if os.path.islink(os.path.join(top, name)):
                links.append(Path(top, name))
        for name in names:
            path = Path(top, name)
            if path.is_symlink():
                links.append(path)
            elif path.suffix.lower() in suffixes and path.is_file():
                found.append(path)
    return sorted(found), sorted(links)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(value: Any) -> str:
    return sha256_text(json.dumps(value, sort_keys=True, default=str))


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by its path relative to `root` (POSIX form)."""
    if root.is_file():
        return {root.name: sha256_file(root)}
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so a power cut after the rename that
    publishes it cannot leave a published folder with empty or half-written files."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # deepest first, the folders last
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _old_name(final_dir: Path) -> Path:
    return final_dir.with_name(f".old-{final_dir.name}-{os.getpid()}")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished directory into place, replacing any older one, without a moment where
    `final_dir` holds a mix of old and new files. A kill between the two renames leaves the old
    copy under `.old-NAME-PID`, which `clean_stale_tmp` puts back."""
    old = _old_name(final_dir)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final_dir`; on success it replaces `final_dir`.

    On any exception (or a kill) the temporary directory is left behind under a `.tmp-` name
    that `clean_stale_tmp` removes, and `final_dir` is untouched.
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a finished artifact is readable like any folder
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final_dir)


_OLD = re.compile(r"^\.old-(.+)-\d+$")


def clean_stale_tmp(parent: Path) -> list[Path]:
    """Remove leftovers of killed writers (`.tmp-*` and `.old-*` entries) under `parent`. An
    `.old-NAME-PID` folder whose NAME is missing is the last complete copy of NAME, left by a kill
    between replace_dir's renames: it is renamed back instead of deleted."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        old = _OLD.match(entry.name)
        if old and entry.is_dir() and not (parent / old.group(1)).exists():
            os.replace(entry, parent / old.group(1))
            _fsync_dir(parent)
            continue
        if entry.name.startswith((".tmp-", ".old-")) or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an advisory lock so two processes never write the same build or cache entry.

    With `wait` the caller queues behind the holder; without it, a held lock is an error."""
    import fcntl

    from vertical.errors import VerticalError

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise VerticalError(f"{what} is in use by another vertical process ({lock_path}); wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
