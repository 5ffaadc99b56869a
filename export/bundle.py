"""The bundle on disk and its manifest: what `vertical export` writes and `vertical serve` trusts.

    bundle/
      manifest.json    every file below with its size and sha256, versions, the build's metrics
      signature.json   optional: an Ed25519 signature of manifest.json (`vertical export --sign`)
      pack.json        name, system prompt, disclaimer, example questions, generation defaults
      model/           the language model for onnxruntime-genai (ONNX + genai_config + tokenizer)
      embedder/        the sentence embedder as ONNX, its tokenizer.json and embedder.json
      index/           the retrieval index (chunks, embeddings from the ONNX embedder, FAISS, BM25)

Torch-free. A bundle is verified before anything in it is loaded: a missing, truncated or
altered file refuses the whole bundle with the file's name. The manifest's hashes say the files
are whole, not who made them (anyone who edits the bundle can rewrite them); a signature made with
the exporter's private key, checked against the public key the operator trusts, says that.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError
from vertical.io import sha256_file

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
FORMAT = "vertical-bundle"
FORMAT_VERSION = 1


RUNTIME_FOLDERS = ("model", "embedder", "index")  # what the runtime loads; pack.json is read by name


class BundleInvalid(VerticalError):
    """The folder is not a bundle, or a file in it does not match its manifest."""


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` except the manifest: relative path -> size and sha256."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() not in (MANIFEST, SIGNATURE):
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
    config = bundle / "model" / "genai_config.json"
    if config.is_file() and "custom_ops_library" in config.read_text(encoding="utf-8", errors="replace"):
        # onnxruntime would load that shared library into the server: code from the bundle
        found.append("model/genai_config.json: names a custom_ops_library (native code); refused")
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


# ---------------------------------------------------------------- signatures (Ed25519, `cryptography`)


def _key_error(path: Path, what: str) -> VerticalError:
    return VerticalError(f"{path}: not an Ed25519 {what} key in PEM form (make a pair with `openssl genpkey "
                         "-algorithm ed25519 -out sign.pem && openssl pkey -in sign.pem -pubout -out sign.pub`)")


def _private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        raise _key_error(path, "private") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise _key_error(path, "private")
    return key


def _public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError):
        raise _key_error(path, "public") from None
    if not isinstance(key, Ed25519PublicKey):
        raise _key_error(path, "public")
    return key


def _key_id(public_key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def sign(bundle: Path, private_key_path: Path) -> str:
    """Sign the bundle's manifest (which holds every file's sha256) with an Ed25519 private key;
    writes signature.json and returns the key's id (sha256 of the public key, 16 hex digits)."""
    from vertical.io import atomic_write_json

    bundle = Path(bundle)
    verify(bundle)  # never vouch for a bundle that is already damaged
    key = _private_key(private_key_path)
    data = (bundle / MANIFEST).read_bytes()
    key_id = _key_id(key.public_key())
    atomic_write_json(bundle / SIGNATURE, {"algorithm": "ed25519", "signed": MANIFEST, "key_id": key_id,
                                           "signature": base64.b64encode(key.sign(data)).decode()})
    return key_id


def check_signature(bundle: Path, public_key_path: Path) -> str:
    """That the manifest was signed by the private key of `public_key_path`; BundleInvalid if the
    bundle is unsigned, signed by another key, or its manifest changed since. Returns the key id."""
    from cryptography.exceptions import InvalidSignature

    bundle = Path(bundle)
    key = _public_key(public_key_path)
    path = bundle / SIGNATURE
    if not path.is_file():
        raise BundleInvalid(f"bundle {bundle} is not signed (no {SIGNATURE}); sign it with `vertical export --sign KEY`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BundleInvalid(f"{path} is damaged; sign the bundle again") from None
    try:
        key.verify(signature, (bundle / MANIFEST).read_bytes())
    except (InvalidSignature, OSError):
        raise BundleInvalid(f"bundle {bundle}: the signature does not match {public_key_path} (signed by another "
                            "key, or manifest.json changed after signing); do not serve it") from None
    return _key_id(key)
