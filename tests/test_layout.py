"""The layout holds: the import-linter contracts (a library below stages that never import each other), and dvc.yaml's
deps cover every file each stage really imports, so that `dvc repro` re-runs a stage whenever its code changes."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SRC = REPO / "src"
PACKAGE = SRC / "effnet"


def module_file(name: str) -> Path | None:
    """The file of module NAME (dotted, under effnet), or None when NAME is not a module (an attribute)."""
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_modules(path: Path) -> set[str]:
    """effnet modules PATH imports anywhere in its body (function-level imports included: they run too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "effnet"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "effnet":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def data_files(path: Path) -> set[Path]:
    """Files beside PATH that it names in a string (package data such as variants.yaml)."""
    names = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and 0 < len(n.value) < 100 and "/" not in n.value and "\n" not in n.value}
    return {path.parent / n for n in names if not n.endswith(".py") and (path.parent / n).is_file()}


def closure(module: str) -> set[Path]:
    """Every file of src/effnet that running MODULE reads as code or package data: its imports, transitively,
    with the `__init__.py` of each package on the way."""
    todo, files = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            init = module_file(".".join(parts[:i]))
            if init and init not in files:
                files.add(init)
        path = module_file(name)
        if path is None or path in files and name != module:
            continue
        files.add(path)
        files |= data_files(path)
        todo += [m for m in imported_modules(path) if module_file(m) not in files]
    return files


def stage_module(cmd: str) -> str:
    """dvc.yaml `cmd: effnet <stage> ...` -> effnet.stages.<stage>."""
    return "effnet.stages." + cmd.split()[1].replace("-", "_")


def dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_dvc_yaml_deps_cover_every_file_the_stage_imports(name):
    stage = dvc_stages()[name]
    deps = [REPO / d for d in stage["deps"] if isinstance(d, str) and not d.startswith("${")]
    covered = [p for p in deps if p.exists()]
    needed = closure(stage_module(stage["cmd"]))
    missing = sorted(str(f.relative_to(REPO)) for f in needed
                     if not any(f == d or d in f.parents for d in covered))
    assert not missing, f"dvc.yaml stage {name} misses deps: {missing}"


def test_closure_follows_imports_at_any_depth_and_package_data():
    files = {f.relative_to(PACKAGE).as_posix() for f in closure("effnet.stages.train")}
    assert {"__init__.py", "stages/__init__.py", "stages/train.py", "lightning.py", "models.py", "variants.py",
            "variants.yaml", "data/__init__.py", "data/feed.py", "data/datamodule.py", "data/train_stream.py",
            "data/gpu.py", "io.py"} <= files
    assert not {f for f in files if f.startswith("stages/") and f not in ("stages/__init__.py", "stages/train.py")}


def test_import_contracts_hold():
    """`lint-imports` (import-linter) with the contracts in pyproject.toml: layers, independent stages, a thin flow."""
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
