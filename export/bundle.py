"""The bundle on disk and its manifest: what `vertical export` writes and `vertical serve` trusts.

    bundle/
      manifest.json    every file below with its size and sha256, versions, the build's metrics
      pack.json        name, system prompt, disclaimer, example questions, generation defaults
      model/           the language model for onnxruntime-genai (ONNX + genai_config + tokenizer)
      embedder/        the sentence embedder as ONNX, its tokenizer.json and embedder.json
      index/           the retrieval index (chunks, embeddings from the ONNX embedder, FAISS, BM25)

Torch-free. A bundle is verified before anything in it is loaded: a missing, truncated or
altered file refuses the whole bundle with the file's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError
from vertical.io import sha256_file

MANIFEST = "manifest.json"
FORMAT = "vertical-bundle"
FORMAT_VERSION = 1


RUNTIME_FOLDERS = ("model", "embedder", "index")  # what the runtime loads; pack.json is read by name


class BundleInvalid(VerticalError):
    """The folder is not a bundle, or a file in it does not match its manifest."""


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` except the manifest: relative path -> size and sha256."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def read_manifest(bundle: Path) -> dict[str, Any]:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleInvalid(f"{bundle} is not a folder; give the folder `vertical export` wrote")
    if not path.is_file():
        raise BundleInvalid(f"{bundle} has no {MANIFEST}: not a vertical bundle (export one with `vertical export BUILD`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleInvalid(f"{path} is not valid JSON ({exc}); copy the bundle again") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleInvalid(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleInvalid(f"{path}: bundle format {manifest['format_version']} is newer than this vertical "
                            f"understands ({FORMAT_VERSION}); upgrade vertical")
    return manifest


def problems(bundle: Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Every way the bundle differs from its manifest: one line per missing or altered file."""
    bundle = Path(bundle)
    manifest = manifest if manifest is not None else read_manifest(bundle)
    found = []
    for relative, expected in manifest["files"].items():
        path = bundle / relative
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            found.append(f"{relative}: listed path is outside the bundle")
        elif not path.is_file():
            found.append(f"{relative}: missing")
        elif path.stat().st_size != expected["bytes"]:
            found.append(f"{relative}: {path.stat().st_size} bytes, manifest says {expected['bytes']} (truncated or altered)")
        elif sha256_file(path) != expected["sha256"]:
            found.append(f"{relative}: sha256 differs from the manifest (altered)")
    # onnxruntime-genai, the tokenizers and the index open their folders and pick files by name, so
    # a file added there could change what is loaded: only listed files may be in them
    listed = set(manifest["files"])
    for folder in RUNTIME_FOLDERS:
        for path in sorted((bundle / folder).rglob("*")) if (bundle / folder).is_dir() else []:
            relative = path.relative_to(bundle).as_posix()
            if path.is_file() and relative not in listed:
                found.append(f"{relative}: not in the manifest (added after export)")
    return found


def verify(bundle: Path) -> dict[str, Any]:
    """The manifest, once every listed file exists with its recorded size and sha256; otherwise
    BundleInvalid naming the file."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    found = problems(bundle, manifest)
    if found:
        more = f" (and {len(found) - 1} more; `vertical verify` lists them)" if len(found) > 1 else ""
        raise BundleInvalid(f"bundle {bundle}: {found[0]}{more}; copy or export the bundle again")
    return manifest
