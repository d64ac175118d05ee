"""The package's architecture, checked: subpackages by role, and imports that flow one way.

cli -> callbacks -> training -> (models, data, metrics, runs, distributed) -> method. A module imports only from its
own subpackage and the layers below it; the method imports nothing of the project outside itself, and no Lightning.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "tpdiff_lightning"
LAYERS = {"cli": 4, "callbacks": 3, "training": 2, "models": 1, "data": 1, "metrics": 1, "runs": 1,
          "distributed": 1, "method": 0}


def imported_modules(source: str) -> list[str]:
    """Every module a source imports (absolute names; ``from . import x`` is not used in this project)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def subpackage(module: str) -> str | None:
    """``tpdiff_lightning.training.module`` -> ``training``; None outside the project or at its top."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tpdiff_lightning" and len(parts) > 1 and parts[1] in LAYERS else None


def violations(sources: dict[str, str]) -> list[str]:
    """Each import that runs against the layers, from ``{path relative to tpdiff_lightning/: source}``."""
    found = []
    for path, source in sources.items():
        home = Path(path).parts[0]
        if home not in LAYERS:
            continue
        for name in imported_modules(source):
            target = subpackage(name)
            if home == "method" and (name.split(".")[0] in ("lightning", "pytorch_lightning")):
                found.append(f"{path}: the method imports {name}")
            if target is None or target == home:
                continue
            if home == "method" or LAYERS[target] >= LAYERS[home]:
                found.append(f"{path} ({home}) imports {name} ({target})")
    return found


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_imports_flow_one_way():
    assert violations(package_sources()) == []


@pytest.mark.parametrize("path, line", [
    ("method/pyramid.py", "from tpdiff_lightning.data.frame_size import frame_size"),
    ("method/sampling.py", "import lightning as L"),
    ("training/module.py", "from tpdiff_lightning.callbacks.fvd_curve import FVDCurve"),
    ("runs/resume.py", "from tpdiff_lightning.training.module import TPDiffModule"),
    ("data/datamodule.py", "from tpdiff_lightning.runs.tensorboard import purge_step_of"),  # a peer of data
    ("callbacks/checkpoint.py", "import tpdiff_lightning.cli.main"),
])
def test_a_planted_upward_import_is_found(path, line):
    sources = package_sources()
    sources[path] = f"{line}\n{sources[path]}"
    assert [v for v in violations(sources) if v.startswith(path)], line


def test_the_package_top_holds_few_modules_and_every_role_has_its_subpackage():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS)
