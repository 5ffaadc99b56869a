"""Stage `base`: resolve the pack's base model into `base/model/`, a plain Hugging Face folder.

GGUF models are converted once into the shared cache (see vertical.models); the build folder
gets hard links to the cached files (a copy across file systems), so a build stays usable when
the cache is cleared and costs no extra disk when it is not.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vertical.io import atomic_write_json
from vertical.models.registry import ensure_local, resolve_base_model

log = logging.getLogger(__name__)


def inputs(ctx) -> dict[str, Any]:
    resolved = resolve_base_model(ctx.base_model)
    return {"base_model": resolved.spec, "kind": resolved.kind, "sha256": resolved.sha256}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def count_parameters(model_dir: Path) -> int:
    """Parameter count read from the safetensors headers, without loading the weights."""
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, framework="np") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total


def run(ctx, out: Path) -> dict[str, Any]:
    resolved = resolve_base_model(ctx.base_model)
    started = time.time()
    local = ensure_local(resolved)
    prepare_seconds = time.time() - started
    model_dir = out / "model"
    for file in sorted(local.rglob("*")):
        if file.is_file() and file.name != "vertical-model.json":
            _link_or_copy(file, model_dir / file.relative_to(local))

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    info = {
        "spec": resolved.spec,
        "kind": resolved.kind,
        "source": str(resolved.source),
        "sha256": resolved.sha256,
        "cache": str(local),
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    atomic_write_json(out / "model.json", info)
    return {
        "parameters": count_parameters(model_dir),
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "prepare_seconds": round(prepare_seconds, 2),
    }
