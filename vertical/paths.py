"""Where things live: shipped packs, the model cache, builds."""

from __future__ import annotations

import os
from pathlib import Path

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
