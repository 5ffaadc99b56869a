"""The tree reads as the pipeline: a stage imports only the shared layers, the torch-free runtime
and earlier stages' public names; the shared layers import no stage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["index", "tune", "edit", "distill", "export", "evaluate"]  # in pipeline order
FOLDERS = {stage: ROOT / "vertical" / stage for stage in STAGES} | {"export": ROOT / "export"}
# the bundle's torch-free runtime and the index format it reads: a layer below every stage
RUNTIME = {"vertical.export.runtime", "vertical.export.bundle", "vertical.index.store"}
ABOVE = {"cli.py", "pipeline.py", "__main__.py"}  # the CLI and the pipeline run the stages


def _imports(file: Path) -> list[tuple[str, list[str], int]]:
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vertical."):
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("vertical.")]
    return found


def _stage_of(module: str) -> str | None:
    if module in RUNTIME:
        return None
    part = module.split(".")[1]
    return part if part in STAGES else None


def test_stages_import_only_earlier_stages_public_names():
    problems = []
    for stage, folder in FOLDERS.items():
        for file in sorted(folder.glob("*.py")):
            for module, names, line in _imports(file):
                other = _stage_of(module)
                if other is None or other == stage:
                    continue
                where = f"{file.relative_to(ROOT)}:{line} imports {module}"
                if STAGES.index(other) > STAGES.index(stage):
                    problems.append(f"{where}: a later stage")
                private = [n for n in names if n.startswith("_")]
                if private:
                    problems.append(f"{where}: private names {private}")
    assert problems == []


def test_shared_layers_import_no_stage():
    shared = [f for f in (ROOT / "vertical").glob("*.py") if f.name not in ABOVE]
    shared += [f for sub in ("pack", "models") for f in (ROOT / "vertical" / sub).glob("*.py")]
    problems = [f"{file.relative_to(ROOT)}:{line} imports {module}"
                for file in shared for module, _, line in _imports(file) if _stage_of(module)]
    assert problems == []
