"""Where things live: shipped packs, the model cache, builds, the model a build answers with, and
what tells a bundle from a build."""

from __future__ import annotations

import os
from pathlib import Path

from vertical.errors import VerticalError

_REPO_ROOT = Path(__file__).resolve().parent.parent


def domains_dir() -> Path:
    """The shipped packs: `domains/` of a source checkout, else the copy installed with the package."""
    override = os.environ.get("VERTICAL_DOMAINS")
    if override:
        return Path(override)
    checkout = _REPO_ROOT / "domains"
    if checkout.is_dir():
        return checkout
    import vertical.domains  # installed as package data by a non-editable install

    return Path(vertical.domains.__path__[0])


def cache_dir() -> Path:
    """Converted models and other reusable, rebuildable artifacts (`VERTICAL_CACHE` overrides)."""
    override = os.environ.get("VERTICAL_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vertical"


def default_builds_dir() -> Path:
    return Path(os.environ.get("VERTICAL_BUILDS", "builds"))


# Most refined model first: what `vertical ask` and the demo use for a build.
MODEL_PREFERENCE = ("edit/model", "tune/merged", "base/model")


def best_model_dir(build_dir: Path) -> Path:
    for rel in MODEL_PREFERENCE:
        path = Path(build_dir) / rel
        if (path / "config.json").is_file():
            return path
    raise VerticalError(f"{build_dir} has no model yet; run `vertical build PACK` first")


def is_bundle(path: Path) -> bool:
    """Whether `path` looks like an exported bundle (rather than a build folder)."""
    return (Path(path) / "pack.json").is_file() and (Path(path) / "model" / "genai_config.json").is_file()


def is_build(path: Path) -> bool:
    """Whether `path` is a build folder (`vertical build`'s output: it has the build's manifest)."""
    return (Path(path) / "manifest.json").is_file() and not is_bundle(path)
