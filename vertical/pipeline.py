"""The build: run a pack's stages in order, skip what is up to date, resume what was killed.

    builds/<pack>/
        manifest.json        per stage: input fingerprint, output file hashes, timing, metrics
        base/ index/ ...     one folder per stage, each with metrics.json

A stage writes into a temporary folder that is renamed into place when it succeeds, then the
manifest is rewritten atomically. A stage is skipped when its inputs (pack files, settings,
upstream outputs, stage code version) hash the same as last time and its recorded output files
are intact; a corrupt or half-present output is rebuilt, never used.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vertical import __version__
from vertical.errors import PackInvalid, VerticalError
from vertical.io import atomic_dir, atomic_write_json, clean_stale_tmp, exclusive_lock, hash_tree, read_json, sha256_json
from vertical.pack import Pack, load_pack
from vertical.paths import default_builds_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stage:
    """One step of the build. `run` and `inputs` are "module:function" names, imported only when
    the stage runs, so light commands never import torch."""

    name: str
    description: str
    needs: tuple[str, ...]
    run: str  # (ctx, out_dir) -> metrics dict; writes its artifacts into out_dir
    inputs: str  # (ctx) -> JSON-able dict of everything the stage reads besides upstream outputs
    version: int = 1  # bump when the stage's code changes what it produces
    distributed: bool = False  # every rank runs it under torchrun / accelerate launch (training)
    uses: tuple[str, ...] = ()  # upstream stages used when they exist (not pulled in when missing)


STAGES: tuple[Stage, ...] = (
    Stage("base", "resolve the base model into a local safetensors folder", (), "vertical.base:run", "vertical.base:inputs"),
    Stage("index", "embedder to ONNX; chunk, embed and index the pack's documents; measure retrieval", (), "vertical.index:run", "vertical.index:inputs",
          version=3),
    Stage("tune", "LoRA fine-tuning on the pack's instructions and questions generated from its documents, "
          "reading retrieved evidence", ("base", "index"), "vertical.tune:run", "vertical.tune:inputs", version=7,
          distributed=True),
    Stage("edit", "write the pack's knowledge edits into the FFN weights (ROME / MEMIT)", ("base",), "vertical.edit:run",
          "vertical.edit:inputs", uses=("tune",)),
    Stage("distill", "a smaller student learns from the best model; edits re-applied", ("base", "index"),
          "vertical.distill:run", "vertical.distill:inputs", version=8, uses=("tune", "edit"), distributed=True),
    Stage("export", "ONNX model + ONNX embedder + index + manifest: the deployable bundle", ("base", "index"),
          "vertical.export:run", "vertical.export:inputs", version=3, uses=("tune", "edit", "distill")),
    Stage("eval", "QA, edits, retrieval and speed for every model of the build: the report", ("base", "index"),
          "vertical.evaluate:run", "vertical.evaluate:inputs", version=5, uses=("tune", "edit", "distill", "export")),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def _load(ref: str) -> Callable:
    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)


class Reporter:
    """How a build reports progress. The CLI swaps in one that draws progress bars."""

    def stage(self, name: str, status: str, detail: str = "") -> None:
        log.info("stage %-8s %s %s", name, status, detail)

    def track(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        yield from items


@dataclass
class BuildContext:
    pack: Pack
    build_dir: Path
    base_model: str
    reporter: Reporter = field(default_factory=Reporter)
    inputs_hash: str = ""  # of the stage now running; keys its scratch folder

    def stage_dir(self, name: str) -> Path:
        """The finished output folder of an upstream stage."""
        path = self.build_dir / name
        if not path.is_dir():
            raise VerticalError(f"{path} is missing; run `vertical build {self.pack.name} --steps {name}`")
        return path

    def work_dir(self, name: str) -> Path:
        """A scratch folder that survives a kill (for checkpoints), keyed by the stage's inputs so a
        changed input never resumes from stale checkpoints; removed when the stage succeeds."""
        root = self.build_dir / ".work" / name
        path = root / self.inputs_hash[:16]
        if root.is_dir() and os.environ.get("RANK", "0") == "0":
            for stale in root.iterdir():
                if stale != path:
                    shutil.rmtree(stale, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        return path


class Ranks:
    """The processes of a `torchrun` / `accelerate launch` run (one process, rank 0, otherwise).

    Rank 0 owns the build folder: it decides what runs, runs every stage and writes every
    artifact. The other ranks join only the stages marked `distributed` (training), and wait for
    rank 0 at the end of every stage.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._group = None
        if self.world > 1:
            import datetime

            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                        timeout=datetime.timedelta(hours=2))
            # rank 0 may index documents for a long time while the others wait: a gloo group with
            # a long timeout carries the coordination, whatever backend training uses
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def wait(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group)


class PhaseClock:
    """Where a stage's time goes: `lap(name)` records the seconds since the previous lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 1)
        self._last = now


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float
    metrics: dict[str, Any]


def load_manifest(build_dir: Path) -> dict[str, Any]:
    path = build_dir / MANIFEST
    if not path.is_file():
        return {"stages": {}}
    try:
        manifest = read_json(path)
    except ValueError:
        log.warning("%s is corrupt; every stage will be checked again", path)
        return {"stages": {}}
    manifest.setdefault("stages", {})
    return manifest


def record_outputs(build_dir: Path, name: str, metrics: dict[str, Any]) -> None:
    """After a command changed a stage's folder outside `vertical build` (index add, edit,
    rollback), record its new files so the next build keeps them instead of calling them corrupt.
    Call it with the build lock held."""
    manifest = load_manifest(build_dir)
    entry = manifest["stages"].get(name)
    if entry is None:
        return
    files = hash_tree(build_dir / name)
    entry.update(files=files, outputs_hash=sha256_json(files), metrics=metrics)
    atomic_write_json(build_dir / MANIFEST, manifest)


def _outputs_intact(build_dir: Path, entry: dict[str, Any], name: str) -> bool:
    out = build_dir / name
    recorded = entry.get("files")
    if not out.is_dir() or not recorded:
        return False
    return hash_tree(out) == recorded


def _select(steps: list[str] | None, force: list[str]) -> list[Stage]:
    for name in [*(steps or []), *force]:
        if name not in STAGE_NAMES:
            raise VerticalError(f"unknown stage '{name}': stages are {', '.join(STAGE_NAMES)}")
    wanted = set(steps or STAGE_NAMES)
    # A requested stage pulls in the stages it needs; they are skipped when already up to date.
    changed = True
    while changed:
        changed = False
        for stage in STAGES:
            if stage.name in wanted:
                for need in stage.needs:
                    if need not in wanted:
                        wanted.add(need)
                        changed = True
    return [stage for stage in STAGES if stage.name in wanted]


def build(
    pack_ref: str | Path,
    out: Path | None = None,
    steps: list[str] | None = None,
    force: list[str] | None = None,
    base_model: str | None = None,
    reporter: Reporter | None = None,
    settings: dict[str, dict[str, Any]] | None = None,
) -> list[StageResult]:
    """Run the pack's stages into `out` (default builds/<pack>) and return what each stage did.
    `settings` overrides stage settings of pack.yaml for this run, e.g. {"export": {"quant": "int4"}}."""
    pack = load_pack(pack_ref)
    for stage_name, values in (settings or {}).items():
        stages = pack.config.stages
        updated = getattr(stages, stage_name).model_validate({**getattr(stages, stage_name).model_dump(), **values})
        pack.config.stages = stages.model_copy(update={stage_name: updated})
    problems = pack.problems()
    if problems:
        raise PackInvalid(pack.name, problems)
    force = force or []
    selected = _select(steps, force)
    build_dir = (out or default_builds_dir() / pack.name).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    reporter = reporter or Reporter()
    ctx = BuildContext(pack=pack, build_dir=build_dir, base_model=base_model or pack.config.base_model, reporter=reporter)

    ranks = Ranks()
    results = []
    if not ranks.main:  # workers: follow rank 0's plan, join the training stages
        for stage in selected:
            results.append(_follow_stage(ctx, stage, ranks))
        return results
    with exclusive_lock(build_dir / ".lock", f"build folder {build_dir}"):
        clean_stale_tmp(build_dir)
        manifest = load_manifest(build_dir)
        if manifest.get("pack") not in (None, pack.name):
            raise VerticalError(f"{build_dir} holds a build of pack '{manifest['pack']}', not '{pack.name}'; use --out")
        manifest.update(pack=pack.name, pack_dir=str(pack.root), vertical_version=__version__)
        for stage in selected:
            results.append(_run_stage(ctx, stage, manifest, forced=stage.name in force, ranks=ranks))
    return results


def _follow_stage(ctx: BuildContext, stage: Stage, ranks: Ranks) -> StageResult:
    inputs_hash, skip = ranks.share(None)
    if skip:
        return StageResult(stage.name, "skipped", 0.0, {})
    started = time.time()
    if stage.distributed:
        import tempfile

        ctx.inputs_hash = inputs_hash
        with tempfile.TemporaryDirectory(prefix=f"vertical-{stage.name}-rank{ranks.rank}-") as scratch:
            _load(stage.run)(ctx, Path(scratch))  # rank 0 writes the artifacts; this copy is discarded
    ranks.wait()
    return StageResult(stage.name, f"ran on rank {ranks.rank}", round(time.time() - started, 2), {})


def _run_stage(ctx: BuildContext, stage: Stage, manifest: dict[str, Any], forced: bool, ranks: Ranks) -> StageResult:
    entries = manifest["stages"]
    upstream = {}
    for need in stage.needs:
        if need not in entries:
            raise VerticalError(f"stage '{stage.name}' needs '{need}', which has not been built")
        upstream[need] = entries[need]["outputs_hash"]
    for use in stage.uses:
        if use in entries and (ctx.build_dir / use).is_dir():
            upstream[use] = entries[use]["outputs_hash"]
    inputs = {"stage_version": stage.version, "upstream": upstream, **_load(stage.inputs)(ctx)}
    inputs_hash = sha256_json(inputs)

    previous = entries.get(stage.name)
    skip = False
    if previous and not forced and previous.get("inputs_hash") == inputs_hash:
        skip = _outputs_intact(ctx.build_dir, previous, stage.name)
        if not skip:
            log.warning("stage %s: output files are missing or corrupt; rebuilding", stage.name)
    ranks.share((inputs_hash, skip))
    if skip:
        # a kill between the manifest write and the scratch removal below leaves the scratch behind
        shutil.rmtree(ctx.build_dir / ".work" / stage.name, ignore_errors=True)
        ctx.reporter.stage(stage.name, "skipped", "inputs unchanged")
        return StageResult(stage.name, "skipped", 0.0, previous.get("metrics", {}))

    ctx.reporter.stage(stage.name, "running", stage.description)
    ctx.inputs_hash = inputs_hash
    started = time.time()
    final_dir = ctx.build_dir / stage.name
    with atomic_dir(final_dir) as tmp:
        metrics = _load(stage.run)(ctx, tmp) or {}
        atomic_write_json(tmp / "metrics.json", metrics)
        files = hash_tree(tmp)
    seconds = round(time.time() - started, 2)
    entries[stage.name] = {
        "inputs": inputs,
        "inputs_hash": inputs_hash,
        "files": files,
        "outputs_hash": sha256_json(files),
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": metrics,
    }
    # Downstream entries were built from the old output; they stay recorded but their inputs
    # hash no longer matches, so they rerun.
    atomic_write_json(ctx.build_dir / MANIFEST, manifest)
    shutil.rmtree(ctx.build_dir / ".work" / stage.name, ignore_errors=True)
    ranks.wait()
    ctx.reporter.stage(stage.name, "done", f"{seconds:.1f}s")
    return StageResult(stage.name, "ran", seconds, metrics)
