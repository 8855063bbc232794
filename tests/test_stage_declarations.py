"""dvc.yaml declares exactly the project code each stage runs, so that DVC re-runs a stage whenever code it
imports changes, and nothing else: every project module a stage imports, directly or through other
modules (imports inside functions included), is one of its deps, and every .py dep is imported.

The params sections are checked on a real run of each stage, in tests/test_pipeline.py
(test_every_stage_declares_the_params_sections_it_reads).
"""

from __future__ import annotations

import ast
from pathlib import Path

from ruamel.yaml import YAML

from bench.processes import stage_command

PROJECT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The project file a module name is, or None for a module from outside the project."""
    path = PROJECT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_project_files(module: str, found: dict[Path, str] | None = None, by: str = "dvc.yaml") -> dict[Path, str]:
    """Every project file `module` runs when imported: itself, the packages above it and, recursively,
    what it imports anywhere in its text; each with the file that first imports it."""
    found = {} if found is None else found
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        path = module_file(".".join(parts[:depth]))
        if path is None or path in found:
            continue
        found[path] = by
        for name in imported_names(path):
            imported_project_files(name, found, by=path.relative_to(PROJECT).as_posix())
    return found


def imported_names(path: Path) -> list[str]:
    """The absolute module names a file imports, `from x import y` giving both x and x.y (y may be a module)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the stages import absolutely"
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def dvc_stages() -> dict:
    return YAML(typ="safe", pure=True).load(PROJECT / "dvc.yaml")["stages"]


def test_every_stage_declares_the_project_modules_it_imports_and_no_others():
    problems = []
    for stage, spec in dvc_stages().items():
        command = stage_command(stage)
        assert command[:2] == ["python", "-m"], f"stage {stage}: expected `python -m <module> ...`, got {command}"
        imported = imported_project_files(command[2])
        declared = {PROJECT / dep for dep in spec.get("deps", []) if dep.endswith(".py")}
        for path in sorted(set(imported) - declared):
            problems.append(f"stage {stage} runs {path.relative_to(PROJECT)} (imported by {imported[path]}) "
                            "but dvc.yaml does not declare it in its deps")
        for path in sorted(declared - set(imported)):
            problems.append(f"stage {stage} declares {path.relative_to(PROJECT)} in its deps but does not import it")
    assert not problems, "\n".join(problems)


def test_the_import_walk_finds_imports_inside_functions(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("import json\n\ndef load():\n    from stages.models import build_model\n")
    assert imported_names(module) == ["json", "stages.models", "stages.models.build_model"]
