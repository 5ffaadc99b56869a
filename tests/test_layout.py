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


def _module_files() -> dict[str, Path]:
    """Every module of the distribution by its import name (vertical.export is export/, vertical.app is app/)."""
    found = {}
    for package, folder in {"vertical": ROOT / "vertical", "vertical.export": ROOT / "export",
                            "vertical.app": ROOT / "app"}.items():
        for file in folder.rglob("*.py"):
            parts = [p for p in file.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = file
    return found


def test_no_import_cycle_among_modules_counting_imports_inside_functions():
    files = _module_files()

    def owner(name: str) -> str | None:  # `from vertical.x import y` names module vertical.x.y or vertical.x
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, file in files.items():
        targets = {owner(f"{name}.{n}") if n else owner(name) for name, names, _ in _imports(file) for n in names or [""]}
        # a module may import its own package's __init__ (the package re-exports it)
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}

    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
