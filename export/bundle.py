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


class BundleInvalid(VerticalError):
    """The folder is not a bundle, or a file in it does not match its manifest."""


def is_bundle(path: Path) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError):
        return False


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


def verify(bundle: Path) -> dict[str, Any]:
    """The manifest, once every listed file exists with its recorded size and sha256."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for relative, expected in manifest["files"].items():
        path = bundle / relative
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            raise BundleInvalid(f"{bundle / MANIFEST} lists a path outside the bundle: {relative}")
        if not path.is_file():
            raise BundleInvalid(f"bundle {bundle}: {relative} is missing; copy the whole bundle folder again")
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise BundleInvalid(f"bundle {bundle}: {relative} does not match its sha256 in {MANIFEST} "
                                "(altered or corrupted); copy or export the bundle again")
    return manifest
